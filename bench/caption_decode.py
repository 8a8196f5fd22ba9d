"""Speed of caption generation: the original's step-by-step greedy loop against model.py's.

    python3 bench/caption_decode.py [--batch-size 128] [--repeats 3] [--words 12] [--device cpu]

The caption branch has the Flickr30K configuration (2048-d regions, hidden 512, words 300,
vocabulary 8481, max_len 60) with random weights; `--words N` raises the <end> logit so
that sequences end after about N words, as trained captioners' do (0: never). Prints the
median time of each and the speed-up; the predictions are checked to agree.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from reference_caption import caption_inference  # noqa: E402  (the tests' reference implementation)
from model import END_ID, CaptionDecoder, CaptionEncoder, CaptionModel  # noqa: E402


def build(vocab_size=8481, max_len=60, device="cpu"):
    torch.manual_seed(0)
    model = CaptionModel(CaptionEncoder(2048, 512), CaptionDecoder(vocab_size, max_len, 512, 300))
    return model.to(device).eval()


def end_bias_for(model, regions, words):
    """The <end> bias at which greedy sequences end after about `words` words on average."""
    low, high = -10.0, 30.0
    for _ in range(20):
        bias = (low + high) / 2
        with torch.no_grad():
            model.decoder.out.bias[END_ID] = bias
            _, preds = model(regions, mode="inference")
        length = (preds != 0).sum(1).float().mean().item()
        low, high = (bias, high) if length > words + 1 else (low, bias)
    return bias


def timed(function, repeats, device):
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            result = function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = build(device=args.device)
    regions = torch.randn(args.batch_size, 36, 2048, device=args.device) * 0.05
    if args.words:
        end_bias_for(model, regions, args.words)
    ours, (_, preds) = timed(lambda: model(regions, mode="inference"), args.repeats, args.device)
    original, (_, expected) = timed(lambda: caption_inference(model, regions), args.repeats, args.device)
    kept = torch.cumsum((expected == END_ID).int(), 1) - (expected == END_ID).int() == 0
    assert torch.equal(preds[kept], expected[kept]), "greedy predictions differ from the original loop's"
    words = ((preds != 0) & (preds != END_ID)).sum(1).float().mean().item()
    print(f"greedy decoding, batch {args.batch_size}, {args.device}, mean caption length {words:.1f} words")
    print(f"original step-by-step loop: {original:.3f} s; ours: {ours:.3f} s; speed-up {original / ours:.2f}x")


if __name__ == "__main__":
    main()
