"""Image-text matching with LXMERT (Tan & Bansal, EMNLP 2019) on VSRN's splits and recall metrics,
or on your own pictures in one step.

    python3 lxmert_match.py --model DIR --data_path DATA --data_name f30k_precomp \\
        --split test --mode matched                                   # every image-caption pair
    python3 lxmert_match.py --model DIR --data_path DATA --data_name coco_precomp --split testall \\
        --vsrn runs/coco/model_best.pth.tar --topk 20                 # LXMERT reranks VSRN's top 20
    python3 lxmert_match.py --model DIR --images photos/ --captions captions.txt \\
        --detector frcnn/pytorch_model.bin                            # pictures and captions in, scores out

Your own pictures: their regions are extracted with detector.py (36 per picture, the caffe
policy LXMERT's features were made with) and cached ($VSRN_CACHE/regions/, see README), every
picture-caption pair is scored, each caption's pictures and each picture's captions are printed
best first, and the score matrix is written (--save_scores: .csv and/or .json). FILE holds one
caption per line, or `image_id<TAB>caption` lines (image id: the file name without extension),
which add recall against those ground truths.

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
import csv
import json
import math
import os
import socket
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import torch
from tqdm import tqdm

from data import DEV_CAPTION_LIMIT, FeatureFile, get_test_loader, read_image_ids, read_region_boxes
from evaluation import (_load_models, _print_results, check_finite, encode_data, metrics_dict, ranks_i2t, ranks_t2i, recall_metrics,
                        similarity, similarity_name)
from model import check_device
from utils.captions import read_captions
from utils.atomic import atomic_write
from utils.errors import CheckpointError, DataError, OptionError, ScoreError, VSRNError, report
from utils.options import ScriptHelpFormatter

MODES = ("matched", "cosine")
DEFAULT_MODEL = "unc-nlp/lxmert-base-uncased"
DEFAULT_SCORES = "lxmert_scores.csv"
LXMERT_BOXES = 36  # regions per picture, as LXMERT's obj36 features
MAX_TOKENS = 20  # LXMERT's pretraining max_seq_length, [CLS] and [SEP] included
# Pairs are drawn in blocks of this many batches, sorted by caption length inside a block so that
# a batch pads its captions to similar lengths.
BATCHES_PER_BLOCK = 64
TIMED_BATCHES = 2  # batches after the first (warm-up) one that the expected-time estimate measures
# LXMERT's loader asserts normalised boxes within [0, 1] up to this much (np.testing.assert_array_less).
BOX_TOLERANCE = 1e-5
HUB_TIMEOUT = 3  # seconds the check that the model hub is reachable waits for a connection


def _transformers():
    try:
        import transformers
    except ImportError:
        raise VSRNError("lxmert_match.py needs the transformers package: python3 -m pip install transformers") from None
    return transformers


# ---------------------------------------------------------------------------------------------
# Inputs


def normalised_boxes(boxes, sizes, image_names=None):
    """Boxes (N, regions, 4) x1 y1 x2 y2 in pixels -> fractions of the image: x by width, y by height.

    `sizes` is (N, 2) (height, width), as {split}_image_sizes.npy stores it. As LXMERT's loader,
    refuses boxes outside their image by more than BOX_TOLERANCE and clips the others into
    [0, 1]; sizes must be positive. Errors name image i as `image_names[i]` (default: "image i").
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    sizes = np.asarray(sizes, dtype=np.float64)
    name = (lambda i: image_names[i]) if image_names is not None else (lambda i: f"image {i}")
    bad_sizes = ~(sizes > 0).all(1)  # NaN is not > 0 either
    if bad_sizes.any():
        i = int(np.flatnonzero(bad_sizes)[0])
        raise DataError(f"{name(i)}: image size {sizes[i, 0]:g} x {sizes[i, 1]:g} (height x width); sizes must be positive")
    height, width = sizes[:, 0, None].astype(np.float32), sizes[:, 1, None].astype(np.float32)
    normalised = np.stack([boxes[..., 0] / width, boxes[..., 1] / height, boxes[..., 2] / width, boxes[..., 3] / height], axis=-1)
    inside = ((normalised > -BOX_TOLERANCE) & (normalised < 1 + BOX_TOLERANCE)).all(-1)  # NaN is outside
    if not inside.all():
        i, region = (int(k) for k in np.argwhere(~inside)[0])
        box = " ".join(f"{v:g}" for v in boxes[i, region])
        raise DataError(
            f"{name(i)}: region {region}'s box (x1 y1 x2 y2 {box}) is not within the {sizes[i, 1]:g} x {sizes[i, 0]:g} "
            "(width x height) image; LXMERT needs every box inside its image"
        )
    return np.clip(normalised, 0.0, 1.0)


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
        ids = read_image_ids(folder, split)
        names = [f"{folder}/{split}_boxes.npy, image " + (f"{ids[i]} (row {i})" if ids else str(i)) for i in range(self.num_images)]
        self.boxes = normalised_boxes(boxes[: self.num_images], sizes[: self.num_images], names)

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
    """(model in eval mode, tokenizer) from a local directory or a hub name; one-line errors."""
    if mode not in MODES:
        raise OptionError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    local_only = hub_unavailable(model_path, "--model")  # before transformers' import, which takes seconds
    transformers = _transformers()
    config = _from_pretrained(transformers.PretrainedConfig.get_config_dict, model_path, "--model", local_only, "its config.json")[0]
    check_model_type(config, model_path)
    model_class = transformers.LxmertForPreTraining if mode == "matched" else transformers.LxmertModel
    model, info = _from_pretrained(model_class.from_pretrained, model_path, "--model", local_only, "LXMERT's weights", output_loading_info=True)
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
    if tokenizer_path is None:
        tokenizer = load_tokenizer(model_path, model.config.vocab_size, "--model", local_only)
    else:
        tokenizer = load_tokenizer(tokenizer_path, model.config.vocab_size)
    return model.eval(), tokenizer


