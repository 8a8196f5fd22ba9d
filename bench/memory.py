"""Start-up time and memory of the train loader on a Flickr30K-sized split.

    python3 bench/memory.py [--dir DIR] [--batches 200] [--batch-size 128] [--workers 0] [--skip-full-load]

Generates DIR/f30k_synth_precomp once (29000 x 36 x 2048 float32 features, ~8.6 GB, and
145000 captions), then measures each figure in a fresh process, so that none inherits
another's memory or token cache: time to the first batch with an empty token cache (cold)
and with the cache it left (warm), peak RSS while iterating shuffled batches, and, for
contrast, the peak RSS of loading the features with a plain np.load.

ru_maxrss counts every resident page mapped into the process: the loader reads each image
into its own buffer, so it stays near the process's own memory (RssAnon); a memory map
of the features would add every page the batches touched (RssFile).
"""

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data import get_precomp_loader  # noqa: E402
from machine import describe, print_table  # noqa: E402
from utils.atomic import atomic_write  # noqa: E402
from utils.options import build_parser  # noqa: E402
from vocab import SPECIAL_TOKENS, load_vocab, save_vocab, vocabulary_from_words  # noqa: E402

NAME = "f30k_synth_precomp"
IMAGES, REGIONS, IMG_DIM, CAPTIONS_PER_IMAGE = 29000, 36, 2048, 5
NUM_WORDS = 400


def word_list(rng):
    """NUM_WORDS made-up lower-case words, each a single token to the tokenizer."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(4 * NUM_WORDS)})
    return list(rng.permutation(words)[:NUM_WORDS])


def write_captions(path, words, rng):
    """Flickr-like: 6 to 30 words (mean about 12), word frequencies falling off as 1/rank."""
    count = IMAGES * CAPTIONS_PER_IMAGE
    lengths = np.minimum(6 + rng.negative_binomial(2, 0.25, size=count), 30)
    p = 1.0 / np.arange(1, len(words) + 1)
    drawn = np.asarray(words)[rng.choice(len(words), size=int(lengths.sum()), p=p / p.sum())]
    ends = np.cumsum(lengths)
    with atomic_write(path, "w") as f:
        f.writelines(" ".join(drawn[end - n : end]) + "\n" for n, end in zip(lengths, ends))


def complete(folder, vocab_path):
    """Every file is written under another name and renamed when done: present means complete."""
    ims_path = os.path.join(folder, "train_ims.npy")
    paths = (ims_path, os.path.join(folder, "train_caps.txt"), vocab_path)
    return all(os.path.isfile(p) for p in paths) and np.load(ims_path, mmap_mode="r").shape == (
        IMAGES,
        REGIONS,
        IMG_DIM,
    )


def generate(folder, vocab_path, seed=0):
    ims_path, caps_path = os.path.join(folder, "train_ims.npy"), os.path.join(folder, "train_caps.txt")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = word_list(rng)
    write_captions(caps_path, words, rng)
    save_vocab(vocabulary_from_words(list(SPECIAL_TOKENS) + words), vocab_path)
    tmp = ims_path + ".partial"
    features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(IMAGES, REGIONS, IMG_DIM))
    chunk = 500  # images, ~150 MB: generation never holds more than this in anonymous memory
    for start in range(0, IMAGES, chunk):
        stop = min(start + chunk, IMAGES)
        features[start:stop] = rng.random((stop - start, REGIONS, IMG_DIM), dtype=np.float32)
        features.flush()  # written back as we go, so dirty pages never pile up
    del features
    os.replace(tmp, ims_path)


def peak_rss():
    """GB: ru_maxrss, plus the largest (joined) child's."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb * 1024 / 1e9


