"""The decisions of bottom-up-attention's Caffe pipeline taken as it took them, in numpy on the CPU.

generate_tsv.py ran py-faster-rcnn's proposal layer, `bbox_transform_inv` and `cpu_nms` (its
config sets USE_GPU_NMS: False, so the RPN's NMS at 0.7 and generate_tsv.py's per-class NMS at 0.3
both ran on the CPU) under numpy 1.x. Where these compare nearly equal numbers the outcome hangs
on the exact arithmetic and on the order of ties, so it is redone here as they did it:

- ranking is `argsort()[::-1]`, equal values in the order numpy 1.x's quicksort left them;
- an overlap is cpu_nms's: IoU in float32 with widths (x2 - x1) + 1, and a box is suppressed
  when that float32 IoU, widened to double, is >= the threshold;
- the RPN's foreground probability is Caffe's float32 softmax over (background, foreground);
- boxes are decoded in float32, exponentials rounded from double.
"""

import numpy as np

from detection.network import FEATURE_STRIDE

CAFFE_ANCHOR_BASE = 16


def exp_float32(values):
    """float32 exponentials rounded from double: the correctly rounded value (bar vanishingly rare
    cases) on every machine, where numpy's own float32 exp varies with its SIMD code path."""
    return np.exp(np.asarray(values, dtype=np.float64)).astype(np.float32)


def caffe_argsort(values):
    """Indices sorting `values` ascending along axis 0, equal values in the order numpy 1.x's
    `argsort()` (its quicksort) left them.

    numpy >= 2 sorts 32- and 64-bit numbers with SIMD sorting networks whose order of equal
    values depends on the CPU; extended-precision numbers still take numpy's own quicksort
    (numpy 1.x's partitions, with the heapsort numpy 1.17 added for degenerate partitions), and
    float32 and float64 values widen to them exactly."""
    return np.asarray(values, dtype=np.longdouble).argsort(axis=0, kind="quicksort")


def caffe_rank(values):
    """Best first along axis 0, as the original's `values.argsort()[::-1]` ranked them."""
    return caffe_argsort(values)[::-1]


def foreground_probability(logits):
    """Caffe's float32 softmax over (background, foreground) of each anchor, from the converted
    objectness logit, foreground minus background (an assumption: detection.network). Caffe
    subtracts the larger score first, so the smaller one's exponential is exp(-|logit|)."""
    logits = np.asarray(logits, dtype=np.float32)
    smaller = exp_float32(-np.abs(logits))
    return np.where(logits > 0, np.float32(1), smaller) / (smaller + np.float32(1))


def cell_anchors(sizes, ratios, base=CAFFE_ANCHOR_BASE):
    """py-faster-rcnn's `generate_anchors` in its order (ratio-major): widths rounded on the base
    box, scaled to each size, centred at (base - 1) / 2; float32 holds them exactly."""
    centre = (base - 1) / 2.0
    anchors = []
    for ratio in ratios:
        w = np.round(np.sqrt(base * base / ratio))
        h = np.round(w * ratio)
        for size in sizes:
            half_w, half_h = 0.5 * (w * size / base - 1), 0.5 * (h * size / base - 1)
            anchors.append([centre - half_w, centre - half_h, centre + half_w, centre + half_h])
    return np.array(anchors, dtype=np.float32)


def grid_anchors(cell, height, width, stride=FEATURE_STRIDE):
    """The cell anchors at every res4 position: (H*W*A, 4), location-major as the proposal layer lays them out."""
    shift_x, shift_y = np.meshgrid(np.arange(width) * stride, np.arange(height) * stride)
    shifts = np.stack([shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()], axis=1)
    return (shifts[:, None, :] + cell[None]).reshape(-1, 4).astype(np.float32)


def decode(anchors, deltas):
    """py-faster-rcnn's `bbox_transform_inv` in float32: widths x2 - x1 + 1, no clamp."""
    widths = anchors[:, 2] - anchors[:, 0] + np.float32(1)
    heights = anchors[:, 3] - anchors[:, 1] + np.float32(1)
    ctr_x = anchors[:, 0] + np.float32(0.5) * widths
    ctr_y = anchors[:, 1] + np.float32(0.5) * heights
    pred_ctr_x = deltas[:, 0] * widths + ctr_x
    pred_ctr_y = deltas[:, 1] * heights + ctr_y
    half_w = np.float32(0.5) * (exp_float32(deltas[:, 2]) * widths)
    half_h = np.float32(0.5) * (exp_float32(deltas[:, 3]) * heights)
    return np.stack([pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h], axis=1)


def clip(boxes, height, width):
    """py-faster-rcnn's `clip_boxes`: into [0, w - 1] x [0, h - 1]."""
    limits = np.array([width - 1, height - 1, width - 1, height - 1], dtype=np.float32)
    return np.maximum(np.minimum(boxes, limits), np.float32(0))


def _areas(boxes):
    return (boxes[:, 2] - boxes[:, 0] + np.float32(1)) * (boxes[:, 3] - boxes[:, 1] + np.float32(1))


def _iou(box, area, boxes, areas):
    """cpu_nms's float32 IoU of one box (broadcast against `boxes`), operation by operation."""
    w = np.maximum(np.float32(0), np.minimum(box[..., 2], boxes[..., 2]) - np.maximum(box[..., 0], boxes[..., 0]) + 1)
    h = np.maximum(np.float32(0), np.minimum(box[..., 3], boxes[..., 3]) - np.maximum(box[..., 1], boxes[..., 1]) + 1)
    inter = w * h
    return inter / (area + areas - inter)


def nms(boxes, scores, thresh, limit=None):
    """py-faster-rcnn's `cpu_nms` on float32 boxes (N, 4) and scores (N,): the kept indices, in
    their order; with `limit`, only the first `limit` of them (the greedy pass stops there)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    areas = _areas(boxes)
    candidates = caffe_rank(np.asarray(scores, dtype=np.float32))
    keep = []
    while len(candidates) and (limit is None or len(keep) < limit):
        best, rest = candidates[0], candidates[1:]
        keep.append(best)
        overlap = _iou(boxes[best], areas[best], boxes[rest], areas[rest])
        candidates = rest[overlap.astype(np.float64) < thresh]
    return np.array(keep, dtype=np.int64)


def suppressions(boxes, thresh):
    """(N, N) bool: whether cpu_nms, keeping either box of a pair, would suppress the other (the
    float32 IoU is symmetric)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    areas = _areas(boxes)
    overlap = _iou(boxes[:, None, :], areas[:, None], boxes[None, :, :], areas[None, :])
    return overlap.astype(np.float64) >= thresh
