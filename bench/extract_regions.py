"""Region extraction speed: seconds per photo, the work a photo is, and how close to the
machine's limit it runs.

    python3 bench/extract_regions.py [--device cpu|cuda] [--policies caffe,hf] [--batch-sizes 1,4,8]
        [--images N] [--image-size 480x640] [--min_size N --max_size N --proposals N]
        [--sweep-proposals 100,150,200,300] [--bf16] [--smoke]

The published architecture (ResNet-101 C4, 1600 classes, 400 attributes) with the deterministic
random weights of ../shared/frcnn_reference/weights_recipe.py (`--recipe`), so nothing is
downloaded; speed does not depend on the weights. Pictures are random, `--image-size` pixels
(COCO's usual 480x640 by default), resized as each policy does: caffe at 600 / 1000 with 300
proposals, hf at the published 800 / 1333 with 300.

For each policy and batch size, one warm-up batch runs under torch.utils.flop_counter, which
counts its convolutions and matrix products (FLOPs per photo), then `--images` photos are timed:
seconds and CPU seconds (all threads) per photo, per-stage times with the device synchronised
  preprocess, backbone (stem to res4), rpn (head and proposals), roi_pool, res5 (+ mean pool),
  heads (object and attribute logits), selection (the policy's choice of regions),
and efficiency = FLOPs per photo / seconds per photo / float32 GEMM rate, the rate of a 2048^3
product run as a 1 x 1 convolution (bench/machine.py; the detector's work is convolutions, which
torch runs with oneDNN or cuDNN; torch.mm's rate, through its BLAS, is shown too), timed before
each batch, in turn with them (the median). An efficiency near 1 says the photo's arithmetic runs at the
machine's matrix-multiply speed already: the machine is the limit, not the code.
`--sweep-proposals` times the first policy at batch size 1 with each number of RPN proposals:
what fewer proposals save. What they change in the regions kept depends on trained weights
(random ones would say nothing true): extract_regions.py --check_against reports it.
`--bf16` runs everything again under torch.autocast(bfloat16) and reports its deviation from
fp32: the region features of the same proposals, and how many kept boxes and object ids agree.
`--smoke` checks the script on a small detector and small pictures in seconds.
"""

import argparse
import importlib.util
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import utils.threads  # noqa: F401  (before torch: its threads wait as in extract_regions.py)
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from detection.extract import extract_regions, extract_regions_batch, score_regions  # noqa: E402
from detection.network import PUBLISHED_ARCH, BottomUpDetector  # noqa: E402
from detection.policies import POLICIES, make_policy  # noqa: E402
from detection.settings import RegionSettings  # noqa: E402
from detection.weights import load_detector  # noqa: E402
from machine import describe, gemm_rate, print_table  # noqa: E402

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


@dataclass
class Measured:
    seconds: float  # per photo
    cpu_seconds: float  # per photo, all threads: the work done, also on a busy shared machine
    stages: dict  # seconds per photo by stage
    flops: float  # per photo
    gemm_rate: float  # FLOP/s, as a convolution
    blas_rate: float  # FLOP/s, torch.mm's

    @property
    def efficiency(self):
        return self.flops / self.seconds / self.gemm_rate

    def summary(self):
        return (
            f"{self.seconds:.2f} s per photo (CPU {self.cpu_seconds:.2f} s), {self.flops / 1e9:,.1f} GFLOP, "
            f"GEMM {self.gemm_rate / 1e9:.1f} GFLOP/s (torch.mm {self.blas_rate / 1e9:.1f}), "
            f"efficiency {self.efficiency:.2f}"
        )


def measure(detector, images, batch_size, settings, bf16=False):
    """The Measured of extracting `images` in batches of `batch_size`, after one warm-up batch
    whose FLOPs are counted; the GEMM rates are timed before each batch, in turn with them, so
    that a shared machine's changing load weighs on both alike (their medians)."""
    device = detector.device
    with autocast(device, bf16), FlopCounterMode(display=False) as counter:
        extract_regions_batch(detector, images[:batch_size], settings)
    flops = counter.get_total_flops() / batch_size
    timer = StageTimer(device)
    seconds, cpu_seconds, gemm, blas = 0.0, 0.0, [], []
    for i in range(0, len(images), batch_size):
        gemm.append(gemm_rate(torch, device, repeats=3, convolution=True))
        blas.append(gemm_rate(torch, device, repeats=3))
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast(device, bf16):
            extract_regions_batch(detector, images[i : i + batch_size], settings, timer=timer)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
    count = len(images)
    stages = {stage: timer.seconds[stage] / count for stage in STAGES}
    rates = statistics.median(gemm), statistics.median(blas)
    return Measured(seconds / count, cpu_seconds / count, stages, flops, *rates)


