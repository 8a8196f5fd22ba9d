"""LXMERT's scores of (image, caption) pairs, with each caption and image encoded once and only the
cross-modality layers run per pair; the inputs as LXMERT was pretrained on them."""

import time

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import DataError, ScoreError
from utils.text import format_duration

MAX_TOKENS = 20  # LXMERT's pretraining max_seq_length, [CLS] and [SEP] included
# Pairs are drawn in blocks of this many batches, sorted by caption length inside a block so that
# a batch pads its captions to similar lengths.
BATCHES_PER_BLOCK = 64
TIMED_BATCHES = 2  # batches after the first (warm-up) one that the expected-time estimate measures
# LXMERT's loader asserts normalised boxes within [0, 1] up to this much (np.testing.assert_array_less).
BOX_TOLERANCE = 1e-5


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
        raise DataError(
            f"{name(i)}: image size {sizes[i, 0]:g} x {sizes[i, 1]:g} (height x width); sizes must be positive"
        )
    height, width = sizes[:, 0, None].astype(np.float32), sizes[:, 1, None].astype(np.float32)
    normalised = np.stack(
        [boxes[..., 0] / width, boxes[..., 1] / height, boxes[..., 2] / width, boxes[..., 3] / height], axis=-1
    )
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
    encoded = tokenizer(
        list(captions), max_length=max_tokens, truncation=True, padding="max_length", return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


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

    language = torch.cat(
        [
            scorer.encode_captions(input_ids[c], mask[c])
            for c in tqdm(captions.split(batch_size), desc="captions", unit="batch", leave=False, disable=None)
        ]
    )
    vision = torch.cat(
        [
            scorer.encode_images(*split.images(i.numpy()))
            for i in tqdm(images.split(batch_size), desc="images", unit="batch", leave=False, disable=None)
        ]
    )
    caption_mask = mask[captions].to(scorer.device)
    lengths = mask.sum(1)

    print(f"{desc}: {total:,} pairs ({len(images)} images, {len(captions)} captions)")
    progress = tqdm(
        total=total, desc=desc, unit="pair", unit_scale=True, dynamic_ncols=True, mininterval=1.0, disable=None
    )
    timer = _ExpectedTime(total, progress)
    done = 0
    for image_ids, caption_ids in pair_blocks(scored, BATCHES_PER_BLOCK * batch_size):
        order = torch.argsort(lengths[caption_ids], stable=True)
        image_ids, caption_ids = image_ids[order], caption_ids[order]
        for start in range(0, len(order), batch_size):
            batch_images, batch_captions = (
                image_ids[start : start + batch_size],
                caption_ids[start : start + batch_size],
            )
            tokens = int(lengths[batch_captions].max())
            slots = caption_slot[batch_captions].to(scorer.device)
            batch_scores = scorer.score(
                language[slots, :tokens],
                caption_mask[slots, :tokens],
                vision[image_slot[batch_images].to(scorer.device)],
            ).cpu()
            done += len(batch_images)
            bad = ~torch.isfinite(batch_scores)
            if bad.any():
                k = int(bad.nonzero()[0, 0])
                raise ScoreError(
                    f"LXMERT's scores: {int(bad.sum())} of the last {len(bad)} pairs scored (of {done:,} so far) "
                    f"are NaN or infinite, the first at image {int(batch_images[k])}, caption {int(batch_captions[k])} "
                    "(diverged weights?); they cannot be ranked"
                )
            scores[batch_images, batch_captions] = batch_scores
            progress.update(len(batch_images))
            timer.batch_done(len(batch_images))
    progress.close()
    scores[:, duplicates] = scores[:, first[duplicates]]
    return scores.masked_fill_(~pairs, float("nan"))


def first_duplicates(input_ids):
    """For each caption (row of token ids), the first caption with the same ids: itself when it has no
    earlier duplicate."""
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
        images, captions = pairs[first_row : last_row + 1].nonzero().unbind(1)
        skip = start - (int(ends[first_row - 1]) if first_row else 0)
        yield images[skip : skip + stop - start] + first_row, captions[skip : skip + stop - start]


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
            self.progress.write(
                f"expected time for {self.total:,} pairs: {format_duration(self.total / rate)} ({rate:,.1f} pairs/s)"
            )
