"""Time VSRN's full training step at the Flickr30K configuration on a synthetic batch.

    python3 bench/train_step.py [--batch-size 16] [--device cpu|cuda] [--steps 5] [--warmup 2]
                               [--amp] [--tf32] [--compile] [--reference]

Efficiency = 3 x (forward FLOPs of the original algorithm's step) / step time / GEMM rate,
where the GEMM rate is that of float32 (B*36 x 2048) @ (2048 x 2048) products timed in the
same rounds as the steps. The FLOPs are the original's (all 59 decoder steps, linear1 over
[region; hidden] at every step), so work this port avoids counts in its favour: the figure
says how close a step comes to the original's arithmetic done at plain GEMM speed.
--reference also times the caption branch written step by step as the original, on the
same weights, in the same rounds.
"""

import argparse
import os
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import utils.threads  # noqa: E402,F401  (before torch: its threads wait as in train.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import reference_caption  # noqa: E402  (the tests' reference implementation)
from data import caption_branch_target, collate_fn  # noqa: E402
from machine import GEMM_SIZE, describe, gemm_product, print_table  # noqa: E402
from model import VSRN, caption_steps  # noqa: E402
from utils.device import configure_backends  # noqa: E402
from utils.options import build_parser  # noqa: E402

VOCAB_SIZE = 8481  # Flickr30K's vocabulary
REGIONS = 36
START_ID, END_ID, FIRST_WORD_ID = 1, 2, 4
MEAN_TOKENS = 14  # Flickr30K: about 12 words plus <start> and <end>
GEMMS_PER_ROUND = 10


def caption_words(rng, batch_size):
    """Flickr-like caption lengths: 6 to 30 words, mean about 12, a long right tail; longest first."""
    words = np.minimum(6 + rng.negative_binomial(2, 0.25, size=batch_size), 30)
    return np.sort(words)[::-1]


def synthetic_batch(batch_size, max_len, seed=0, img_dim=2048, vocab_size=VOCAB_SIZE):
    """collate_fn's output for random features and random words."""
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate(caption_words(rng, batch_size)):
        caption = torch.from_numpy(np.concatenate([[START_ID], rng.integers(FIRST_WORD_ID, vocab_size, n), [END_ID]]))
        label, mask = caption_branch_target(caption, max_len)
        image = torch.from_numpy(rng.random((REGIONS, img_dim), dtype=np.float32))
        items.append((image, caption, i, i, label, mask))
    # Already longest first, so collate_fn's stable sort keeps ids = range(B).
    return collate_fn(items)


def original_forward_flops(opt, batch_size, caption_tokens):
    """GFLOPs of the original's forward pass, per part (multiply-add = 2)."""
    D, H, V = opt.embed_size, opt.dim_hidden, opt.vocab_size
    n = batch_size * REGIONS
    decoder_steps = opt.max_len - 1

    def gru(inputs, hidden):  # one step of one sample: 3 gates, input and hidden products
        return 2 * 3 * (inputs * hidden + hidden * hidden)

    parts = {
        "image fc": 2 * n * opt.img_dim * D,
        "GCN x4": 4 * (4 * 2 * n * D * D + 2 * 2 * batch_size * REGIONS * REGIONS * D),
        "image GRU": n * gru(D, D),
        "text GRU": caption_tokens * gru(opt.word_dim, D),
        "caption encoder": 2 * n * opt.dim_vid * H + n * gru(H, H),
        "decoder attention": decoder_steps * n * (2 * 2 * H * H + 2 * H),
        "decoder GRU": decoder_steps * batch_size * gru(opt.dim_word + H, H),
        "decoder vocab": decoder_steps * batch_size * 2 * H * V,
    }
    return {name: flops / 1e9 for name, flops in parts.items()}


def timed(fns, steps, warmup, sync):
    """Seconds of each call of each function, `steps` rounds after `warmup` untimed ones. The
    functions take turns within a round, so a change of load on a shared machine hits all alike."""
    times = [[] for _ in fns]
    for index in range(warmup + steps):
        for fn, seconds in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if index >= warmup:
                seconds.append(time.perf_counter() - start)
    return times


def reference_train_step(model, images, captions, lengths, labels, masks):
    """train_emb with the caption loss from reference_caption."""
    img_emb, cap_emb, regions = model.forward_emb(images, captions, lengths)
    with model.autocast():
        caption_loss = reference_caption.caption_loss(model.caption_model, regions, labels, masks)
    loss = model.criterion(img_emb, cap_emb) + caption_loss
    model.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.optimizer.clip_grad_norm_(model.grad_clip)
    model.optimizer.step()


