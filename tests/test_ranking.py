import numpy as np
import pytest
import torch

import evaluation
from reference_counting import counted_i2t, counted_t2i
from reference_ranking import dot_scores, loop_i2t, loop_t2i
from evaluation import i2t, order_sim, ranks_i2t, ranks_t2i, recall_metrics, similarity, t2i


def order_scores(im, s):
    return -np.sqrt((np.clip(s[None] - im[:, None], 0, None) ** 2).sum(2))


SCORES = {"cosine": dot_scores, "order": order_scores}


def tie_free(sims):
    """Whether no score ties a ground truth or a best score, where the loop's order is unspecified."""
    n = len(sims)
    own = sims.reshape(n, n, 5)[np.arange(n), np.arange(n)]
    best_own = own.max(1, keepdims=True)
    caption_truth = sims[np.arange(5 * n) // 5, np.arange(5 * n)]
    return all(
        [
            ((sims == best_own).sum(1) == (own == best_own).sum(1)).all(),
            ((sims == sims.max(1, keepdims=True)).sum(1) == 1).all(),
            ((sims == caption_truth).sum(0) == 1).all(),
            ((sims == sims.max(0)).sum(0) == 1).all(),
        ]
    )


def exact_embeddings(seed, n_images, dim, score=dot_scores):
    """Integer-valued float32 embeddings, drawn until no score ties under `score`.

    Entries are bounded so that dim * (2 * bound)**2 <= 2**24, which keeps every dot product and
    order score, partial sums included, exact in float32: the loop's per-query products and the
    chunked GEMMs then agree to the bit whatever their summation order.
    """
    rng = np.random.default_rng(seed)
    bound = int(2**11 / np.sqrt(dim))
    while True:
        images = np.repeat(rng.integers(-bound, bound + 1, (n_images, dim)), 5, axis=0)
        captions = rng.integers(-bound, bound + 1, (5 * n_images, dim))
        images, captions = images.astype(np.float32), captions.astype(np.float32)
        if tie_free(score(images[::5], captions)):
            return images, captions


def one_hot_embeddings(sims):
    """Embeddings whose dot products are exactly the given (N, 5N) score matrix."""
    images = np.repeat(np.eye(len(sims), dtype=np.float32), 5, axis=0)
    return images, np.ascontiguousarray(sims.T)


def assert_same(fast, loop):
    (metrics, (ranks, top1)), (expected_metrics, (expected_ranks, expected_top1)) = fast, loop
    assert metrics == expected_metrics
    assert all(type(m) is float for m in metrics)
    assert ranks.dtype == top1.dtype == np.float64
    np.testing.assert_array_equal(ranks, expected_ranks)
    np.testing.assert_array_equal(top1, expected_top1)


@pytest.mark.parametrize("measure", ["cosine", "order"])
@pytest.mark.parametrize("n_images, dim", [(1, 8), (7, 8), (7, 32), (100, 32)])
def test_matches_loop(n_images, dim, measure):
    score = SCORES[measure]
    images, captions = exact_embeddings(0, n_images, dim, score)
    for fast, loop in ((i2t, loop_i2t), (t2i, loop_t2i)):
        result = fast(images, captions, measure=measure, return_ranks=True)
        assert_same(result, loop(images, captions, n_images, score))
        assert fast(images, captions, measure=measure) == result[0]


@pytest.mark.parametrize("measure", ["cosine", "order"])
@pytest.mark.parametrize("chunk_elements", [1, 7 * 5 * 40, 3 * 200 * 16])
def test_chunked_matches_loop(monkeypatch, chunk_elements, measure):
    score = SCORES[measure]
    images, captions = exact_embeddings(3, 40, 16, score)
    monkeypatch.setattr(evaluation, "CHUNK_ELEMENTS", chunk_elements)
    assert_same(i2t(images, captions, measure=measure, return_ranks=True), loop_i2t(images, captions, 40, score))
    assert_same(t2i(images, captions, measure=measure, return_ranks=True), loop_t2i(images, captions, 40, score))


def test_npts_queries_a_prefix_against_all_targets():
    images, captions = exact_embeddings(5, 30, 8)
    assert_same(i2t(images, captions, npts=12, return_ranks=True), loop_i2t(images, captions, 12, dot_scores))
    assert_same(t2i(images, captions, npts=12, return_ranks=True), loop_t2i(images, captions, 12, dot_scores))


def test_continuous_scores_match_loop(monkeypatch):
    rng = np.random.default_rng(11)
    sims = rng.random((60, 300), dtype=np.float32)
    assert tie_free(sims)
    images, captions = one_hot_embeddings(sims)
    monkeypatch.setattr(evaluation, "CHUNK_ELEMENTS", 4000)
    assert_same(i2t(images, captions, return_ranks=True), loop_i2t(images, captions, 60, dot_scores))
    assert_same(t2i(images, captions, return_ranks=True), loop_t2i(images, captions, 60, dot_scores))


def test_ensemble_sims_match_loop_on_averaged_scores():
    dim = 16
    images, captions = exact_embeddings(8, 50, 2 * dim)
    model1 = images[:, :dim], captions[:, :dim]
    model2 = images[:, dim:], captions[:, dim:]
    sims = (similarity(*model1) + similarity(*model2)) / 2

    def averaged_scores(im, s):
        return (im[:, :dim] @ s[:, :dim].T + im[:, dim:] @ s[:, dim:].T) / 2

    assert_same(i2t(*model1, sims=sims, return_ranks=True), loop_i2t(images, captions, 50, averaged_scores))
    assert_same(t2i(*model1, sims=sims.numpy(), return_ranks=True), loop_t2i(images, captions, 50, averaged_scores))


def hand_made_sims():
    """Two images, ten captions. Image 0: captions 5, 6, 7 beat its best own caption (3).
    Image 1: its caption 9 is best. Caption 0 prefers image 1; all others their own image."""
    sims = np.zeros((2, 10), dtype=np.float32)
    sims[0] = [0.1, 0.2, 0.3, 0.5, 0.4, 0.9, 0.8, 0.7, 0.0, -0.1]
    sims[1] = [0.6, 0.0, 0.0, 0.0, 0.0, 0.95, 0.85, 0.75, 0.2, 1.0]
    return sims


def test_hand_made_i2t():
    metrics, (ranks, top1) = i2t(None, None, sims=hand_made_sims(), return_ranks=True)
    np.testing.assert_array_equal(ranks, [3.0, 0.0])
    np.testing.assert_array_equal(top1, [5.0, 9.0])
    assert metrics == (50.0, 100.0, 100.0, 2.0, 2.5)


def test_hand_made_t2i():
    metrics, (ranks, top1) = t2i(None, None, sims=torch.from_numpy(hand_made_sims()), return_ranks=True)
    np.testing.assert_array_equal(ranks, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(top1, [1, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert metrics == (90.0, 100.0, 100.0, 1.0, 1.1)


def test_hand_made_embeddings():
    # Image 0 points along x, image 1 along y; caption 2 of image 0 leans towards y.
    images = np.repeat(np.array([[1, 0], [0, 1]], dtype=np.float32), 5, axis=0)
    captions = np.array([[1, 0]] * 5 + [[0, 1]] * 5, dtype=np.float32)
    captions[2] = [0.6, 0.8]
    assert i2t(images, captions) == (100.0, 100.0, 100.0, 1.0, 1.0)
    metrics, (ranks, top1) = t2i(images, captions, return_ranks=True)
    np.testing.assert_array_equal(ranks, [0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    assert metrics == (90.0, 100.0, 100.0, 1.0, 1.1)


def test_recall_metrics():
    assert recall_metrics(np.array([0.0, 3.0, 12.0, 4.0])) == (25.0, 75.0, 75.0, 4.0, 5.75)
    assert recall_metrics([9, 10, 0]) == (100 / 3, 100 / 3, 200 / 3, 10.0, 19 / 3 + 1)


def test_ranks_on_wide_matrix():
    # More captions than 5 per image are allowed: extra captions only compete.
    sims = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    ranks, top1 = ranks_i2t(sims)
    np.testing.assert_array_equal(ranks, [2])
    np.testing.assert_array_equal(top1, [6])
    ranks, top1 = ranks_t2i(sims[:, :5])
    np.testing.assert_array_equal(ranks, np.zeros(5))
    np.testing.assert_array_equal(top1, np.zeros(5))


def test_order_sim():
    im = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    s = torch.tensor([[3.0, 0.0], [0.0, 4.0], [-1.0, -1.0]])
    expected = torch.tensor([[-2.0, -4.0, 0.0], [-3.0, -4.0, 0.0]])
    torch.testing.assert_close(order_sim(im, s), expected, rtol=0, atol=0)


def test_similarity_of_normalised_floats():
    rng = np.random.default_rng(2)
    images = np.repeat(rng.standard_normal((20, 64)), 5, axis=0)
    captions = rng.standard_normal((100, 64))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    sims = similarity(images.astype(np.float32), captions.astype(np.float32))
    assert sims.dtype == torch.float32 and sims.shape == (20, 100)
    np.testing.assert_allclose(sims.numpy(), images[::5] @ captions.T, rtol=0, atol=1e-6)
    order = similarity(images, captions, measure="order")
    np.testing.assert_allclose(order.numpy(), order_scores(images[::5], captions), rtol=0, atol=1e-6)


def test_unknown_measure():
    with pytest.raises(ValueError, match="measure"):
        similarity(np.zeros((5, 2)), np.zeros((5, 2)), measure="euclidean")


def test_exact_ties_count_optimistically():
    # As README says: a target that ties the ground truth does not count against it, so
    # scores that all tie (a collapsed model) give perfect recall in both directions.
    sims = np.zeros((20, 100), dtype=np.float32)
    assert i2t(None, None, sims=sims)[:3] == t2i(None, None, sims=sims)[:3] == (100.0, 100.0, 100.0)
    sims = np.random.default_rng(0).random((20, 100), dtype=np.float32)
    sims[0, 7] = sims[0, :5].max()  # caption 7 ties image 0's best own caption
    sims[1, 5] = sims[:, 5].max() + 1  # image 1 above every other image for caption 5 (image 1's own)
    sims[3, 5] = sims[1, 5]  # image 3 ties it
    assert ranks_i2t(sims)[0][0] == np.count_nonzero(sims[0] > sims[0, :5].max())
    assert ranks_t2i(sims)[0][5] == 0


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_refused_with_count_and_place(monkeypatch, value):
    """A NaN compares neither above nor below: ranked, a NaN row would count as an R@1 hit."""
    monkeypatch.setattr(evaluation, "CHUNK_ELEMENTS", 40)  # several chunks: the count and place span them
    sims = np.random.default_rng(0).normal(size=(6, 30)).astype(np.float32)
    sims[4, 7] = sims[4, 21] = sims[5, 0] = value
    for rank in (i2t, t2i):
        with pytest.raises(
            evaluation.ScoreError,
            match=r"^the similarity: 3 of the 180 scores are NaN or infinite, the first at image 4, caption 7 ",
        ):
            rank(None, None, sims=sims)
    with pytest.raises(evaluation.ScoreError, match=r"^VSRN's: 3 of the 180"):
        ranks_t2i(torch.from_numpy(sims), "VSRN's")
    sims[4, 20:25] = np.nan  # a whole ground-truth block: before, the caption ranked as a hit
    with pytest.raises(evaluation.ScoreError, match="7 of the 180"):
        ranks_i2t(sims)


def test_ranks_with_caption_images_of_any_layout_match_loop():
    """caption_images: captions in any order and number per image (the one-step LXMERT demo's ground truths)."""
    rng = np.random.default_rng(3)
    sims = torch.from_numpy(rng.normal(size=(4, 9)))
    caption_images = [2, 0, 1, 3, 0, 2, 2, 1, 3]
    i2t_ranks = [
        np.sum(sims[i].numpy() > max(sims[i, j] for j in range(9) if caption_images[j] == i).item()) for i in range(4)
    ]
    t2i_ranks = [np.sum(sims[:, j].numpy() > sims[caption_images[j], j].item()) for j in range(9)]
    np.testing.assert_array_equal(ranks_i2t(sims, caption_images=caption_images)[0], i2t_ranks)
    np.testing.assert_array_equal(ranks_t2i(sims, caption_images=caption_images)[0], t2i_ranks)
    five = torch.from_numpy(rng.normal(size=(3, 15)))
    for rank in (ranks_i2t, ranks_t2i):
        np.testing.assert_array_equal(rank(five, caption_images=np.arange(15) // 5)[0], rank(five)[0])


def tied_scores(rng, n_images, n_captions, dtype):
    """Scores from a handful of values: most rows and columns hold ties, of ground truths and of best scores."""
    return rng.integers(-3, 4, (n_images, n_captions)).astype(dtype) / 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("rank_chunk", [1, 23, 1 << 18])
def test_ranks_equal_the_counted_reference_with_ties(monkeypatch, dtype, rank_chunk):
    """Ranks and top-1 equal the previous torch implementation's (tests/reference_counting.py) to the
    last entry, ties everywhere, in blocks of one row up to one block of the whole matrix."""
    monkeypatch.setattr(evaluation, "RANK_CHUNK_ELEMENTS", rank_chunk)
    rng = np.random.default_rng(4)
    for n_images in (1, 2, 7, 30):
        sims = tied_scores(rng, n_images, 5 * n_images, dtype)
        for fast, reference in ((ranks_i2t, counted_i2t), (ranks_t2i, counted_t2i)):
            for scores in (sims, torch.from_numpy(sims)):
                ranks, top1 = fast(scores)
                expected_ranks, expected_top1 = reference(sims)
                assert ranks.dtype == top1.dtype == np.float64
                np.testing.assert_array_equal(ranks, expected_ranks)
                np.testing.assert_array_equal(top1, expected_top1)


@pytest.mark.parametrize("rank_chunk", [1, 10, 1 << 18])
def test_ranks_with_caption_images_equal_the_counted_reference(monkeypatch, rank_chunk):
    """The variable-captions form (captions in any order and number per image, some images without
    any for t2i), with ties, equals the previous implementation's."""
    monkeypatch.setattr(evaluation, "RANK_CHUNK_ELEMENTS", rank_chunk)
    rng = np.random.default_rng(5)
    for n_images, n_captions in ((1, 3), (4, 9), (12, 40)):
        sims = torch.from_numpy(tied_scores(rng, n_images, n_captions, np.float32))
        caption_images = rng.permutation(np.arange(n_captions) % n_images)
        for fast, reference in ((ranks_i2t, counted_i2t), (ranks_t2i, counted_t2i)):
            for layout in (caption_images, caption_images.tolist(), torch.from_numpy(caption_images)):
                ranks, top1 = fast(sims, caption_images=layout)
                expected_ranks, expected_top1 = reference(sims, caption_images=caption_images)
                np.testing.assert_array_equal(ranks, expected_ranks)
                np.testing.assert_array_equal(top1, expected_top1)
        described = np.arange(n_captions) % max(1, n_images - 1)  # the last image has no caption
        np.testing.assert_array_equal(
            ranks_t2i(sims, caption_images=described)[0], counted_t2i(sims, caption_images=described)[0]
        )


def test_metrics_equal_the_counted_reference_on_continuous_scores():
    """Recalls, medians and means of i2t and t2i from one shared matrix, as evalrank calls them."""
    rng = np.random.default_rng(6)
    sims = torch.from_numpy(rng.normal(size=(50, 250)).astype(np.float32))
    sims[:, ::5] += 1.5  # ground truths above the crowd, so that the recalls are not all near zero
    for fast, ranks, reference in ((i2t, ranks_i2t, counted_i2t), (t2i, ranks_t2i, counted_t2i)):
        metrics, (fast_ranks, fast_top1) = fast(None, None, sims=sims, return_ranks=True)
        expected_ranks, expected_top1 = reference(sims)
        assert metrics == recall_metrics(expected_ranks)
        np.testing.assert_array_equal(fast_ranks, expected_ranks)
        np.testing.assert_array_equal(fast_top1, expected_top1)


def test_huge_finite_scores_are_ranked_not_refused():
    """Scores whose sum overflows are finite: they are ranked (the exact check says so, once)."""
    sims = np.full((3, 15), np.finfo(np.float32).max / 2, dtype=np.float32)
    sims[:, 0] = 0
    np.testing.assert_array_equal(ranks_i2t(sims)[0], counted_i2t(sims)[0])
    np.testing.assert_array_equal(ranks_t2i(sims)[0], counted_t2i(sims)[0])
