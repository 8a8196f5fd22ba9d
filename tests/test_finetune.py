"""train.py --init_from: a new run from a trained checkpoint (this port's or the original release's), its
vocabulary extended with the new data's words (every old row kept bit for bit, new rows initialised as the
original initialises them), its model options kept, a fresh optimizer; the checkpoint records its vocabulary."""

import os
import shutil

import numpy as np
import pytest
import torch

import evaluate_models
import train
from conftest import make_opt, shared_file
from model import VOCABULARY_ROWS, VSRN
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError
from vocab import (
    build_dataset_vocab,
    extend_vocab,
    load_vocab,
    load_vocab_by_name,
    save_vocab,
    vocab_digest,
    vocabulary_from_words,
)

RUN = ["--batch_size", "16", "--num_epochs", "1", "--workers", "0", "--seed", "3", "--device", "cpu", "--max_len", "20"]
NEW_WORDS = {"dog": "puppy", "cat": "kitten", "horse": "pony"}
SIZES = {"train": 24, "dev": 8, "test": 8}


@pytest.fixture
def domains(toy_data, tmp_path):
    """(data_path, vocab_path, checkpoint of toy_precomp without recorded words): toy_precomp and b_precomp,
    the same pictures described with three other words."""
    data_path, vocab_path = toy_data
    data = tmp_path / "data"
    for split, count in SIZES.items():  # the first images of the toy splits: quick epochs
        features = np.load(os.path.join(data_path, "toy_precomp", f"{split}_ims.npy"))[:count]
        lines = open(os.path.join(data_path, "toy_precomp", f"{split}_caps.txt")).readlines()[: 5 * count]
        text = "".join(lines)
        for name in ("toy_precomp", "b_precomp"):
            (data / name).mkdir(parents=True, exist_ok=True)
            np.save(data / name / f"{split}_ims.npy", features)
            (data / name / f"{split}_caps.txt").write_text(text)
            for old, new in NEW_WORDS.items():
                text = text.replace(f" {old} ", f" {new} ")
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    save_vocab(vocab, str(tmp_path / "vocab" / "toy_precomp_vocab.json"))
    torch.manual_seed(1)
    opt = make_opt(data_path=str(data), vocab_path=str(tmp_path / "vocab"), vocab_size=len(vocab), word_dim=12)
    model = VSRN(opt)
    state = {"model": model.state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab), "optimizer": {}}
    return str(data), str(tmp_path / "vocab"), save_checkpoint(state, False, str(tmp_path / "a_run"))


def fine_tune(domains, tmp_path, *more):
    data, vocab_path, checkpoint = domains
    argv = ["--data_path", data, "--data_name", "b_precomp", "--vocab_path", vocab_path, "--init_from", checkpoint]
    return train.main([*argv, "--logger_name", str(tmp_path / "b_run"), *RUN, *more])


def test_the_vocabulary_is_extended_and_every_old_row_kept_bit_for_bit(domains, tmp_path, capsys):
    data, vocab_path, checkpoint = domains
    assert fine_tune(domains, tmp_path, "--learning_rate", "0") == 0  # one epoch that changes no weight
    start, tuned = load_checkpoint(checkpoint), load_checkpoint(str(tmp_path / "b_run" / "checkpoint.pth.tar"))
    old = load_vocab(os.path.join(vocab_path, "toy_precomp_vocab.json"))
    new = extend_vocab(old, build_dataset_vocab(data, "b_precomp"))
    assert tuned["vocab_words"] == [new.idx2word[i] for i in range(len(new))]
    assert tuned["vocab_words"][: len(old)] == [old.idx2word[i] for i in range(len(old))]
    assert set(tuned["vocab_words"][len(old) :]) == set(NEW_WORDS.values())
    assert tuned["vocab_digest"] == vocab_digest(new) and tuned["opt"].vocab_size == len(new)
    # A model of the new vocabulary as the run built it (same seed) holds the original's initial new rows.
    torch.manual_seed(tuned["opt"].seed)
    fresh = VSRN(tuned["opt"]).state_dict()
    for part, (before, after, initial) in enumerate(zip(start["model"], tuned["model"], fresh)):
        name = ("img_enc", "txt_enc", "caption_model")[part]
        for key, value in before.items():
            if key in VOCABULARY_ROWS.get(name, ()):
                assert torch.equal(after[key][: len(old)], value), (name, key)  # old rows, bit for bit
                assert torch.equal(after[key][len(old) :], initial[key][len(old) :]), (name, key)
                assert after[key].shape[0] == len(new)
            elif "running" not in key and "num_batches" not in key:  # BatchNorm statistics move in training
                assert torch.equal(after[key], value), (name, key)
    assert tuned["Eiters"] == 8 and tuned["epoch"] == 1  # its own steps: 120 captions in batches of 16
    assert "3 words of the b_precomp captions appended" in capsys.readouterr().err


