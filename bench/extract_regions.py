"""Region extraction speed: images/s and per-stage times of the bottom-up-attention detector.

    python3 bench/extract_regions.py [--device cpu|cuda] [--policy hf|caffe] [--batch-sizes 1,4,8]
        [--bf16] [--image-size 480x640] [--min_size N --max_size N --proposals N] [--smoke]

The published architecture (ResNet-101 C4, 1600 classes, 400 attributes) with the deterministic
random weights of ../shared/frcnn_reference/weights_recipe.py (`--recipe`), so nothing is
downloaded; speed does not depend on the weights. Pictures are random, `--image-size` pixels
(COCO's usual 480x640 by default), resized as the policy does: hf (the default) at the published
800 / 1333 with 300 proposals, caffe at 600 / 1000 with 300. Each batch size runs the same number
of images (`--images`, default 8) after one warm-up batch; stages are timed with the device
synchronised (per image: the batch's time over its images):
  preprocess, backbone (stem to res4), rpn (head, anchors, NMS), roi_pool, res5 (+ mean pool),
  heads (object and attribute logits), selection (box regression, NMS, the policy's choice).
`--bf16` runs everything again under torch.autocast(bfloat16) and reports its deviation from
fp32: the region features of the same proposals, and how many kept boxes and object ids agree.
`--smoke` checks the script on a small detector and small pictures in seconds.
"""

import argparse
import importlib.util
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from detection.extract import extract_regions, extract_regions_batch, score_regions  # noqa: E402
from detection.network import PUBLISHED_ARCH, BottomUpDetector  # noqa: E402
from detection.policies import POLICIES, make_policy  # noqa: E402
from detection.weights import load_detector  # noqa: E402
from machine import describe, print_table  # noqa: E402

STAGES = ("preprocess", "backbone", "rpn", "roi_pool", "res5", "heads", "selection")
SMOKE_ARCH = dict(
    PUBLISHED_ARCH,
    stem=8,
    res2=(1, 8, 16),
    res3=(1, 8, 32),
    res4=(2, 16, 64),
    res5=(1, 16, 64),
    rpn_hidden=32,
    embedding=16,
    attr_hidden=32,
)


