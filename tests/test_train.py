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

SMALL = [
    "--data_name",
    "toy_precomp",
    "--img_dim",
    "32",
    "--embed_size",
    "32",
    "--dim_vid",
    "32",
    "--word_dim",
    "16",
    "--dim_hidden",
    "16",
    "--dim_word",
    "16",
    "--max_len",
    "20",
    "--batch_size",
    "16",
    "--workers",
    "0",
    "--learning_rate",
    "0.002",
    "--log_step",
    "5",
    "--seed",
    "1",
]


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


def final_state(folder):
    return load_checkpoint(os.path.join(folder, "checkpoint.pth.tar"))


def assert_same_weights(a, b):
    for part_a, part_b in zip(a["model"], b["model"]):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert torch.equal(part_a[key], part_b[key]), key


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
