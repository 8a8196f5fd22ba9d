"""Anchors and boxes, in detectron2's arithmetic and in py-faster-rcnn's (Caffe's +1 widths)."""

import math

import numpy as np
import torch

from detection.network import FEATURE_STRIDE

CAFFE_ANCHOR_BASE = 16
# detectron2's clamp on the log-size deltas (py-faster-rcnn has none).
SCALE_CLAMP = math.log(1000.0 / 16)


def hf_cell_anchors(sizes, ratios):
    """detectron2's anchors: centred at 0, unrounded; size-major, as the checkpoint's channels."""
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def caffe_cell_anchors(sizes, ratios, base=CAFFE_ANCHOR_BASE):
    """py-faster-rcnn's `generate_anchors` (widths rounded on the base box, centred at 7.5), in
    the checkpoint's channel order (size-major: detectron2's order, into which the conversion
    put the Caffe model's ratio-major anchors)."""
    centre = (base - 1) / 2.0
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = np.round(np.sqrt(base * base / ratio))
            h = np.round(w * ratio)
            w, h = w * size / base, h * size / base
            anchors.append(
                [centre - 0.5 * (w - 1), centre - 0.5 * (h - 1), centre + 0.5 * (w - 1), centre + 0.5 * (h - 1)]
            )
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell_anchors, height, width, stride=FEATURE_STRIDE):
    """The cell anchors at every res4 position: (H*W*A, 4), location-major like the RPN's outputs."""
    device = cell_anchors.device
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0), caffe=False):
    """Apply (dx, dy, dw, dh) deltas to boxes. caffe: py-faster-rcnn's `bbox_transform_inv`
    (widths x2 - x1 + 1, no clamp); else detectron2's (widths x2 - x1, log-sizes clamped)."""
    one = 1.0 if caffe else 0.0
    widths = boxes[:, 2] - boxes[:, 0] + one
    heights = boxes[:, 3] - boxes[:, 1] + one
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy, dw, dh = deltas[:, 0] / wx, deltas[:, 1] / wy, deltas[:, 2] / ww, deltas[:, 3] / wh
    if not caffe:
        dw, dh = dw.clamp(max=SCALE_CLAMP), dh.clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        dim=1,
    )


def clip_boxes(boxes, height, width, caffe=False):
    """Into the image: [0, w] x [0, h] (detectron2), or [0, w - 1] x [0, h - 1] (py-faster-rcnn)."""
    one = 1 if caffe else 0
    x = boxes[:, 0::2].clamp(min=0, max=width - one)
    y = boxes[:, 1::2].clamp(min=0, max=height - one)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def plus_one(boxes):
    """Boxes whose torchvision IoU is py-faster-rcnn's (areas (x2 - x1 + 1) (y2 - y1 + 1))."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
