"""End to end: vocab.py -> train.py -> evalrank on generated toy data; resume; stop; errors."""

import contextlib
import os

import pytest
import torch

import train
import vocab as vocab_module
from evaluation import evalrank
from model import VSRN
from utils.checkpoint import load_checkpoint
from vocab import load_vocab_by_name, vocab_digest
from model import ContrastiveLoss
from conftest import ROOT, error_line
from toy_training import SMALL, TINY_MODEL, assert_same_weights, final_state, train_args, wait_for
import shlex
import shutil
import signal
import stat
import subprocess
import sys


@pytest.fixture
def toy_run(toy_data, tmp_path):
    """Arguments of a small training run on the toy data, writing into tmp_path/run."""
    data_path, vocab_path = toy_data

    def args(*extra, name="run"):
        return [
            "--data_path",
            data_path,
            "--vocab_path",
            vocab_path,
            "--logger_name",
            str(tmp_path / name),
            *SMALL,
            *extra,
        ]

    return args


@pytest.fixture
def recorded_losses(monkeypatch):
    losses = []
    original = VSRN.train_emb

    def train_emb(self, *batch):
        result = original(self, *batch)
        losses.append(result["Le"])
        return result

    monkeypatch.setattr(VSRN, "train_emb", train_emb)
    return losses


def test_vocab_train_evaluate_learns_well_above_chance(toy_data, tmp_path):
    data_path, _ = toy_data
    vocab_path = str(tmp_path / "vocab")
    assert (
        vocab_module.main(
            ["--data_path", data_path, "--data_name", "toy_precomp", "--vocab_path", vocab_path, "--threshold", "1"]
        )
        == 0
    )
    run = str(tmp_path / "run")
    args = ["--data_path", data_path, "--vocab_path", vocab_path, "--logger_name", run, *SMALL, "--num_epochs", "4"]
    assert train.main(args) == 0
    assert {"checkpoint.pth.tar", "model_best.pth.tar"} <= set(os.listdir(run))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run))
    metrics = evalrank(os.path.join(run, "model_best.pth.tar"), data_path=data_path, split="test")
    # 20 test images: chance is R@1 = 5% and R@10 = 50%.
    assert metrics["r1"] >= 20 and metrics["r1i"] >= 15 and metrics["r10"] >= 70 and metrics["r10i"] >= 70
    assert set(metrics) == {"r1", "r5", "r10", "medr", "meanr", "r1i", "r5i", "r10i", "medri", "meanri", "rsum"}
    assert os.path.isfile(os.path.join(run, "ranks.pth.tar"))
    checkpoint = final_state(run)
    assert checkpoint["epoch"] == 4 and checkpoint["next_epoch"] == 4 and checkpoint["Eiters"] == 4 * 25
    assert len(checkpoint["model"]) == 3


def test_same_seed_gives_identical_losses(toy_run, recorded_losses):
    assert train.main(toy_run("--num_epochs", "1", name="a")) == 0
    first = list(recorded_losses)
    recorded_losses.clear()
    assert train.main(toy_run("--num_epochs", "1", name="b")) == 0
    assert first == recorded_losses and len(first) == 25


def test_stop_mid_epoch_then_resume_equals_uninterrupted_run(toy_run, tmp_path, monkeypatch, recorded_losses):
    assert train.main(toy_run("--num_epochs", "2", "--val_step", "10", name="full")) == 0
    full_losses = list(recorded_losses)
    recorded_losses.clear()

    # Stop as a SIGTERM would, after iteration 13 (mid-epoch, not at a validation point).
    original = train.Trainer.train_epoch

    def train_epoch(self, epoch, start_batch):
        original_emb = self.model.train_emb

        def train_emb(*batch):
            result = original_emb(*batch)
            if self.model.Eiters == 13:
                self.stop.signal_name = "SIGTERM"
            return result

        self.model.train_emb = train_emb
        return original(self, epoch, start_batch)

    monkeypatch.setattr(train.Trainer, "train_epoch", train_epoch)
    assert train.main(toy_run("--num_epochs", "2", "--val_step", "10", name="split")) == 128 + 15  # SIGTERM
    monkeypatch.setattr(train.Trainer, "train_epoch", original)
    stopped = final_state(str(tmp_path / "split"))
    assert (stopped["Eiters"], stopped["next_epoch"], stopped["next_batch"]) == (13, 0, 13)
    # The checkpoint alone is enough: data, dimensions, seed and folder come from it.
    assert train.main(["--resume", str(tmp_path / "split" / "checkpoint.pth.tar")]) == 0
    assert recorded_losses == full_losses
    resumed, full = final_state(str(tmp_path / "split")), final_state(str(tmp_path / "full"))
    assert resumed["Eiters"] == full["Eiters"] == 50 and resumed["best_rsum"] == full["best_rsum"]
    assert_same_weights(resumed, full)
    assert resumed["optimizer"]["state"][0]["step"] == full["optimizer"]["state"][0]["step"]


