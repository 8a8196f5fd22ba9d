"""Image-text retrieval metrics of VSE++/VSRN: Recall@1/5/10, median and mean rank.

Embeddings come as the encoder produces them: `images` is (5N, K) with each image repeated
once per caption, `captions` is (5N, K), and captions 5i..5i+4 describe image i. With any other
number of captions per image, `caption_images` gives the image of each caption (grouped by
image, as data.PrecompDataset.caption_images); image-to-text recall then counts an image as
found at K when any of its captions is within the top K, text-to-image recall is per caption
(the convention of LAVIS, ALBEF and BLIP). With five per image both ways give the same figures.

Ranks are counted rather than sorted: the rank of a query is the number of targets scoring
strictly above its ground truth. A target that ties the ground truth therefore does not count
against it (ranks are optimistic), and top1 is the lowest index among equal best scores. The
original's unstable argsort left both cases unspecified; continuous embeddings do not tie.
"""

import contextlib
import io
import math
import os
import warnings

import numpy as np
import torch
from tqdm import tqdm

from data import check_data_folder
from inference import load_models, split_loader
from model import order_sim
from utils.atomic import atomic_write
from utils.errors import DataError, OptionError, ScoreError

# Elements in one chunk of scores or comparisons (16M: 64 MB of float32). COCO-5K (5000 x 25000)
# then needs little beyond its 500 MB similarity matrix, and order_sim's few (rows, targets, K)
# temporaries stay within a few hundred MB.
CHUNK_ELEMENTS = 1 << 24
# Scores ranked at once by t2i (256K: 1 MB of float32), which stay in a core's cache through their passes.
RANK_CHUNK_ELEMENTS = 1 << 18

MEASURES = ("cosine", "order")


def first_caption_rows(caption_images):
    """The row of each image's first caption (its row of `images`), for images 0..n-1 that all have one."""
    caption_images = np.asarray(caption_images)
    images, first = np.unique(caption_images, return_index=True)
    if len(images) and (images[0] != 0 or images[-1] != len(images) - 1):
        raise ValueError("caption_images must name images 0..n-1, each with at least one caption")
    return first


