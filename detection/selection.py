"""Which regions a policy keeps: generate_tsv.py's per-class NMS and confidence rule (caffe), the
LXMERT demo's NMS thresholds in turn (hf)."""

import numpy as np
import torch
from torchvision.ops import nms

from detection.caffe_ops import caffe_rank, suppressions

CAFFE_CLASS_NMS = 0.3
_WORD_BITS = 64


def _bit_rows(matrix):
    """A (N, M) bool matrix as (N, ceil(M / 64)) uint64 words, column m at bit m % 64 of word m // 64."""
    packed = np.packbits(matrix, axis=1, bitorder="little")
    padding = -packed.shape[1] % (_WORD_BITS // 8)
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, padding)))).view(np.uint64)


def per_class_max_conf(boxes, class_scores, thresh=CAFFE_CLASS_NMS):
    """generate_tsv.py's `max_conf`: each region's best class score among the classes for which it
    survives that class's cpu_nms over all regions' boxes (detection.caffe_ops), else 0.
    boxes (R, 4) float32 in the picture's pixels, class_scores (R, C) float32 -> (R,) float64.

    The boxes are the same for every class, so their suppressions are computed once, and the
    greedy passes of all classes advance together, one rank at a time, each class's kept regions
    a bitset."""
    class_scores = np.asarray(class_scores, dtype=np.float32)
    regions, classes = class_scores.shape
    if regions == 0:
        return np.zeros(0)
    suppressing = _bit_rows(suppressions(boxes, thresh))
    order = caffe_rank(class_scores)  # (R, C): each class's regions, best first
    kept = np.zeros((classes, regions), dtype=bool)
    kept_bits = np.zeros((classes, suppressing.shape[1]), dtype=np.uint64)
    every_class = np.arange(classes)
    for region in order:
        survives = ~(suppressing[region] & kept_bits).any(axis=1)
        kept[every_class, region] = survives
        bit = np.left_shift(np.uint64(1), (region % _WORD_BITS).astype(np.uint64))
        kept_bits[every_class, region // _WORD_BITS] |= np.where(survives, bit, np.uint64(0))
    return np.where(kept.T, class_scores, np.float32(0)).max(axis=1).astype(np.float64)


def select_caffe(max_conf, min_boxes=10, max_boxes=100, conf_thresh=0.2):
    """generate_tsv.py's choice: the regions with max_conf >= conf_thresh, in region order, unless
    fewer than min_boxes or more than max_boxes: then the best min_boxes / max_boxes by max_conf,
    ranked as its `np.argsort(max_conf)[::-1]`. A fixed count N is min_boxes = max_boxes = N.
    max_conf (R,) -> int64 indices."""
    max_conf = np.asarray(max_conf, dtype=np.float64)
    keep = np.flatnonzero(max_conf >= conf_thresh)
    if min_boxes <= len(keep) <= max_boxes:
        return keep
    return caffe_rank(max_conf)[: (min_boxes if len(keep) < min_boxes else max_boxes)].astype(np.int64)


def select_hf(boxes, scores, min_boxes, max_boxes, thresholds):
    """The demo's choice: NMS at each threshold in turn until at least min_boxes survive, keeping
    at most max_boxes, best first. Where the demo crashes (fewer survive even the last threshold),
    the last NMS's survivors are followed by the best suppressed regions up to min_boxes."""
    keep = boxes.new_zeros(0, dtype=torch.long)
    for thresh in thresholds:
        keep = nms(boxes, scores, float(thresh))[:max_boxes]
        if len(keep) >= min_boxes:
            return keep
    suppressed = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    suppressed[keep] = False
    rest = torch.nonzero(suppressed).flatten()
    rest = rest[torch.sort(scores[rest], descending=True, stable=True).indices]
    return torch.cat([keep, rest])[:min_boxes]
