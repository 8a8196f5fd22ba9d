"""Ways to encode a query's sentence faster than float32, measured against it: the time of a sentence
alone and of 16 together, and the top-10 agreement of their embeddings with float32's over many
queries and photo libraries.

    python3 bench/fast_text.py --checkpoint runs/toy2048/model_best.pth.tar [--queries 1000] [--photos 2000]
    python3 bench/fast_text.py      # a text encoder of the released size (300 -> 2048) with random weights

A checkpoint of the released size trained on the toy world at 2048-d regions (one epoch, about 20
minutes on 2 cores; docs/search.md#the-sentences-encoding):

    python3 train.py --demo --data_path data2048 --vocab_path vocab2048 --logger_name runs/toy2048 \\
        --img_dim 2048 --embed_size 2048 --dim_vid 2048 --word_dim 300 --learning_rate 0.001 --num_epochs 1

The ways: float32 (the model, the reference); int8, torch's dynamic quantization of the GRU
(search.py's int8: fbgemm kernels, int8 weights and int8 activations quantized per step);
int8 weights with bfloat16 activations (a GRU step written around torch._weight_int8pack_mm);
bfloat16 (the encoder cast). Queries: distinct toy-world sentences with a checkpoint, random
12-word sentences without. Libraries: the checkpoint's embeddings of `--photos` new toy-world
photos; `--synthetic` vectors around those embeddings (noise from a near copy to a stranger);
and, always, `--synthetic` vectors around the queries' own float32 embeddings. Agreement: the share
of float32's top 10 that a way's top 10 holds (mean over queries), and the share of queries whose
float32 top-1 is in the way's top 10.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import utils.threads  # noqa: E402,F401  (before torch, as the scripts)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from inference import int8_text_encoder  # noqa: E402
from machine import describe, gemm_rate, print_table  # noqa: E402
from model import EncoderText, l2norm  # noqa: E402

RELEASED_VOCAB, WORD_DIM, DIM = 8481, 300, 2048


class StepGRU(nn.Module):
    """A one-layer text encoder written step by step around a product `recurrent(h)` (B, 3H) that
    holds the recurrent weights in another format; gates as torch's GRU."""

    def __init__(self, encoder, recurrent):
        super().__init__()
        rnn = encoder.rnn
        self.embed, self.use_abs, self.recurrent = encoder.embed, encoder.use_abs, recurrent
        self.hidden = rnn.hidden_size
        self.w_ih, self.b_ih = rnn.weight_ih_l0.detach(), rnn.bias_ih_l0.detach()

    def forward(self, captions, lengths):
        lengths = torch.as_tensor(lengths)
        inputs = F.linear(self.embed(captions), self.w_ih, self.b_ih)  # every word's input gates at once
        h = torch.zeros(len(captions), self.hidden)
        out = torch.empty_like(h)
        two = 2 * self.hidden
        for step in range(inputs.shape[1]):
            gates, recurrent = inputs[:, step], self.recurrent(h)
            reset_update = torch.sigmoid(gates[:, :two] + recurrent[:, :two])
            new = torch.tanh(torch.addcmul(gates[:, two:], reset_update[:, : self.hidden], recurrent[:, two:]))
            h = torch.addcmul(new, reset_update[:, self.hidden :], h - new)
            ended = lengths == step + 1
            out[ended] = h[ended]
        out = l2norm(out)
        return out.abs() if self.use_abs else out


def int8_weights_bf16_activations(encoder):
    """Per-row symmetric int8 recurrent weights, multiplied with bfloat16 activations (weight-only int8)."""
    weight, bias = encoder.rnn.weight_hh_l0.detach(), encoder.rnn.bias_hh_l0.detach()
    scale = weight.abs().amax(1).clamp(min=1e-12) / 127
    quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    scale = scale.bfloat16()
    return StepGRU(encoder, lambda h: torch._weight_int8pack_mm(h.bfloat16(), quantized, scale).float() + bias)


class Bfloat16(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        import copy

        self.encoder = copy.deepcopy(encoder).bfloat16()

    def forward(self, captions, lengths):
        return self.encoder(captions, lengths).float()


WAYS = {
    "float32": lambda encoder: encoder,
    "int8 (dynamic quantization)": int8_text_encoder,
    "int8 weights, bf16 activations": int8_weights_bf16_activations,
    "bfloat16": Bfloat16,
}


def load(checkpoint):
    """(text encoder, image encoder or None, vocabulary size, the checkpoint's options or None)."""
    if checkpoint is None:
        torch.manual_seed(0)
        return EncoderText(RELEASED_VOCAB, WORD_DIM, DIM, 1).eval(), None, RELEASED_VOCAB, None
    from inference import load_models

    opt, vocab, models = load_models([checkpoint], need_data=False, device="cpu")
    return models[0].txt_enc, models[0].img_enc, len(vocab), (opt, vocab)


def toy_sentences(count, seed):
    """Distinct sentences of the toy world (its templates, concepts and adjectives)."""
    from utils.make_toy_data import ADJECTIVES, CONCEPTS, TEMPLATES

    rng = np.random.default_rng(seed)
    found = set()
    while len(found) < count:
        x, y, z = rng.choice(CONCEPTS, 3, replace=False)
        found.add(TEMPLATES[rng.integers(len(TEMPLATES))].format(x=x, y=y, z=z, a=rng.choice(ADJECTIVES)))
    return sorted(found)


def query_ids(count, vocab_size, vocab=None, seed=0):
    """Token id rows (with <start> and <end>) and lengths of `count` sentences."""
    if vocab is None:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(4, vocab_size, (1, 14), generator=generator) for _ in range(count)]
    from vocab import END, START, tokenize

    return [
        torch.tensor([[vocab(START)] + [vocab(w) for w in tokenize(text)] + [vocab(END)]])
        for text in toy_sentences(count, seed)
    ]


