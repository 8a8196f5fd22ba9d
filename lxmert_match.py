"""Image-text matching with LXMERT (Tan & Bansal, EMNLP 2019) on VSRN's splits and recall metrics,
or on your own pictures in one step.

    python3 lxmert_match.py --model DIR --data_path DATA --data_name f30k_precomp \\
        --split test --mode matched                                   # every image-caption pair
    python3 lxmert_match.py --model DIR --data_path DATA --data_name coco_precomp --split testall \\
        --vsrn runs/coco/model_best.pth.tar --topk 20                 # LXMERT reranks VSRN's top 20
    python3 lxmert_match.py --model DIR --images photos/ --captions captions.txt \\
        --detector frcnn/pytorch_model.bin                            # pictures and captions in, scores out

Your own pictures: their regions are extracted by the detector (36 per picture, the caffe
policy LXMERT's features were made with) and cached ($VSRN_CACHE/regions/, see docs/lxmert.md), every
picture-caption pair is scored, each caption's pictures and each picture's captions are printed
best first, and the score matrix is written (--save_scores: .csv and/or .json). FILE holds one
caption per line, or `image_id<TAB>caption` lines (image id: the file name without extension),
which add recall against those ground truths.

Modes (see docs/lxmert.md):
  matched  softmax(cross_relationship_score)[:, 1] of LxmertForPreTraining: the probability its
           pretraining image-text matching head gives the pair.
  cosine   cosine of LxmertModel's final language and vision outputs, each averaged over its real
           positions (the caption's tokens, [CLS] and [SEP] included; the 36 regions).

Inputs are those LXMERT was pretrained on: BERT-uncased word pieces `[CLS] caption [SEP]` cut to 20
tokens, the 36 region features, and their boxes divided by the image's width (x) and height (y).
The split needs the `_boxes.npy` and `_image_sizes.npy` files that utils.tsv_to_precomp writes.

Recall, median and mean rank are evaluation.py's: the same ranking code runs on LXMERT's (image,
caption) score matrix instead of VSRN's similarity matrix.
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import sys

from lxmert.loading import DEFAULT_MODEL, MODES
from lxmert.pictures import DEFAULT_SCORES, PicturesRequest, match_pictures
from lxmert.splits import SplitRequest, evaluate
from utils.device import check_device
from utils.errors import OptionError, run_job
from utils.options import ScriptHelpFormatter, request_from


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="local folder of LXMERT's weights (see docs/lxmert.md), or a hub name"
    )
    parser.add_argument(
        "--mode",
        default="matched",
        choices=MODES,
        help="matched: the matching head's probability; "
        "cosine: cosine of the language and vision outputs, each averaged over its positions",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per forward pass")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--amp", action="store_true", help="bfloat16 autocast on CUDA (the matching head stays float32)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: --model)")
    parser.add_argument(
        "--save_scores",
        nargs="+",
        default=None,
        metavar="PATH",
        help=f"save LXMERT's (images, captions) score matrix: PATH.npy for a split; PATH.csv and/or PATH.json "
        f"for --images (there default: {DEFAULT_SCORES})",
    )
    split = parser.add_argument_group("a split of precomputed features (as evaluate_models.py)")
    split.add_argument("--data_path", default=None, help="folder holding NAME/ (as train.py)")
    split.add_argument("--data_name", default=None, help="e.g. f30k_precomp; the split needs boxes and image sizes")
    split.add_argument("--split", default="test", help="dev, test or testall (COCO 5K)")
    split.add_argument(
        "--vsrn",
        nargs="+",
        default=None,
        metavar="CHECKPOINT",
        help="two-stage: rerank these VSRN checkpoints' top-k (several: an ensemble)",
    )
    split.add_argument("--topk", type=int, default=20, help="candidates per query that LXMERT rescores (with --vsrn)")
    split.add_argument(
        "--alpha", type=float, default=1.0, help="candidates rank by alpha*LXMERT + (1-alpha)*VSRN (with --vsrn)"
    )
    split.add_argument("--vocab_path", default=None, help="overrides the VSRN checkpoint's vocab_path")
    own = parser.add_argument_group("your own pictures, in one step")
    own.add_argument(
        "--images", nargs="+", default=None, metavar="DIR_OR_FILES", help="a folder of pictures, or picture files"
    )
    own.add_argument(
        "--captions",
        default=None,
        metavar="FILE",
        help="one caption per line, or image_id<TAB>caption lines (adds recall)",
    )
    own.add_argument(
        "--detector",
        default=None,
        metavar="WEIGHTS",
        help="the bottom-up-attention detector's pytorch_model.bin (see docs/regions.md)",
    )
    own.add_argument(
        "--detector_config",
        default=None,
        metavar="YAML",
        help="the detector's config.yaml (default: its published values)",
    )
    own.add_argument(
        "--policy",
        default="caffe",
        choices=("caffe", "hf"),
        help="region selection (caffe: as LXMERT's features were made)",
    )
    own.add_argument(
        "--top", type=int, default=5, help="pictures printed per caption and captions per picture (0: all)"
    )
    args = parser.parse_args(argv)
    return run_job(
        lambda: run(args, parser),
        "no scores were saved (each file is written whole at the end); the regions of your pictures "
        "extracted so far stay in the region cache, so the same command goes on from there",
    )


def run(args, parser):
    check_device(args.device)
    if args.images is not None:
        check_pictures_arguments(args, parser)
        match_pictures(request_from(PicturesRequest, args, save_scores=args.save_scores or [DEFAULT_SCORES]))
    else:
        if args.data_path is None or args.data_name is None:
            raise OptionError(
                "--data_path and --data_name name the split to evaluate; or match your own pictures with "
                "--images DIR --captions FILE --detector WEIGHTS"
            )
        save_scores = args.save_scores or [None]
        if len(save_scores) > 1:
            raise OptionError(f"--save_scores {' '.join(save_scores)}: a split's scores are saved as one PATH.npy")
        evaluate(request_from(SplitRequest, args, save_scores=save_scores[0]))


def check_pictures_arguments(args, parser):
    """--images needs --captions and --detector, and takes none of a split's flags."""
    for flag in ("captions", "detector"):
        if getattr(args, flag) is None:
            raise OptionError(f"--images: needs --{flag} (see docs/lxmert.md)")
    for flag in ("data_path", "data_name", "vsrn", "vocab_path"):
        if getattr(args, flag) is not None:
            raise OptionError(f"--{flag}: belongs to a split's evaluation, not to --images")
    for flag in ("split", "topk", "alpha"):
        if getattr(args, flag) != parser.get_default(flag):
            raise OptionError(f"--{flag}: belongs to a split's evaluation, not to --images")


if __name__ == "__main__":
    sys.exit(main())
