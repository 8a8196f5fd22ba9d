import argparse
import importlib
import os
import random
import re
import zipfile

import pytest
import torch

from conftest import CreatesFile, error_line, make_opt, shared_file
from inference import load_checkpoint_vocab
from utils import checkpoint as checkpoint_module
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError
from inference import load_models
import shutil
from inference import vocabulary_folder


def test_original_release_checkpoint_loads_safely_with_defaults_filled_in():
    checkpoint = load_checkpoint(shared_file("fixtures", "legacy_vsrn_f30k_tiny.pth.tar"))
    assert checkpoint["epoch"] == 17 and checkpoint["Eiters"] == 20000 and checkpoint["best_rsum"] == 480.0
    opt = checkpoint["opt"]
    assert isinstance(opt, argparse.Namespace)
    assert opt.embed_size == 64 and opt.vocab_size == 8481 and opt.data_name == "f30k_precomp"
    assert opt.seed is None and opt.amp is False  # options the original lacked take today's defaults
    assert len(checkpoint["model"]) == 2


def test_round_trip_of_our_checkpoint(tmp_path):
    state = {
        "epoch": 1,
        "model": [{"w": torch.ones(2)}],
        "opt": make_opt(),
        "best_rsum": 3.0,
        "rng": {"torch": torch.get_rng_state()},
    }
    save_checkpoint(state, is_best=True, folder=str(tmp_path))
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        loaded = load_checkpoint(str(tmp_path / name))
        assert torch.equal(loaded["model"][0]["w"], torch.ones(2)) and loaded["opt"].embed_size == 32


def test_checkpoint_with_a_foreign_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"model": [], "opt": CreatesFile(str(marker))}, path)
    with pytest.raises(
        CheckpointError, match=rf"evil.pth.tar: refusing to load: it needs the global {re.escape(CreatesFile.GLOBAL)},"
    ):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_legacy_format_with_a_foreign_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pth.tar"
    torch.save({"model": [], "opt": CreatesFile(str(marker))}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(str(path))
    assert not marker.exists()


def checkpoint_error(path):
    """The one line load_checkpoint raises for `path`, checked never to advise loading it unsafely."""
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(str(path))
    message = str(raised.value)
    assert "\n" not in message and "weights_only" not in message and len(message) < 200, message
    return message


def random_bytes(size, seed=0):
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path, seed):
    path = tmp_path / "garbage.pth.tar"
    path.write_bytes(random_bytes(5000, seed))
    assert checkpoint_error(path).startswith(f"{path}: not a PyTorch checkpoint")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_checkpoint_is_named_truncated_at_any_length(tmp_path, legacy):
    whole = tmp_path / "whole.pth.tar"
    torch.save(
        {"model": [{"w": torch.ones(1000)}], "opt": make_opt()}, whole, _use_new_zipfile_serialization=not legacy
    )
    data = whole.read_bytes()
    path = tmp_path / "model.pth.tar"
    for length in (1, 3, 10, 100, len(data) // 2, len(data) - 100, len(data) - 1):
        path.write_bytes(data[:length])
        assert checkpoint_error(path).startswith(f"{path}: truncated PyTorch checkpoint"), length


def test_foreign_and_missing_files_give_clear_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert (
        checkpoint_error(text) == f"{text}: not a PyTorch checkpoint "
        "(torch.save writes a zip archive or, before PyTorch 1.6, its legacy pickle format)"
    )
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    assert checkpoint_error(empty) == f"{empty}: empty file (0 bytes), not a PyTorch checkpoint"
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "hello")
    assert checkpoint_error(archive) == f"{archive}: a zip archive without data.pkl, not a PyTorch checkpoint"
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    assert "not a VSRN checkpoint" in checkpoint_error(tmp_path / "other.pt")
    assert checkpoint_error(tmp_path / "missing.pth.tar") == f"{tmp_path}/missing.pth.tar: checkpoint not found"


def test_a_whole_checkpoint_with_an_odd_pickle_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "odd.pth.tar"
    torch.save({"model": [], "opt": make_opt()}, path)
    with zipfile.ZipFile(path) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    pickled = next(name for name in entries if name.endswith("/data.pkl"))
    entries[pickled] = b"\x80\x02}q\x00(X\x01\x00\x00\x00a\x2f."  # opcode 0x2f: never in a weights-only pickle
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    assert checkpoint_error(path).startswith(f"{path}: refusing to load: it holds what a VSRN checkpoint never does (")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint({"model": [{"w": torch.zeros(3)}], "opt": make_opt()}, True, str(tmp_path))

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": [{"w": torch.ones(3)}], "opt": make_opt()}, True, str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar", "model_best.pth.tar"]
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert torch.equal(load_checkpoint(str(tmp_path / name))["model"][0]["w"], torch.zeros(3))


