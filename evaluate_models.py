"""Evaluate VSRN checkpoints: edit the paths below (as in the original) or pass them as flags.

    python3 evaluate_models.py                                   # the blocks below
    python3 evaluate_models.py --data_path DATA --split test m1.pth.tar [m2.pth.tar ...] [--fold5]
    python3 evaluate_models.py --data_path DATA --split testall --eccv coco1.pth.tar [coco2.pth.tar]
    python3 evaluate_models.py --data_path DATA --data_name mine_precomp --split test f30k.pth.tar  # on other data

Several checkpoints are evaluated as an ensemble (their similarity matrices averaged).
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys

from evaluation import evalrank
from utils.errors import CheckpointError, OptionError, run_job
from utils.options import ScriptHelpFormatter

# MS-COCO: 1K test (5 folds of the 5000-image `testall` split) with the two-model ensemble.
# Drop `fold5=True` for the 5K test. `vocab_path=None` reads the vocabulary from the folder the
# checkpoint records; set a folder (e.g. "vocab/") to read it from there.
COCO = dict(
    model_paths=("pretrain_model/coco/model_coco_1.pth.tar", "pretrain_model/coco/model_coco_2.pth.tar"),
    data_path="data/",
    vocab_path=None,
    split="testall",
    fold5=True,
)
# Flickr30K: 1K test with the two-model ensemble.
FLICKR30K = dict(
    model_paths=("pretrain_model/flickr/model_fliker_1.pth.tar", "pretrain_model/flickr/model_fliker_2.pth.tar"),
    data_path="data/",
    vocab_path=None,
    split="test",
    fold5=False,
)
RUN = [FLICKR30K]  # the blocks run without flags, e.g. [COCO, FLICKR30K]

BLOCK_KEYS = ("model_paths", "data_path", "vocab_path", "split", "fold5")


def block_arguments(block, vocab_path=None):
    """evalrank's arguments for a block: its model paths and keywords; `vocab_path`, when given,
    overrides the block's."""
    unknown = sorted(set(block) - set(BLOCK_KEYS))
    if unknown or "model_paths" not in block:
        problem = f"the unknown key(s) {', '.join(unknown)}" if unknown else "no model_paths"
        raise OptionError(f"evaluate_models.py: a block has {problem}; its keys are {', '.join(BLOCK_KEYS)}")
    keywords = {key: value for key, value in block.items() if key != "model_paths"}
    if vocab_path is not None:
        keywords["vocab_path"] = vocab_path
    return block["model_paths"], keywords


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument("model_paths", nargs="*", help="checkpoints; several form an ensemble")
    parser.add_argument("--data_path", default=None, help="overrides the checkpoint's data_path")
    parser.add_argument(
        "--data_name",
        default=None,
        help="evaluate on this dataset under the data path instead of the checkpoint's (e.g. a trained model on "
        "your own data before fine-tuning; its captions read with the checkpoint's vocabulary); also the blocks'",
    )
    parser.add_argument("--split", default="test", help="dev, test or testall (COCO)")
    parser.add_argument("--fold5", action="store_true", help="COCO 1K: average over 5 folds of 1000 images")
    parser.add_argument("--vocab_path", default=None, help="overrides the checkpoint's vocab_path (and the blocks')")
    parser.add_argument(
        "--eccv", action="store_true", help="COCO testall: also ECCV Caption, CxC and COCO 1K/5K metrics (eccv_caption)"
    )
    args = parser.parse_args(argv)
    blocks = (
        [dict(model_paths=args.model_paths, data_path=args.data_path, split=args.split, fold5=args.fold5)]
        if args.model_paths
        else RUN
    )
    return run_job(
        lambda: evaluate(blocks, args),
        "nothing was written: rerun the command (its ranks file is written only at the end)",
    )


def evaluate(blocks, args):
    runs = [block_arguments(block, args.vocab_path) for block in blocks]
    if not args.model_paths:
        missing = [path for model_paths, _ in runs for path in model_paths if not os.path.isfile(path)]
        if missing:
            raise CheckpointError(
                f"{missing[0]}: checkpoint not found; edit the blocks at the top of evaluate_models.py, or pass "
                "checkpoints: python3 evaluate_models.py --data_path DATA --split test CHECKPOINT [CHECKPOINT ...]"
            )
    for model_paths, keywords in runs:
        evalrank(*model_paths, **keywords, eccv=args.eccv, data_name=args.data_name)


if __name__ == "__main__":
    sys.exit(main())