def similarity(images, captions, measure="cosine", caption_images=None):
    """Scores of every image (one row in five of `images`, or each image's first row by
    `caption_images`) against every caption: (N, captions) float32."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    rows = slice(None, None, 5) if caption_images is None else first_caption_rows(caption_images)
    ims = torch.as_tensor(images[rows], dtype=torch.float32)
    caps = torch.as_tensor(captions, dtype=torch.float32)
    sims = torch.empty(len(ims), len(caps))
    elements_per_row = len(caps) * (caps.shape[1] if measure == "order" else 1)
    step = _rows_per_chunk(elements_per_row)
    for start in range(0, len(ims), step):
        chunk = ims[start : start + step]
        if measure == "order":
            sims[start : start + step] = order_sim(chunk, caps)
        else:
            torch.mm(chunk, caps.T, out=sims[start : start + step])
    return sims


def check_finite(scores, name="the scores"):
    """Refuse an (images, captions) score matrix holding NaN or infinite scores, in one line
    naming `name`, how many and the first one's image and caption.

    A NaN compares neither above nor below anything: ranked, it would count as a hit.
    """
    scores = torch.as_tensor(scores)
    step = _rows_per_chunk(scores.shape[1])
    count, first = 0, None
    for start in range(0, len(scores), step):
        bad = ~torch.isfinite(scores[start : start + step])
        count += int(bad.sum())
        if first is None and bad.any():
            image, caption = bad.nonzero()[0].tolist()
            first = (start + image, caption)
    if count:
        raise ScoreError(
            f"{name}: {count:,} of the {scores.numel():,} scores are NaN or infinite, the first at image {first[0]}, "
            f"caption {first[1]} (a diverged model or non-finite features?); they cannot be ranked"
        )


def ranks_i2t(sims, name="the scores", caption_images=None):
    """Rank of each image's best caption among 5i..5i+4, and its top-scored caption.

    `sims` is an (n_images, n_captions) score matrix; returns two float arrays of n_images.
    Non-finite scores are refused (`check_finite`, naming `name`). `caption_images`: the image
    (row) each caption describes, for captions that are not 5 per image in image order; every
    image needs one.
    """
    sims = torch.as_tensor(sims)
    scores = _as_array(sims)
    if caption_images is not None:
        caption_images = torch.as_tensor(caption_images, dtype=torch.int64)
        own = sims[caption_images, torch.arange(sims.shape[1])]
        truths = torch.full((len(sims),), -math.inf, dtype=sims.dtype).scatter_reduce(0, caption_images, own, "amax")
        truths = _as_array(truths)
    ranks, top1 = np.empty(len(scores)), np.empty(len(scores))
    above = np.empty(scores.shape[1], dtype=bool)
    finite = FiniteScores(sims, name)
    # A row at a time: its four passes (sum, comparison, count, argmax) find it in the core's
    # cache, and numpy counts a flat row of booleans many times faster than a sum along an axis.
    for image, row in enumerate(scores):
        finite.check(row)
        truth = row[5 * image : 5 * image + 5].max() if caption_images is None else truths[image]
        ranks[image] = np.count_nonzero(np.greater(row, truth, out=above))
        top1[image] = row.argmax()  # the first of equal best scores
    return ranks, top1


def ranks_t2i(sims, name="the scores", caption_images=None):
    """Rank of each caption's image (caption j describes image j // 5), and its top-scored image.

    `sims` is an (n_images, n_captions) score matrix; returns two float arrays of n_captions.
    Non-finite scores are refused (`check_finite`, naming `name`). `caption_images`: the image
    each caption describes, when it is not j // 5.
    """
    sims = torch.as_tensor(sims)
    scores = _as_array(sims)
    n_images, n_captions = scores.shape
    captions = np.arange(n_captions)
    caption_images = (
        captions // 5 if caption_images is None else _as_array(torch.as_tensor(caption_images)).astype(np.int64)
    )
    truth = scores[caption_images, captions]
    ranks, top1, best = np.zeros(n_captions, dtype=np.int64), np.zeros(n_captions, dtype=np.int64), None
    step = _rows_per_chunk(n_captions, RANK_CHUNK_ELEMENTS)
    above = np.empty((min(step, n_images), n_captions), dtype=bool)
    finite = FiniteScores(sims, name)
    # Blocks of whole rows, which the matrix holds contiguously (a column is scattered over all of
    # it): each caption's count and best image so far are carried from one block to the next.
    for start in range(0, n_images, step):
        block = scores[start : start + step]
        finite.check(block)
        is_above = np.greater(block, truth, out=above[: len(block)])
        ranks += np.add.reduce(is_above.view(np.uint8), axis=0, dtype=np.int32)
        block_best = block.max(0)
        if best is None:
            best, better, candidates = block_best, captions, block
        else:
            # Only a strictly better score moves a caption's top image: the first of equal best images stays.
            better = np.flatnonzero(block_best > best)
            candidates = block[:, better]
            best[better] = block_best[better]
        top1[better] = start + (candidates == best[better]).argmax(0)
    return ranks.astype(float), top1.astype(float)


def recall_metrics(ranks):
    """(R@1, R@5, R@10, median rank, mean rank) of 0-based ranks, in percent and 1-based ranks."""
    ranks = np.asarray(ranks)
    r1, r5, r10 = (100.0 * np.count_nonzero(ranks < k) / len(ranks) for k in (1, 5, 10))
    medr = np.floor(np.median(ranks)) + 1
    meanr = ranks.mean() + 1
    return tuple(float(metric) for metric in (r1, r5, r10, medr, meanr))


def i2t(
    images,
    captions,
    npts=None,
    measure="cosine",
    return_ranks=False,
    sims=None,
    name="the similarity",
    caption_images=None,
):
    """Caption retrieval for the first `npts` images (default: all) among all captions.

    `sims`, an (n_images, n_captions) numpy or torch score matrix such as the average of two
    models' `similarity`, replaces the one computed from the embeddings; `npts` then defaults
    to its number of rows. Non-finite scores are refused in one line naming `name`.
    `caption_images`: the image of each caption when they are not 5 per image (every image is
    then ranked: `npts` must be None); an image's rank is its best caption's.
    Returns (r1, r5, r10, medr, meanr), or with `return_ranks` also (ranks, top1).
    """
    if caption_images is not None:
        ranks, top1 = _ranks_of_every_image(ranks_i2t, images, captions, npts, measure, sims, name, caption_images)
    else:
        if npts is None:
            npts = images.shape[0] // 5 if sims is None else len(sims)
        if sims is None:
            sims = similarity(images[: 5 * npts], captions, measure)
        ranks, top1 = ranks_i2t(torch.as_tensor(sims)[:npts], name)
    metrics = recall_metrics(ranks)
    return (metrics, (ranks, top1)) if return_ranks else metrics


def t2i(
    images,
    captions,
    npts=None,
    measure="cosine",
    return_ranks=False,
    sims=None,
    name="the similarity",
    caption_images=None,
):
    """Image retrieval for the captions of the first `npts` images (default: all) among all images.

    `sims`, `name` and `caption_images` are as for `i2t`. Returns (r1, r5, r10, medr, meanr), or with
    `return_ranks` also (ranks, top1), one entry per caption.
    """
    if caption_images is not None:
        ranks, top1 = _ranks_of_every_image(ranks_t2i, images, captions, npts, measure, sims, name, caption_images)
    else:
        if npts is None:
            npts = images.shape[0] // 5 if sims is None else len(sims)
        if sims is None:
            sims = similarity(images, captions[: 5 * npts], measure)
        ranks, top1 = ranks_t2i(torch.as_tensor(sims)[:, : 5 * npts], name)
    metrics = recall_metrics(ranks)
    return (metrics, (ranks, top1)) if return_ranks else metrics


def _ranks_of_every_image(rank, images, captions, npts, measure, sims, name, caption_images):
    """`rank` (ranks_i2t or ranks_t2i) of every image and caption, mapped by `caption_images`."""
    if npts is not None:
        raise ValueError("npts takes the first images of 5 captions each; with caption_images every image is ranked")
    if sims is None:
        sims = similarity(images, captions, measure, caption_images)
    return rank(torch.as_tensor(sims), name, caption_images=caption_images)


def _rows_per_chunk(elements_per_row, chunk_elements=None):
    return max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, elements_per_row))


def _as_array(scores):
    """A numpy view of a CPU tensor (a copy from another device, and float32 for bfloat16, which numpy lacks)."""
    scores = scores.detach().cpu()
    return (scores.float() if scores.dtype == torch.bfloat16 else scores).numpy()


class FiniteScores:
    """Refuses non-finite scores as `check_finite` does, from the sum of each part ranked: a sum is
    finite only when its terms are. A sum that overflows (huge finite scores) sends the whole matrix
    to `check_finite` once."""

    def __init__(self, sims, name):
        self.sims, self.name, self.checked = sims, name, False

    def check(self, part):
        if self.checked:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(part.sum())
        if not finite:
            check_finite(self.sims, self.name)  # raises, naming the first; returns when the sum only overflowed
            self.checked = True


def encode_data(model, data_loader):
    """Image and caption embeddings (float32), one row per caption as the original.

    Each image is encoded once per batch and copied to the rows of its captions: in
    eval mode the encoder is deterministic, so this equals encoding every row.
    """
    model.val_start()
    dataset = data_loader.dataset
    img_embs = cap_embs = None
    with torch.no_grad():
        for images, captions, lengths, ids, _, _ in tqdm(
            data_loader, desc="encoding", unit="batch", leave=False, disable=None
        ):
            image_ids = [int(dataset.image_of[index]) for index in ids]
            first_row = {image_id: row for row, image_id in reversed(list(enumerate(image_ids)))}
            unique_ids = list(first_row)
            img_emb, cap_emb, _ = model.forward_emb(images[[first_row[i] for i in unique_ids]], captions, lengths)
            if img_embs is None:
                img_embs = np.zeros((len(dataset), img_emb.size(1)), dtype=np.float32)
                cap_embs = np.zeros((len(dataset), cap_emb.size(1)), dtype=np.float32)
            position = {image_id: k for k, image_id in enumerate(unique_ids)}
            img_embs[list(ids)] = img_emb.cpu().numpy()[[position[i] for i in image_ids]]
            cap_embs[list(ids)] = cap_emb.cpu().numpy()
    return img_embs, cap_embs


def print_recall(r, ri):
    """The original's lines of a recall table: image-to-text metrics `r`, text-to-image `ri`."""
    print("rsum: %.1f" % (sum(r[:3]) + sum(ri[:3])))
    print("Average i2t Recall: %.1f" % (sum(r[:3]) / 3))
    print("Image to text: %.1f %.1f %.1f %.1f %.1f" % tuple(r))
    print("Average t2i Recall: %.1f" % (sum(ri[:3]) / 3))
    print("Text to image: %.1f %.1f %.1f %.1f %.1f" % tuple(ri))