def check_model_type(config, model_path):
    """Refuse a config.json (as a dict) that names another model than LXMERT.

    transformers would build an LXMERT from any config, ignoring its model_type, and then
    report missing weights. A config naming neither a model type nor architectures passes.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type is not None and model_type != "lxmert":
        raise CheckpointError(f"--model {model_path}: a {model_type} model (config.json), not LXMERT")
    if model_type is None and architectures and not any(name.startswith("Lxmert") for name in architectures):
        raise CheckpointError(f"--model {model_path}: a {architectures[0]} model (config.json), not LXMERT")


def hub_unavailable(value, flag):
    """Whether `value` of `flag` must load without the model hub (a folder, or the hub out of reach).

    A folder loads as it is. A value that is not a folder but names one (an absolute or
    relative path, a path below a folder that exists) is refused at once, as is a file. What
    remains can be a hub name: it is looked up on the hub only when the hub answers, else in
    transformers' cache alone, so that no request waits on an unreachable hub.
    """
    if os.path.isdir(value):
        return True
    if os.path.exists(value):
        raise CheckpointError(f"{flag} {value}: a file, not a folder; LXMERT's weights are a folder (see README, LXMERT matching)")
    if not is_hub_name(value):
        raise CheckpointError(f"{flag} {value}: folder not found")
    return not hub_reachable()


def is_hub_name(value):
    """Whether `value` can name a model on the hub (`name` or `owner/name`) rather than only a path."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id  # transformers' dependency
    except ImportError:
        _transformers()  # the one-line error saying what to install
        raise

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    owner = value.split("/")[0]
    return not ("/" in value and os.path.isdir(owner))