def median_ms(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def embed_alone(encoder, queries):
    return torch.cat([encoder(ids, [ids.shape[1]]) for ids in queries]).numpy()


@torch.no_grad()
def timings(encoder, queries):
    """(ms for a sentence alone: median over the queries, ms for 16 of them together)."""
    alone = statistics.median(median_ms(lambda ids=ids: encoder(ids, [ids.shape[1]]), 3) for ids in queries[:40])
    batch = queries[:16]
    lengths = [ids.shape[1] for ids in batch]
    padded = torch.zeros(len(batch), max(lengths), dtype=torch.int64)
    for row, ids in enumerate(batch):
        padded[row, : ids.shape[1]] = ids[0]
    return alone, median_ms(lambda: encoder(padded, lengths), 10)


def around(centres, count, seed):
    """`count` unit vectors around rows of `centres`: noise of norm 0.1 to 1.5 (a near copy to a stranger)."""
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, len(centres), count)].copy()
    noise = rng.standard_normal(vectors.shape, dtype=np.float32)
    noise *= (rng.uniform(0.1, 1.5, count) / np.linalg.norm(noise, axis=1))[:, None].astype(np.float32)
    vectors += noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def top10(queries, library):
    return torch.from_numpy(queries @ library.T).topk(10, dim=1).indices.numpy()


def agreement(exact_top, top):
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_top, top)])
    kept = np.mean([a[0] in b for a, b in zip(exact_top, top)])
    return overlap, kept


@torch.no_grad()
def toy_photos(img_enc, img_dim, count):
    """The image embeddings of `count` new photos of the toy world (its prototypes, other draws)."""
    from utils.make_toy_data import make_prototypes, make_split

    rng = np.random.RandomState(0)
    prototypes = make_prototypes(rng, img_dim)
    features, _, _ = make_split(np.random.RandomState(12345), prototypes, count)
    return torch.cat([img_enc(torch.from_numpy(features[i : i + 64]))[0] for i in range(0, count, 64)]).numpy()


def compare(checkpoint=None, count=1000, photos=2000, synthetic=100_000):
    """Prints, per way, its encoding times and its agreement with float32 (see the module's doc)."""
    txt_enc, img_enc, vocab_size, trained = load(checkpoint)
    rnn = txt_enc.rnn
    print(
        f"text encoder: {'random weights' if trained is None else checkpoint}, {vocab_size} words, "
        f"{rnn.input_size} -> {rnn.hidden_size}, {rnn.num_layers} layer(s)"
    )
    queries = query_ids(count, vocab_size, None if trained is None else trained[1])
    encoders = {name: make(txt_enc) for name, make in WAYS.items()}
    embeddings = {name: embed_alone(encoder, queries) for name, encoder in encoders.items()}
    exact = embeddings["float32"]
    libraries = {}
    if img_enc is not None:
        photo_vectors = toy_photos(img_enc, trained[0].img_dim, photos)
        libraries[f"{photos:,} toy photos"] = photo_vectors
        libraries[f"{synthetic:,} around the photos"] = around(photo_vectors, synthetic, 1)
    libraries[f"{synthetic:,} around the queries"] = around(exact, synthetic, 2)
    exact_tops = {name: top10(exact, library) for name, library in libraries.items()}
    rows = []
    for name, encoder in encoders.items():
        alone, together = timings(encoder, queries)
        cosine = (embeddings[name] * exact).sum(1).min()
        figures = [f"alone {alone:6.2f} ms, 16 together {together:6.2f} ms; cosine to float32 >= {cosine:.6f}"]
        for library_name, library in libraries.items():
            overlap, kept = agreement(exact_tops[library_name], top10(embeddings[name], library))
            figures.append(f"{library_name}: top-10 overlap {overlap:.4f}, float32's top-1 kept {kept:.4f}")
        rows.append((name, "; ".join(figures)))
        print(name, rows[-1][1], flush=True)
    print_table(rows, f"{len(queries)} sentences: encoding time (median), agreement with float32 (mean over them)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a VSRN checkpoint (default: random weights of the released size)")
    parser.add_argument("--queries", type=int, default=1000, help="distinct sentences")
    parser.add_argument("--photos", type=int, default=2000, help="toy-world photos embedded by the checkpoint")
    parser.add_argument("--synthetic", type=int, default=100_000, help="vectors of each synthetic library")
    args = parser.parse_args()
    gemm = gemm_rate(torch, "cpu")
    print_table(describe(torch) + [("float32 GEMM", f"{gemm / 1e9:.0f} GFLOP/s (torch.mm, 2048^3)")], "machine")
    compare(args.checkpoint, args.queries, args.photos, args.synthetic)


if __name__ == "__main__":
    main()