METRIC_NAMES = ("r1", "r5", "r10", "medr", "meanr", "r1i", "r5i", "r10i", "medri", "meanri")


def metrics_dict(values):
    """METRIC_NAMES' values (i2t then t2i) as a dict, with rsum, the sum of the six recalls."""
    metrics = dict(zip(METRIC_NAMES, values))
    metrics["rsum"] = sum(metrics[k] for k in ("r1", "r5", "r10", "r1i", "r5i", "r10i"))
    return metrics


def average_similarity(embeddings, measure="cosine", rows=slice(None), caption_images=None):
    """The (images, captions) score matrix of one model's (img_embs, cap_embs), or the average
    of several models' (an ensemble), over the caption rows `rows` (`caption_images`: the image
    of each of those rows, when they are not 5 per image)."""
    return sum(similarity(img[rows], cap[rows], measure, caption_images) for img, cap in embeddings) / len(embeddings)


def similarity_name(num_models):
    """How errors name the score matrix of one VSRN model or of an ensemble."""
    return "VSRN's similarity" if num_models == 1 else f"the {num_models}-model ensemble's averaged similarity"


FOLD_IMAGES = 1000  # COCO 1K: five folds of 1000 images


def fold_rows(fold, caption_images=None):
    """(caption rows, their images counted within the fold or None) of fold `fold` of the COCO 1K
    protocol: the captions of images 1000 * fold .. 1000 * fold + 999 (rows 5000 * fold .. with 5 per image)."""
    if caption_images is None:
        return slice(fold * 5 * FOLD_IMAGES, (fold + 1) * 5 * FOLD_IMAGES), None
    caption_images = np.asarray(caption_images)
    first, end = np.searchsorted(caption_images, [fold * FOLD_IMAGES, (fold + 1) * FOLD_IMAGES], side="left")
    return slice(int(first), int(end)), caption_images[first:end] - fold * FOLD_IMAGES


