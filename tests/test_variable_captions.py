"""Any number of captions per image: the caption-to-image map in data.py, recall against a brute-force
reference (image to text: any of the image's captions within K; text to image: per caption), and the
same figures as the five-per-image evaluation when every image has five."""

import os
import shutil

import numpy as np
import pytest
import torch

import train
from conftest import make_opt
from data import DEV_CAPTION_LIMIT, PrecompDataset, collate_fn, whole_images_prefix
from evaluation import encode_data, evalrank, evaluate_embeddings, i2t, recall_metrics, t2i
from model import VSRN
from utils.errors import DataError
from vocab import load_vocab_by_name


def reference_ranks(images, captions, caption_images):
    """The ranks as a reader of LAVIS's evaluation would compute them, one query at a time: an image's
    rank is the position of its best-placed caption in its sorted scores, a caption's the position of
    its image."""
    caption_images = np.asarray(caption_images)
    scores = images @ captions.T
    i2t_ranks = []
    for image in range(len(images)):
        order = list(np.argsort(-scores[image], kind="stable"))
        i2t_ranks.append(min(order.index(c) for c in np.flatnonzero(caption_images == image)))
    t2i_ranks = []
    for caption in range(len(captions)):
        order = list(np.argsort(-scores[:, caption], kind="stable"))
        t2i_ranks.append(order.index(caption_images[caption]))
    return np.array(i2t_ranks), np.array(t2i_ranks)


def reference_recall(ranks):
    """R@1, R@5, R@10 (percent), median and mean rank (1-based) of 0-based ranks, written out."""
    n = len(ranks)
    return (
        100.0 * sum(r < 1 for r in ranks) / n,
        100.0 * sum(r < 5 for r in ranks) / n,
        100.0 * sum(r < 10 for r in ranks) / n,
        float(np.floor(np.median(ranks)) + 1),
        float(np.mean(ranks) + 1),
    )


def variable_embeddings(counts, dim=8, seed=0, noise=1.2):
    """(image rows repeated per caption, captions, caption_images) with counts[i] captions of image i."""
    rng = np.random.default_rng(seed)
    caption_images = np.repeat(np.arange(len(counts)), counts)
    images = rng.normal(size=(len(counts), dim))
    captions = images[caption_images] + rng.normal(scale=noise, size=(len(caption_images), dim))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(images)[caption_images], unit(captions), caption_images


@pytest.mark.parametrize("most", [1, 2, 5, 9])
def test_recall_with_1_to_n_captions_matches_the_brute_force_reference(most):
    counts = np.random.default_rng(most).integers(1, most + 1, size=60)
    images, captions, caption_images = variable_embeddings(counts, seed=most)
    expected_i2t, expected_t2i = reference_ranks(
        images[np.searchsorted(caption_images, np.arange(60))], captions, caption_images
    )
    r, (ranks, _) = i2t(images, captions, caption_images=caption_images, return_ranks=True)
    ri, (ranks_i, _) = t2i(images, captions, caption_images=caption_images, return_ranks=True)
    np.testing.assert_array_equal(ranks, expected_i2t)
    np.testing.assert_array_equal(ranks_i, expected_t2i)
    assert r == pytest.approx(reference_recall(expected_i2t), abs=1e-9)
    assert ri == pytest.approx(reference_recall(expected_t2i), abs=1e-9)
    assert len(ranks) == 60 and len(ranks_i) == counts.sum()
    # An image counts as found at K when any caption is: more captions can only help it.
    assert recall_metrics(ranks)[0] > 0


def test_an_image_is_found_by_any_of_its_captions():
    # Image 0's captions score 0.9 and 0.1 against it: its best one is first, so R@1 counts it.
    sims = torch.tensor([[0.1, 0.2, 0.9], [0.5, 0.6, 0.0]])
    r = i2t(None, None, sims=sims, caption_images=[0, 1, 0])
    ri, (ranks, top1) = t2i(None, None, sims=sims, caption_images=[0, 1, 0], return_ranks=True)
    assert r[:3] == (100.0, 100.0, 100.0)
    assert ranks.tolist() == [1, 0, 0] and top1.tolist() == [1, 1, 0]
    assert ri[0] == pytest.approx(200 / 3)


