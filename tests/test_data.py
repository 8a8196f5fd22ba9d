import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import data
from conftest import ROOT, drop_last_caption, error_line, make_opt, replace_line
from data import EpochShuffleSampler, PrecompDataset, caption_branch_target, collate_fn, load_caption_ids
from utils.errors import DataError
from vocab import vocabulary_from_words
import train
from toy_training import train_args

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "café", "."]


@pytest.fixture
def vocab():
    return vocabulary_from_words(WORDS)


def write_split(folder, split, features, captions, raw=None):
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, f"{split}_ims.npy"), features)
    with open(os.path.join(folder, f"{split}_caps.txt"), "wb") as f:
        f.write(raw if raw is not None else ("\n".join(captions) + "\n").encode("utf-8"))


def tiny_split(tmp_path, captions=None, features=None, split="train", raw=None):
    folder = str(tmp_path / "tiny_precomp")
    if features is None:
        features = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    if captions is None:
        captions = ["A dog runs."] * 5 + ["a CAT", "a café", "zebra dog", "a", "dog cat dog"]
    write_split(folder, split, features, captions, raw)
    return folder


def test_caption_branch_target_short_caption():
    label, mask = caption_branch_target(torch.tensor([1, 4, 5, 2]), max_len=6)
    assert label.tolist() == [1, 4, 5, 2, 0, 0, 0]
    assert mask.tolist() == [1, 1, 1, 1, 1, 0, 0]  # up to and including the first pad


def test_caption_branch_target_truncates_to_max_len_with_end_last():
    caption = torch.tensor([1, 4, 5, 6, 7, 8, 2])
    label, mask = caption_branch_target(caption, max_len=5)
    assert label.tolist() == [1, 4, 5, 6, 2, 0]
    assert mask.tolist() == [1, 1, 1, 1, 1, 1]
    label, mask = caption_branch_target(torch.tensor([1, 4, 5, 6, 2]), max_len=5)  # exactly max_len
    assert label.tolist() == [1, 4, 5, 6, 2, 0] and mask.tolist() == [1] * 6


def test_items_match_hand_computed_expectations(tmp_path, vocab):
    dataset = PrecompDataset(tiny_split(tmp_path), "train", vocab, max_len=4, img_dim=4)
    assert len(dataset) == 10 and dataset.im_div == 5
    image, caption, index, img_id, label, mask = dataset[6]
    assert index == 6 and img_id == 1
    assert torch.equal(image, torch.arange(12, 24, dtype=torch.float32).reshape(3, 4))
    assert caption.tolist() == [1, 4, 8, 2]  # "a café": read as UTF-8 text, not bytes
    _, caption, *_ = dataset[0]
    assert caption.tolist() == [1, 4, 5, 7, 9, 2]  # lower-cased, "." split off
    _, caption, _, _, label, mask = dataset[7]
    assert caption.tolist() == [1, 3, 5, 2]  # unknown word -> <unk>
    _, caption, _, _, label, mask = dataset[9]
    assert caption.tolist() == [1, 5, 6, 5, 2]
    assert label.tolist() == [1, 5, 6, 2, 0] and mask.tolist() == [1, 1, 1, 1, 1]


def test_collate_sorts_by_length_and_pads(tmp_path, vocab):
    dataset = PrecompDataset(tiny_split(tmp_path), "train", vocab, max_len=8, img_dim=4)
    images, targets, lengths, ids, labels, masks = collate_fn([dataset[i] for i in (8, 0, 5)])
    assert lengths == [6, 4, 3] and ids == (0, 5, 8)
    assert targets.tolist() == [[1, 4, 5, 7, 9, 2], [1, 4, 6, 2, 0, 0], [1, 4, 2, 0, 0, 0]]
    assert images.shape == (3, 3, 4) and torch.equal(images[0], dataset[0][0])
    assert labels.shape == (3, 9) and masks.shape == (3, 9)


def test_one_caption_per_image(tmp_path, vocab):
    folder = tiny_split(tmp_path, captions=["a dog", "a cat"])
    dataset = PrecompDataset(folder, "train", vocab, max_len=20, img_dim=4)
    assert dataset.im_div == 1 and dataset[1][3] == 1


def test_dev_split_is_capped_at_5000_captions(tmp_path, vocab):
    folder = tiny_split(tmp_path, captions=["a dog"] * 5005, features=np.zeros((1001, 1, 4), np.float32), split="dev")
    assert len(PrecompDataset(folder, "dev", vocab, max_len=20, img_dim=4)) == 5000


