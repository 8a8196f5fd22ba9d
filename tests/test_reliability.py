"""Crash safety, signals, NaN, determinism across resume, and one-line errors for bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import evaluate_models
import train
from conftest import ROOT
from model import ContrastiveLoss
from test_train import SMALL, assert_same_weights, final_state
from utils.checkpoint import load_checkpoint
from vocab import load_vocab, save_vocab, vocabulary_from_words


@pytest.fixture
def toy_copy(toy_data, tmp_path):
    """A private copy of the toy dataset to corrupt: (data_path, vocab_path, folder)."""
    data_path, vocab_path = toy_data
    copy = tmp_path / "data"
    shutil.copytree(data_path, copy)
    return str(copy), vocab_path, str(copy / "toy_precomp")


def train_args(data_path, vocab_path, run, *extra):
    return ["--data_path", data_path, "--vocab_path", vocab_path, "--logger_name", str(run), *SMALL, *extra]


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def start_training(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", VSRN_CACHE=str(tmp_path / "cache"))
    log = open(tmp_path / "train.log", "w")
    process = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return process, tmp_path / "train.log"


def wait_for(log_path, text, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log_path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"exited early:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"'{text}' not logged in {timeout}s:\n{log_path.read_text()}")


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
    hint = text.splitlines()[-1].strip()
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
    "corrupt,expected",
    [
        (lambda f: os.remove(f"{f}/train_ims.npy"), "train_ims.npy: not found; expected the precomputed layout"),
        (lambda f: _drop_last_caption(f"{f}/train_caps.txt"), "train_caps.txt: 399 captions for the 80 images"),
        (
            lambda f: np.save(f"{f}/train_ims.npy", np.zeros((80, 32), np.float32)),
            "expected 3-D (num_images, regions, img_dim)",
        ),
        (
            lambda f: np.save(f"{f}/train_ims.npy", np.zeros((80, 36, 16), np.float32)),
            "16 dims per region; --img_dim is 32",
        ),
        (lambda f: _replace_line(f"{f}/train_caps.txt", 7, b"a caf\xe9"), "train_caps.txt: line 7 is not UTF-8 text"),
    ],
    ids=["missing-split", "caption-count", "feature-rank", "img-dim", "not-utf8"],
)
def test_bad_data_is_one_line_with_exit_code_2(toy_copy, tmp_path, capsys, corrupt, expected):
    data_path, vocab_path, folder = toy_copy
    corrupt(folder)
    assert train.main(train_args(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1")) == 2
    assert expected in error_line(capsys)


def _drop_last_caption(path):
    lines = open(path, "rb").read().splitlines(keepends=True)
    open(path, "wb").write(b"".join(lines[:-1]))


def _replace_line(path, number, content):
    lines = open(path, "rb").read().split(b"\n")
    lines[number - 1] = content
    open(path, "wb").write(b"\n".join(lines))


def test_nan_features_in_a_worker_name_split_and_index(toy_copy, tmp_path, capsys):
    data_path, vocab_path, folder = toy_copy
    features = np.load(f"{folder}/train_ims.npy")
    features[17, 3, 5] = np.inf
    np.save(f"{folder}/train_ims.npy", features)
    assert train.main(train_args(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1", "--workers", "1")) == 2
    line = error_line(capsys)
    assert "train_ims.npy: NaN or Inf in the features of image 17 (train split, caption index 8" in line


def test_empty_caption_lines_warn_and_training_goes_on(toy_copy, tmp_path):
    data_path, vocab_path, folder = toy_copy
    _replace_line(f"{folder}/train_caps.txt", 3, b"")
    with pytest.warns(UserWarning, match="1 empty caption line"):
        assert train.main(train_args(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1")) == 0


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


@pytest.fixture
def trained(toy_data, tmp_path_factory):
    data_path, vocab_path = toy_data
    run = tmp_path_factory.mktemp("trained")
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 0
    return str(run / "model_best.pth.tar")


def test_checkpoint_vocabulary_mismatch(toy_data, trained, tmp_path, capsys):
    # Same size, words in another order: the case that size checks cannot catch.
    data_path, vocab_path = toy_data
    words = load_vocab(os.path.join(vocab_path, "toy_precomp_vocab.json")).idx2word
    permuted = [words[i] for i in range(4)] + [words[i] for i in reversed(range(4, len(words)))]
    other = tmp_path / "vocab"
    save_vocab(vocabulary_from_words(permuted), str(other / "toy_precomp_vocab.json"))
    assert evaluate_models.main(["--data_path", data_path, "--vocab_path", str(other), trained]) == 2
    line = error_line(capsys)
    assert f"{trained}: trained with another vocabulary" in line and str(other / "toy_precomp_vocab.json") in line
    resume = ("--resume", trained)
    assert train.main(train_args(data_path, str(other), tmp_path / "run", "--num_epochs", "2", *resume)) == 2
    line = error_line(capsys)
    assert f"{trained}: trained with another vocabulary" in line and str(other / "toy_precomp_vocab.json") in line


def test_evaluate_models_blocks_honour_their_vocab_path(toy_data, trained, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = toy_data
    words = load_vocab(os.path.join(vocab_path, "toy_precomp_vocab.json")).idx2word
    other = tmp_path / "vocab"
    save_vocab(
        vocabulary_from_words([words[i] for i in range(4)] + [words[i] for i in reversed(range(4, len(words)))]),
        str(other / "toy_precomp_vocab.json"),
    )
    block = dict(model_paths=(trained,), data_path=data_path, vocab_path=str(other), split="test", fold5=False)
    monkeypatch.setattr(evaluate_models, "RUN", [block])
    assert evaluate_models.main([]) == 2  # the block's vocabulary is read, and it is not the checkpoint's
    line = error_line(capsys)
    assert f"{trained}: trained with another vocabulary" in line and str(other / "toy_precomp_vocab.json") in line
    assert evaluate_models.main(["--vocab_path", vocab_path]) == 0  # the flag overrides the block
    assert "rsum:" in capsys.readouterr().out
    monkeypatch.setattr(evaluate_models, "RUN", [dict(block, vocab=vocab_path)])
    assert evaluate_models.main([]) == 2
    assert error_line(capsys) == (
        "error: evaluate_models.py: a block has the unknown key(s) vocab; "
        "its keys are model_paths, data_path, vocab_path, split, fold5"
    )


def test_evaluation_split_checks(toy_copy, trained, capsys):
    data_path, vocab_path, folder = toy_copy
    assert (
        evaluate_models.main(
            ["--data_path", data_path, "--vocab_path", vocab_path, "--fold5", "--split", "test", trained]
        )
        == 2
    )
    assert "fold5 needs 5 folds of 5000 captions; the test split of toy_precomp has 100" in error_line(capsys)
    np.save(f"{folder}/test_ims.npy", np.load(f"{folder}/test_ims.npy")[:19])
    _drop_last_caption(f"{folder}/test_caps.txt")
    lines = open(f"{folder}/test_caps.txt").read().splitlines()
    # 19 images of one caption each are ranked (each against its own); 20 captions for 19 images are refused.
    open(f"{folder}/test_caps.txt", "w").write("\n".join(lines[:20]) + "\n")
    assert evaluate_models.main(["--data_path", data_path, "--vocab_path", vocab_path, "--split", "test", trained]) == 2
    assert "test_caps.txt: 20 captions for the 19 images of test_ims.npy; expected 5 captions per image" in error_line(
        capsys
    )


def test_unwritable_logger_folder_is_one_line(toy_data, tmp_path, capsys):
    data_path, vocab_path = toy_data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main(train_args(data_path, vocab_path, blocker / "run", "--num_epochs", "1")) == 1
    assert "file/run" in error_line(capsys)
