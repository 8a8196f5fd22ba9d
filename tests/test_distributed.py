"""Data-parallel training (gloo, 2 processes spawned here) against one process on the same global batches."""

import os
import socket
import sys

import pytest
import torch
from torch import nn

import train
from conftest import make_opt
from data import EpochShuffleSampler, GlobalBatchShareSampler, share_sizes
from model import VSRN
from toy_training import SMALL, final_state
from utils import distributed
from utils.device import configure_backends
from utils.errors import OptionError
from toy_training import install_probes

# 81 images, 405 captions: 25 global batches of 16 and a last one of 5, split 3 + 2.
TRAIN_IMAGES = 81
STEPS = 26
STOP_AT = 13


@pytest.fixture(scope="module")
def odd_toy(tmp_path_factory):
    from utils.captions import read_captions
    from utils.make_toy_data import make_toy_data
    from vocab import build_vocab, save_vocab

    root = tmp_path_factory.mktemp("odd_toy")
    folder = make_toy_data(str(root / "data"), img_dim=32, sizes={"train": TRAIN_IMAGES, "dev": 20, "test": 20})
    captions = [c for split in ("train", "dev") for c in read_captions(os.path.join(folder, f"{split}_caps.txt"))]
    save_vocab(build_vocab(captions, threshold=1), str(root / "vocab" / "toy_precomp_vocab.json"))
    return str(root / "data"), str(root / "vocab")


def run_args(odd_toy, run, *extra):
    data_path, vocab_path = odd_toy
    # No dropout: its masks cannot be split across processes as one process draws them.
    return [
        "--data_path",
        data_path,
        "--vocab_path",
        vocab_path,
        "--logger_name",
        str(run),
        *SMALL,
        "--num_epochs",
        "1",
        "--val_step",
        "10",
        "--input_dropout_p",
        "0",
        *extra,
    ]