def test_the_model_options_come_from_the_checkpoint(domains, tmp_path, capsys):
    assert fine_tune(domains, tmp_path, "--word_dim", "12", "--learning_rate", "0.001") == 0
    tuned = load_checkpoint(str(tmp_path / "b_run" / "model_best.pth.tar"))
    assert tuned["opt"].embed_size == 32 and tuned["opt"].word_dim == 12 and tuned["opt"].img_dim == 32
    assert tuned["opt"].learning_rate == 0.001 and tuned["opt"].encoder_data_name == "toy_precomp"
    assert fine_tune(domains, tmp_path, "--logger_name", str(tmp_path / "c_run"), "--embed_size", "64") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: --embed_size 64 contradicts the 32 of {domains[2]}, which --init_from starts from; "
        "a fine-tuned model keeps its checkpoint's model options"
    )
    resume = ["--resume", str(tmp_path / "b_run" / "checkpoint.pth.tar")]
    assert train.main([*resume, "--init_from", domains[2]]) == 2
    assert (
        "--init_from starts a new run from a checkpoint's weights, --resume continues a run" in capsys.readouterr().err
    )


def test_a_fine_tuned_run_resumes_and_evaluates_without_a_vocabulary_file(domains, tmp_path, capsys):
    assert fine_tune(domains, tmp_path) == 0
    run_vocab = load_vocab(str(tmp_path / "b_run" / "b_precomp_vocab.json"))  # beside its checkpoints
    assert vocab_digest(run_vocab) == load_checkpoint(str(tmp_path / "b_run" / "model_best.pth.tar"))["vocab_digest"]
    shutil.rmtree(domains[1])  # the recorded words are all it needs
    os.remove(tmp_path / "b_run" / "b_precomp_vocab.json")
    assert train.main(["--resume", str(tmp_path / "b_run" / "checkpoint.pth.tar"), "--num_epochs", "2"]) == 0
    capsys.readouterr()
    best = str(tmp_path / "b_run" / "model_best.pth.tar")
    assert evaluate_models.main(["--data_path", domains[0], "--split", "test", best]) == 0
    assert "Images: 8, Captions: 40" in capsys.readouterr().out
    # The starting checkpoint on the new data, before fine-tuning (its vocabulary: unknown words as <unk>).
    words = load_checkpoint(best)["vocab_words"][: -len(NEW_WORDS)]
    save_vocab(vocabulary_from_words(words), os.path.join(domains[1], "toy_precomp_vocab.json"))
    assert (
        evaluate_models.main(
            ["--data_path", domains[0], "--data_name", "b_precomp", "--vocab_path", domains[1], domains[2]]
        )
        == 0
    )
    assert "Images: 8, Captions: 40" in capsys.readouterr().out


def test_start_from_an_original_release_checkpoint(tmp_path, capsys):
    checkpoint = shared_file("fixtures", "legacy_vsrn_f30k_tiny.pth.tar")
    vocab_pkl = shared_file("vocab", "f30k_precomp_vocab.pkl")
    old = load_vocab(vocab_pkl)
    folder = tmp_path / "data" / "mine_precomp"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = [old.idx2word[i] for i in range(4, 200)] + ["zyzzyva", "quokka"]
    for split, count in (("train", 8), ("dev", 4)):
        np.save(folder / f"{split}_ims.npy", rng.random((count, 36, 2048), dtype=np.float32))
        captions = [" ".join(rng.choice(words, size=8)) + " zyzzyva quokka" for _ in range(5 * count)]
        (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    (tmp_path / "vocab").mkdir()
    os.symlink(vocab_pkl, tmp_path / "vocab" / "f30k_precomp_vocab.pkl")
    argv = [
        "--data_path",
        str(tmp_path / "data"),
        "--data_name",
        "mine_precomp",
        "--vocab_path",
        str(tmp_path / "vocab"),
    ]
    argv += [
        "--init_from",
        checkpoint,
        "--logger_name",
        str(tmp_path / "run"),
        *RUN,
        "--batch_size",
        "8",
        "--learning_rate",
        "0",
    ]
    assert train.main(argv) == 0
    start, tuned = load_checkpoint(checkpoint), load_checkpoint(str(tmp_path / "run" / "checkpoint.pth.tar"))
    assert tuned["opt"].encoder_data_name == "f30k_precomp" and "bn.weight" in tuned["model"][0]  # its variant
    assert len(tuned["vocab_words"]) == len(old) + 2 and tuned["vocab_words"][-2:] in (
        ["zyzzyva", "quokka"],
        ["quokka", "zyzzyva"],
    )
    assert torch.equal(tuned["model"][1]["embed.weight"][: len(old)], start["model"][1]["embed.weight"])
    for key, value in start["model"][0].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(tuned["model"][0][key], value), key
    assert len(tuned["model"]) == 3  # a caption branch, started afresh (the release saved none)


def test_start_from_refuses_weights_that_do_not_fit(domains):
    start = load_checkpoint(domains[2])
    opt = start["opt"]
    opt.vocab_size += 2
    model = VSRN(opt)
    with pytest.raises(
        CheckpointError, match=r"txt_enc.embed.weight has shape \(\d+, 12\); its vocabulary of 10 words"
    ):
        model.start_from(start["model"], 10, "start.pth.tar")