def evaluate_embeddings(embeddings, measure="cosine", fold5=False, sims=None, caption_images=None):
    """Recall of one model's (img_embs, cap_embs), or of several averaged as an ensemble.

    `sims`: their `average_similarity` over the whole split when the caller has it already
    (not used for fold5). `caption_images`: the image of each caption (grouped by image) when
    they are not 5 per image; fold5's folds are then the captions of 1000 images each.
    Prints the original's lines; returns (metrics dict, (rt, rti)) with the ranks of the whole
    split, or of the first fold for fold5 (as the original saved them).
    """
    num_captions = len(embeddings[0][1])
    name = similarity_name(len(embeddings))

    def evaluate(rows, rows_sims=None, name=name, rows_images=None):
        if rows_sims is None:
            rows_sims = average_similarity(embeddings, measure, rows, rows_images)
        img, cap = embeddings[0][0][rows], embeddings[0][1][rows]
        keywords = dict(measure=measure, return_ranks=True, sims=rows_sims, name=name, caption_images=rows_images)
        r, rt = i2t(img, cap, **keywords)
        ri, rti = t2i(img, cap, **keywords)
        return r, ri, rt, rti

    if not fold5:
        r, ri, rt, rti = evaluate(slice(0, num_captions), sims, rows_images=caption_images)
        print_recall(r, ri)
        metrics = metrics_dict(r + ri)
    else:
        results = []
        for fold in range(5):
            rows, rows_images = fold_rows(fold, caption_images)
            r, ri, rt_fold, rti_fold = evaluate(
                rows, name=f"{name}, fold {fold + 1} of 5 (counted within the fold)", rows_images=rows_images
            )
            if fold == 0:
                rt, rti = rt_fold, rti_fold
            print("Image to text: %.1f, %.1f, %.1f, %.1f, %.1f" % r)
            print("Text to image: %.1f, %.1f, %.1f, %.1f, %.1f" % ri)
            rsum = sum(r[:3]) + sum(ri[:3])
            print("rsum: %.1f ar: %.1f ari: %.1f" % (rsum, sum(r[:3]) / 3, sum(ri[:3]) / 3))
            results.append(r + ri)
        mean = np.mean(np.array(results), axis=0)
        print("-----------------------------------")
        print("Mean metrics: ")
        print_recall(tuple(mean[:5]), tuple(mean[5:]))
        metrics = metrics_dict(float(v) for v in mean)
    return metrics, (rt, rti)


