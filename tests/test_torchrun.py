"""train.py under torchrun (gloo, 2 processes): a failing process, SIGTERM and kill -9 on the launcher."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from conftest import ROOT
from data import GlobalBatchShareSampler, PrecompDataset
from toy_training import SMALL, final_state, install_probes, wait_for
from utils.checkpoint import load_checkpoint
from vocab import load_vocab_by_name

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]


def args_for(data_path, vocab_path, run, *extra):
    return [
        "--data_path",
        data_path,
        "--vocab_path",
        vocab_path,
        "--logger_name",
        str(run),
        *SMALL,
        "--input_dropout_p",
        "0",
        *extra,
    ]


def start_torchrun(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", VSRN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    log = open(tmp_path / "torchrun.log", "w")
    process = subprocess.Popen([*TORCHRUN, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, tmp_path / "torchrun.log"


def workers_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_a_failing_process_ends_the_job_with_its_message(toy_copy, tmp_path):  # noqa: F811
    data_path, vocab_path, folder = toy_copy
    # An image whose captions in the first global batch all fall in rank 1's share: rank 1 alone fails.
    opt, _ = train.parse_options(args_for(data_path, vocab_path, tmp_path / "run"))
    dataset = PrecompDataset(
        folder, "train", load_vocab_by_name(vocab_path, "toy_precomp", data_path), opt.max_len, opt.img_dim
    )
    lengths = np.diff(dataset.offsets)
    shares = [list(GlobalBatchShareSampler(len(dataset), opt.seed, lengths, 16, rank, 2))[:8] for rank in (0, 1)]
    image = next(i // 5 for i in shares[1] if all(j // 5 != i // 5 for j in shares[0]))
    features = np.load(f"{folder}/train_ims.npy")
    features[image, 0, 0] = np.nan
    np.save(f"{folder}/train_ims.npy", features)

    start = time.time()
    process, log = start_torchrun(args_for(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1"), tmp_path)
    assert process.wait(timeout=180) != 0
    assert time.time() - start < 120  # ended, not hung
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert f"error: {folder}/train_ims.npy: NaN or Inf in the features of image {image} (train split" in errors[0]
    assert not any("NaN or Inf" in line for line in errors[1:])  # rank 0 did not fail on its own
    assert "rank      : 1" in text.split("Root Cause")[1]  # torchrun names rank 1 as the first failure


def test_sigterm_to_torchrun_stops_both_at_one_step_and_one_process_resumes(
    toy_data,
    tmp_path,
    monkeypatch,
    one_thread,
):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    args = args_for(data_path, vocab_path, run, "--num_epochs", "2", "--log_step", "1")
    process, log = start_torchrun(args, tmp_path)
    wait_for(log, "Epoch: [0][5/25]", process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)  # torchrun itself reports the signal and exits non-zero
    text = log.read_text()
    assert "Stopped by SIGTERM before the last epoch ended" in text
    assert f"python3 train.py --resume {run}/checkpoint.pth.tar" in text
    assert "Traceback" not in text.split("Stopped by SIGTERM")[0]  # the training processes ended cleanly
    stopped = final_state(str(run))
    assert stopped["next_epoch"] == 0 and stopped["Eiters"] == stopped["next_batch"] >= 6
    assert len(stopped["rng_ranks"]) == 2

    # BatchNorm active: the first step's logged loss is one process's (the GCN BatchNorm starts at zero).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    first = {tag: events.Scalars(tag)[0] for tag in ("Le", "Le_retrieval", "Le_caption")}
    single = {}
    install_probes(monkeypatch.setattr, single, frozen_bn=False, stop_at=1)
    assert (
        train.main(args_for(data_path, vocab_path, tmp_path / "single", "--num_epochs", "2")) == 143
    )  # the probe's stop
    for tag, event in first.items():
        assert event.step == 1 and event.value == pytest.approx(single["losses"][0][tag], rel=1e-6)

    # One process resumes the two processes' checkpoint to the end.
    resume = ("--resume", str(run / "checkpoint.pth.tar"))
    single["losses"] = []  # the probe's SIGTERM came after step 1, which lies behind
    assert train.main(args_for(data_path, vocab_path, run, "--num_epochs", "2", *resume)) == 0
    assert final_state(str(run))["Eiters"] == 50 and len(single["losses"]) == 50 - stopped["Eiters"]


def test_kill_9_on_torchrun_ends_its_processes_and_the_checkpoint_resumes(toy_data, tmp_path, one_thread):  # noqa: F811
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    args = args_for(data_path, vocab_path, run, "--num_epochs", "2", "--val_step", "10")
    process, log = start_torchrun(args, tmp_path)
    wait_for(log, "Epoch: [0][14/25]", process)
    workers = workers_of(process.pid)
    assert len(workers) == 2
    process.kill()
    process.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)  # they did not train on unseen
    survived = load_checkpoint(str(run / "checkpoint.pth.tar"))
    assert survived["Eiters"] in (10, 20, 25)
    resume = ("--resume", str(run / "checkpoint.pth.tar"))
    assert train.main(args_for(data_path, vocab_path, run, "--num_epochs", "2", *resume)) == 0
    assert final_state(str(run))["Eiters"] == 50