def test_caption_updates_of_checkpoints_that_predate_the_option(tmp_path):
    # The original release was trained with two caption updates per step, ours before the option with one.
    assert load_checkpoint(shared_file("fixtures", "legacy_vsrn_f30k_tiny.pth.tar"))["opt"].caption_updates == 2
    old = vars(make_opt())
    del old["caption_updates"]
    state = {
        "epoch": 1,
        "model": [{}],
        "opt": argparse.Namespace(**old),
        "optimizer": {"state": {}, "param_groups": []},
    }
    save_checkpoint(state, is_best=False, folder=str(tmp_path))
    assert load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))["opt"].caption_updates == 1
    state["opt"] = make_opt(caption_updates=2)
    save_checkpoint(state, is_best=False, folder=str(tmp_path))
    assert load_checkpoint(str(tmp_path / "checkpoint.pth.tar"))["opt"].caption_updates == 2


def write_vocabularies(folder, json_words, pkl_words):
    from vocab import save_vocab, vocabulary_from_words
    import pickle

    save_vocab(vocabulary_from_words(json_words), os.path.join(folder, "toy_vocab.json"))
    with open(os.path.join(folder, "toy_vocab.pkl"), "wb") as f:
        pickle.dump(vocabulary_from_words(pkl_words), f, protocol=2)


SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]


def test_checkpoint_without_digest_uses_the_pkl_if_original_and_says_which(tmp_path, capsys):
    write_vocabularies(str(tmp_path), SPECIALS + ["dog", "cat"], SPECIALS + ["cat", "dog"])
    original = {"model": [], "opt": make_opt(), "epoch": 3}
    vocab = load_checkpoint_vocab(original, "orig.pth.tar", str(tmp_path), "toy")
    assert vocab.path == str(tmp_path / "toy_vocab.pkl") and vocab("cat") == 4
    assert (
        f"orig.pth.tar records no vocabulary digest: using the vocabulary {tmp_path / 'toy_vocab.pkl'}"
        in capsys.readouterr().err
    )
    ours_before_digests = {**original, "optimizer": {}}
    assert load_checkpoint_vocab(ours_before_digests, "ours.pth.tar", str(tmp_path), "toy").path.endswith(".json")


def test_checkpoint_digest_picks_the_matching_file_or_names_both(tmp_path):
    from vocab import vocab_digest, vocabulary_from_words

    write_vocabularies(str(tmp_path), SPECIALS + ["dog", "cat"], SPECIALS + ["cat", "dog"])
    for words, ext in ((["cat", "dog"], "pkl"), (["dog", "cat"], "json")):
        checkpoint = {
            "model": [],
            "opt": make_opt(),
            "optimizer": {},
            "vocab_digest": vocab_digest(vocabulary_from_words(SPECIALS + words)),
        }
        assert load_checkpoint_vocab(checkpoint, "m.pth.tar", str(tmp_path), "toy").path.endswith(ext)
    checkpoint["vocab_digest"] = vocab_digest(vocabulary_from_words(SPECIALS + ["cow"]))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint_vocab(checkpoint, "m.pth.tar", str(tmp_path), "toy")
    message = str(error.value)
    assert message.startswith("m.pth.tar: trained with another vocabulary") and "\n" not in message
    assert str(tmp_path / "toy_vocab.json") in message and str(tmp_path / "toy_vocab.pkl") in message


@pytest.mark.parametrize(
    "script,flags",
    [
        ("train", ["--resume"]),
        ("evaluate_models", []),
        ("caption", ["--checkpoint"]),
        ("visualize", ["--index", "0", "--checkpoint"]),
    ],
)
@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_every_script_names_a_bad_checkpoint_in_one_line(tmp_path, capsys, monkeypatch, script, flags, damage):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model_best.pth.tar"
    if damage == "random":
        path.write_bytes(random_bytes(3000))
    else:
        save_checkpoint({"model": [{"w": torch.ones(1000)}], "opt": make_opt()}, False, str(tmp_path), path.name)
        path.write_bytes(path.read_bytes()[:2000])
    expected = {"random": "not a PyTorch checkpoint", "truncated": "truncated PyTorch checkpoint"}[damage]
    assert importlib.import_module(script).main([*flags, str(path)]) == 2
    assert error_line(capsys).startswith(f"error: {path}: {expected}")


def test_a_checkpoints_relative_vocabulary_is_found_from_any_folder(own_photos, tmp_path, monkeypatch):
    _, _, checkpoint, root = own_photos
    monkeypatch.chdir(tmp_path)  # neither the project's folder nor the run's
    opt, vocab, _ = load_models([checkpoint], need_data=False)
    assert vocab.path == str(root / "project" / "vocab" / "mine_precomp_vocab.json")
    # A copy of the run elsewhere: found from the checkpoint's folder upward.
    moved = tmp_path / "elsewhere" / "deep"
    shutil.copytree(root / "project" / "runs" / "mine", moved / "run")
    shutil.copytree(root / "project" / "vocab", tmp_path / "elsewhere" / "vocab")
    copied = str(moved / "run" / "checkpoint.pth.tar")
    assert vocabulary_folder(opt, copied) == str(tmp_path / "elsewhere" / "vocab")
    shutil.rmtree(tmp_path / "elsewhere" / "vocab")
    with pytest.raises(
        Exception, match="vocabulary not found, from here nor from the checkpoint's folder; pass --vocab_path"
    ):
        load_models([copied], need_data=False)
