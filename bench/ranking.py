"""Time i2t + t2i: the similarity GEMM and each ranking direction, against the previous
implementation and the original per-query loop.

    python3 bench/ranking.py [--sizes 1000,5000] [--dim 1024] [--repeats 3] [--loop-repeats 1]

1000 images x 5000 captions is the Flickr30K-1K test, 5000 x 25000 the COCO-5K one. Per size:
the float32 similarity GEMM (evaluation.similarity), then ranks_i2t and ranks_t2i on that one
matrix (as evalrank calls them), then the previous torch implementation
(tests/reference_counting.py) on the same matrix, and the original loop (`--loop-repeats 0`
leaves it out: it takes a minute at COCO-5K). The ranking's cost does not depend on the
embeddings' dimension, the GEMM's grows with it: `--dim` 1024 is VSE++'s, VSRN's is 2048.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# With torch loaded, numpy's OpenBLAS threads and torch's OpenMP threads oversubscribe the cores
# and slow the loop's small products tens of times; one BLAS thread runs them at full speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils.threads  # noqa: E402,F401  (before torch, as the scripts)
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' reference implementations
from evaluation import i2t, ranks_i2t, ranks_t2i, recall_metrics, similarity, t2i  # noqa: E402
from machine import describe, gemm_rate, print_table  # noqa: E402
from reference_counting import counted_i2t, counted_t2i  # noqa: E402
from reference_ranking import loop_i2t, loop_t2i  # noqa: E402

# Norm of each caption's noise relative to its image's; see embeddings().
NOISE = 7
NAMES = {1000: "Flickr30K-1K", 5000: "COCO-5K"}


def embeddings(n_images, dim, seed=0):
    """Unit image embeddings and, for each, five unit captions: the image plus NOISE x noise.

    The loop's per-query products and the fast path's GEMMs round differently, by about 1e-8,
    which reorders a ground truth only when a competitor scores within that of it. Captions
    this close to their images put ground truths far enough above the crowd of random scores
    that this is expected for well under one query at COCO-5K, so the metrics must be equal.
    (Rounding to a grid coarse enough for exact float32 products ties many more scores.)
    """
    rng = np.random.default_rng(seed)
    images = normalise(rng.standard_normal((n_images, dim)))
    noise = normalise(rng.standard_normal((5 * n_images, dim)))
    captions = normalise(np.repeat(images, 5, axis=0) + NOISE * noise)
    return np.repeat(images, 5, axis=0).astype(np.float32), captions.astype(np.float32)


def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def median_seconds(run, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def same(ranked, expected):
    return all(np.array_equal(a, b) for a, b in zip(ranked, expected))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000", help="comma-separated numbers of images")
    parser.add_argument("--dim", type=int, default=1024, help="the embeddings' dimension")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each step (their median)")
    parser.add_argument("--loop-repeats", type=int, default=1, help="timed runs of the original loop (0: none)")
    args = parser.parse_args()

    gemm = gemm_rate(torch, "cpu")
    print_table(
        describe(torch)
        + [
            ("float32 GEMM", f"{gemm / 1e9:.0f} GFLOP/s (torch.mm, 2048^3)"),
            ("numpy", f"{np.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"),
        ],
        "machine",
    )
    rows = []
    for n_images in (int(size) for size in args.sizes.split(",")):
        images, captions = embeddings(n_images, args.dim)
        gemm_s, sims = median_seconds(lambda: similarity(images, captions), args.repeats)
        i2t_s, ranked_i2t = median_seconds(lambda: ranks_i2t(sims), args.repeats)
        t2i_s, ranked_t2i = median_seconds(lambda: ranks_t2i(sims), args.repeats)
        before_i2t_s, counted_i2t_ranks = median_seconds(lambda: counted_i2t(sims), args.repeats)
        before_t2i_s, counted_t2i_ranks = median_seconds(lambda: counted_t2i(sims), args.repeats)
        assert same(ranked_i2t, counted_i2t_ranks) and same(ranked_t2i, counted_t2i_ranks), (
            f"ranks or top-1 differ from the previous implementation's at {n_images} images"
        )
        metrics = (recall_metrics(ranked_i2t[0]), recall_metrics(ranked_t2i[0]))
        assert metrics == (i2t(None, None, sims=sims), t2i(None, None, sims=sims))
        loop = ""
        if args.loop_repeats:
            loop_s, loop_metrics = median_seconds(
                lambda: (loop_i2t(images, captions)[0], loop_t2i(images, captions)[0]), args.loop_repeats
            )
            assert loop_metrics == metrics, f"metrics differ from the loop's at {n_images} images"
            loop = f"; the original loop {loop_s:.2f} s"
        name = f"{NAMES.get(n_images, '')} ({n_images} x {5 * n_images}, dim {args.dim})".strip()
        total = gemm_s + i2t_s + t2i_s
        before = gemm_s + before_i2t_s + before_t2i_s
        flops = 2 * n_images * 5 * n_images * args.dim
        rows.append(
            (
                name,
                f"GEMM {gemm_s:.3f} s ({flops / gemm_s / 1e9:.0f} GFLOP/s), i2t {i2t_s:.3f} s, t2i {t2i_s:.3f} s: "
                f"ranking {(i2t_s + t2i_s) / gemm_s:.2f}x the GEMM, all {total:.3f} s = {total / gemm_s:.2f}x; "
                f"before: i2t {before_i2t_s:.3f} s, t2i {before_t2i_s:.3f} s, all {before:.3f} s = "
                f"{before / gemm_s:.2f}x{loop}",
            )
        )
        print(rows[-1][0], rows[-1][1], flush=True)
        print(f"  i2t r1 r5 r10 medr meanr: {metrics[0]}\n  t2i r1 r5 r10 medr meanr: {metrics[1]}")
    print_table(rows, "i2t + t2i from one similarity matrix (medians; identical ranks, top-1 and metrics)")


if __name__ == "__main__":
    main()