def _worker(rank, world_size, port, args, out, frozen_bn, stop_rank, stop_at):
    """One process of the job, launched as torchrun would: the environment, then train.main."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    log = open(os.path.join(out, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = os.fdopen(1, "w", buffering=1), os.fdopen(2, "w", buffering=1)
    records = {}
    install_probes(setattr, records, frozen_bn, stop_at if rank == stop_rank else None)
    records["code"] = train.main(args)
    torch.save(records, os.path.join(out, f"rank{rank}.pt"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, out, world_size=2, frozen_bn=True, stop_rank=None, stop_at=None):
    os.makedirs(out, exist_ok=True)
    torch.multiprocessing.start_processes(
        _worker,
        args=(world_size, free_port(), args, str(out), frozen_bn, stop_rank, stop_at),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def assert_losses_close(actual, expected):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        for key in ("Le_retrieval", "Le_caption", "Le"):
            assert a[key] == pytest.approx(e[key], rel=1e-5, abs=1e-5), (step, key)


def assert_weights_close(a, b):
    for part_a, part_b in zip(a["model"], b["model"]):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            torch.testing.assert_close(part_a[key].float(), part_b[key].float(), rtol=1e-5, atol=1e-5, msg=key)


def test_two_processes_train_as_one_stop_together_and_resume_as_one(odd_toy, tmp_path, monkeypatch, one_thread):
    reference = {}
    install_probes(monkeypatch.setattr, reference, frozen_bn=True)
    assert train.main(run_args(odd_toy, tmp_path / "one")) == 0
    assert len(reference["losses"]) == STEPS

    # Two processes; SIGTERM reaches rank 1 alone, after step 13: both stop there.
    rank0, rank1 = spawn(run_args(odd_toy, tmp_path / "two"), tmp_path / "out", stop_rank=1, stop_at=STOP_AT)
    assert rank0["code"] == rank1["code"] == 128 + 15  # stopped by SIGTERM: not complete
    assert rank0["losses"] == rank1["losses"]  # the global batch's, on every process
    assert_losses_close(rank0["losses"], reference["losses"][:STOP_AT])
    # Gradients before clipping: the global batch's, not twice them nor half.
    for ours, theirs in zip(rank0["grads"], reference["grads"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

    # Rank 0 alone writes: the checkpoint at step 10 and the one at the stop, one TensorBoard file, the log.
    assert (rank0["saves"], rank1["saves"]) == (2, 0)
    assert sum(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "two")) == 1
    logs = [(tmp_path / "out" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert "Epoch: [0][9/26]" in logs[0] and "Image to text" in logs[0]
    assert "Epoch:" not in logs[1] and "Image to text" not in logs[1] and "Traceback" not in logs[1]
    stopped = final_state(str(tmp_path / "two"))
    assert (stopped["Eiters"], stopped["next_epoch"], stopped["next_batch"]) == (STOP_AT, 0, STOP_AT)
    assert len(stopped["rng_ranks"]) == 2

    # Resumed by one process, the run ends as the single-process one did.
    reference_losses, reference["losses"] = reference["losses"], []
    resume = ("--resume", str(tmp_path / "two" / "checkpoint.pth.tar"))
    assert train.main(run_args(odd_toy, tmp_path / "two", *resume)) == 0
    assert_losses_close(reference["losses"], reference_losses[STOP_AT:])
    assert_weights_close(final_state(str(tmp_path / "two")), final_state(str(tmp_path / "one")))


@pytest.fixture(scope="module")
def f30k_two_short(tmp_path_factory):
    """A Flickr30K-named toy set (the variant with the final BatchNorm) of 50 training
    captions: 3 global batches of 16 and a last one of 2, one caption per process."""
    from utils.captions import read_captions
    from utils.make_toy_data import make_toy_data
    from vocab import build_vocab, save_vocab

    root = tmp_path_factory.mktemp("f30k")
    folder = make_toy_data(str(root / "data"), name="f30k_precomp", img_dim=32, sizes={"train": 10, "dev": 10})
    captions = [c for split in ("train", "dev") for c in read_captions(os.path.join(folder, f"{split}_caps.txt"))]
    save_vocab(build_vocab(captions, threshold=1), str(root / "vocab" / "f30k_precomp_vocab.json"))
    return str(root / "data"), str(root / "vocab")


def test_batchnorm_statistics_are_the_global_batchs_on_the_cpu_down_to_one_sample_per_process(
    f30k_two_short, tmp_path, monkeypatch, one_thread
):
    args = ("--data_name", "f30k_precomp", "--val_step", "100")
    reference = {}
    install_probes(monkeypatch.setattr, reference, frozen_bn=False)
    assert train.main(run_args(f30k_two_short, tmp_path / "one", *args)) == 0
    rank0, rank1 = spawn(run_args(f30k_two_short, tmp_path / "two", *args), tmp_path / "out", frozen_bn=False)
    assert rank0["code"] == rank1["code"] == 0, (tmp_path / "out" / "rank1.log").read_text()[-2000:]
    assert len(rank0["losses"]) == 4
    assert_losses_close(rank0["losses"], reference["losses"])
    two, one = (final_state(str(tmp_path / run))["model"][0] for run in ("two", "one"))
    # The final BatchNorm's running statistics, the last step's taken over 2 captions.
    for key in ("bn.running_mean", "bn.running_var", "bn.weight", "bn.num_batches_tracked"):
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    # Everywhere else to 1e-4: the GCN convolutions' biases feed a BatchNorm, which cancels
    # them, so their gradient is zero but for rounding, and Adam's normalised steps on that
    # rounding differ between the two runs by up to 3e-5.
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-4, atol=1e-4, msg=key)


class SyncBatchNormWorld(distributed.SingleProcess):
    """One process whose model gets SyncBatchNorm, as on GPUs under torchrun (without a
    process group it normalises as BatchNorm)."""

    def wrap(self, module):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def test_compile_leaves_an_encoder_holding_sync_batchnorm_uncompiled(toy_data, tmp_path, monkeypatch):
    compiled, models = [], []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))
    distribute = VSRN.distribute
    monkeypatch.setattr(VSRN, "distribute", lambda self, world: (models.append(self), distribute(self, world)))
    data_path, vocab_path = toy_data
    opt, _ = train.parse_options(
        [
            "--data_path",
            data_path,
            "--vocab_path",
            vocab_path,
            "--logger_name",
            str(tmp_path / "run"),
            *SMALL,
            "--num_epochs",
            "1",
            "--val_step",
            "1000",
            "--compile",
        ]
    )
    assert train.run(opt, None, SyncBatchNormWorld()) == 0
    (model,) = models
    assert any(isinstance(layer, nn.SyncBatchNorm) for layer in model.img_enc.modules())
    assert compiled == [model.txt_enc]
    # One process: both encoders.
    compiled.clear()
    model = VSRN(make_opt(), training=False)
    train.compile_encoders(model)
    assert compiled == [model.img_enc, model.txt_enc]


def test_shares_are_the_single_process_batches_in_rank_order():
    generator = torch.Generator().manual_seed(0)
    length, batch_size = 103, 12
    caption_lengths = torch.randint(3, 8, (length,), generator=generator).tolist()  # many ties
    single = EpochShuffleSampler(length, seed=5)
    for world_size in (2, 3, 4):
        for epoch, start_batch in ((0, 0), (1, 4)):
            single.set_epoch(epoch, start_batch * batch_size)
            order = list(single)
            expected = [
                sorted(order[i : i + batch_size], key=caption_lengths.__getitem__, reverse=True)
                for i in range(0, len(order), batch_size)
            ]
            shares = []
            for rank in range(world_size):
                sampler = GlobalBatchShareSampler(length, 5, caption_lengths, batch_size, rank, world_size)
                sampler.set_epoch(epoch, start_batch * batch_size)
                indices = list(sampler)
                assert len(indices) == len(sampler)
                local = batch_size // world_size
                shares.append([indices[i : i + local] for i in range(0, len(indices), local)])
            assert [sum((s[b] for s in shares), []) for b in range(len(expected))] == expected


def test_share_sizes():
    assert share_sizes(16, 2) == [8, 8]
    assert share_sizes(7, 3) == [3, 2, 2]


def test_global_batch_rules_are_one_line_errors(monkeypatch):
    with pytest.raises(OptionError, match="the last batch of each epoch holds 1 of the 25 training captions"):
        GlobalBatchShareSampler(25, 0, [3] * 25, 12, 0, 2)
    monkeypatch.setattr(
        os,
        "environ",
        dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
    )
    with pytest.raises(
        OptionError, match="--batch_size 15 is the global batch and must divide evenly among the 2 processes"
    ):
        distributed.init_world(15)
    os.environ["WORLD_SIZE"] = "two"
    with pytest.raises(
        distributed.DistributedError, match="environment variable WORLD_SIZE='two': expected an integer"
    ):
        distributed.init_world(16)
    with pytest.raises(
        OptionError, match="--device cuda:1: under torchrun each process uses the GPU of its LOCAL_RANK"
    ):
        distributed._device("cuda:1", 0)
    if torch.cuda.device_count() < 8:
        with pytest.raises(OptionError, match="LOCAL_RANK 7 needs GPU cuda:7, but this node has"):
            distributed._device("cuda", 7)


def test_without_a_launcher_there_is_no_process_group(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_world(16) is distributed.SINGLE_PROCESS
    assert not torch.distributed.is_initialized()


def test_float32_on_cuda_unless_tf32():
    # PyTorch's own default lets cuDNN (the GRUs) use TF32; the faithful default must not.
    # (Set and restored by hand: these switches are properties that monkeypatch cannot undo.)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        configure_backends(tf32=False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        configure_backends(tf32=True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
