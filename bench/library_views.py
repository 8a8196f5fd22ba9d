"""The served library's memory under concurrent views of a large photo: /api/photos/{id}/view of 8000 x 8000
pictures, requested by many clients at once, against a `search.py --serve` process.

    python3 bench/library_views.py [--side 8000] [--clients 16] [--photos 1] [--format jpeg|png]

A library of `--photos` pictures of `--side` x `--side` pixels (smooth gradients, so the files stay small;
decoding costs the same whatever the content), each with an obj36 row, indexed with a tiny checkpoint. The
server is started, asked for its page's library answer, and then `--clients` threads each ask for a view (of
the photos in turn). Printed: the server's resident memory before, its peak (VmHWM) after, the growth, the
time the views took and their status codes.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import describe, gemm_rate, print_table  # noqa: E402


def big_pictures(folder, side, count, fmt):
    """`count` pictures of side x side pixels in `folder`; their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    paths = []
    for number in range(count):
        pixels = np.empty((side, side, 3), dtype=np.uint8)
        pixels[..., 0] = ramp[None, :]
        pixels[..., 1] = ramp[:, None]
        pixels[..., 2] = (number * 37) % 256
        path = os.path.join(folder, f"big_{number:03d}.{'jpg' if fmt == 'jpeg' else 'png'}")
        Image.fromarray(pixels).save(path, quality=90) if fmt == "jpeg" else Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def rows_of(paths, side, feature_dim, tsv):
    """An obj36 TSV with a row of 36 random regions for each picture (matched by file stem)."""
    from utils.obj36 import format_obj36_line

    rng = np.random.default_rng(0)
    with open(tsv, "w") as out:
        for path in paths:
            start, size = rng.uniform(0, 0.7 * side, (36, 2)), rng.uniform(0.05 * side, 0.3 * side, (36, 2))
            regions = {
                "img_h": side,
                "img_w": side,
                "boxes": np.concatenate([start, start + size], axis=1).astype(np.float32),
                "features": rng.random((36, feature_dim), dtype=np.float32),
                "objects_id": rng.integers(0, 1600, 36),
                "objects_conf": np.ones(36, np.float32),
                "attrs_id": np.zeros(36, np.int64),
                "attrs_conf": np.ones(36, np.float32),
            }
            out.write(format_obj36_line(os.path.splitext(os.path.basename(path))[0], regions))
    return tsv


def make_library(work, side, count, fmt):
    """(the library's folder) of `count` big pictures, made with the toy world's tiny checkpoint."""
    from photo_world import TOY_DIM, make_world

    world = make_world(os.path.join(work, "world"), sizes={"test": 2}, seeds=(0,))
    paths = big_pictures(os.path.join(work, "big"), side, count, fmt)
    tsv = rows_of(paths, side, TOY_DIM, os.path.join(work, "big_obj36.tsv"))
    lib = os.path.join(work, "lib")
    args = ["--images", os.path.join(work, "big"), "--checkpoint", world.checkpoints[0], "--regions", tsv]
    subprocess.run([sys.executable, os.path.join(ROOT, "index.py"), *args, "--library", lib], check=True)
    return lib


def memory(pid):
    """(resident MB now, peak resident MB) of a process."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server(lib):
    """(the server process, its base URL) of `search.py --serve` on a free port."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "search.py"), "--library", lib, "--serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in process.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return process, found.group(1)
    raise RuntimeError("the server did not start")


def concurrent_views(lib, clients, photos):
    """{before_mb, peak_mb, growth_mb, seconds, statuses} of `clients` concurrent views against a fresh server."""
    process, base = start_server(lib)
    try:
        with urllib.request.urlopen(base + "api/library", timeout=120) as answer:
            json.load(answer)
        time.sleep(1.0)
        before, peak_before = memory(process.pid)
        statuses = []

        def view(number):
            try:
                with urllib.request.urlopen(f"{base}api/photos/{number % photos + 1}/view", timeout=600) as answer:
                    answer.read()
                    statuses.append(answer.status)
            except OSError as e:
                statuses.append(getattr(e, "code", str(e)))

        threads = [threading.Thread(target=view, args=(number,)) for number in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        now, peak = memory(process.pid)
        return {
            "before_mb": round(before),
            "peak_mb": round(peak),
            "growth_mb": round(peak - max(before, peak_before)),
            "after_mb": round(now),
            "seconds": round(seconds, 2),
            "statuses": sorted(set(map(str, statuses))),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=8000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--photos", type=int, default=1, help="distinct photos the clients ask for, in turn")
    p.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    args = p.parse_args()
    print_table([*describe(torch), ("GEMM", f"{gemm_rate(torch, 'cpu') / 1e9:.0f} GFLOP/s")], "machine")
    with tempfile.TemporaryDirectory() as work:
        lib = make_library(work, args.side, args.photos, args.format)
        found = concurrent_views(lib, args.clients, args.photos)
    print(
        f"{args.clients} concurrent views of {args.photos} {args.side} x {args.side} {args.format} photo(s): "
        f"server {found['before_mb']} MB before, peak {found['peak_mb']} MB (+{found['growth_mb']} MB), "
        f"{found['after_mb']} MB after; {found['seconds']} s; statuses {', '.join(found['statuses'])}"
    )


if __name__ == "__main__":
    main()
