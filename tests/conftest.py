"""What the tests share: the project on sys.path, ../shared/, small options, generated data and the runs and
models several test files use (trained or made once a session), and how a one-line error is read."""

import argparse
import contextlib
import io
import os
import shutil
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

from utils.options import option_defaults  # noqa: E402


def shared_file(*parts):
    """A file of ../shared/, or skip the test when the reference material is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"reference file {path} is absent (../shared/ is not next to this checkout)")
    return path


class CreatesFile:
    """Pickles to a call of open(path, "w"): loading it must never create the file."""

    # The global as pickle names it: io.open up to Python 3.11, _io.open from 3.12.
    GLOBAL = f"{open.__module__}.{open.__qualname__}"

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_opt(**overrides):
    """Options as train.py parses them, with small dimensions for fast tests."""
    opt = dict(option_defaults())
    opt.update(
        data_name="toy_precomp",
        img_dim=32,
        embed_size=32,
        dim_vid=32,
        word_dim=16,
        dim_hidden=16,
        dim_word=16,
        max_len=20,
        batch_size=16,
        workers=0,
        vocab_size=60,
        device="cpu",
        seed=0,
    )
    opt.update(overrides)
    return argparse.Namespace(**opt)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Every test gets its own token cache, so none sees another's files.
    monkeypatch.setenv("VSRN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_java(monkeypatch):
    """Score captions as on a machine without Java (no METEOR, NLTK tokenization): fast."""
    import captioning

    monkeypatch.setattr(captioning, "java_available", lambda: False)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small generated toy_precomp dataset and its vocabulary: (data_path, vocab_path)."""
    from utils.make_toy_data import make_toy_data
    from vocab import build_vocab, save_vocab
    from utils.captions import read_captions

    root = tmp_path_factory.mktemp("toy")
    data_path = str(root / "data")
    folder = make_toy_data(data_path, img_dim=32, sizes={"train": 80, "dev": 20, "test": 20})
    captions = [c for split in ("train", "dev") for c in read_captions(os.path.join(folder, f"{split}_caps.txt"))]
    vocab_path = str(root / "vocab")
    save_vocab(build_vocab(captions, threshold=1), os.path.join(vocab_path, "toy_precomp_vocab.json"))
    return data_path, vocab_path


@pytest.fixture
def toy_copy(toy_data, tmp_path):
    """A private copy of the toy dataset to corrupt: (data_path, vocab_path, folder)."""
    data_path, vocab_path = toy_data
    copy = tmp_path / "data"
    shutil.copytree(data_path, copy)
    return str(copy), vocab_path, str(copy / "toy_precomp")


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="session")
def trained_toy(toy_data, tmp_path_factory):
    """A checkpoint trained one epoch on the toy dataset (toy_training's small options): its model_best path."""
    import train
    from toy_training import train_args

    data_path, vocab_path = toy_data
    run = tmp_path_factory.mktemp("trained")
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 0
    return str(run / "model_best.pth.tar")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(the folder it ran in, what it printed) of `python3 train.py --demo`, run once for every test that needs the
    demo's data or its trained checkpoint (runs/demo/model_best.pth.tar in that folder)."""
    import train

    folder, printed, start = tmp_path_factory.mktemp("demo"), io.StringIO(), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed):
            assert train.main(["--demo"]) == 0
    finally:
        os.chdir(start)
    return folder, printed.getvalue()


def one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.fixture
def one_thread():
    # Like the spawned processes: a loaded two-core machine runs small steps faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "on", "bench", "."]  # own_photos' vocabulary


@pytest.fixture(scope="session")
def own_photos(tmp_path_factory):
    """(pictures folder, tiny detector weights, a VSRN checkpoint reading its regions, that checkpoint's run folder):
    three pictures of one's own, and a run as train.py leaves it, its vocabulary recorded relatively."""
    from PIL import Image

    from model import VSRN
    from tiny_detector import TINY_ARCH, tiny_detector_state_dict
    from utils.checkpoint import save_checkpoint
    from vocab import save_vocab, vocab_digest, vocabulary_from_words

    root = tmp_path_factory.mktemp("own_photos")
    rng = np.random.RandomState(0)
    (root / "photos").mkdir()
    for n in range(3):
        Image.fromarray(rng.randint(0, 256, (50 + 10 * n, 70, 3), dtype=np.uint8)).save(root / "photos" / f"p{n}.png")
    weights = root / "detector.bin"
    torch.save(tiny_detector_state_dict(), weights)
    # A run as train.py leaves it: vocabulary and checkpoint recorded relative to where training ran.
    vocab = vocabulary_from_words(WORDS)
    save_vocab(vocab, str(root / "project" / "vocab" / "mine_precomp_vocab.json"))
    opt = make_opt(
        data_name="mine_precomp",
        vocab_path="vocab",
        logger_name="runs/mine",
        vocab_size=len(vocab),
        img_dim=TINY_ARCH["res5"][-1],
    )
    run = root / "project" / "runs" / "mine"
    state = {"model": VSRN(opt, training=False).state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab)}
    checkpoint = save_checkpoint(state, False, str(run))
    return root / "photos", str(weights), checkpoint, root


def drop_last_caption(path):
    lines = open(path, "rb").read().splitlines(keepends=True)
    open(path, "wb").write(b"".join(lines[:-1]))


def replace_line(path, number, content):
    lines = open(path, "rb").read().split(b"\n")
    lines[number - 1] = content
    open(path, "wb").write(b"\n".join(lines))