def load_recipe(path):
    if not Path(path).is_file():
        sys.exit(f"error: {path}: weights recipe not found (pass --recipe)")
    spec = importlib.util.spec_from_file_location("weights_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def random_detector(arch, recipe, device):
    template = {k: tuple(v.shape) for k, v in BottomUpDetector(arch).state_dict().items()}
    return load_detector(recipe.make_state_dict(template, seed=0), device=device)


def pictures(count, height, width):
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Seconds per stage, the device synchronised around each."""

    def __init__(self, device):
        self.device, self.seconds = device, defaultdict(float)

    @contextmanager
    def __call__(self, stage):
        synchronise(self.device)
        start = time.perf_counter()
        yield
        synchronise(self.device)
        self.seconds[stage] += time.perf_counter() - start


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def measure(detector, images, batch_size, settings, bf16=False):
    """(images/s, CPU seconds per image, seconds per image by stage) over `images`, after one
    warm-up batch. CPU time (all threads) shows the work done also on a busy shared machine."""
    device = detector.device
    with autocast(device, bf16):
        extract_regions_batch(detector, images[:batch_size], **settings)
    timer = StageTimer(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast(device, bf16):
        for i in range(0, len(images), batch_size):
            extract_regions_batch(detector, images[i : i + batch_size], timer=timer, **settings)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return len(images) / total, cpu / len(images), {stage: timer.seconds[stage] / len(images) for stage in STAGES}


def bf16_deviation(detector, image, settings):
    """bf16 against fp32 on one picture: features of the same proposals, kept boxes and ids."""
    scored = score_regions(
        detector, [image], settings["policy"], settings["min_size"], settings["max_size"], settings["proposals"]
    )[0]
    with torch.inference_mode(), autocast(detector.device, True):
        res4 = detector.backbone(scored["input"].unsqueeze(0))
        rois = torch.cat([torch.zeros(len(scored["proposals"]), 1, device=res4.device), scored["proposals"]], dim=1)
        features = detector.region_features(res4, rois).float()
    reference = scored["features"]
    relative = ((features - reference).abs().max() / reference.abs().max()).item()
    fp32 = extract_regions(detector, image, **settings)
    with autocast(detector.device, True):
        bf16 = extract_regions(detector, image, **settings)
    same_box = np.abs(fp32["boxes"][:, None] - bf16["boxes"][None]).max(axis=2) < 1.0
    matched = same_box.any(axis=1).mean()
    ids = np.mean(
        [
            (bf16["objects_id"][same_box[i]] == fp32["objects_id"][i]).any()
            for i in range(len(fp32["boxes"]))
            if same_box[i].any()
        ]
        or [0.0]
    )
    return [
        ("features, same proposals", f"max |bf16 - fp32| / max |fp32| = {relative:.2e}"),
        ("kept boxes", f"{matched:.0%} of fp32's also kept under bf16 (within 1 px)"),
        ("object ids", f"{ids:.0%} of those boxes with the same class"),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--policy", default="hf", choices=tuple(POLICIES))
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--images", type=int, default=8, help="pictures timed per batch size")
    parser.add_argument("--image-size", default="480x640", help="HEIGHTxWIDTH of the random pictures")
    parser.add_argument("--min_size", type=int, default=None)
    parser.add_argument("--max_size", type=int, default=None)
    parser.add_argument("--proposals", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast and measure its deviation")
    parser.add_argument("--recipe", default=str(ROOT.parent / "shared" / "frcnn_reference" / "weights_recipe.py"))
    parser.add_argument(
        "--smoke", action="store_true", help="a small detector on small pictures: checks the script runs"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    height, width = (int(x) for x in args.image_size.lower().split("x"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.smoke:
        height, width = min(height, 120), min(width, 160)
        args.images, args.min_size, args.max_size, args.proposals = (
            min(args.images, 4),
            args.min_size or 96,
            args.max_size or 160,
            args.proposals or 50,
        )
    settings = {
        "policy": args.policy,
        "num_boxes": 36,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "proposals": args.proposals,
    }

    torch.manual_seed(0)
    start = time.perf_counter()
    detector = random_detector(SMOKE_ARCH if args.smoke else PUBLISHED_ARCH, load_recipe(args.recipe), device)
    print_table(describe(torch, device), "machine")
    plan = make_policy(
        detector, args.policy, num_boxes=36, min_size=args.min_size, max_size=args.max_size, proposals=args.proposals
    )
    print_table(
        [
            (
                "detector",
                "smoke-test size" if args.smoke else "ResNet-101 C4, 1600 classes, 400 attributes (random weights)",
            ),
            (
                "policy",
                f"{args.policy}: shortest side {plan.min_size}, longest <= {plan.max_size}, {plan.post_nms} "
                "proposals, 36 regions",
            ),
            ("pictures", f"{args.images} per batch size, {height}x{width}"),
            ("weights", f"made in {time.perf_counter() - start:.1f} s"),
        ],
        "settings",
    )
    images = pictures(max(args.images, max(batch_sizes)), height, width)[: max(args.images, max(batch_sizes))]
    precisions = [("fp32", False)] + ([("bf16 autocast", True)] if args.bf16 else [])
    for name, bf16 in precisions:
        for batch_size in batch_sizes:
            rate, cpu, stages = measure(detector, images[: max(args.images, batch_size)], batch_size, settings, bf16)
            rows = [("images/s", f"{rate:.3f} ({1 / rate:.2f} s per image; CPU time {cpu:.2f} s per image)")]
            rows += [(stage, f"{seconds:.3f} s per image") for stage, seconds in stages.items()]
            print_table(rows, f"{args.device}, {name}, batch size {batch_size}")
    if args.bf16:
        print_table(bf16_deviation(detector, images[0], settings), "bf16 autocast against fp32")


if __name__ == "__main__":
    main()
