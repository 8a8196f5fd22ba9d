"""Your own pictures and captions made into a VSRN dataset: regions, splits, the precomputed layout, the vocabulary.

    python3 make_dataset.py --images ROOT --annotations ANN [--format auto] --detector W \\
        --data_path DATA --data_name NAME_precomp [--splits 0.8,0.1,0.1 --seed 0]
    python3 make_dataset.py --images photos/ --detector W --data_path DATA --data_name NAME_precomp  # cat.jpg + cat.txt
    python3 make_dataset.py --annotations train=a.csv test=b.csv --regions rows.tsv --data_path DATA --data_name NAME
    torchrun --standalone --nproc_per_node=N make_dataset.py ... --device cuda        # the detector over N GPUs
    python3 make_dataset.py --demo     # toy pictures with captions in a CSV: a dataset, fine-tuned, evaluated

Annotations (detected from the file, or --format): Karpathy's dataset_*.json (its splits; restval with
--use_restval), COCO's captions_*.json, LAVIS/ALBEF/BLIP JSON, Hugging Face imagefolder metadata.jsonl,
CSV/TSV with named columns (open_clip's filepath,title; --columns otherwise), a folder where cat.jpg has
cat.txt, Flickr30K's results_20130124.token. Picture names are relative to --images (default: the
annotation's folder). Several files may each be given a split: --annotations train=A dev=B test=C.

Regions, from one source: --detector (the caffe policy, 36 boxes, extracted once into DATA/NAME/
regions_obj36.tsv, the resume point: killed at any moment, the same command finishes the rest), --regions
(published obj36 or generate_tsv.py rows, matched by file name, annotation id or SHA-256) or --library (a
photo library's kept regions). A picture present twice (same SHA-256) is kept once; the same picture in two
given splits is refused. Malformed records and pictures left out are one line each, counted at the end.
See docs/dataset.md.
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys

from dataset_maker.annotations import FORMATS, split_name
from dataset_maker.make import DatasetRequest, make_dataset, next_commands
from utils.device import check_device
from utils.distributed import SINGLE_PROCESS, join_world
from utils.errors import Interrupted, OptionError, VSRNError, report, report_interrupt
from utils.options import ScriptHelpFormatter


def annotation_arguments(values):
    """--annotations PATH ... or SPLIT=PATH ... -> [(split or None, path)]."""
    sources = []
    for value in values or ():
        split, equals, path = value.partition("=")
        if equals and not os.path.exists(value):
            name = split_name(split)
            if name is None:
                raise OptionError(f"--annotations {value}: split {split!r} is not train, val (or dev) or test")
            sources.append((name, path))
        else:
            sources.append((None, value))
    if sources and len({split is None for split, _ in sources}) > 1:
        raise OptionError("--annotations: give every file a split (SPLIT=FILE) or none")
    return sources


def request_of(args):
    if args.data_name is None:
        raise OptionError("--data_name: name the dataset folder to write (NAME_precomp, under --data_path)")
    keys = DatasetRequest.__dataclass_fields__
    values = {key: getattr(args, key) for key in keys if hasattr(args, key) and key != "annotations"}
    return DatasetRequest(**values, annotations=annotation_arguments(args.annotations))


def run(args, world):
    if args.demo:
        if world is not SINGLE_PROCESS:
            raise OptionError("--demo runs in one process")
        from dataset_maker.demo import run_demo

        run_demo()
        return 0
    request = request_of(args)
    summary = make_dataset(request, world)
    if summary is not None:
        print("\n".join(summary.lines()))
        print(f"Vocabulary written to {summary.vocab_file}")
        print("\n".join(next_commands(request, summary)))
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument(
        "--images", default=None, help="folder the annotations' picture names are relative to (or of cat.jpg + cat.txt)"
    )
    p.add_argument(
        "--annotations",
        nargs="+",
        metavar="[SPLIT=]FILE",
        help="caption annotation files (or a folder of pictures with .txt captions), each optionally SPLIT=FILE",
    )
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="the annotations' format")
    p.add_argument("--columns", default=None, metavar="IMAGE,CAPTION", help="CSV/TSV: the picture and caption columns")
    p.add_argument("--use_restval", action="store_true", help="Karpathy's restval pictures into train")
    p.add_argument("--data_path", default="data", help="folder to write NAME_precomp/ into")
    p.add_argument("--data_name", default=None, help="the dataset's folder name, NAME_precomp")
    p.add_argument("--vocab_path", default="vocab", help="folder to write NAME_vocab.json to")
    p.add_argument("--threshold", type=int, default=4, help="the vocabulary's minimum word count (vocab.py's)")
    p.add_argument("--overwrite_vocab", action="store_true", help="replace a different NAME_vocab.json")
    p.add_argument(
        "--splits",
        default="0.8,0.1,0.1",
        metavar="TRAIN,DEV,TEST",
        help="shares of the pictures, drawn by --seed, when the annotations give no splits",
    )
    p.add_argument("--seed", type=int, default=0, help="the draw of the splits")
    regions = p.add_argument_group("regions (one source)")
    regions.add_argument("--detector", default=None, metavar="WEIGHTS", help="the detector's pytorch_model.bin")
    regions.add_argument("--detector_config", default=None, help="its config.yaml (None: the published values)")
    regions.add_argument("--regions", nargs="+", metavar="ROWS.tsv", help="published obj36 or generate_tsv.py rows")
    regions.add_argument("--library", default=None, metavar="LIB", help="a photo library's folder (index.py)")
    regions.add_argument("--min_size", type=int, default=None, help="detector input's shortest side (None: 600)")
    regions.add_argument("--max_size", type=int, default=None, help="detector input's longest side (None: 1000)")
    regions.add_argument("--proposals", type=int, default=None, help="RPN proposals kept (None: 300)")
    regions.add_argument(
        "--device", default=None, help="cuda or cpu (None: cuda when available; torchrun: each LOCAL_RANK's GPU)"
    )
    regions.add_argument("--batch_size", type=int, default=1, help="pictures per detector pass of each process")
    regions.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads that read pictures ahead"
    )
    regions.add_argument(
        "--dist_timeout", type=float, default=10.0, help="minutes a torchrun process waits for the others"
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="the toy world's pictures with captions in a CSV (1 to 5 a picture) made into a dataset, the demo's "
        "checkpoint fine-tuned on it (trained first when absent) and evaluated before and after",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    world = SINGLE_PROCESS
    try:
        check_device(args.device)
        if not args.demo:
            world = join_world(args.device, args.dist_timeout)
        code = run(args, world)
    except (VSRNError, OSError) as e:
        code = report(e)
    except Interrupted as e:
        code = report_interrupt(str(e))
    except KeyboardInterrupt:
        code = report_interrupt(
            "the regions extracted so far are kept in the dataset's regions_obj36.tsv and the dataset's files are "
            "whole (old or new): rerun the same command to finish"
        )
    return world.exit(code)


if __name__ == "__main__":
    sys.exit(main())