def test_mid_epoch_resume_refuses_another_batch_size(toy_run, tmp_path, capsys, monkeypatch):
    def stop_after_three(self, epoch, start_batch):
        self.stop.signal_name = "SIGTERM"
        return original(self, epoch, start_batch)

    original = train.Trainer.train_epoch
    monkeypatch.setattr(train.Trainer, "train_epoch", stop_after_three)
    assert train.main(toy_run("--num_epochs", "2", name="bs")) == 143
    monkeypatch.setattr(train.Trainer, "train_epoch", original)
    assert final_state(str(tmp_path / "bs"))["next_batch"] == 1
    resume = ["--resume", str(tmp_path / "bs" / "checkpoint.pth.tar"), "--batch_size", "8"]
    assert train.main(toy_run("--num_epochs", "2", *resume, name="bs")) == 2
    assert "resume with the same batch size, not 8" in capsys.readouterr().err


@contextlib.contextmanager
def stopped_after_one_step():
    """Training stops (as on SIGTERM) after its first step, saving a checkpoint."""
    original = train.Trainer.train_epoch

    def train_epoch(self, epoch, start_batch):
        self.stop.signal_name = "SIGTERM"
        return original(self, epoch, start_batch)

    train.Trainer.train_epoch = train_epoch
    try:
        yield
    finally:
        train.Trainer.train_epoch = original


def first_caption_param(opt):
    """Index in the optimizer state of the caption branch's first parameter."""
    model = VSRN(opt, training=False)
    return sum(1 for module in (model.img_enc, model.txt_enc) for _ in module.parameters())


def test_resume_from_an_original_release_checkpoint(toy_run, tmp_path, capsys):
    assert train.main(toy_run("--num_epochs", "1", name="orig")) == 0
    ours = final_state(str(tmp_path / "orig"))
    caption = first_caption_param(ours["opt"])
    assert ours["optimizer"]["state"][caption]["step"] == 2 * 25 and ours["optimizer"]["state"][0]["step"] == 25
    legacy = {"epoch": 1, "model": ours["model"][:2], "best_rsum": 12.5, "opt": ours["opt"], "Eiters": 25}
    path = str(tmp_path / "legacy.pth.tar")
    torch.save(legacy, path, _use_new_zipfile_serialization=False)
    assert train.main(toy_run("--num_epochs", "2", "--resume", path, name="cont")) == 0
    resumed = final_state(str(tmp_path / "cont"))
    assert resumed["Eiters"] == 50 and resumed["epoch"] == 2 and resumed["best_rsum"] >= 12.5
    assert "counts as finished" not in capsys.readouterr().err
    # Saved by the original at a validation in the middle of epoch 0, recorded as epoch 1:
    # epoch 0 counts as finished and training goes on with epoch 1, as the checkpoint says.
    torch.save({**legacy, "Eiters": 13}, path, _use_new_zipfile_serialization=False)
    with stopped_after_one_step():
        assert train.main(toy_run("--num_epochs", "2", "--resume", path, name="mid")) == 143
    resumed = final_state(str(tmp_path / "mid"))
    assert (resumed["Eiters"], resumed["next_epoch"], resumed["next_batch"]) == (14, 1, 1)
    assert (
        "Eiters 13 is not a whole number of epochs of 25 batches: saved during epoch 0, which counts as finished; "
        "continuing with epoch 1" in capsys.readouterr().err
    )


def test_checkpoints_record_the_vocabulary_and_resume_keeps_their_caption_updates(toy_run, toy_data, tmp_path):
    with stopped_after_one_step():
        assert train.main(toy_run("--num_epochs", "1", "--caption_updates", "1", name="once")) == 143
    first = final_state(str(tmp_path / "once"))
    assert first["vocab_digest"] == vocab_digest(load_vocab_by_name(toy_data[1], "toy_precomp"))
    caption = first_caption_param(first["opt"])
    assert first["opt"].caption_updates == 1 and first["optimizer"]["state"][caption]["step"] == 1
    resume = ("--resume", str(tmp_path / "once" / "checkpoint.pth.tar"))
    with stopped_after_one_step():
        assert train.main(toy_run("--num_epochs", "1", *resume, name="once")) == 143  # resumes with the checkpoint's 1
    resumed = final_state(str(tmp_path / "once"))
    assert resumed["opt"].caption_updates == 1 and resumed["optimizer"]["state"][caption]["step"] == 2
    assert resumed["vocab_digest"] == first["vocab_digest"]


