"""Time i2t + t2i: the chunked GEMM ranking of evaluation.py against the original per-query loop.

    python3 bench/ranking.py [--sizes 1000,5000] [--repeats 3] [--loop-repeats 1]

1000 images x 5000 captions is the Flickr30K-1K test, 5000 x 25000 the COCO-5K one. "fast"
calls i2t and t2i on the embeddings, each computing the similarity matrix; "shared" computes
it once and passes it to both as sims=.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# With torch loaded, numpy's OpenBLAS threads and torch's OpenMP threads oversubscribe the cores
# and slow the loop's small products tens of times; one BLAS thread runs them at full speed.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' reference implementations
from evaluation import i2t, similarity, t2i  # noqa: E402
from reference_ranking import loop_i2t, loop_t2i  # noqa: E402

DIM = 1024
# Norm of each caption's noise relative to its image's; see embeddings().
NOISE = 7
NAMES = {1000: "Flickr30K-1K", 5000: "COCO-5K"}


def embeddings(n_images, seed=0):
    """Unit image embeddings and, for each, five unit captions: the image plus NOISE x noise.

    The loop's per-query products and the fast path's GEMMs round differently, by about 1e-8,
    which reorders a ground truth only when a competitor scores within that of it. Captions
    this close to their images put ground truths far enough above the crowd of random scores
    that this is expected for well under one query at COCO-5K, so the metrics must be equal.
    (Rounding to a grid coarse enough for exact float32 products ties many more scores.)
    """
    rng = np.random.default_rng(seed)
    images = normalise(rng.standard_normal((n_images, DIM)))
    noise = normalise(rng.standard_normal((5 * n_images, DIM)))
    captions = normalise(np.repeat(images, 5, axis=0) + NOISE * noise)
    return np.repeat(images, 5, axis=0).astype(np.float32), captions.astype(np.float32)


def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shared_similarity(images, captions):
    """i2t and t2i from one similarity matrix, as an evaluation reporting both should call them."""
    sims = similarity(images, captions)
    return i2t(images, captions, sims=sims), t2i(images, captions, sims=sims)


def median_seconds(evaluate, repeats):
    times, metrics = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = evaluate()
        times.append(time.perf_counter() - start)
    return statistics.median(times), metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000", help="comma-separated numbers of images")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast path")
    parser.add_argument("--loop-repeats", type=int, help="timed runs of the loop (default: --repeats)")
    args = parser.parse_args()
    loop_repeats = args.loop_repeats or args.repeats

    uname = platform.uname()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    )
    print(
        f"machine: {uname.system} {uname.release} {uname.machine}, "
        f"processor {platform.processor() or 'unknown'}, {os.cpu_count()} CPUs"
    )
    print(f"{'size':<32} {'loop s':>9} {'fast s':>9} {'speed-up':>9} {'shared s':>9}")
    for n_images in (int(size) for size in args.sizes.split(",")):
        images, captions = embeddings(n_images)
        loop_s, loop = median_seconds(
            lambda: (loop_i2t(images, captions)[0], loop_t2i(images, captions)[0]), loop_repeats
        )
        fast_s, fast = median_seconds(lambda: (i2t(images, captions), t2i(images, captions)), args.repeats)
        shared_s, shared = median_seconds(lambda: shared_similarity(images, captions), args.repeats)
        assert fast == shared == loop, f"metrics differ at {n_images} images: {fast}, {shared}, {loop}"
        name = f"{NAMES.get(n_images, '')} ({n_images} x {5 * n_images})".strip()
        print(f"{name:<32} {loop_s:>9.2f} {fast_s:>9.3f} {loop_s / fast_s:>8.1f}x {shared_s:>9.3f}", flush=True)
        print(f"  i2t r1 r5 r10 medr meanr: {fast[0]}\n  t2i r1 r5 r10 medr meanr: {fast[1]}")


if __name__ == "__main__":
    main()
