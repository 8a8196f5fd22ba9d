"""Bottom-up-attention region features of your own pictures, as LXMERT's obj36 TSV or a VSRN split.

    python3 extract_regions.py --images DIR_OR_FILES [...] --weights pytorch_model.bin [--config config.yaml] \\
        --out regions.tsv [--policy caffe|hf] [--boxes 36 | --min_boxes 10 --max_boxes 100] \\
        [--min_size N --max_size N --proposals N] [--device cuda] [--batch_size N]
    # straight into a VSRN data folder (the TSV stays as the resume point):
    python3 extract_regions.py --images DIR --weights W --out regions.tsv \\
        --precomp --captions CAPS --data_path DATA --data_name NAME_precomp --split SPLIT
    # several GPUs, one TSV:
    torchrun --standalone --nproc_per_node=N extract_regions.py --images DIR --weights W --out regions.tsv --device cuda
    # the self-check: our caffe-policy regions against published rows of the same pictures
    python3 extract_regions.py --check_against val2014_obj36.tsv --images DIR --weights W [--proposals N]

Pictures: the files given, and in each folder given its files with a picture extension, by
name; the image id is the file name without its extension. One TSV line per picture, in that
order: img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features
(arrays base64 of raw int64 / float32), as utils.tsv_to_precomp and LXMERT's loader read.

A rerun with the same --out extracts only the pictures not yet in it (a torn last line, left by
a crash, is dropped and redone). A picture that cannot be read is one line on stderr, skipped
and counted in the summary. The work is detection.pipeline's; this script reads the flags.

--check_against (detection.check) writes nothing: it prints one line per picture (named after
its row's image id), a summary and a verdict, and exits 0 when every picture agrees, 1 otherwise.
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys

from detection.check import check_against
from detection.pipeline import Counts, extract_to_tsv
from detection.settings import CAFFE_BOXES, FIXED_BOXES, RegionSettings
from detection.weights import load_detector
from utils import tsv_to_precomp
from utils.device import check_device
from utils.distributed import SINGLE_PROCESS, join_world
from utils.errors import DataError, OptionError, VSRNError, report, report_interrupt
from utils.images import list_images
from utils.obj36 import check_resumable, parse_row, read_written
from utils.options import ScriptHelpFormatter


def region_settings(args):
    """The RegionSettings of the flags: --boxes N (36 by default), or a variable --min_boxes..--max_boxes."""
    variable = args.min_boxes is not None or args.max_boxes is not None
    return RegionSettings(
        policy=args.policy,
        boxes=FIXED_BOXES if args.boxes is None and not variable else args.boxes,
        min_boxes=args.min_boxes,
        max_boxes=args.max_boxes,
        conf_thresh=args.conf_thresh,
        min_size=args.min_size,
        max_size=args.max_size,
        proposals=args.proposals,
    )


def check_arguments(args):
    if not os.path.isfile(args.weights):
        raise OptionError(
            f"--weights {args.weights}: file not found (the detector's pytorch_model.bin or "
            "faster_rcnn_from_caffe_attr.pkl)"
        )
    if args.config and not os.path.isfile(args.config):
        raise OptionError(f"--config {args.config}: file not found")
    if args.batch_size < 1 or args.workers < 1:
        raise OptionError("--batch_size and --workers: expected at least 1")
    if args.precomp:
        missing = [
            f"--{name}" for name in ("captions", "data_path", "data_name", "split") if getattr(args, name) is None
        ]
        if missing:
            raise OptionError(f"--precomp writes a VSRN split: give {', '.join(missing)} too")
        tsv_to_precomp.split_folder(args.data_path, args.data_name)
        if args.min_boxes is not None or args.max_boxes is not None:
            raise OptionError(
                "--precomp: VSRN needs the same number of boxes per image; use --boxes N, not --min_boxes/--max_boxes"
            )
    elif args.captions or args.data_path or args.data_name or args.split or args.karpathy_split:
        raise OptionError("--captions, --data_path, --data_name, --split and --karpathy_split go with --precomp")


def write_split(args, num_boxes):
    """The VSRN split of the TSV and its captions, by utils.tsv_to_precomp's conversion."""
    with open(args.out, "rb") as f:
        first = f.readline().rstrip(b"\n")
    if not first:
        raise DataError(f"{args.out}: no rows to write a split from")
    feature_dim = parse_row(first, f"{args.out}:1")["features"].shape[1]
    folder = tsv_to_precomp.split_folder(args.data_path, args.data_name)
    written, skipped = tsv_to_precomp.convert(
        [args.out], args.captions, folder, args.split, num_boxes, feature_dim, args.karpathy_split
    )
    print(
        f"{written} images written to {folder}/{args.split}_*"
        + (f" ({skipped} of other Karpathy splits skipped)" if skipped else "")
    )


def check_self_check_arguments(args, world):
    conflicting = [
        (args.out is not None, "--out: it writes nothing"),
        (args.policy != "caffe", f"--policy {args.policy}: it compares the caffe policy's regions"),
        (
            any(getattr(args, name) is not None for name in ("boxes", "min_boxes", "max_boxes")),
            "--boxes/--min_boxes/--max_boxes: it takes each row's box count",
        ),
        (args.precomp, "--precomp: it writes no split"),
        (world is not SINGLE_PROCESS, "torchrun: it runs in one process"),
    ]
    for conflict, why in conflicting:
        if conflict:
            raise OptionError(f"--check_against: drop {why}")
    if not os.path.isfile(args.weights):
        raise OptionError(f"--weights {args.weights}: file not found (the detector whose regions are checked)")