def hub_offline():
    """Whether HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE forbids the model hub."""
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout=HUB_TIMEOUT):
    """Whether the model hub (HF_ENDPOINT, through the HTTPS proxy if one is set) takes a connection within `timeout` s."""
    if hub_offline():
        return False
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    address = urllib.parse.urlsplit(proxy) if proxy else endpoint
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        with socket.create_connection((address.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _from_pretrained(load, value, flag, local_only, what, **kwargs):
    """`load(value, ...)` of transformers (loading `what`) with its failures as one line; no hub request when `local_only`."""
    transformers = _transformers()
    verbosity, progress_bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # what the caller checks, it reports in one line
    transformers.logging.disable_progress_bar()
    try:
        return load(value, local_files_only=local_only, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if os.path.isdir(value):
            raise CheckpointError(f"{flag} {value}: cannot load {what} from this folder ({_first_line(e)})") from None
        if local_only:
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the model hub cannot be reached"
            raise CheckpointError(
                f"{flag} {value}: no such folder, and not in the hub's cache ({why}); download the weights into a "
                "folder and pass that (see README, LXMERT matching)"
            ) from None
        raise CheckpointError(f"{flag} {value}: no such folder, and the model hub cannot provide it ({_first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress_bars:
            transformers.logging.enable_progress_bar()


def load_tokenizer(path, vocab_size, flag="--tokenizer", local_only=None):
    """LXMERT's tokenizer from a folder or a hub name (`local_only` as `hub_unavailable` decides by default)."""
    transformers = _transformers()
    if local_only is None:
        local_only = hub_unavailable(path, flag)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.txt", "tokenizer.json")):
        raise CheckpointError(
            f"{path}: no tokenizer (vocab.txt or tokenizer.json); save LXMERT's tokenizer there or pass --tokenizer"
        )
    # transformers 4.x has a Rust-backed LxmertTokenizerFast; in 5.x LxmertTokenizer is that one.
    tokenizer_class = getattr(transformers, "LxmertTokenizerFast", None) or transformers.LxmertTokenizer
    tokenizer = _from_pretrained(tokenizer_class.from_pretrained, path, flag, local_only, "LXMERT's tokenizer")
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
        """amp: bfloat16 autocast on `device` for the transformer layers (the matching head runs in float32)."""
        self.mode = mode
        self.device = device
        self.model = model.to(device)
        self.backbone = model.lxmert if mode == "matched" else model
        self.encoder = self.backbone.encoder
        self.dtype = next(model.parameters()).dtype
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(amp))
        self.full_precision = torch.autocast(device.type, enabled=False)

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
            cls = last_layer_cls(layers[-1], language, extended, vision)
        # In bfloat16 the logits would take a few hundred values: scores would tie, and ties count
        # in the ground truth's favour.
        with self.full_precision:
            logits = self.model.cls.seq_relationship(self.backbone.pooler(cls.to(self.dtype)))
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
    """LXMERT's scores of the pairs marked in `pairs` (num_images, num_captions) bool; NaN elsewhere.

    Captions of the same word pieces are scored once, for all of them: duplicates score exactly
    alike, so they tie as they do in VSRN. Non-finite scores are refused as soon as they appear.
    """
    first = first_duplicates(input_ids)
    duplicates = (first != torch.arange(len(first))).nonzero()[:, 0]
    scored = pairs.clone()
    for caption in duplicates.tolist():
        scored[:, first[caption]] |= pairs[:, caption]
    scored[:, duplicates] = False
    scores = torch.full(pairs.shape, float("nan"), dtype=torch.float64)
    total = int(scored.sum())
    if total == 0:
        return scores
    images, captions = scored.any(1).nonzero()[:, 0], scored.any(0).nonzero()[:, 0]
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
    done = 0
    for image_ids, caption_ids in pair_blocks(scored, BATCHES_PER_BLOCK * batch_size):
        order = torch.argsort(lengths[caption_ids], stable=True)
        image_ids, caption_ids = image_ids[order], caption_ids[order]
        for start in range(0, len(order), batch_size):
            batch_images, batch_captions = image_ids[start:start + batch_size], caption_ids[start:start + batch_size]
            tokens = int(lengths[batch_captions].max())
            slots = caption_slot[batch_captions].to(scorer.device)
            batch_scores = scorer.score(language[slots, :tokens], caption_mask[slots, :tokens], vision[image_slot[batch_images].to(scorer.device)]).cpu()
            done += len(batch_images)
            bad = ~torch.isfinite(batch_scores)
            if bad.any():
                k = int(bad.nonzero()[0, 0])
                raise ScoreError(
                    f"LXMERT's scores: {int(bad.sum())} of the last {len(bad)} pairs scored (of {done:,} so far) are NaN or "
                    f"infinite, the first at image {int(batch_images[k])}, caption {int(batch_captions[k])} (diverged "
                    "weights?); they cannot be ranked"
                )
            scores[batch_images, batch_captions] = batch_scores
            progress.update(len(batch_images))
            timer.batch_done(len(batch_images))
    progress.close()
    scores[:, duplicates] = scores[:, first[duplicates]]
    return scores.masked_fill_(~pairs, float("nan"))


def first_duplicates(input_ids):
    """For each caption (row of token ids), the first caption with the same ids: itself when it has no earlier duplicate."""
    _, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,) if len(inverse) else (0,), len(inverse), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse)), "amin")
    return first[inverse]


