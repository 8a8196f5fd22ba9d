"""LXMERT pair-scoring speed (pairs/s) and the full-split times it implies.

    python3 bench/lxmert_pairs.py [--batch-sizes 8,32,64] [--tokens 16] [--repeats 3] [--device cpu] [--amp]

A base-size LXMERT (LxmertConfig's defaults, as unc-nlp/lxmert-base-uncased: 9 language, 5
object-relationship, 5 cross-modality layers, hidden 768) with random weights, so nothing is
downloaded; speed does not depend on the weights. Times, as lxmert_match.py runs them:
  - the cross-modality layers and the matching head, once per (image, caption) pair;
  - the language layers once per caption and the object-relationship layers once per image;
  - for comparison (at the first batch size), LxmertForPreTraining's whole forward per pair (all
    heads), as a direct transformers loop over the pairs would run it.
Efficiency: the pairs' floating-point work per second over the float32 GEMM rate measured in the
same run, a ratio less sensitive to the load of a shared machine than the raw rate.
`--tokens` is the caption length in word pieces with [CLS] and [SEP]: Flickr30K and COCO captions
average 10 to 13 words, so 16 errs on the long side; LXMERT cuts at 20.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe, gemm_product, print_table  # noqa: E402
from lxmert.scoring import PairScorer  # noqa: E402
from utils.device import check_device  # noqa: E402
from utils.text import format_duration  # noqa: E402

FLICKR_1K_PAIRS = 1000 * 5000
COCO_5K = (5000, 25000)


def cross_flops(tokens, regions, config):
    """Floating-point operations per pair of the cross-modality layers and the matching head as
    PairScorer runs them (the last layer computes only what the [CLS] output needs)."""
    h, inner, t, r = config.hidden_size, config.intermediate_size, tokens, regions
    language = 2 * t * h * h + 2 * r * h * h + 2 * t * r * h + 4 * t * h * h + 2 * t * t * h + 2 * t * h * inner
    vision = 2 * r * h * h + 2 * t * h * h + 2 * r * t * h + 4 * r * h * h + 2 * r * r * h + 2 * r * h * inner
    last = 2 * t * h * h + 2 * r * h * h + 2 * t * r * h + 2 * t * h * h + 2 * h * h + 2 * t * h + 2 * h * inner + h * h
    return 2 * ((config.x_layers - 1) * (language + vision) + last)


def median_seconds(run, repeats):
    return interleaved_medians([run], repeats)[0]


def interleaved_medians(runs, repeats):
    """Median seconds of each run, timed in turns so that a shared machine's changing load
    affects them alike; one warm-up call each first."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="8,32,64", help="pairs per forward pass, comma-separated")
    parser.add_argument(
        "--tokens", type=int, default=16, help="caption length in word pieces, [CLS] and [SEP] included"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument(
        "--no-direct", action="store_true", help="skip the whole-forward comparison (run at the first batch size)"
    )
    args = parser.parse_args()
    from transformers import LxmertConfig, LxmertForPreTraining

    device = check_device(args.device)
    torch.manual_seed(0)
    config = LxmertConfig()
    model = LxmertForPreTraining(config).eval().to(device)
    scorer = PairScorer(model, "matched", device, amp=args.amp and device.type == "cuda")
    print_table(describe(torch, device), "machine")
    print(f"command: python3 {' '.join(sys.argv)}")

    regions, tokens = 36, args.tokens
    flops = cross_flops(tokens, regions, config)
    gemm, gemm_flops = gemm_product(torch, device)
    rows, rate_of = [("cross layers + head per pair", f"{flops / 1e9:.2f} GFLOP")], {}
    with torch.inference_mode():
        for number, batch in enumerate(int(b) for b in args.batch_sizes.split(",")):
            ids = torch.randint(1000, config.vocab_size, (batch, tokens))
            mask = torch.ones(batch, tokens, dtype=torch.int64)
            features, boxes = torch.rand(batch, regions, config.visual_feat_dim), torch.rand(batch, regions, 4)
            language = scorer.encode_captions(ids, mask)
            vision = scorer.encode_images(features, boxes)
            mask_on_device = mask.to(device)

            def cross():
                scorer.score(language, mask_on_device, vision)
                synchronise(device)

            def captions():
                scorer.encode_captions(ids, mask)
                synchronise(device)

            def images():
                scorer.encode_images(features, boxes)
                synchronise(device)

            direct = None
            if number == 0 and not args.no_direct:
                inputs = dict(
                    input_ids=ids.to(device),
                    attention_mask=mask_on_device,
                    token_type_ids=torch.zeros_like(mask_on_device),
                    visual_feats=features.to(device),
                    visual_pos=boxes.to(device),
                )

                def direct():
                    with scorer.autocast:
                        model(**inputs)
                    synchronise(device)

            seconds = interleaved_medians([cross, gemm] + ([direct] if direct else []), args.repeats)
            pair_rate, gemm_rate = batch / seconds[0], gemm_flops / seconds[1]
            caption_rate = batch / median_seconds(captions, args.repeats)
            image_rate = batch / median_seconds(images, args.repeats)
            rate_of[batch] = (pair_rate, caption_rate, image_rate)
            rows.append(
                (
                    f"batch {batch}: pairs (cross layers + head)",
                    f"{pair_rate:,.2f} pairs/s, efficiency {pair_rate * flops / gemm_rate:.2f} "
                    f"(GEMM {gemm_rate / 1e9:,.1f} GFLOP/s)",
                )
            )
            rows.append((f"batch {batch}: captions (language layers)", f"{caption_rate:,.1f} captions/s"))
            rows.append((f"batch {batch}: images (object-relationship layers)", f"{image_rate:,.1f} images/s"))
            if direct:
                direct_rate = batch / seconds[2]
                rows.append(
                    (
                        f"batch {batch}: LxmertForPreTraining forward per pair",
                        f"{direct_rate:,.2f} pairs/s (ours: {pair_rate / direct_rate:.2f}x its rate)",
                    )
                )
    print_table(rows, f"\nspeed ({tokens} tokens, 36 regions, medians of {args.repeats})")

    best = max(rate_of, key=lambda b: rate_of[b][0])
    pair_rate, caption_rate, image_rate = rate_of[best]
    flickr = FLICKR_1K_PAIRS / pair_rate + 5000 / caption_rate + 1000 / image_rate
    images, captions = COCO_5K
    coco_pairs = images * 20 + captions * 20  # the two directions' candidates (an upper bound of their union)
    coco = coco_pairs / pair_rate + captions / caption_rate + images / image_rate
    coco_all = images * captions / pair_rate + captions / caption_rate + images / image_rate
    print_table(
        [
            ("Flickr30K 1K test, all 5M pairs", format_duration(flickr)),
            (f"COCO 5K, two-stage top-20 (<= {coco_pairs:,} pairs)", format_duration(coco)),
            ("COCO 5K, all 125M pairs", format_duration(coco_all)),
        ],
        f"\nprojected with batch {best} (LXMERT scoring only; a two-stage run adds VSRN's encoding)",
    )


if __name__ == "__main__":
    main()