def bf16_deviation(detector, image, settings):
    """bf16 against fp32 on one picture: features of the same proposals, kept boxes and ids."""
    scored = score_regions(detector, [image], settings)[0]
    with torch.inference_mode(), autocast(detector.device, True):
        res4 = detector.backbone(scored["input"].unsqueeze(0))
        rois = torch.cat([torch.zeros(len(scored["proposals"]), 1, device=res4.device), scored["proposals"]], dim=1)
        features = detector.region_features(res4, rois).float()
    reference = scored["features"]
    relative = ((features - reference).abs().max() / reference.abs().max()).item()
    fp32 = extract_regions(detector, image, settings)
    with autocast(detector.device, True):
        bf16 = extract_regions(detector, image, settings)
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
    parser.add_argument("--policies", default="caffe,hf", help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--images", type=int, default=8, help="pictures timed per batch size")
    parser.add_argument("--image-size", default="480x640", help="HEIGHTxWIDTH of the random pictures")
    parser.add_argument("--min_size", type=int, default=None)
    parser.add_argument("--max_size", type=int, default=None)
    parser.add_argument("--proposals", type=int, default=None)
    parser.add_argument(
        "--sweep-proposals",
        default="100,150,200,300",
        help="numbers of proposals to time the first policy with at batch size 1 ('' for none)",
    )
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast and measure its deviation")
    parser.add_argument("--recipe", default=str(ROOT.parent / "shared" / "frcnn_reference" / "weights_recipe.py"))
    parser.add_argument(
        "--smoke", action="store_true", help="a small detector on small pictures: checks the script runs"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    height, width = (int(x) for x in args.image_size.lower().split("x"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = args.policies.split(",")
    unknown = [policy for policy in policies if policy not in POLICIES]
    if unknown:
        parser.error(f"--policies: {', '.join(unknown)}: expected some of {', '.join(POLICIES)}")
    sweep = [int(p) for p in args.sweep_proposals.split(",") if p]
    if args.smoke:
        height, width = min(height, 120), min(width, 160)
        args.images, args.min_size, args.max_size, args.proposals = (
            min(args.images, 4),
            args.min_size or 96,
            args.max_size or 160,
            args.proposals or 50,
        )
        sweep = [p for p in sweep if p <= 50][:2] or [25, 50]
    sizes = {"boxes": 36, "min_size": args.min_size, "max_size": args.max_size}

    torch.manual_seed(0)
    start = time.perf_counter()
    detector = random_detector(SMOKE_ARCH if args.smoke else PUBLISHED_ARCH, load_recipe(args.recipe), device)
    print(f"command: python3 {' '.join(sys.argv)}")
    print_table(describe(torch, device), "machine")
    plans = {
        policy: make_policy(detector, RegionSettings(policy=policy, proposals=args.proposals, **sizes))
        for policy in policies
    }
    print_table(
        [
            (
                "detector",
                "smoke-test size" if args.smoke else "ResNet-101 C4, 1600 classes, 400 attributes (random weights)",
            ),
            *(
                (
                    f"policy {policy}",
                    f"shortest side {plan.min_size}, longest <= {plan.max_size}, {plan.post_nms} proposals, 36 regions",
                )
                for policy, plan in plans.items()
            ),
            ("pictures", f"{args.images} per batch size, {height}x{width}"),
            ("weights", f"made in {time.perf_counter() - start:.1f} s"),
        ],
        "settings",
    )
    images = pictures(max(args.images, max(batch_sizes)), height, width)
    precisions = [("fp32", False)] + ([("bf16 autocast", True)] if args.bf16 else [])
    for name, bf16 in precisions:
        for policy in policies:
            settings = RegionSettings(**sizes, policy=policy, proposals=args.proposals)
            for batch_size in batch_sizes:
                measured = measure(detector, images[: max(args.images, batch_size)], batch_size, settings, bf16)
                rows = [("photo", measured.summary())]
                rows += [(stage, f"{seconds:.3f} s per photo") for stage, seconds in measured.stages.items()]
                print_table(rows, f"{args.device}, {name}, policy {policy}, batch size {batch_size}")
    if sweep:
        policy, timed = policies[0], {}
        for proposals in sweep:
            settings = RegionSettings(**sizes, policy=policy, proposals=proposals)
            timed[proposals] = measure(detector, images[: args.images], 1, settings)
        slowest = timed[max(sweep)]
        print_table(
            [
                (
                    f"{proposals} proposals",
                    f"{m.summary()}; {m.seconds / slowest.seconds:.2f}x the time of {max(sweep)}",
                )
                for proposals, m in timed.items()
            ],
            f"{args.device}, fp32, policy {policy}, batch size 1: fewer proposals",
        )
    if args.bf16:
        settings = RegionSettings(**sizes, policy=policies[0], proposals=args.proposals)
        print_table(bf16_deviation(detector, images[0], settings), f"bf16 autocast against fp32, policy {policies[0]}")


if __name__ == "__main__":
    main()
