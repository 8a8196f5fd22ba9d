"""Generate a caption for every image of a split with VSRN's caption branch, and score them.

    python3 caption.py --checkpoint runs/coco/model_best.pth.tar --data_path DATA --split test \
        [--beam_size 3] [--out captions.json]

Writes [{"image_id": ..., "caption": ...}] (ids from SPLIT_image_ids.txt when present, else
the image's index) and prints BLEU-1..4, METEOR, ROUGE-L and CIDEr-D against the split's
reference captions with pycocoevalcap's scorers (the COCO caption evaluation). METEOR and
the Stanford PTB tokenizer need Java: without `java` on PATH, METEOR is skipped and the
captions are tokenized with NLTK's Treebank tokenizer instead. SPICE is not run.
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import sys

from captioning import caption_split
from utils.errors import VSRNError, report, report_interrupt
from utils.options import ScriptHelpFormatter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint trained by this port (with caption weights)")
    parser.add_argument("--data_path", default=None, help="overrides the checkpoint's data_path")
    parser.add_argument("--split", default="test", help="dev, test or testall (COCO)")
    parser.add_argument("--beam_size", default=1, type=int, help="1: greedy, as the original; > 1: beam search")
    parser.add_argument(
        "--out", default=None, help="JSON file for the captions (default: captions_SPLIT.json next to the checkpoint)"
    )
    parser.add_argument("--vocab_path", default=None, help="overrides the checkpoint's vocab_path")
    parser.add_argument("--batch_size", default=128, type=int, help="images decoded at once")
    args = parser.parse_args(argv)
    try:
        caption_split(
            args.checkpoint, args.data_path, args.split, args.beam_size, args.out, args.vocab_path, args.batch_size
        )
    except (VSRNError, OSError) as e:
        return report(e)
    except KeyboardInterrupt:
        return report_interrupt("no captions were written (the file is written whole at the end): rerun the command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