def test_five_per_image_given_as_a_map_equals_the_five_per_image_evaluation(capsys):
    images, captions, caption_images = variable_embeddings(np.full(5000, 5), dim=6, seed=3, noise=1.6)
    first = slice(0, 5000)  # 1000 images
    five, (rt, rti) = evaluate_embeddings([(images[first], captions[first])])
    mapped, (mrt, mrti) = evaluate_embeddings([(images[first], captions[first])], caption_images=caption_images[first])
    assert mapped == pytest.approx(five, abs=1e-6)
    np.testing.assert_array_equal(rt, mrt)
    np.testing.assert_array_equal(rti, mrti)
    folds, _ = evaluate_embeddings([(images, captions)], fold5=True)
    mapped_folds, _ = evaluate_embeddings([(images, captions)], fold5=True, caption_images=caption_images)
    assert mapped_folds == pytest.approx(folds, abs=1e-6)
    assert 0 < folds["r1"] < 100  # a non-trivial table


def test_fold5_with_a_map_averages_folds_of_1000_images(capsys):
    counts = np.random.default_rng(4).integers(1, 8, size=5000)
    images, captions, caption_images = variable_embeddings(counts, dim=6, seed=4, noise=1.6)
    metrics, _ = evaluate_embeddings([(images, captions)], fold5=True, caption_images=caption_images)
    expected = []
    for fold in range(5):
        rows = (caption_images >= 1000 * fold) & (caption_images < 1000 * (fold + 1))
        fold_images = caption_images[rows] - 1000 * fold
        expected.append(
            i2t(images[rows], captions[rows], caption_images=fold_images)
            + t2i(images[rows], captions[rows], caption_images=fold_images)
        )
    assert metrics["r1"] == pytest.approx(np.mean([e[0] for e in expected]))
    assert metrics["r10i"] == pytest.approx(np.mean([e[7] for e in expected]))