def pair_blocks(pairs, block_size):
    """The marked (image, caption) pairs of `pairs` (images x captions, bool) in row order, as
    (image ids, caption ids) blocks of `block_size` pairs (the last one shorter), whatever
    each row holds: blocks fill whole batches however sparse the rows are."""
    ends = pairs.sum(1).cumsum(0)  # pairs up to and including each row
    total = int(ends[-1]) if len(ends) else 0
    for start in range(0, total, block_size):
        stop = min(start + block_size, total)
        first_row, last_row = torch.searchsorted(ends, torch.tensor([start, stop - 1]), right=True).tolist()
        images, captions = pairs[first_row:last_row + 1].nonzero().unbind(1)
        skip = start - (int(ends[first_row - 1]) if first_row else 0)
        yield images[skip:skip + stop - start] + first_row, captions[skip:skip + stop - start]


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
    """Boolean mask of each query's `topk` best targets, and of every target tied with its k-th
    (so none is left out by chance); queries run along the other dimension."""
    scores = torch.as_tensor(scores)
    k = min(topk, scores.shape[dim])
    kth = scores.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    return scores >= kth


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
    sims = sum(similarity(images, captions, opt.measure) for images, captions in embeddings) / len(embeddings)
    check_finite(sims, similarity_name(len(embeddings)))
    return sims


# ---------------------------------------------------------------------------------------------
# Your own pictures


def read_pictures_captions(path):
    """(captions, their image ids or None) of a caption file: one caption per line, or
    `image_id<TAB>caption` on every line. Blank lines are skipped."""
    captions, image_ids = [], []
    for number, line in enumerate(read_captions(path), start=1):
        if not line:
            continue
        image_id, tab, caption = line.partition("\t")
        if captions and bool(tab) != bool(image_ids):
            raise DataError(f"{path}: line {number} " + ("has" if tab else "has no") + " image id and tab, unlike the lines before; "
                            "give every line as `caption` or every line as `image_id<TAB>caption`")
        if tab:
            if not image_id.strip() or not caption.strip():
                raise DataError(f"{path}: line {number}: expected `image_id<TAB>caption`, got an empty " + ("image id" if not image_id.strip() else "caption"))
            image_ids.append(image_id.strip())
        captions.append(caption.strip() if tab else line)
    if not captions:
        raise DataError(f"{path}: no captions")
    return captions, image_ids or None


class Pictures:
    """Pictures' regions (LXMERT inputs: features and normalised boxes), by image id, in a fixed order."""

    def __init__(self, regions, paths, visual_feat_dim, detector):
        self.ids = list(regions)
        features = [regions[i]["features"] for i in self.ids]
        width = features[0].shape[1]
        if width != visual_feat_dim:
            raise DataError(f"--detector {detector}: its regions have {width} dims; the LXMERT model's visual_feat_dim is {visual_feat_dim}")
        self.features = np.stack(features).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(self.features).reshape(len(self.ids), -1).all(1))
        if len(bad):
            raise DataError(f"{paths[self.ids[bad[0]]]}: NaN or Inf in its region features (--detector {detector})")
        sizes = [(regions[i]["img_h"], regions[i]["img_w"]) for i in self.ids]
        self.boxes = normalised_boxes(np.stack([regions[i]["boxes"] for i in self.ids]), sizes, [paths[i] for i in self.ids])

    def images(self, indices):
        """Features (len, regions, dim) and normalised boxes (len, regions, 4) of some pictures."""
        indices = np.asarray(indices)
        return torch.from_numpy(self.features[indices]), torch.from_numpy(self.boxes[indices])