def check_reference(model, images, captions, lengths, labels, masks):
    """Relative difference of the two caption losses without dropout, in float32."""
    model.val_start()
    with torch.no_grad():
        regions = model.forward_emb(images, captions, lengths)[2].float()
        ours = model.caption_model.loss(regions, labels, masks, steps=caption_steps(masks, model.max_len))
        reference = reference_caption.caption_loss(model.caption_model, regions, labels, masks)
    model.train_start()
    return abs(float(ours) - float(reference)) / abs(float(reference)), float(ours)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--tf32", action="store_true", help="TF32 matrix products (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the three modules")
    p.add_argument("--reference", action="store_true", help="also time the original's step-by-step caption branch")
    args = p.parse_args(argv)

    opt = build_parser().parse_args([])
    opt.data_name, opt.vocab_size, opt.seed = "f30k_precomp", VOCAB_SIZE, 0
    opt.device, opt.amp, opt.tf32 = args.device, args.amp, args.tf32
    configure_backends(opt.tf32)  # as train.py: float32 unless --tf32, seeded
    torch.manual_seed(opt.seed)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    model = VSRN(opt)
    if args.compile:
        for module in model.modules():
            module.compile()
    model.train_start()
    images, captions, lengths, ids, labels, masks = synthetic_batch(args.batch_size, opt.max_len)
    images, captions = images.to(model.device), captions.to(model.device)
    labels, masks = labels.to(model.device), masks.to(model.device)
    B = args.batch_size

    flops = original_forward_flops(opt, B, sum(lengths))
    total = sum(flops.values())
    flops_128 = original_forward_flops(opt, 128, 128 * MEAN_TOKENS)
    product, product_flops = gemm_product(torch, model.device, rows=B * REGIONS, wait=False)

    def gemms():
        for _ in range(GEMMS_PER_ROUND):
            product()

    steps = [lambda: model.train_emb(images, captions, lengths, ids, labels, masks)]
    if args.reference:
        difference, loss = check_reference(model, images, captions, lengths, labels, masks)
        steps.append(lambda: reference_train_step(model, images, captions, lengths, labels, masks))
    # The GEMMs take their turn in every round too, so they see the same load as the steps.
    medians = [median(t) for t in timed(steps + [gemms], args.steps, args.warmup, sync)]
    step = medians[0]
    rate = product_flops / (medians[-1] / GEMMS_PER_ROUND) / 1e9
    efficiency = 3 * total / step / rate
    if cuda:  # of our step alone: the reference's, timed in turn, holds all 59 steps' activations
        torch.cuda.reset_peak_memory_stats()
        steps[0]()
        peak = torch.cuda.max_memory_allocated() / 2**30

    rows = describe(torch, model.device)
    rows += [
        ("options", f"batch {B}, amp {args.amp}, tf32 {args.tf32}, compile {args.compile}"),
        (
            "captions",
            f"{sum(lengths)} tokens, longest {lengths[0]}, "
            f"decoder steps run {caption_steps(masks, opt.max_len)} of {opt.max_len - 1}",
        ),
    ]
    print_table(rows, "VSRN training step, Flickr30K configuration")
    print_table(
        [(name, f"{g:9.2f}  ({g / total:5.1%})") for name, g in flops.items()] + [("total", f"{total:9.2f}")],
        f"Original algorithm, forward GFLOP at batch {B} (x3 for forward + backward)",
    )
    total_128 = sum(flops_128.values())
    print(
        f"  sanity: batch 128, {MEAN_TOKENS} tokens/caption: {total_128 / 1e3:.3f} TFLOP forward, "
        f"decoder attention {flops_128['decoder attention'] / total_128:.1%}"
    )

    results = [
        (
            f"GEMM rate (float32{', TF32 on' if args.tf32 else ''})",
            f"{rate:.1f} GFLOP/s  ({B * REGIONS}x{GEMM_SIZE} @ {GEMM_SIZE}x{GEMM_SIZE}, {GEMMS_PER_ROUND} per round, "
            "timed in turn with the steps)",
        ),
        ("train_emb step", f"{step * 1e3:.1f} ms  (median of {args.steps} rounds after {args.warmup} warm-up)"),
        ("efficiency", f"{efficiency:.2f}"),
    ]
    if cuda:
        results.append(("peak GPU memory", f"{peak:.2f} GiB"))
    if args.reference:
        reference = medians[1]
        results += [
            ("reference step", f"{reference * 1e3:.1f} ms  (timed in turn with ours)"),
            ("reference efficiency", f"{3 * total / reference / rate:.2f}"),
            ("speed-up over reference", f"{reference / step:.2f}x"),
            (
                "caption loss check",
                f"{'ok' if difference <= 1e-4 else 'MISMATCH'}: relative difference {difference:.1e} "
                f"(loss {loss:.4f}, dropout off)",
            ),
        ]
    print_table(results, "Measured")


if __name__ == "__main__":
    main()
