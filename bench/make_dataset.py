"""make_dataset.py's speed and disk: seconds a picture with the detector and from published rows, bytes a picture.

    python3 bench/make_dataset.py [--detector-pictures 3] [--rows-pictures 500] [--device cpu|cuda]
        [--batch_size N] [--proposals N] [--out DIR]

Pictures are random 480x640 JPEGs (COCO's usual size), each with 1 to 5 captions in a CSV. The detector
is the published architecture (ResNet-101 C4, 1600 classes, 400 attributes) with the deterministic random
weights of ../shared/frcnn_reference/weights_recipe.py (`--recipe`): speed does not depend on the weights.
The detector's run is make_dataset's whole work (pictures read and hashed, regions extracted into the
resume TSV, the layout and vocabulary written), timed with and without loading the detector; the rows'
run is the same from published rows (`--regions`) of 36 x 2048 random features: everything but the
detector. Then the bytes a picture takes: its row in the resume TSV, its features and boxes in the layout.
"""

import argparse
import csv
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import utils.threads  # noqa: F401,E402  (before torch: its threads wait as in make_dataset.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dataset_maker.make import DatasetRequest, make_dataset  # noqa: E402
from detection.network import PUBLISHED_ARCH, BottomUpDetector  # noqa: E402
from detection.weights import load_detector  # noqa: E402
from machine import describe, gemm_rate, print_table  # noqa: E402
from utils.obj36 import format_obj36_line  # noqa: E402

WORDS = "a dog cat bench tree kite ball on the next to with under near red blue green".split()


def write_pictures(folder, count, seed=0):
    """`count` random 480x640 JPEGs and a CSV of their captions (1 to 5 each); the CSV's path."""
    rng = np.random.RandomState(seed)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "captions.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        for i in range(count):
            name = f"photo{i:06d}.jpg"
            Image.fromarray(rng.randint(0, 256, (480, 640, 3), dtype=np.uint8)).save(
                os.path.join(folder, name), quality=90
            )
            writer.writerows([name, " ".join(rng.choice(WORDS, 8))] for _ in range(rng.randint(1, 6)))
    return path


def write_rows(path, count, seed=0):
    """Published-style obj36 rows (36 boxes of 2048 random features) of photo000000 ..."""
    rng = np.random.RandomState(seed)
    with open(path, "w") as f:
        for i in range(count):
            regions = {
                "img_h": 480,
                "img_w": 640,
                "objects_id": rng.randint(0, 1600, 36),
                "objects_conf": rng.random_sample(36),
                "attrs_id": rng.randint(0, 400, 36),
                "attrs_conf": rng.random_sample(36),
                "boxes": rng.uniform(0, 480, (36, 4)),
                "features": rng.random_sample((36, 2048)).astype(np.float32),
            }
            f.write(format_obj36_line(f"photo{i:06d}", regions))


def recipe_state_dict(recipe_path):
    """The published architecture's state dict with the recipe's deterministic random weights."""
    if not os.path.isfile(recipe_path):
        sys.exit(f"error: {recipe_path}: weights recipe not found (pass --recipe)")
    spec = importlib.util.spec_from_file_location("weights_recipe", recipe_path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    template = {k: tuple(v.shape) for k, v in BottomUpDetector(PUBLISHED_ARCH).state_dict().items()}
    return recipe.make_state_dict(template, seed=0)


def timed_make(request):
    start = time.perf_counter()
    summary = make_dataset(request)
    return time.perf_counter() - start, summary


def folder_bytes(folder, suffix):
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(suffix))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector-pictures", type=int, default=3, help="pictures through the detector")
    parser.add_argument("--rows-pictures", type=int, default=500, help="pictures from published rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=1, help="pictures per detector pass")
    parser.add_argument("--proposals", type=int, default=None, help="RPN proposals kept (None: 300)")
    parser.add_argument(
        "--recipe", default=os.path.join(os.path.dirname(ROOT), "shared", "frcnn_reference", "weights_recipe.py")
    )
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="bench_make_dataset_")
    rates = [gemm_rate(torch, args.device, convolution=True) / 1e9]
    print_table(describe(torch, args.device), "Machine")

    weights = os.path.join(work, "frcnn_random.bin")
    if not os.path.isfile(weights):
        torch.save(recipe_state_dict(args.recipe), weights)
    start = time.perf_counter()
    load_detector(weights, device=args.device)
    load_seconds = time.perf_counter() - start

    rows_table = []
    if args.detector_pictures:
        annotations = write_pictures(os.path.join(work, "detector_pictures"), args.detector_pictures)
        request = DatasetRequest(
            os.path.join(work, "data"), "detector_precomp", annotations=[(None, annotations)], detector=weights,
            device=args.device, batch_size=args.batch_size, proposals=args.proposals, splits="1,0,0",
            vocab_path=os.path.join(work, "vocab"), threshold=1,
        )  # fmt: skip
        seconds, summary = timed_make(request)
        rates.append(gemm_rate(torch, args.device, convolution=True) / 1e9)
        count = args.detector_pictures
        folder = summary.folder
        tsv, layout = folder_bytes(folder, ".tsv") / count / 1024, folder_bytes(folder, ".npy") / count / 1024
        rows_table += [
            (f"detector, {count} pictures", f"{seconds / count:.2f} s a picture ({seconds:.1f} s in all)"),
            ("  less loading the detector", f"{(seconds - load_seconds) / count:.2f} s a picture"),
            ("  loading the detector", f"{load_seconds:.1f} s"),
            ("  resume TSV", f"{tsv:.0f} KiB a picture"),
            ("  layout (features, boxes, sizes)", f"{layout:.0f} KiB a picture"),
        ]
    if args.rows_pictures:
        annotations = write_pictures(os.path.join(work, "rows_pictures"), args.rows_pictures, seed=1)
        rows = os.path.join(work, "rows.tsv")
        write_rows(rows, args.rows_pictures)
        request = DatasetRequest(
            os.path.join(work, "data"), "rows_precomp", annotations=[(None, annotations)], regions=[rows],
            splits="0.8,0.1,0.1", vocab_path=os.path.join(work, "vocab"), threshold=1,
        )  # fmt: skip
        seconds, summary = timed_make(request)
        count = args.rows_pictures
        per_picture = 1000 * seconds / count
        layout = folder_bytes(summary.folder, ".npy") / count / 1024
        rows_table += [
            (f"published rows, {count} pictures", f"{per_picture:.1f} ms a picture ({seconds:.1f} s in all)"),
            ("  rows file", f"{os.path.getsize(rows) / count / 1024:.0f} KiB a picture"),
            ("  layout (features, boxes, sizes)", f"{layout:.0f} KiB a picture"),
        ]
    print_table(
        [("float32 GEMM (1x1 convolution)", " / ".join(f"{r:.0f}" for r in rates) + " GFLOP/s (before / after)")]
        + rows_table,
        f"make_dataset.py on {args.device}",
    )
    if not args.out:
        import shutil

        shutil.rmtree(work)


if __name__ == "__main__":
    main()
