"""Memory and speed of utils.tsv_to_precomp on a generated multi-GB obj36 TSV.

    python3 bench/tsv_convert.py [--dir DIR] [--gb 2.5] [--repeats 3]

Generates DIR/features_obj36.tsv once (LXMERT's 10-field layout, 36 boxes x 2048 float32 per
line, ~393 KB of base64 per image) and its captions, then converts it `--repeats` times, each
in a fresh process, and prints the converter's peak RSS (VmHWM: its own resident high-water
mark) against the size of the feature array it wrote, and lines per second (median).
Streaming keeps the peak flat: it does not grow with the TSV (COCO's train TSV is 17 GB).
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machine import describe, print_table  # noqa: E402

BOXES, DIM = 36, 2048
POOL = 16  # distinct feature arrays cycled through the lines: generation stays fast


def b64(array, dtype):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes())


def generate(tsv_path, caps_path, target_bytes, seed=0):
    rng = np.random.default_rng(seed)
    pool = [b64(rng.random((BOXES, DIM), dtype=np.float32), np.float32) for _ in range(POOL)]
    ids, conf = b64(np.arange(BOXES), np.int64), b64(np.linspace(0, 1, BOXES), np.float32)
    written, line_number = 0, 0
    with open(tsv_path + ".partial", "wb") as tsv, open(caps_path + ".partial", "w", encoding="utf-8") as caps:
        while written < target_bytes:
            image_id = f"{100000 + line_number}"
            boxes = np.sort(rng.uniform(0, 480, size=(BOXES, 4)), axis=1)[:, [0, 2, 1, 3]]
            line = (
                b"\t".join(
                    [
                        image_id.encode(),
                        b"480",
                        b"640",
                        ids,
                        conf,
                        ids,
                        conf,
                        str(BOXES).encode(),
                        b64(boxes, np.float32),
                        pool[line_number % POOL],
                    ]
                )
                + b"\n"
            )
            tsv.write(line)
            caps.writelines(f"{image_id}\tcaption {k} of image {image_id}\n" for k in range(5))
            written += len(line)
            line_number += 1
    os.replace(caps_path + ".partial", caps_path)
    os.replace(tsv_path + ".partial", tsv_path)  # last: present means complete
    return line_number


def peak_rss_gb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def convert_child(tsv_path, caps_path, data_path):
    from utils.tsv_to_precomp import main as convert

    start = time.perf_counter()
    code = convert(
        [
            "--tsv",
            tsv_path,
            "--captions",
            caps_path,
            "--data_path",
            data_path,
            "--data_name",
            "bench_precomp",
            "--split",
            "train",
        ]
    )
    return {"code": code, "seconds": time.perf_counter() - start, "peak": peak_rss_gb()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/vsrn_bench_tsv")
    p.add_argument("--gb", type=float, default=2.5, help="size of the generated TSV")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tsv_path, caps_path = os.path.join(args.dir, "features_obj36.tsv"), os.path.join(args.dir, "captions.txt")
    data_path = os.path.join(args.dir, "data")
    if args.child:
        print(json.dumps(convert_child(tsv_path, caps_path, data_path)))
        return
    os.makedirs(args.dir, exist_ok=True)
    if not os.path.isfile(tsv_path) or abs(os.path.getsize(tsv_path) - args.gb * 1e9) > 0.01 * args.gb * 1e9:
        print(f"generating {tsv_path} (~{args.gb:.1f} GB)", flush=True)
        generate(tsv_path, caps_path, args.gb * 1e9)
    with open(caps_path, encoding="utf-8") as f:
        lines = sum(1 for _ in f) // 5
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", "--dir", args.dir],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        if not result or result["code"] != 0:
            sys.exit(f"conversion failed:\n{done.stdout}\n{done.stderr}")
        runs.append({**result, "wall": wall})
    features_gb = lines * BOXES * DIM * 4 / 1e9
    tsv_gb = os.path.getsize(tsv_path) / 1e9
    seconds = statistics.median(r["seconds"] for r in runs)
    import torch  # only to describe the machine as the other benchmarks do

    print_table(describe(torch), f"tsv_to_precomp.py on a {tsv_gb:.2f} GB obj36 TSV ({lines} images x {BOXES} x {DIM})")
    peaks = ", ".join("%.3f" % r["peak"] for r in runs)
    times = ", ".join("%.1f" % r["seconds"] for r in runs)
    print_table(
        [
            (
                "peak RSS of the converter (VmHWM)",
                f"{max(r['peak'] for r in runs):.3f} GB (runs: {peaks}); "
                f"the feature array it wrote: {features_gb:.2f} GB",
            ),
            (
                "conversion time (median)",
                f"{seconds:.1f} s (runs: {times}); with start-up {statistics.median(r['wall'] for r in runs):.1f} s",
            ),
            ("throughput (median)", f"{lines / seconds:.0f} lines/s, {tsv_gb * 1000 / seconds:.0f} MB/s of TSV"),
            ("COCO train TSV (17 GB) at this rate", f"~{17 / tsv_gb * seconds / 60:.0f} min"),
        ],
        f"Measured, {args.repeats} conversions, each in a fresh process",
    )


if __name__ == "__main__":
    main()