def run_self_check(args, world):
    check_self_check_arguments(args, world)
    items = list_images(args.images)
    detector = load_detector(args.weights, args.config, check_device(args.device))
    settings = RegionSettings(min_size=args.min_size, max_size=args.max_size, proposals=args.proposals)
    agree = check_against(detector, items, args.check_against, settings)
    return 0 if agree else 1


def run(args, world):
    if args.check_against:
        return run_self_check(args, world)
    if args.out is None:
        raise OptionError("--out: give the obj36 TSV to write (or --check_against ROWS.tsv to compare with rows)")
    settings = region_settings(args)
    check_arguments(args)
    if world.is_main:
        items = list_images(args.images)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        done, last_row = read_written(args.out)
        check_resumable(args.out, last_row, settings.boxes)
        todo = [item for item in items if item[0] not in done]
        counts = Counts(len(items) - len(todo))
    else:
        todo, counts = None, None
    todo = world.broadcast(todo)
    if todo:
        device = check_device(args.device) if world is SINGLE_PROCESS else world.device
        detector = load_detector(args.weights, args.config, device)
        extract_to_tsv(
            detector, todo, args.out, settings, counts, world, batch_size=args.batch_size, workers=args.workers
        )
    if world.is_main:
        print(counts.summary(args.out))
    world.close()  # before the conversion: the other processes need not wait for it
    if world.is_main and args.precomp:
        write_split(args, settings.boxes)
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument(
        "--images", nargs="+", required=True, metavar="DIR_OR_FILE", help="folders of pictures and picture files"
    )
    p.add_argument(
        "--weights",
        required=True,
        help="the detector: pytorch_model.bin (unc-nlp/frcnn-vg-finetuned) or faster_rcnn_from_caffe_attr.pkl",
    )
    p.add_argument("--config", default=None, help="the detector's config.yaml (None: the published values)")
    p.add_argument("--out", default=None, help="the obj36 TSV to write, or to complete when it exists")
    p.add_argument(
        "--check_against",
        default=None,
        metavar="ROWS.tsv",
        help="instead of writing, compare the caffe policy's regions of --images with published rows of the same "
        "pictures (obj36 or generate_tsv.py TSV; a picture's id is its file name without extension): one line per "
        "picture and a verdict; exit code 1 when some picture differs",
    )
    p.add_argument(
        "--policy",
        default="caffe",
        choices=("caffe", "hf"),
        help="caffe: bottom-up-attention's generate_tsv.py (SCAN's and LXMERT's features); "
        "hf: the LXMERT demo's selection",
    )
    p.add_argument(
        "--boxes",
        type=int,
        default=None,
        help=f"exactly this many boxes per image (None: {FIXED_BOXES}, unless --min_boxes/--max_boxes)",
    )
    p.add_argument(
        "--min_boxes",
        type=int,
        default=None,
        help="variable count, caffe policy: at least this many boxes "
        f"(None: {CAFFE_BOXES[0]} when --max_boxes is given)",
    )
    p.add_argument(
        "--max_boxes",
        type=int,
        default=None,
        help="variable count, caffe policy: at most this many boxes "
        f"(None: {CAFFE_BOXES[1]} when --min_boxes is given)",
    )
    p.add_argument(
        "--conf_thresh", type=float, default=0.2, help="with a variable count: keep regions of at least this confidence"
    )
    p.add_argument(
        "--min_size",
        type=int,
        default=None,
        help="shortest side of the network input (None: the policy's, 600 caffe / 800 hf)",
    )
    p.add_argument(
        "--max_size", type=int, default=None, help="longest side at most (None: the policy's, 1000 caffe / 1333 hf)"
    )
    p.add_argument("--proposals", type=int, default=None, help="RPN proposals kept after NMS (None: the policy's, 300)")
    p.add_argument(
        "--device",
        default=None,
        help="cuda or cpu (None: cuda when available; under torchrun each process takes its LOCAL_RANK's GPU)",
    )
    p.add_argument("--batch_size", type=int, default=1, help="pictures per forward pass of each process")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="threads that decode pictures ahead of the detector",
    )
    p.add_argument(
        "--dist_timeout",
        type=float,
        default=10.0,
        help="minutes a torchrun process waits for the others before failing",
    )
    p.add_argument(
        "--precomp",
        action="store_true",
        help="then write a VSRN split from the TSV and --captions (utils.tsv_to_precomp's conversion)",
    )
    tsv_to_precomp.add_split_arguments(p, required=False)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    world = SINGLE_PROCESS
    try:
        check_device(args.device)
        world = join_world(args.device, args.dist_timeout)
        code = run(args, world)
    except (VSRNError, OSError) as e:
        code = report(e)
    except KeyboardInterrupt:
        code = report_interrupt(
            "the check wrote nothing: rerun the same command to check again"
            if args.check_against
            else f"the rows in {args.out} are whole: rerun the same command to continue"
        )
    return world.exit(code)


if __name__ == "__main__":
    sys.exit(main())
