"""VSRN's image encoder at the released size (36 regions of 2048 dims -> a 2048-d embedding), as
index.py runs it on published rows: photos/s in float32, bfloat16 and int8, and how far each moves
the scores from float32's.

    python3 bench/image_encoder.py [--checkpoint M] [--photos 256] [--batch 64]

Without a checkpoint: random weights of the released size, the reasoning blocks' BatchNorm set
away from its zero start (else each block is the identity and its products would not count).
The ways: float32 (index.py's); bfloat16 autocast; bfloat16 weights (the encoder cast); int8
(fbgemm's dynamic quantization of every product with weights: the first layer, the four reasoning
blocks' projections and the GRU). Scores: the inner products of the photos' embeddings with 256
random unit sentence vectors; the deviation is the largest change of a score, against their spread.
"""

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils.threads  # noqa: E402,F401  (before torch, as the scripts)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from machine import describe, gemm_rate, print_table  # noqa: E402
from model import EncoderImagePrecompAttn  # noqa: E402

DIM, REGIONS = 2048, 36


def released_size_encoder(checkpoint):
    if checkpoint:
        from inference import load_models

        return load_models([checkpoint], need_data=False, device="cpu")[2][0].img_enc
    torch.manual_seed(0)
    encoder = EncoderImagePrecompAttn(DIM, DIM, "coco_precomp").eval()
    for name, parameter in encoder.named_parameters():
        if name.endswith("W.1.weight") or name.endswith("W.1.bias"):
            nn.init.normal_(parameter, 0, 0.5)
    return encoder


class Int8Linear(nn.Module):
    """A float32 product with a weight (x W^T + b) through fbgemm's dynamic int8 kernels."""

    def __init__(self, weight, bias):
        super().__init__()
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        zero = torch.zeros(len(weight), dtype=torch.int64)
        quantized = torch.quantize_per_channel(weight.detach(), scale.double(), zero, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, bias.detach())

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), self.packed, True).view(*x.shape[:-1], -1)


def int8_encoder(encoder):
    """A copy whose products with weights run in int8: the reasoning blocks' 1x1 convolutions (run as
    products) become Int8Linear, the first layer and the GRU torch's dynamic quantization."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(encoder, {nn.Linear, nn.GRU}, dtype=torch.qint8)
        for block in (quantized.Rs_GCN_1, quantized.Rs_GCN_2, quantized.Rs_GCN_3, quantized.Rs_GCN_4):
            projections = {
                name: Int8Linear(conv.weight.squeeze(-1), conv.bias)
                for name, conv in (("g", block.g), ("theta", block.theta), ("phi", block.phi), ("w", block.W[0]))
            }
            block.forward_regions = int8_block(block, projections)
    return quantized


def int8_block(block, projections):
    def forward_regions(x):
        g, theta, phi = projections["g"](x), projections["theta"](x), projections["phi"](x)
        y = torch.matmul(torch.matmul(theta, phi.transpose(1, 2)) / x.size(1), g)
        w_y = block.W[1](projections["w"](y).transpose(1, 2)).transpose(1, 2)
        return w_y + x

    return forward_regions


def ways(encoder):
    bf16 = copy.deepcopy(encoder).bfloat16()
    return {
        "float32": (encoder, contextlib.nullcontext, torch.float32),
        "bfloat16 autocast": (encoder, lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.float32),
        "bfloat16 weights": (bf16, contextlib.nullcontext, torch.bfloat16),
        "int8": (int8_encoder(encoder), contextlib.nullcontext, torch.float32),
    }


@torch.no_grad()
def embed(way, features, batch):
    encoder, context, dtype = way
    chunks = []
    with context():
        for start in range(0, len(features), batch):
            chunks.append(encoder(features[start : start + batch].to(dtype))[0].float())
    return torch.cat(chunks)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a VSRN checkpoint of 2048-d regions (default: random weights)")
    parser.add_argument("--photos", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="photos per pass (index.py's commit batch)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gemm = gemm_rate(torch, "cpu")
    print_table(describe(torch) + [("float32 GEMM", f"{gemm / 1e9:.0f} GFLOP/s (torch.mm, 2048^3)")], "machine")
    encoder = released_size_encoder(args.checkpoint)
    rng = np.random.default_rng(0)
    features = torch.from_numpy(np.maximum(rng.normal(0, 1, (args.photos, REGIONS, DIM)), 0).astype(np.float32) * 3)
    sentences = torch.nn.functional.normalize(torch.randn(256, DIM), dim=1)
    # The encoder's float32 multiply-adds per photo: the first layer, 4 blocks of 4 projections, the GRU.
    flops = 2 * REGIONS * DIM * DIM * (1 + 16 + 6) + 2 * 4 * 2 * REGIONS * REGIONS * DIM
    rows, reference = [], None
    for name, way in ways(encoder).items():
        embed(way, features[: args.batch], args.batch)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            embeddings = embed(way, features, args.batch)
            seconds.append(time.perf_counter() - start)
        scores = embeddings @ sentences.T
        reference = scores if reference is None else reference
        rate = args.photos / statistics.median(seconds)
        deviation = (scores - reference).abs().max().item()
        rows.append(
            (
                name,
                f"{rate:6.1f} photos/s ({rate * flops / gemm:.2f} of the GEMM rate in float32 terms); largest score "
                f"change {deviation:.2e} (the scores' spread {reference.std().item():.2e})",
            )
        )
        print(name, rows[-1][1], flush=True)
    print_table(rows, f"VSRN's image encoder, {args.photos} photos of {REGIONS} x {DIM} regions, {args.batch} a pass")


if __name__ == "__main__":
    main()