def picture_regions(items, detector, detector_config, policy, device, batch_size):
    """{image id: regions} of the pictures `items` ((image id, path) pairs), extracted once and
    then read from the cache, which is named on stdout."""
    import extract_regions

    cache = extract_regions.regions_cache_path(detector, detector_config, policy, LXMERT_BOXES)
    print(f"Regions of {len(items)} pictures ({policy} policy, {LXMERT_BOXES} boxes), extracted once and cached in {cache}")
    regions = extract_regions.cached_regions([path for _, path in items], detector, detector_config, policy, LXMERT_BOXES,
                                             device=str(device), batch_size=batch_size)
    if not regions:
        raise DataError(f"--images: none of the {len(items)} pictures could be used (see the lines above)")
    if len(regions) < len(items):
        print(f"{len(items) - len(regions)} of the {len(items)} pictures could not be used (see the lines above); matching the others")
    return regions


def print_rankings(scores, image_ids, captions, top):
    """Each caption's pictures and each picture's captions, best first (`top` of them; 0: all)."""
    count = lambda n: n if top <= 0 else min(top, n)  # noqa: E731
    width = max(len(i) for i in image_ids)
    for j, caption in enumerate(captions):
        print(f"Caption {j + 1}: {caption}")
        for rank, i in enumerate(torch.argsort(scores[:, j], descending=True, stable=True)[:count(len(image_ids))].tolist(), start=1):
            print(f"  {rank:>3}. {image_ids[i]:<{width}}  {scores[i, j]:.4f}")
    for i, image_id in enumerate(image_ids):
        print(f"Picture {image_id}:")
        for rank, j in enumerate(torch.argsort(scores[i], descending=True, stable=True)[:count(len(captions))].tolist(), start=1):
            print(f"  {rank:>3}. {scores[i, j]:.4f}  {captions[j]}")


def save_score_matrix(path, scores, image_ids, captions, mode, model_path):
    """The (pictures, captions) scores as CSV (a row per picture, a column per caption) or JSON, atomically."""
    if os.path.splitext(path)[1].lower() == ".json":
        record = {"mode": mode, "model": model_path, "images": image_ids, "captions": captions, "scores": scores.tolist()}
        with atomic_write(path, "w") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)
    else:
        with atomic_write(path, "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_id", *captions])
            writer.writerows([image_id, *(repr(float(v)) for v in row)] for image_id, row in zip(image_ids, scores.tolist()))


def check_scores_paths(paths, formats):
    for path in paths:
        if os.path.splitext(path)[1].lower() not in formats:
            raise OptionError(f"--save_scores {path}: expected a {' or '.join(formats)} file")