# The eccv_caption metric groups computed (its names).
ECCV_TARGETS = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls", "coco_1k_recalls", "coco_5k_recalls")
ECCV_ROWS = (
    ("ECCV mAP@R", ("eccv_map_at_r",)),
    ("ECCV R-Precision", ("eccv_rprecision",)),
    ("ECCV R@1", ("eccv_r1",)),
    ("CxC R@1/5/10", ("cxc_r1", "cxc_r5", "cxc_r10")),
    ("COCO 1K R@1/5/10", ("coco_1k_r1", "coco_1k_r5", "coco_1k_r10")),
    ("COCO 5K R@1/5/10", ("coco_5k_r1", "coco_5k_r5", "coco_5k_r10")),
)
ECCV_TARGET_NAMES = tuple(name for _, names in ECCV_ROWS for name in names)  # what eccv_caption_metrics returns


def _eccv_metrics_class():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notice that ujson is absent
            from eccv_caption import Metrics
    except ImportError:
        raise OptionError("ECCV Caption metrics need the eccv_caption package: pip install eccv_caption") from None
    return Metrics


def eccv_caption_metrics(img_embs, cap_embs, caption_ids=None, measure="cosine", sims=None, name="the similarity"):
    """ECCV Caption (mAP@R, R-Precision, R@1), CxC R@1/5/10 and COCO 1K and 5K R@1/5/10 of the
    eccv_caption package, in percent: {name: {"i2t": value, "t2i": value}}.

    The embeddings are COCO's 5K test split in the Karpathy order of SCAN's `testall`, as
    `encode_data` returns them (one image row per caption; captions 5i..5i+4 describe image
    i). `caption_ids` are the COCO caption ids of the rows (default: the package's
    `coco_test_ids`, which are that order). `sims`, an (images, captions) score matrix such as
    an ensemble's `average_similarity`, replaces the one computed from the embeddings;
    non-finite scores are refused in one line naming `name`.
    """
    metrics = _eccv_metrics_class()()
    caption_ids = np.asarray(metrics.coco_ids if caption_ids is None else caption_ids, dtype=np.int64)
    if sorted(caption_ids.tolist()) != sorted(metrics.coco_ids.tolist()):
        raise ValueError("caption_ids must be the 25000 COCO 5K test caption ids of eccv_caption (in any order)")
    sims = torch.as_tensor(similarity(img_embs, cap_embs, measure) if sims is None else sims, dtype=torch.float32)
    if tuple(sims.shape) != (len(caption_ids) // 5, len(caption_ids)):
        raise ValueError(f"expected scores of 5000 images x 25000 captions, got {tuple(sims.shape)}")
    check_finite(sims, name)
    image_ids = np.asarray([metrics.coco_gts["t2i"][int(c)][0] for c in caption_ids[::5]])
    # The package's COCO 1K folds are blocks of 5000 of its own caption order.
    position = {int(c): k for k, c in enumerate(metrics.coco_ids)}
    caption_folds = np.asarray([position[int(c)] // 5000 for c in caption_ids])
    image_folds = caption_folds[::5]
    # Every positive of every query must be within reach: mAP@R reads R results deep.
    depth = max(
        10,
        *(
            len(v)
            for gts in (metrics.coco_gts, metrics.cxc_gts, metrics.eccv_gts)
            for d in gts.values()
            for v in d.values()
        ),
    )
    i2t_ranked = _ranked_targets(sims, depth, image_folds, caption_folds)
    t2i_ranked = _ranked_targets(sims.T, depth, caption_folds, image_folds)
    i2t_items = {int(image_ids[i]): caption_ids[ranked].tolist() for i, ranked in enumerate(i2t_ranked)}
    t2i_items = {int(caption_ids[j]): image_ids[ranked].tolist() for j, ranked in enumerate(t2i_ranked)}
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        scores = metrics.compute_all_metrics(i2t_items, t2i_items, target_metrics=ECCV_TARGETS, Ks=(1, 5, 10))
    return {name: {d: 100.0 * float(v) for d, v in value.items()} for name, value in scores.items()}


def _ranked_targets(scores, depth, query_folds, target_folds, fold_depth=10):
    """Per query (row of `scores`), target indices best first: its `depth` best overall,
    merged with its `fold_depth` best among the targets of its own fold (for COCO 1K), so
    that both the list's first `depth` entries and its fold's first `fold_depth` are exact."""
    ranked = [None] * scores.shape[0]
    for fold in np.unique(query_folds):
        queries = torch.from_numpy(np.flatnonzero(query_folds == fold))
        targets = torch.from_numpy(np.flatnonzero(target_folds == fold))
        step = _rows_per_chunk(scores.shape[1])
        for start in range(0, len(queries), step):
            rows = queries[start : start + step]
            chunk = scores[_as_index(rows)].contiguous()
            best, best_index = chunk.topk(min(depth, chunk.shape[1]), dim=1)
            in_fold, in_fold_index = chunk[:, _as_index(targets)].topk(min(fold_depth, len(targets)), dim=1)
            values = torch.cat([best, in_fold], dim=1)
            indices = torch.cat([best_index, targets[in_fold_index]], dim=1)
            order = values.argsort(dim=1, descending=True, stable=True)
            for row, merged in zip(rows.tolist(), indices.gather(1, order).tolist()):
                ranked[row] = list(dict.fromkeys(merged))
    return ranked


def _as_index(indices):
    """A slice (a view, no copy) when the sorted indices are consecutive, else the indices."""
    if len(indices) and int(indices[-1]) - int(indices[0]) == len(indices) - 1:
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices


def print_eccv_metrics(scores):
    print("ECCV Caption / CxC / COCO (eccv_caption), image to text | text to image:")
    for label, names in ECCV_ROWS:
        i2t_values = " / ".join("%.1f" % scores[n]["i2t"] for n in names)
        t2i_values = " / ".join("%.1f" % scores[n]["t2i"] for n in names)
        print(f"  {label:<18} {i2t_values:>18} | {t2i_values}")


def evalrank(
    *model_paths,
    data_path=None,
    split="dev",
    fold5=False,
    vocab_path=None,
    ranks_path=None,
    eccv=False,
    data_name=None,
):
    """Recall of one checkpoint, or of several as an ensemble (their similarity matrices averaged).

    fold5: the original's COCO 1K protocol, five folds of 1000 images averaged.
    eccv: also ECCV Caption / CxC / COCO metrics (`eccv_caption_metrics`; COCO `testall` only),
    printed after the table and added to the result as NAME_i2t and NAME_t2i.
    data_name: another dataset under the data path than the checkpoint's (e.g. a trained model on
    new data before fine-tuning: its captions read with the checkpoint's vocabulary, unknown words
    as <unk>). Any number of captions per image is ranked (see the module's docstring).
    Returns a dict of r1, r5, r10, medr, meanr, r1i, ..., meanri and rsum; saves the
    per-query ranks to `ranks_path` (default: ranks.pth.tar next to the first checkpoint).
    """
    if not model_paths:
        raise ValueError("evalrank needs at least one checkpoint path")
    if eccv:
        _eccv_metrics_class()  # a missing package fails before the encoding, not after
        if split != "testall":
            raise OptionError(
                f"--eccv: ECCV Caption and CxC annotate COCO's 5K test images; use --split testall, not {split}"
            )
    opt, vocab, models = load_models(model_paths, data_path, vocab_path, need_data=data_name is None)
    data_name = data_name or opt.data_name
    if data_name != opt.data_name:
        check_data_folder(opt.data_path, data_name, "check --data_path and --data_name")
    if eccv and not data_name.startswith("coco"):
        whose = "the checkpoint is for" if data_name == opt.data_name else "the data is"
        raise OptionError(f"--eccv: ECCV Caption and CxC annotate COCO's 5K test images; {whose} {data_name}")
    print("Loading dataset")
    loader = split_loader(opt, vocab, split, data_name)
    num_captions = len(loader.dataset)
    caption_images = getattr(loader.dataset, "caption_images", None)  # None: 5 per image
    num_images = num_captions // 5 if caption_images is None else len(first_caption_rows(caption_images))
    if fold5 and caption_images is None and num_captions < 25 * FOLD_IMAGES:
        raise DataError(f"fold5 needs 5 folds of 5000 captions; the {split} split of {data_name} has {num_captions}")
    if fold5 and num_images < 5 * FOLD_IMAGES:
        raise DataError(
            f"fold5 needs 5 folds of {FOLD_IMAGES} images; the {split} split of {data_name} has {num_images}"
        )
    if eccv and (caption_images is not None or num_captions != 25000):
        raise DataError(
            "--eccv needs COCO's 5K test split (5000 images of 5 captions); "
            f"the {split} split of {data_name} has {num_images} images and {num_captions} captions"
        )
    print("Computing results...")
    embeddings = [encode_data(model, loader) for model in models]
    print("Images: %d, Captions: %d" % (num_images, num_captions))
    sims = average_similarity(embeddings, opt.measure) if eccv else None
    if caption_images is None:  # five per image: the original's evaluation
        metrics, (rt, rti) = evaluate_embeddings(embeddings, opt.measure, fold5, sims=sims)
    else:
        metrics, (rt, rti) = evaluate_embeddings(embeddings, opt.measure, fold5, caption_images=caption_images)
    if eccv:
        scores = eccv_caption_metrics(None, None, sims=sims)
        print_eccv_metrics(scores)
        metrics.update({f"{name}_{direction}": value for name, d in scores.items() for direction, value in d.items()})
    ranks_path = ranks_path or os.path.join(os.path.dirname(os.path.abspath(model_paths[0])), "ranks.pth.tar")
    with atomic_write(ranks_path, "wb") as f:
        torch.save({"rt": tuple(torch.from_numpy(a) for a in rt), "rti": tuple(torch.from_numpy(a) for a in rti)}, f)
    return metrics