def test_evaluate_models_flags_run_an_ensemble(toy_run, toy_data, tmp_path, capsys):
    import evaluate_models

    data_path, vocab_path = toy_data
    assert train.main(toy_run("--num_epochs", "1", name="one")) == 0
    assert train.main(toy_run("--num_epochs", "1", "--seed", "2", name="two")) == 0
    paths = [str(tmp_path / name / "model_best.pth.tar") for name in ("one", "two")]
    capsys.readouterr()
    assert evaluate_models.main(["--data_path", data_path, "--vocab_path", vocab_path, "--split", "test", *paths]) == 0
    out = capsys.readouterr().out
    assert "Images: 20, Captions: 100" in out and "Image to text:" in out and "Text to image:" in out


def test_demo_preset_yields_to_explicit_flags():
    opt, _ = train.parse_options(["--demo", "--num_epochs", "1", "--embed_size", "64"])
    assert opt.demo and opt.data_name == "toy_precomp" and opt.num_epochs == 1 and opt.embed_size == 64
    assert opt.dim_vid == train.DEMO_PRESET["dim_vid"]
    assert train.parse_options([])[0].seed is not None


def test_demo_generates_data_and_vocabulary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "--demo",
        "--num_epochs",
        "1",
        "--img_dim",
        "32",
        "--embed_size",
        "32",
        "--dim_vid",
        "32",
        "--batch_size",
        "128",
    ]
    assert train.main(args) == 0
    assert os.path.isfile(tmp_path / "data" / "toy_precomp" / "train_ims.npy")
    assert os.path.isfile(tmp_path / "vocab" / "toy_precomp_vocab.json")
    out = capsys.readouterr().out
    assert "Image to text:" in out and "Text to image:" in out and "rsum:" in out


