import argparse
import os
import sys

import pytest

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
