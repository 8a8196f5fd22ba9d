"""evaluation.py's ranking as it was before it moved to numpy passes over cache-sized blocks: torch
comparisons over chunks of 16M scores, the columns of t2i read in place.

The yardstick for the ranking's identical outputs, ties and the variable-captions form included
(tests/test_ranking.py), and the "before" of bench/ranking.py.
"""

import math

import torch

from evaluation import check_finite

CHUNK_ELEMENTS = 1 << 24


def counted_i2t(sims, name="the scores", caption_images=None):
    """(ranks, top1) of each image, as ranks_i2t returns them."""
    sims = torch.as_tensor(sims)
    if caption_images is not None:
        caption_images = torch.as_tensor(caption_images, dtype=torch.int64)
        own = sims[caption_images, torch.arange(sims.shape[1])]
        truths = torch.full((len(sims),), -math.inf, dtype=sims.dtype).scatter_reduce(0, caption_images, own, "amax")
    step = _rows_per_chunk(sims.shape[1])
    ranks, top1 = [], []
    for start in range(0, len(sims), step):
        rows = sims[start : start + step]
        if not torch.isfinite(rows).all():
            check_finite(sims, name)
        if caption_images is None:
            own_captions = 5 * torch.arange(start, start + len(rows))[:, None] + torch.arange(5)
            truth = rows.gather(1, own_captions).amax(1)
        else:
            truth = truths[start : start + len(rows)]
        ranks.append((rows > truth[:, None]).sum(1, dtype=torch.int32))
        top1.append(rows.argmax(1))
    return _as_float_arrays(ranks, top1)


def counted_t2i(sims, name="the scores", caption_images=None):
    """(ranks, top1) of each caption, as ranks_t2i returns them."""
    sims = torch.as_tensor(sims)
    caption_images = (
        torch.arange(sims.shape[1]) // 5
        if caption_images is None
        else torch.as_tensor(caption_images, dtype=torch.int64)
    )
    n_images = len(sims)
    images = torch.arange(n_images, dtype=torch.int32)[:, None]
    step = _rows_per_chunk(n_images)
    ranks, top1 = [], []
    for start in range(0, sims.shape[1], step):
        columns = sims[:, start : start + step]
        if not torch.isfinite(columns).all():
            check_finite(sims, name)
        captions = torch.arange(start, start + columns.shape[1])
        truth = columns[caption_images[captions], captions - start]
        ranks.append((columns > truth).sum(0, dtype=torch.int32))
        is_best = columns == columns.amax(0)
        top1.append(torch.where(is_best, images, n_images).amin(0))
    return _as_float_arrays(ranks, top1)


def _rows_per_chunk(elements_per_row):
    return max(1, CHUNK_ELEMENTS // max(1, elements_per_row))


def _as_float_arrays(ranks, top1):
    return torch.cat(ranks).numpy().astype(float), torch.cat(top1).numpy().astype(float)