def match_pictures(images, captions_path, detector, model_path=DEFAULT_MODEL, mode="matched", detector_config=None, policy="caffe",
                   batch_size=64, device=None, amp=False, tokenizer_path=None, save_scores=(DEFAULT_SCORES,), top=5):
    """LXMERT's (pictures, captions) scores of your own pictures and captions, in one step.

    images: a folder or picture files (a list); captions_path: one caption per line, or
    `image_id<TAB>caption` lines, which add recall (evaluation.py's, against those ground
    truths). Regions: detector.py's through extract_regions.cached_regions. Prints the
    rankings (`top` per query; 0: all) and writes the matrix to each of `save_scores` (.csv,
    .json). Returns (scores (pictures, captions) float64, picture ids, captions, recall dict or None).
    """
    import extract_regions  # the detector's job, for this mode only

    images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    check_scores_paths(save_scores, (".csv", ".json"))
    if batch_size < 1:
        raise OptionError(f"--batch_size {batch_size}: must be at least 1")
    captions, truth_ids = read_pictures_captions(captions_path)
    items = extract_regions.list_images(images)
    paths = dict(items)
    unknown = sorted(set(truth_ids or ()) - set(paths))
    if unknown:
        raise DataError(f"{captions_path}: image id {unknown[0]!r} is not a picture of --images ({len(unknown)} unknown ids)")
    if not os.path.isfile(detector):
        raise OptionError(f"--detector {detector}: detector weights not found (see README, Your own images)")
    device = check_device(device)
    model, tokenizer = load_lxmert(model_path, mode, tokenizer_path)
    regions = picture_regions(items, detector, detector_config, policy, device, batch_size)
    pictures = Pictures(regions, paths, model.config.visual_feat_dim, detector)
    input_ids, mask = caption_tokens(tokenizer, captions)
    pairs = torch.ones(len(pictures.ids), len(captions), dtype=torch.bool)
    with torch.inference_mode():
        scores = lxmert_scores(PairScorer(model, mode, device, amp=amp and device.type == "cuda"), pictures, input_ids, mask, pairs,
                               batch_size, f"LXMERT {mode}")
    print_rankings(scores, pictures.ids, captions, top)
    for path in save_scores:
        save_score_matrix(path, scores, pictures.ids, captions, mode, model_path)
        print(f"Scores of {len(pictures.ids)} pictures x {len(captions)} captions saved to {path}")
    recall = None if truth_ids is None else pictures_recall(scores, pictures.ids, truth_ids)
    return scores, pictures.ids, captions, recall


def pictures_recall(scores, image_ids, truth_ids):
    """evaluation.py's recall of the scores against `image_id<TAB>caption` ground truths: picture to
    captions over the pictures that have captions, caption to pictures over every caption whose
    picture could be used. Prints the table; returns its dict."""
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    kept = [j for j, image_id in enumerate(truth_ids) if image_id in row]
    if len(kept) < len(truth_ids):
        print(f"{len(truth_ids) - len(kept)} captions of pictures that could not be used are left out of the recall")
    if not kept:
        return None
    scores = scores[:, kept]
    caption_images = torch.tensor([row[truth_ids[j]] for j in kept])
    described = caption_images.unique()  # sorted picture rows that have captions
    as_described = torch.searchsorted(described, caption_images)
    r = recall_metrics(ranks_i2t(scores[described], "LXMERT's scores", caption_images=as_described)[0])
    ri = recall_metrics(ranks_t2i(scores, "LXMERT's scores", caption_images=caption_images)[0])
    print(f"Recall against the ground truths of the caption file ({len(described)} pictures, {len(kept)} captions):")
    _print_results(r, ri)
    return metrics_dict(r + ri)


# ---------------------------------------------------------------------------------------------
# Evaluation