def test_missing_files_are_named(tmp_path, vocab):
    folder = tiny_split(tmp_path)
    with pytest.raises(DataError, match=r"tiny_precomp/test_ims.npy: not found; expected the precomputed layout"):
        PrecompDataset(folder, "test", vocab, max_len=20, img_dim=4)
    os.remove(os.path.join(folder, "train_caps.txt"))
    with pytest.raises(DataError, match=r"train_caps.txt: not found"):
        PrecompDataset(folder, "train", vocab, max_len=20, img_dim=4)


def test_caption_count_must_be_one_or_five_per_image(tmp_path, vocab):
    folder = tiny_split(tmp_path, captions=["a dog"] * 9)
    with pytest.raises(DataError, match=r"train_caps.txt: 9 captions for the 2 images of .*train_ims.npy; expected 5"):
        PrecompDataset(folder, "train", vocab, max_len=20, img_dim=4)


def test_feature_rank_and_dim_are_checked(tmp_path, vocab):
    folder = tiny_split(tmp_path, features=np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match=r"train_ims.npy: features have shape \(2, 4\); expected 3-D"):
        PrecompDataset(folder, "train", vocab, max_len=20, img_dim=4)
    folder = tiny_split(tmp_path)
    with pytest.raises(DataError, match=r"features have 4 dims per region; --img_dim is 2048"):
        PrecompDataset(folder, "train", vocab, max_len=20, img_dim=2048)


def test_non_utf8_caption_names_the_line(tmp_path, vocab):
    raw = "\n".join(["a dog"] * 7).encode() + b"\na \xff dog\na dog\na dog\n"
    folder = tiny_split(tmp_path, raw=raw)
    with pytest.raises(DataError, match=r"train_caps.txt: line 8 is not UTF-8 text"):
        PrecompDataset(folder, "train", vocab, max_len=20, img_dim=4)


def test_nan_features_name_split_and_index(tmp_path, vocab):
    features = np.ones((2, 3, 4), np.float32)
    features[1, 2, 0] = np.nan
    dataset = PrecompDataset(tiny_split(tmp_path, features=features), "train", vocab, max_len=20, img_dim=4)
    dataset[4]
    with pytest.raises(DataError, match=r"NaN or Inf in the features of image 1 \(train split, caption index 7\)"):
        dataset[7]


def test_empty_caption_lines_warn_and_are_kept(tmp_path, vocab):
    folder = tiny_split(tmp_path, captions=["a dog"] * 3 + [""] + ["a cat"] * 6)
    with pytest.warns(UserWarning, match=r"1 empty caption line\(s\) \(first: line 4\)"):
        dataset = PrecompDataset(folder, "train", vocab, max_len=20, img_dim=4)
    assert dataset[3][1].tolist() == [1, 2]


def test_token_cache_is_reused_and_keyed_by_content(tmp_path, vocab, monkeypatch):
    folder = tiny_split(tmp_path)
    path = os.path.join(folder, "train_caps.txt")
    ids, offsets, _ = load_caption_ids(path, vocab)
    monkeypatch.setattr(data, "tokenize", lambda text: pytest.fail("tokenized again despite the cache"))
    cached_ids, cached_offsets, _ = load_caption_ids(path, vocab)
    assert np.array_equal(ids, cached_ids) and np.array_equal(offsets, cached_offsets)
    with open(path, "a", encoding="utf-8") as f:
        f.write("a dog\n")
    monkeypatch.setattr(data, "tokenize", lambda text: text.split())
    assert len(load_caption_ids(path, vocab)[1]) == len(offsets) + 1


def test_features_are_read_per_image_not_loaded(tmp_path, vocab):
    dataset = PrecompDataset(tiny_split(tmp_path), "train", vocab, max_len=20, img_dim=4)
    assert isinstance(dataset.images, data.FeatureFile) and dataset.images.shape == (2, 3, 4)
    assert dataset.images[1].tolist() == np.arange(12, 24, dtype=np.float32).reshape(3, 4).tolist()


