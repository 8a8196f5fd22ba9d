"""Image-text matching with LXMERT (Tan & Bansal, EMNLP 2019) on VSRN's splits and recall metrics.

    python3 lxmert_match.py --model unc-nlp/lxmert-base-uncased --data_path DATA --data_name f30k_precomp \\
        --split test --mode matched                                   # every image-caption pair
    python3 lxmert_match.py --model DIR --data_path DATA --data_name coco_precomp --split testall \\
        --vsrn runs/coco/model_best.pth.tar --topk 20                 # LXMERT reranks VSRN's top 20

Modes (see README, "LXMERT matching"):
  matched  softmax(cross_relationship_score)[:, 1] of LxmertForPreTraining: the probability its
           pretraining image-text matching head gives the pair.
  cosine   cosine of LxmertModel's final language and vision outputs, each averaged over its real
           positions (the caption's tokens, [CLS] and [SEP] included; the 36 regions).

Inputs are those LXMERT was pretrained on: BERT-uncased word pieces `[CLS] caption [SEP]` cut to 20
tokens, the 36 region features, and their boxes divided by the image's width (x) and height (y).
The split needs the `_boxes.npy` and `_image_sizes.npy` files that utils/tsv_to_precomp.py writes.

Recall, median and mean rank are evaluation.py's: the same ranking code runs on LXMERT's (image,
caption) score matrix instead of VSRN's similarity matrix.
"""
import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from data import DEV_CAPTION_LIMIT, FeatureFile, get_test_loader, read_captions, read_region_boxes
from evaluation import _load_models, _print_results, encode_data, metrics_dict, ranks_i2t, ranks_t2i, recall_metrics, similarity
from model import check_device
from utils.atomic import atomic_write
from utils.errors import CheckpointError, DataError, OptionError, VSRNError, report
from utils.options import ScriptHelpFormatter

MODES = ("matched", "cosine")
MAX_TOKENS = 20  # LXMERT's pretraining max_seq_length, [CLS] and [SEP] included
# Pairs are drawn in blocks of about this many batches, sorted by caption length inside a block so
# that a batch pads its captions to similar lengths.
BATCHES_PER_BLOCK = 64
TIMED_BATCHES = 2  # batches after the first (warm-up) one that the expected-time estimate measures


def _transformers():
    try:
        import transformers
    except ImportError:
        raise VSRNError("lxmert_match.py needs the transformers package: python3 -m pip install transformers") from None
    return transformers


# ---------------------------------------------------------------------------------------------
# Inputs


def normalised_boxes(boxes, sizes):
    """Boxes (N, regions, 4) x1 y1 x2 y2 in pixels -> fractions of the image: x by width, y by height.

    `sizes` is (N, 2) (height, width), as {split}_image_sizes.npy stores it.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    sizes = np.asarray(sizes, dtype=np.float32)
    height, width = sizes[:, 0, None], sizes[:, 1, None]
    return np.stack([boxes[..., 0] / width, boxes[..., 1] / height, boxes[..., 2] / width, boxes[..., 3] / height], axis=-1)


def caption_tokens(tokenizer, captions, max_tokens=MAX_TOKENS):
    """Token ids and attention mask (len(captions), max_tokens) of `[CLS] caption [SEP]`, cut as LXMERT did."""
    encoded = tokenizer(list(captions), max_length=max_tokens, truncation=True, padding="max_length", return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


class Split:
    """A split's images (features and normalised boxes) and captions, 5 per image."""

    def __init__(self, data_path, data_name, split, visual_feat_dim):
        folder = os.path.join(data_path, data_name)
        self.ims_path = os.path.join(folder, f"{split}_ims.npy")
        if not os.path.isfile(self.ims_path):
            raise DataError(
                f"{self.ims_path}: not found; LXMERT needs {split}_ims.npy, {split}_caps.txt, {split}_boxes.npy "
                f"and {split}_image_sizes.npy in {folder} (see README, LXMERT matching)"
            )
        self.features = FeatureFile(self.ims_path)
        if self.features.ndim != 3:
            raise DataError(f"{self.ims_path}: features have shape {self.features.shape}; expected (num_images, regions, {visual_feat_dim})")
        if self.features.shape[2] != visual_feat_dim:
            raise DataError(
                f"{self.ims_path}: features have {self.features.shape[2]} dims per region; the LXMERT model's "
                f"visual_feat_dim is {visual_feat_dim}"
            )
        boxes, sizes = read_region_boxes(folder, split, needed_by="LXMERT (lxmert_match.py)")
        captions = read_captions(os.path.join(folder, f"{split}_caps.txt"))
        if len(captions) != 5 * len(self.features):
            raise DataError(
                f"{folder}/{split}_caps.txt: {len(captions)} captions for the {len(self.features)} images of "
                f"{split}_ims.npy; evaluation needs 5 per image"
            )
        # As evaluation.py: validation (dev) uses the first 5000 captions, hence 1000 images.
        if split == "dev":
            captions = captions[:DEV_CAPTION_LIMIT]
        self.captions = captions
        self.num_images = len(captions) // 5
        self.boxes = normalised_boxes(boxes[: self.num_images], sizes[: self.num_images])

    def images(self, indices):
        """Features (len, regions, dim) and normalised boxes (len, regions, 4) of some images."""
        features = np.stack([self.features[int(i)] for i in indices])
        if not np.isfinite(features).all():
            bad = int(indices[int(np.flatnonzero(~np.isfinite(features).reshape(len(features), -1).all(1))[0])])
            raise DataError(f"{self.ims_path}: NaN or Inf in the features of image {bad}")
        return torch.from_numpy(features), torch.from_numpy(self.boxes[np.asarray(indices)])