def recall_of(i2t_scores, t2i_scores, name="the scores"):
    """evaluation.py's metrics: image-to-text ranks from one score matrix, text-to-image from another."""
    r = recall_metrics(ranks_i2t(i2t_scores, name)[0])
    ri = recall_metrics(ranks_t2i(t2i_scores, name)[0])
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
            check_finite(first_stage, "the first-stage scores")
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
    scorer = PairScorer(model, mode, device, amp=amp and device.type == "cuda")
    with torch.inference_mode():
        scores = lxmert_scores(scorer, data, input_ids, mask, pairs, batch_size, desc)

    if first_stage is None:
        metrics, r, ri = recall_of(scores, scores, "LXMERT's scores")
    else:
        _, vr, vri = recall_of(first_stage, first_stage, "VSRN's scores")
        print("VSRN (first stage):")
        _print_results(vr, vri)
        i2t_scores = rerank(first_stage, scores, i2t_candidates, alpha)
        t2i_scores = rerank(first_stage.T, scores.T, t2i_candidates.T, alpha).T
        metrics, r, ri = recall_of(i2t_scores, t2i_scores, "the reranked scores")
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
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local folder of LXMERT's weights (see README), or a hub name")
    parser.add_argument("--mode", default="matched", choices=MODES,
                        help="matched: the matching head's probability; cosine: cosine of the language and vision outputs, each averaged over its positions")
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per forward pass")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA (the matching head stays float32)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: --model)")
    parser.add_argument("--save_scores", nargs="+", default=None, metavar="PATH",
                        help=f"save LXMERT's (images, captions) score matrix: PATH.npy for a split; PATH.csv and/or PATH.json "
                             f"for --images (there default: {DEFAULT_SCORES})")
    split = parser.add_argument_group("a split of precomputed features (as evaluate_models.py)")
    split.add_argument("--data_path", default=None, help="folder holding NAME/ (as train.py)")
    split.add_argument("--data_name", default=None, help="e.g. f30k_precomp; the split needs boxes and image sizes")
    split.add_argument("--split", default="test", help="dev, test or testall (COCO 5K)")
    split.add_argument("--vsrn", nargs="+", default=None, metavar="CHECKPOINT", help="two-stage: rerank these VSRN checkpoints' top-k (several: an ensemble)")
    split.add_argument("--topk", type=int, default=20, help="candidates per query that LXMERT rescores (with --vsrn)")
    split.add_argument("--alpha", type=float, default=1.0, help="candidates rank by alpha*LXMERT + (1-alpha)*VSRN (with --vsrn)")
    split.add_argument("--vocab_path", default=None, help="overrides the VSRN checkpoint's vocab_path")
    own = parser.add_argument_group("your own pictures, in one step")
    own.add_argument("--images", nargs="+", default=None, metavar="DIR_OR_FILES", help="a folder of pictures, or picture files")
    own.add_argument("--captions", default=None, metavar="FILE", help="one caption per line, or image_id<TAB>caption lines (adds recall)")
    own.add_argument("--detector", default=None, metavar="WEIGHTS", help="the bottom-up-attention detector's pytorch_model.bin (see README)")
    own.add_argument("--detector_config", default=None, metavar="YAML", help="the detector's config.yaml (default: its published values)")
    own.add_argument("--policy", default="caffe", choices=("caffe", "hf"), help="region selection (caffe: as LXMERT's features were made)")
    own.add_argument("--top", type=int, default=5, help="pictures printed per caption and captions per picture (0: all)")
    args = parser.parse_args(argv)
    try:
        if args.images is not None:
            check_pictures_arguments(args, parser)
            match_pictures(args.images, args.captions, args.detector, args.model, args.mode, args.detector_config, args.policy,
                           args.batch_size, args.device, args.amp, args.tokenizer, args.save_scores or [DEFAULT_SCORES], args.top)
        else:
            if args.data_path is None or args.data_name is None:
                raise OptionError("--data_path and --data_name name the split to evaluate; or match your own pictures with "
                                  "--images DIR --captions FILE --detector WEIGHTS")
            save_scores = args.save_scores or [None]
            if len(save_scores) > 1 or (save_scores[0] and not save_scores[0].endswith(".npy")):
                raise OptionError(f"--save_scores {' '.join(save_scores)}: a split's scores are saved as one PATH.npy")
            evaluate(args.model, args.data_path, args.data_name, args.split, args.mode, args.vsrn, args.topk, args.alpha,
                     args.batch_size, args.device, args.amp, args.tokenizer, args.vocab_path, save_scores[0])
    except (VSRNError, OSError) as e:
        return report(e)
    return 0


def check_pictures_arguments(args, parser):
    """--images needs --captions and --detector, and takes none of a split's flags."""
    for flag in ("captions", "detector"):
        if getattr(args, flag) is None:
            raise OptionError(f"--images: needs --{flag} (see README, LXMERT matching)")
    for flag in ("data_path", "data_name", "vsrn", "vocab_path"):
        if getattr(args, flag) is not None:
            raise OptionError(f"--{flag}: belongs to a split's evaluation, not to --images")
    for flag in ("split", "topk", "alpha"):
        if getattr(args, flag) != parser.get_default(flag):
            raise OptionError(f"--{flag}: belongs to a split's evaluation, not to --images")


if __name__ == "__main__":
    sys.exit(main())