def write_split(folder, split, counts, img_dim=32, seed=0, map_file=True):
    """A split with counts[i] captions of image i (drawn from the toy vocabulary's words)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", rng.random((len(counts), 36, img_dim), dtype=np.float32))
    words = "dog cat horse bird cow sheep bicycle car bus boat train kite ball tree bench".split()
    lines = [" ".join(["a", *rng.choice(words, 3)]) for _ in range(int(np.sum(counts)))]
    (folder / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    if map_file:
        np.save(folder / f"{split}_caption_images.npy", np.repeat(np.arange(len(counts)), counts))


def test_the_dataset_gives_each_caption_its_image(tmp_path, toy_data):
    vocab = load_vocab_by_name(toy_data[1], "toy_precomp")
    write_split(tmp_path / "mine_precomp", "test", [2, 1, 3])
    dataset = PrecompDataset(str(tmp_path / "mine_precomp"), "test", vocab, 20, 32)
    assert len(dataset) == 6 and dataset.im_div is None
    assert [dataset[i][3] for i in range(6)] == [0, 0, 1, 2, 2, 2]
    assert dataset.caption_images.tolist() == [0, 0, 1, 2, 2, 2]
    assert list(dataset.captions_of(2)) == [3, 4, 5]
    np.testing.assert_array_equal(dataset[4][0].numpy(), np.load(tmp_path / "mine_precomp" / "test_ims.npy")[2])


def test_a_map_of_five_per_image_is_the_five_per_image_layout(tmp_path, toy_data):
    vocab = load_vocab_by_name(toy_data[1], "toy_precomp")
    write_split(tmp_path / "mine_precomp", "test", [5, 5, 5])
    dataset = PrecompDataset(str(tmp_path / "mine_precomp"), "test", vocab, 20, 32)
    assert dataset.im_div == 5 and dataset.caption_images is None


def test_dev_keeps_whole_images_within_the_first_5000_captions():
    five = np.arange(20000) // 5
    assert whole_images_prefix(five, DEV_CAPTION_LIMIT) == 5000  # the original's first 5000 captions
    assert whole_images_prefix(np.arange(7000), DEV_CAPTION_LIMIT) == 5000
    varying = np.repeat(np.arange(3000), 3)  # 3 per image: 1666 whole images
    assert whole_images_prefix(varying, DEV_CAPTION_LIMIT) == 4998
    assert whole_images_prefix(np.zeros(6000, dtype=np.int64), DEV_CAPTION_LIMIT) == 6000  # one image: kept whole
    assert whole_images_prefix(np.arange(10), DEV_CAPTION_LIMIT) == 10


@pytest.mark.parametrize(
    "entries, message",
    [
        ([0, 0, 1], "3 entries for 4 captions"),
        ([0, 2, 2, 3], "entry 1 (0-based) goes from image 0 to 2"),
        ([0, 1, 0, 2], "entry 2 (0-based) goes from image 1 to 0"),
        ([0, 0, 1, 1], "the entries run from image 0 to 1"),
    ],
)
def test_a_wrong_map_is_one_line_naming_it(tmp_path, toy_data, entries, message):
    vocab = load_vocab_by_name(toy_data[1], "toy_precomp")
    write_split(tmp_path / "mine_precomp", "test", [1, 1, 2])
    np.save(tmp_path / "mine_precomp" / "test_caption_images.npy", np.array(entries))
    with pytest.raises(DataError) as error:
        PrecompDataset(str(tmp_path / "mine_precomp"), "test", vocab, 20, 32)
    assert str(error.value).startswith(f"{tmp_path / 'mine_precomp' / 'test_caption_images.npy'}: {message}")
    assert "\n" not in str(error.value)


def test_counts_that_vary_without_a_map_are_refused(tmp_path, toy_data):
    vocab = load_vocab_by_name(toy_data[1], "toy_precomp")
    write_split(tmp_path / "mine_precomp", "test", [1, 2, 3], map_file=False)
    with pytest.raises(DataError, match="expected 5 captions per image \\(or 1\\), or test_caption_images.npy"):
        PrecompDataset(str(tmp_path / "mine_precomp"), "test", vocab, 20, 32)


def test_evalrank_on_varying_counts_matches_the_reference(tmp_path, toy_data, capsys):
    data_path, vocab_path = toy_data
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    counts = np.random.default_rng(7).integers(1, 6, size=30)
    write_split(tmp_path / "data" / "mine_precomp", "test", counts, seed=7)
    opt = make_opt(data_name="mine_precomp", data_path=str(tmp_path / "data"), vocab_path=vocab_path)
    opt.vocab_size = len(vocab)
    torch.manual_seed(0)
    model = VSRN(opt, training=False)
    checkpoint = tmp_path / "model.pth.tar"
    torch.save({"model": model.state_dict(), "opt": opt}, checkpoint)
    shutil.copy(os.path.join(vocab_path, "toy_precomp_vocab.json"), tmp_path / "mine_precomp_vocab.json")
    metrics = evalrank(str(checkpoint), split="test", vocab_path=str(tmp_path), ranks_path=str(tmp_path / "r.pth"))
    assert f"Images: 30, Captions: {counts.sum()}" in capsys.readouterr().out
    dataset = PrecompDataset(str(tmp_path / "data" / "mine_precomp"), "test", vocab, opt.max_len, 32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate_fn)
    images, captions = encode_data(model, loader)
    caption_images = dataset.caption_images
    expected_i2t, expected_t2i = reference_ranks(
        images[np.searchsorted(caption_images, np.arange(30))], captions, caption_images
    )
    got = [metrics[k] for k in ("r1", "r5", "r10", "medr", "meanr", "r1i", "r5i", "r10i", "medri", "meanri")]
    assert got == pytest.approx(reference_recall(expected_i2t) + reference_recall(expected_t2i), abs=1e-6)


def test_training_validates_on_varying_counts(tmp_path, toy_data, capsys):
    data_path, vocab_path = toy_data
    folder = tmp_path / "data" / "mine_precomp"
    rng = np.random.default_rng(1)
    for split, size in (("train", 40), ("dev", 12)):
        write_split(folder, split, rng.integers(1, 5, size=size), seed=size)
    shutil.copy(os.path.join(vocab_path, "toy_precomp_vocab.json"), tmp_path / "mine_precomp_vocab.json")
    args = [
        "--data_path", str(tmp_path / "data"), "--data_name", "mine_precomp", "--vocab_path", str(tmp_path),
        "--logger_name", str(tmp_path / "run"), "--img_dim", "32", "--embed_size", "32", "--dim_vid", "32",
        "--word_dim", "16", "--dim_hidden", "16", "--dim_word", "16", "--batch_size", "16", "--num_epochs", "1",
        "--workers", "0", "--seed", "0", "--device", "cpu", "--max_len", "12",
    ]  # fmt: skip
    assert train.main(args) == 0
    assert "Image to text:" in capsys.readouterr().err
    assert (tmp_path / "run" / "model_best.pth.tar").is_file()