def test_float16_features_and_truncated_files(tmp_path, vocab):
    features = (np.arange(24).reshape(2, 3, 4) / 8).astype(np.float16)
    dataset = PrecompDataset(tiny_split(tmp_path, features=features), "train", vocab, max_len=20, img_dim=4)
    assert dataset[5][0].dtype == torch.float32 and dataset[5][0].tolist() == (features[1].astype(np.float32)).tolist()
    path = os.path.join(str(tmp_path / "tiny_precomp"), "train_ims.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(DataError, match=r"train_ims.npy: file is truncated"):
        PrecompDataset(str(tmp_path / "tiny_precomp"), "train", vocab, max_len=20, img_dim=4)


def test_epoch_order_is_fixed_by_seed_and_epoch_and_resumable():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(EpochShuffleSampler(10, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(1, start=4)
    assert list(sampler) == second[4:] and len(sampler) == 6


def test_loaders_use_workers_and_keep_the_global_rng(toy_data):
    data_path, vocab_path = toy_data
    from vocab import load_vocab_by_name

    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    opt = make_opt(data_path=data_path, workers=1)
    train_loader, val_loader = data.get_loaders(
        data_path,
        "toy_precomp",
        vocab,
        batch_size=16,
        workers=1,
        max_len=opt.max_len,
        img_dim=opt.img_dim,
        seed=opt.seed,
    )
    state = torch.get_rng_state()
    # Workers never fork this process, which runs threads (Python 3.12+ warns that a fork may deadlock).
    assert train_loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    other_thread = threading.Event()
    threading.Thread(target=other_thread.wait, daemon=True).start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(val_loader)
    finally:
        other_thread.set()
    assert not [w for w in caught if "fork" in str(w.message)]
    assert torch.equal(state, torch.get_rng_state())
    assert sum(len(b[2]) for b in batches) == 100 and train_loader.num_workers == 1
    assert not train_loader.pin_memory or torch.cuda.is_available()


def test_dataset_equals_the_original_straightforward_reading(toy_data):
    """Features read per image and cached word ids give the items of the original's
    __getitem__: full np.load, per-item tokenization of the UTF-8 caption."""
    from vocab import load_vocab_by_name, tokenize

    data_path, vocab_path = toy_data
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    folder = os.path.join(data_path, "toy_precomp")
    opt = make_opt(max_len=12)
    dataset = PrecompDataset(folder, "train", vocab, opt.max_len, opt.img_dim)
    PrecompDataset(folder, "train", vocab, opt.max_len, opt.img_dim)  # second start-up: from the cache
    images = np.load(os.path.join(folder, "train_ims.npy"))
    with open(os.path.join(folder, "train_caps.txt"), encoding="utf-8") as f:
        captions = [line.strip() for line in f]
    for index in (0, 3, 4, 5, 199, 399):
        image, caption, i, img_id, label, mask = dataset[index]
        assert img_id == index // 5 and torch.equal(image, torch.from_numpy(images[index // 5]))
        expected = [vocab("<start>")] + [vocab(t) for t in tokenize(captions[index])] + [vocab("<end>")]
        assert caption.tolist() == expected
        cut = expected if len(expected) <= 12 else expected[:11] + [vocab("<end>")]
        assert label.tolist() == cut + [0] * (13 - len(cut))
        assert mask.tolist() == [1.0] * (len(cut) + 1) + [0.0] * (12 - len(cut))


def test_a_process_whose_loader_still_has_workers_exits(toy_data):
    """Workers ignore SIGTERM, which multiprocessing's exit handler sends before joining them:
    a loader left with live workers must not keep the process from exiting."""
    data_path, vocab_path = toy_data
    program = f"""
import argparse, sys
sys.path.insert(0, {ROOT!r})
import data
from conftest import make_opt
from vocab import load_vocab_by_name
opt = make_opt(data_path={data_path!r}, workers=1)
train_loader, _ = data.get_loaders({data_path!r}, "toy_precomp", load_vocab_by_name({vocab_path!r}, "toy_precomp"),
                                   batch_size=16, workers=1, max_len=opt.max_len, img_dim=opt.img_dim)
batches = iter(train_loader)
next(batches)
print("a batch", flush=True)
"""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0 and done.stdout == "a batch\n", done.stderr


@pytest.mark.parametrize(
    "corrupt,expected",
    [
        (lambda f: os.remove(f"{f}/train_ims.npy"), "train_ims.npy: not found; expected the precomputed layout"),
        (lambda f: drop_last_caption(f"{f}/train_caps.txt"), "train_caps.txt: 399 captions for the 80 images"),
        (
            lambda f: np.save(f"{f}/train_ims.npy", np.zeros((80, 32), np.float32)),
            "expected 3-D (num_images, regions, img_dim)",
        ),
        (
            lambda f: np.save(f"{f}/train_ims.npy", np.zeros((80, 36, 16), np.float32)),
            "16 dims per region; --img_dim is 32",
        ),
        (lambda f: replace_line(f"{f}/train_caps.txt", 7, b"a caf\xe9"), "train_caps.txt: line 7 is not UTF-8 text"),
    ],
    ids=["missing-split", "caption-count", "feature-rank", "img-dim", "not-utf8"],
)
def test_bad_data_is_one_line_with_exit_code_2(toy_copy, tmp_path, capsys, corrupt, expected):
    data_path, vocab_path, folder = toy_copy
    corrupt(folder)
    assert train.main(train_args(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1")) == 2
    assert expected in error_line(capsys)


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
    replace_line(f"{folder}/train_caps.txt", 3, b"")
    with pytest.warns(UserWarning, match="1 empty caption line"):
        assert train.main(train_args(data_path, vocab_path, tmp_path / "run", "--num_epochs", "1")) == 0