# ---------------------------------------------------------------------------------------------
# Model


def load_lxmert(model_path, mode, tokenizer_path=None):
    """(model in eval mode, tokenizer) from a hub name or a local directory; one-line errors."""
    if mode not in MODES:
        raise OptionError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    transformers = _transformers()
    model_class = transformers.LxmertForPreTraining if mode == "matched" else transformers.LxmertModel
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # missing weights are checked below, in one line
    try:
        model, info = model_class.from_pretrained(model_path, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"--model {model_path}: cannot load LXMERT weights ({_first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if getattr(model.config, "model_type", None) != "lxmert":
        raise CheckpointError(f"--model {model_path}: a {model.config.model_type} model, not LXMERT")
    missing = sorted(info.get("missing_keys", ()))
    if mode == "matched":
        if any(key.startswith("cls.seq_relationship.") for key in missing):
            raise CheckpointError(
                f"--model {model_path}: no image-text matching head (cls.seq_relationship) in its weights; "
                "--mode matched needs LXMERT's pretraining checkpoint (e.g. unc-nlp/lxmert-base-uncased); "
                "--mode cosine needs only the backbone"
            )
        missing = [key for key in missing if key.startswith("lxmert.")]
    if missing:
        raise CheckpointError(f"--model {model_path}: {len(missing)} LXMERT weights missing (e.g. {missing[0]})")
    tokenizer = load_tokenizer(tokenizer_path or model_path, model.config.vocab_size)
    return model.eval(), tokenizer


def load_tokenizer(path, vocab_size):
    transformers = _transformers()
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json")):
        raise CheckpointError(
            f"{path}: no tokenizer (vocab.txt or tokenizer.json); save LXMERT's tokenizer there or pass --tokenizer"
        )
    # transformers 4.x has a Rust-backed LxmertTokenizerFast; in 5.x LxmertTokenizer is that one.
    tokenizer_class = getattr(transformers, "LxmertTokenizerFast", None) or transformers.LxmertTokenizer
    try:
        tokenizer = tokenizer_class.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load LXMERT's tokenizer ({_first_line(e)}); pass --tokenizer") from None
    # transformers 5 builds an empty word-piece vocabulary when it finds no vocabulary file.
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise CheckpointError(f"{path}: the tokenizer has no vocabulary (only special tokens); pass --tokenizer")
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {vocab_size}")
    return tokenizer


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class PairScorer:
    """LXMERT's score of (image, caption) pairs.

    LXMERT's language layers read only the caption and its object-relationship layers only the
    image, so their outputs are computed once per caption and once per image; only the
    cross-modality layers run once per pair. These are the modules LxmertModel.forward runs, in
    its order, with its masks (tests compare with LxmertForPreTraining and LxmertModel directly).
    """

    def __init__(self, model, mode, device, amp=False):
        self.mode = mode
        self.device = device
        self.model = model.to(device)
        self.backbone = model.lxmert if mode == "matched" else model
        self.encoder = self.backbone.encoder
        self.dtype = next(model.parameters()).dtype
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(amp) and device.type == "cuda")

    def _extended_mask(self, mask):
        # LxmertModel's: 0 where attended, the dtype's minimum where masked.
        return (1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min

    def encode_captions(self, input_ids, mask):
        """Output of the language layers, (captions, tokens, hidden)."""
        with self.autocast:
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self.backbone.embeddings(input_ids, torch.zeros_like(input_ids))
            extended = self._extended_mask(mask)
            for layer in self.encoder.layer:
                hidden = layer(hidden, extended)[0]
        return hidden

    def encode_images(self, features, boxes):
        """Output of the object-relationship layers, (images, regions, hidden)."""
        with self.autocast:
            hidden = self.encoder.visn_fc(features.to(self.device), boxes.to(self.device))
            for layer in self.encoder.r_layers:
                hidden = layer(hidden, None)[0]
        return hidden

    def score(self, language, mask, vision):
        """Scores (float64) of pairs given their encoded captions (with masks) and images."""
        with self.autocast:
            extended = self._extended_mask(mask)
            layers = self.encoder.x_layers
            if self.mode == "cosine":
                for layer in layers:
                    language, vision = layer(language, extended, vision, None)[:2]
                return cosine_of_means(language, mask, vision)
            for layer in layers[:-1]:
                language, vision = layer(language, extended, vision, None)[:2]
            logits = self.model.cls.seq_relationship(self.backbone.pooler(last_layer_cls(layers[-1], language, extended, vision)))
        return torch.softmax(logits.double(), dim=-1)[:, 1]


def last_layer_cls(layer, language, extended_mask, vision):
    """The [CLS] output (pairs, 1, hidden) of a cross-modality layer: all the matching head reads.

    The same operations as LxmertXLayer.forward, less those no [CLS] output depends on: the
    vision stream, and the self-attention queries and feed-forward of the other tokens. (All
    tokens' cross-attention outputs are still needed: they are the self-attention's keys and
    values.) About a sixth of the per-pair work with 5 cross-modality layers.
    """
    attended = layer.visual_attention(language, vision, ctx_att_mask=None)[0]
    cls = attended[:, :1]
    self_attention = layer.lang_self_att
    cls = self_attention.output(self_attention.self(cls, attended, extended_mask)[0], cls)
    return layer.lang_output(layer.lang_inter(cls), cls)


def cosine_of_means(language, mask, vision):
    """Cosine of the language output averaged over the real tokens and the vision output over the regions."""
    mask = mask.to(language.device, torch.float64)[:, :, None]
    text = (language.double() * mask).sum(1) / mask.sum(1)
    image = vision.double().mean(1)
    return torch.nn.functional.cosine_similarity(text, image, dim=-1)


def lxmert_scores(scorer, split, input_ids, mask, pairs, batch_size, desc):
    """LXMERT's scores of the pairs marked in `pairs` (num_images, num_captions) bool; NaN elsewhere."""
    scores = torch.full(pairs.shape, float("nan"), dtype=torch.float64)
    total = int(pairs.sum())
    if total == 0:
        return scores
    images, captions = pairs.any(1).nonzero()[:, 0], pairs.any(0).nonzero()[:, 0]
    image_slot = torch.full((pairs.shape[0],), -1, dtype=torch.int64)
    image_slot[images] = torch.arange(len(images))
    caption_slot = torch.full((pairs.shape[1],), -1, dtype=torch.int64)
    caption_slot[captions] = torch.arange(len(captions))

    language = torch.cat([scorer.encode_captions(input_ids[c], mask[c]) for c in tqdm(captions.split(batch_size), desc="captions", unit="batch", leave=False, disable=None)])
    vision = torch.cat([scorer.encode_images(*split.images(i.numpy())) for i in tqdm(images.split(batch_size), desc="images", unit="batch", leave=False, disable=None)])
    caption_mask = mask[captions].to(scorer.device)
    lengths = mask.sum(1)

    print(f"{desc}: {total:,} pairs ({len(images)} images, {len(captions)} captions)")
    progress = tqdm(total=total, desc=desc, unit="pair", unit_scale=True, dynamic_ncols=True, mininterval=1.0, disable=None)
    timer = _ExpectedTime(total, progress)
    rows_per_block = max(1, BATCHES_PER_BLOCK * batch_size // pairs.shape[1])
    for start in range(0, pairs.shape[0], rows_per_block):
        image_ids, caption_ids = pairs[start:start + rows_per_block].nonzero().unbind(1)
        image_ids = image_ids + start
        order = torch.argsort(lengths[caption_ids], stable=True)
        image_ids, caption_ids = image_ids[order], caption_ids[order]
        for first in range(0, len(order), batch_size):
            batch_images, batch_captions = image_ids[first:first + batch_size], caption_ids[first:first + batch_size]
            tokens = int(lengths[batch_captions].max())
            slots = caption_slot[batch_captions].to(scorer.device)
            batch_scores = scorer.score(language[slots, :tokens], caption_mask[slots, :tokens], vision[image_slot[batch_images].to(scorer.device)])
            scores[batch_images, batch_captions] = batch_scores.cpu()
            progress.update(len(batch_images))
            timer.batch_done(len(batch_images))
    progress.close()
    return scores


class _ExpectedTime:
    """Prints, after the first batches, how long the whole scoring should take at their speed."""

    def __init__(self, total, progress):
        self.total, self.progress = total, progress
        self.batches, self.pairs, self.start = 0, 0, None

    def batch_done(self, pairs):
        self.batches += 1
        if self.batches == 1:  # the first batch warms up kernels and caches
            self.start = time.perf_counter()
            return
        self.pairs += pairs
        if self.batches == 1 + TIMED_BATCHES:
            rate = self.pairs / max(time.perf_counter() - self.start, 1e-9)
            self.progress.write(f"expected time for {self.total:,} pairs: {format_duration(self.total / rate)} ({rate:,.1f} pairs/s)")


def format_duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


# ---------------------------------------------------------------------------------------------
# Two-stage retrieval


def top_candidates(scores, topk, dim):
    """Boolean mask of each query's `topk` best targets; queries run along the other dimension."""
    scores = torch.as_tensor(scores)
    k = min(topk, scores.shape[dim])
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask.scatter_(dim, scores.topk(k, dim=dim).indices, True)
    return mask


def rerank(first_stage, second_stage, candidates, alpha=1.0):
    """Scores (queries x targets, float64) of two-stage retrieval.

    Each query's candidates rank by `alpha * second_stage + (1 - alpha) * first_stage`, all
    above its other targets, which keep the first stage's order (shifted below the candidates).
    """
    first = torch.as_tensor(first_stage, dtype=torch.float64)
    second = torch.as_tensor(second_stage, dtype=torch.float64)
    candidates = torch.as_tensor(candidates, dtype=torch.bool)
    result = torch.empty(first.shape, dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, first.shape[1]))
    for start in range(0, len(first), step):
        rows = slice(start, start + step)
        chosen, base = candidates[rows], first[rows]
        fused = alpha * second[rows] + (1 - alpha) * base if alpha != 1 else second[rows]
        lowest_chosen = torch.where(chosen, fused, math.inf).amin(1, keepdim=True)
        highest_other = torch.where(chosen, -math.inf, base).amax(1, keepdim=True)
        shift = (highest_other - lowest_chosen + 1).clamp(min=0)
        result[rows] = torch.where(chosen, fused, base - shift)
    return result


def vsrn_similarity(checkpoints, data_path, data_name, split, vocab_path=None):
    """VSRN's (num_images, num_captions) similarity on the split: one checkpoint or an ensemble's average."""
    opt, vocab, models = _load_models(checkpoints, data_path, vocab_path)
    loader = get_test_loader(split, data_name, vocab, opt.crop_size, opt.batch_size, opt.workers, opt)
    embeddings = [encode_data(model, loader) for model in models]
    return sum(similarity(images, captions, opt.measure) for images, captions in embeddings) / len(embeddings)


# ---------------------------------------------------------------------------------------------
# Evaluation


def recall_of(i2t_scores, t2i_scores):
    """evaluation.py's metrics: image-to-text ranks from one score matrix, text-to-image from another."""
    r = recall_metrics(ranks_i2t(i2t_scores)[0])
    ri = recall_metrics(ranks_t2i(t2i_scores)[0])
    metrics = metrics_dict(r + ri)
    return metrics, r, ri


def evaluate(model_path, data_path, data_name, split, mode="matched", vsrn=None, topk=20, alpha=1.0,
             batch_size=64, device=None, amp=False, tokenizer_path=None, vocab_path=None, save_scores=None):
    """Recall of LXMERT image-text matching on a split: dict r1 r5 r10 medr meanr r1i ... meanri rsum.

    mode: 'matched' (the matching head's probability) or 'cosine' (see the module's docstring).
    vsrn: None scores every pair; VSRN checkpoint path(s) (several: an ensemble) or an
      (num_images, num_captions) first-stage score matrix make it two-stage: LXMERT rescores each
      query's `topk` best targets by VSRN, which rank above the rest in VSRN's order.
    alpha: candidates rank by alpha * LXMERT + (1 - alpha) * VSRN (two-stage only).
    save_scores: .npy path for LXMERT's (num_images, num_captions) float64 scores (NaN where not scored).
    """
    if topk < 1:
        raise OptionError(f"--topk {topk}: must be at least 1")
    if not 0 <= alpha <= 1:
        raise OptionError(f"--alpha {alpha}: must lie in [0, 1]")
    if alpha != 1 and vsrn is None:
        raise OptionError(f"--alpha {alpha}: mixes VSRN's scores in, so it needs --vsrn")
    if batch_size < 1:
        raise OptionError(f"--batch_size {batch_size}: must be at least 1")
    device = check_device(device)
    model, tokenizer = load_lxmert(model_path, mode, tokenizer_path)
    data = Split(data_path, data_name, split, model.config.visual_feat_dim)
    num_images, num_captions = data.num_images, len(data.captions)
    print(f"LXMERT {mode} on {data_name} {split}: {num_images} images, {num_captions} captions")

    first_stage = None
    if vsrn is not None:
        if isinstance(vsrn, (str, os.PathLike)):
            vsrn = [vsrn]
        if isinstance(vsrn, (list, tuple)):
            first_stage = vsrn_similarity([os.fspath(p) for p in vsrn], data_path, data_name, split, vocab_path)
        else:
            first_stage = torch.as_tensor(np.asarray(vsrn), dtype=torch.float32)
        if tuple(first_stage.shape) != (num_images, num_captions):
            raise DataError(f"VSRN's scores are {tuple(first_stage.shape)}; the {split} split has {num_images} images and {num_captions} captions")
        i2t_candidates = top_candidates(first_stage, topk, dim=1)
        t2i_candidates = top_candidates(first_stage, topk, dim=0)
        pairs = i2t_candidates | t2i_candidates
        desc = f"LXMERT {mode}, VSRN top-{topk}"
    else:
        pairs = torch.ones(num_images, num_captions, dtype=torch.bool)
        desc = f"LXMERT {mode}, all pairs"

    input_ids, mask = caption_tokens(tokenizer, data.captions)
    scorer = PairScorer(model, mode, device, amp)
    with torch.inference_mode():
        scores = lxmert_scores(scorer, data, input_ids, mask, pairs, batch_size, desc)

    if first_stage is None:
        metrics, r, ri = recall_of(scores, scores)
    else:
        _, vr, vri = recall_of(first_stage, first_stage)
        print("VSRN (first stage):")
        _print_results(vr, vri)
        i2t_scores = rerank(first_stage, scores, i2t_candidates, alpha)
        t2i_scores = rerank(first_stage.T, scores.T, t2i_candidates.T, alpha).T
        metrics, r, ri = recall_of(i2t_scores, t2i_scores)
        fusion = f", alpha {alpha:g}" if alpha != 1 else ""
        print(f"LXMERT {mode} reranking VSRN's top-{topk}{fusion}:")
    _print_results(r, ri)
    if save_scores:
        with atomic_write(save_scores, "wb") as f:
            np.save(f, scores.numpy())
        print(f"LXMERT scores saved to {save_scores}")
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument("--model", required=True, help="hub name (e.g. unc-nlp/lxmert-base-uncased) or local directory")
    parser.add_argument("--data_path", required=True, help="folder holding NAME/ (as train.py)")
    parser.add_argument("--data_name", required=True, help="e.g. f30k_precomp; the split needs boxes and image sizes")
    parser.add_argument("--split", default="test", help="dev, test or testall (COCO 5K)")
    parser.add_argument("--mode", default="matched", choices=MODES,
                        help="matched: the matching head's probability; cosine: pooled language and vision outputs")
    parser.add_argument("--vsrn", nargs="+", default=None, metavar="CHECKPOINT", help="two-stage: rerank these VSRN checkpoints' top-k (several: an ensemble)")
    parser.add_argument("--topk", type=int, default=20, help="candidates per query that LXMERT rescores (with --vsrn)")
    parser.add_argument("--alpha", type=float, default=1.0, help="candidates rank by alpha*LXMERT + (1-alpha)*VSRN (with --vsrn)")
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per forward pass")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: --model)")
    parser.add_argument("--vocab_path", default=None, help="overrides the VSRN checkpoint's vocab_path")
    parser.add_argument("--save_scores", default=None, metavar="PATH.npy", help="save LXMERT's (images, captions) score matrix")
    args = parser.parse_args(argv)
    try:
        evaluate(args.model, args.data_path, args.data_name, args.split, args.mode, args.vsrn, args.topk, args.alpha,
                 args.batch_size, args.device, args.amp, args.tokenizer, args.vocab_path, args.save_scores)
    except (VSRNError, OSError) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