def proc_status():
    """GB now of RssAnon and RssFile, and VmHWM, this process's own peak RSS."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                status[key] = int(value.split()[0]) * 1024 / 1e9
    return status


def child(mode, args, folder, vocab_path):
    """Runs in a fresh process, whose imports count in its start-up; returns what it measured."""
    if mode == "generate":
        generate(folder, vocab_path)
        return {}
    if mode == "np-load":
        features = np.load(os.path.join(folder, "train_ims.npy"))
        return {"shape": list(features.shape), "peak": peak_rss(), **proc_status()}
    start = time.perf_counter()
    defaults = build_parser().parse_args([])
    loader = get_precomp_loader(
        folder,
        "train",
        load_vocab(vocab_path),
        defaults.max_len,
        defaults.img_dim,
        args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        seed=0,
    )
    batches = iter(loader)
    next(batches)
    result = {"first_batch_at": time.time(), "loader": time.perf_counter() - start}
    if mode == "iterate":
        start = time.perf_counter()
        for _, _ in zip(range(args.batches - 1), batches):
            pass
        result["iterate"] = time.perf_counter() - start
        result.update(proc_status())
        del batches, loader  # joins the workers, so RUSAGE_CHILDREN counts them
        gc.collect()
        result["peak"] = peak_rss()
    return result


def run_child(mode, args, cache):
    env = dict(os.environ, VSRN_CACHE=cache, PYTHONWARNINGS="ignore")
    launched = time.time()
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--dir",
        args.dir,
        "--batches",
        str(args.batches),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "first_batch_at" in result:
        result["from_start"] = result["first_batch_at"] - launched
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/vsrn_bench")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--skip-full-load", action="store_true", help="skip the ~8.6 GB plain np.load")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = os.path.join(args.dir, NAME)
    vocab_path = os.path.join(args.dir, f"{NAME}_vocab.json")
    if args.child:
        print(json.dumps(child(args.child, args, folder, vocab_path)))
        return

    cache = tempfile.mkdtemp(prefix="vsrn_cache_")
    try:
        if not complete(folder, vocab_path):
            # In its own process: writing the features maps all 8.6 GB of them, and a process
            # started by subprocess (vfork, then exec) inherits its parent's peak in ru_maxrss.
            print(f"generating {folder} (~{IMAGES * REGIONS * IMG_DIM * 4 / 1e9:.1f} GB)", flush=True)
            run_child("generate", args, cache)
        cold = run_child("first-batch", args, cache)
        warm = run_child("first-batch", args, cache)
        iterate = run_child("iterate", args, cache)
        full = None if args.skip_full_load else run_child("np-load", args, cache)
    finally:
        shutil.rmtree(cache)

    title = f"Train loader on a Flickr30K-sized split ({IMAGES} images, {IMAGES * CAPTIONS_PER_IMAGE} captions)"
    print_table(describe(torch), title)
    rows = [
        (
            "cold start (empty token cache)",
            f"{cold['from_start']:6.2f} s to the first batch ({cold['loader']:.2f} s after imports)",
        ),
        (
            "warm start (token cache filled)",
            f"{warm['from_start']:6.2f} s to the first batch ({warm['loader']:.2f} s after imports)",
        ),
        (
            f"iterating {args.batches} x {args.batch_size}, {args.workers} workers",
            f"{iterate['peak']:6.2f} GB peak RSS (ru_maxrss{', + largest worker' if args.workers else ''}; "
            f"VmHWM of the main process {iterate['VmHWM']:.2f}); "
            f"at the end RssAnon {iterate['RssAnon']:.2f} GB, RssFile {iterate['RssFile']:.2f} GB; "
            f"{args.batches / (iterate['iterate'] + iterate['loader']):.1f} batches/s",
        ),
    ]
    if full:
        rows.append(
            (
                "plain np.load of train_ims.npy",
                f"{full['peak']:6.2f} GB peak RSS (ru_maxrss; VmHWM {full['VmHWM']:.2f}); "
                f"RssAnon {full['RssAnon']:.2f} GB",
            )
        )
    print_table(rows, "Measured, each in a fresh process")
    print_table(
        [
            ("warm start <= 5 s", "met" if warm["from_start"] <= 5 else "NOT met"),
            (
                "peak RSS <= 2.5 GB",
                f"ru_maxrss {'met' if iterate['peak'] <= 2.5 else 'NOT met'}, "
                f"RssAnon {'met' if iterate['RssAnon'] <= 2.5 else 'NOT met'}",
            ),
        ],
        "Targets",
    )


if __name__ == "__main__":
    main()