def start_training(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", VSRN_CACHE=str(tmp_path / "cache"))
    log = open(tmp_path / "train.log", "w")
    process = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return process, tmp_path / "train.log"


def lines_of_train_py(log_text):
    """The log less the warnings of multiprocessing's resource tracker (both lines of each name it): a
    process of its own that shares train.py's stderr and, on a loaded machine, can write after
    train.py's last line (seen once in CI, Python 3.11, after SIGINT)."""
    return [line for line in log_text.splitlines() if "resource_tracker" not in line]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_exits_zero(toy_data, tmp_path, signum):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    process, log = start_training(
        train_args(data_path, vocab_path, run, "--num_epochs", "2", "--workers", "1"), tmp_path
    )
    wait_for(log, "Epoch: [0][9/25]", process)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    text = log.read_text()
    name = signal.Signals(signum).name
    assert f"{name} received" in text and f"Stopped by {name} before the last epoch ended" in text
    hint = lines_of_train_py(text)[-1].strip()
    assert hint == f"python3 train.py --resume {run}/checkpoint.pth.tar" and "Traceback" not in text
    stopped = final_state(str(run))
    assert stopped["Eiters"] >= 10 and (stopped["next_epoch"], stopped["next_batch"]) != (0, 0)
    assert train.main(hint.split()[2:]) == 0
    assert final_state(str(run))["Eiters"] == 50


def test_kill_9_then_resume_reaches_the_uninterrupted_result(toy_data, tmp_path):
    data_path, vocab_path = toy_data
    args = ("--num_epochs", "2", "--val_step", "10")
    assert train.main(train_args(data_path, vocab_path, tmp_path / "full", *args)) == 0
    run = tmp_path / "killed"
    process, log = start_training(train_args(data_path, vocab_path, run, *args), tmp_path)
    wait_for(log, "Epoch: [0][14/25]", process)
    process.kill()
    process.wait()
    survived = load_checkpoint(str(run / "checkpoint.pth.tar"))  # complete despite the kill
    assert survived["Eiters"] in (10, 20, 25)
    resume = ("--resume", str(run / "checkpoint.pth.tar"))
    assert train.main(train_args(data_path, vocab_path, run, *args, *resume)) == 0
    resumed, full = final_state(str(run)), final_state(str(tmp_path / "full"))
    assert resumed["Eiters"] == full["Eiters"] == 50
    assert_same_weights(resumed, full)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(toy_data, tmp_path, monkeypatch, capsys):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    original = ContrastiveLoss.forward
    calls = []

    def forward(self, im, s):
        calls.append(1)
        loss = original(self, im, s)
        return loss * float("nan") if len(calls) == 12 else loss

    monkeypatch.setattr(ContrastiveLoss, "forward", forward)
    checkpoint = run / "checkpoint.pth.tar"
    saved = {}
    original_save = train.Trainer.save

    def save(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        saved["bytes"] = checkpoint.read_bytes()

    monkeypatch.setattr(train.Trainer, "save", save)
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1", "--val_step", "10")) == 1
    line = error_line(capsys)
    assert "training stopped: loss is not finite at iteration 12" in line and "is untouched" in line
    assert checkpoint.read_bytes() == saved["bytes"]
    assert load_checkpoint(str(checkpoint))["Eiters"] == 10


@pytest.mark.parametrize(
    "extra,expected",
    [
        (("--dim_vid", "16"), "--dim_vid 16 must equal --embed_size 32"),
        (("--data_name", "f30k"), "--data_name f30k: only precomputed features"),
        (("--data_name", "coco_precomp"), "/coco_precomp: dataset folder not found; expected coco_precomp/"),
        (
            ("--vocab_path", "/no/vocab"),
            "/no/vocab/toy_precomp_vocab.json: vocabulary not found (nor .pkl); build it with: python3 vocab.py",
        ),
        (("--resume", "nowhere.pth.tar"), "nowhere.pth.tar: checkpoint not found"),
        (("--device", "gpu"), "--device gpu: expected cpu or cuda"),
    ],
    ids=["dim-vid", "raw-images", "no-data", "no-vocab", "no-checkpoint", "device"],
)
def test_bad_flags_are_one_line_with_exit_code_2(toy_data, tmp_path, capsys, extra, expected):
    data_path, vocab_path = toy_data
    assert train.main(train_args(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1", *extra)) == 2
    assert expected in error_line(capsys)


def test_unwritable_logger_folder_is_one_line(toy_data, tmp_path, capsys):
    data_path, vocab_path = toy_data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main(train_args(data_path, vocab_path, blocker / "run", "--num_epochs", "1")) == 1
    assert "file/run" in error_line(capsys)


def stop_at_iteration(monkeypatch, iteration):
    """Make the run stop as a SIGTERM would, right after iteration `iteration`."""
    original = train.Trainer.train_epoch

    def train_epoch(self, epoch, start_batch):
        original_emb = self.model.train_emb

        def train_emb(*batch):
            result = original_emb(*batch)
            if self.model.Eiters == iteration:
                self.stop.signal_name = "SIGTERM"
            return result

        self.model.train_emb = train_emb
        return original(self, epoch, start_batch)

    monkeypatch.setattr(train.Trainer, "train_epoch", train_epoch)
    return lambda: monkeypatch.setattr(train.Trainer, "train_epoch", original)


def test_a_stop_in_the_last_epoch_is_not_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    restore = stop_at_iteration(monkeypatch, 10)  # the demo's toy train split has 40 batches per epoch
    assert train.main(["--demo", "--num_epochs", "1", *TINY_MODEL]) == 143
    restore()
    captured = capsys.readouterr()
    assert "Demo: recall" not in captured.out  # no evaluation of a stale model_best
    assert "Stopped by SIGTERM before the last epoch ended; the run is not complete" in captured.err
    hint = captured.err.strip().splitlines()[-1].strip()
    assert hint == "python3 train.py --resume runs/demo/checkpoint.pth.tar"
    assert train.main(shlex.split(hint)[2:]) == 0
    assert "Demo: recall of runs/demo/model_best.pth.tar" in capsys.readouterr().out
    assert final_state("runs/demo")["Eiters"] == 40


def test_resume_refuses_contradicting_flags_and_accepts_safe_ones(toy_data, tmp_path, monkeypatch, capsys):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    restore = stop_at_iteration(monkeypatch, 3)
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 143
    restore()
    checkpoint = str(run / "checkpoint.pth.tar")
    for flags, expected in (
        (["--embed_size", "64"], f"--embed_size 64 contradicts the checkpoint's 32 ({checkpoint})"),
        (["--seed", "7"], "--seed 7 contradicts the checkpoint's 1"),
        (["--max_violation"], "--max_violation True contradicts the checkpoint's False"),
    ):
        assert train.main(["--resume", checkpoint, *flags]) == 2
        assert expected in error_line(capsys)
    # Same values as recorded are fine; so are the safe overrides.
    opt, _ = train.parse_options(["--resume", checkpoint, "--embed_size", "32", "--num_epochs", "3", "--workers", "1"])
    assert (opt.embed_size, opt.num_epochs, opt.workers, opt.logger_name) == (32, 3, 1, str(run))
    assert opt.data_path == data_path and opt.seed == 1 and opt.resume == checkpoint


def test_demo_resume_of_another_run_writes_into_that_run(toy_data, tmp_path, monkeypatch):
    data_path, vocab_path = toy_data
    other = tmp_path / "other"
    restore = stop_at_iteration(monkeypatch, 3)
    assert train.main(train_args(data_path, vocab_path, other, "--num_epochs", "1")) == 143
    restore()
    monkeypatch.chdir(tmp_path)
    assert train.main(["--resume", str(other / "checkpoint.pth.tar"), "--demo"]) == 2  # not a demo run
    assert train.main(["--resume", str(other / "checkpoint.pth.tar")]) == 0
    assert not (tmp_path / "runs").exists() and final_state(str(other))["Eiters"] == 25


def test_a_new_run_never_overwrites_a_folder_holding_a_run(toy_data, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 0
    before = (run / "checkpoint.pth.tar").read_bytes()
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 2
    assert (
        f"{run} already holds a run; continue it with `python3 train.py --resume {run}/checkpoint.pth.tar`"
        in error_line(capsys)
    )
    assert (run / "checkpoint.pth.tar").read_bytes() == before
    # Resuming a checkpoint into a folder that holds another run is refused too.
    assert train.main(train_args(data_path, vocab_path, tmp_path / "b", "--num_epochs", "1")) == 0
    assert train.main(["--resume", str(tmp_path / "b" / "checkpoint.pth.tar"), "--logger_name", str(run)]) == 2
    assert "holds another run's checkpoint.pth.tar" in error_line(capsys)
    # The demo, which users rerun as is, moves on to the next free folder instead.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model_best.pth.tar").write_bytes(b"an earlier demo")
    opt, _ = train.parse_options(["--demo"])
    assert opt.logger_name == "runs/demo_2"


@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_written_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("VSRN_CACHE", str(cache))
    with umask(0o027):
        assert train.main(["--demo", "--num_epochs", "1", *TINY_MODEL]) == 0
    written = [
        "runs/demo/checkpoint.pth.tar",
        "runs/demo/model_best.pth.tar",
        "runs/demo/ranks.pth.tar",
        "vocab/toy_precomp_vocab.json",
        "data/toy_precomp/train_ims.npy",
        "data/toy_precomp/test_caps.txt",
    ] + [str(p) for p in cache.iterdir()]
    assert len(written) > 6
    for path in written:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, path


def test_a_missing_data_folder_is_named_before_the_vocabulary(tmp_path, capsys, monkeypatch):
    assert (
        train.main(
            [
                "--data_path",
                str(tmp_path / "nowhere"),
                "--data_name",
                "f30k_precomp",
                "--logger_name",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    line = error_line(capsys)
    assert f"{tmp_path}/nowhere/f30k_precomp: dataset folder not found" in line and "--data_path" in line
    monkeypatch.chdir(tmp_path)
    opt, _ = train.parse_options(["--demo", "--data_path", str(tmp_path / "elsewhere"), "--num_epochs", "1"])
    with pytest.MonkeyPatch.context() as patch:
        messages = []
        patch.setattr(train.logging, "info", lambda msg, *args: messages.append(msg % args))
        train.prepare_demo(opt)
    assert f"Writing the toy dataset to {tmp_path}/elsewhere/toy_precomp" in messages


def test_the_demo_on_other_data_names_that_data(toy_data, tmp_path, monkeypatch, capsys):
    data_path, vocab_path = toy_data
    shutil.copytree(os.path.join(data_path, "toy_precomp"), tmp_path / "data" / "mine_precomp")
    shutil.copy(os.path.join(vocab_path, "toy_precomp_vocab.json"), tmp_path / "mine_precomp_vocab.json")
    monkeypatch.chdir(tmp_path)
    assert (
        train.main(["--demo", "--data_name", "mine_precomp", "--vocab_path", ".", "--num_epochs", "1", *TINY_MODEL])
        == 0
    )
    out = capsys.readouterr().out
    assert "Demo: recall of runs/demo/model_best.pth.tar on the test split of data/mine_precomp\n" in out
    assert "toy" not in out
