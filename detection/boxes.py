"""Anchors and boxes in detectron2's arithmetic (the hf policy's; the caffe policy's are in detection.caffe_ops)."""

import math

import torch

from detection.network import FEATURE_STRIDE

# detectron2's clamp on the log-size deltas.
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


def grid_anchors(cell_anchors, height, width, stride=FEATURE_STRIDE):
    """The cell anchors at every res4 position: (H*W*A, 4), location-major like the RPN's outputs."""
    device = cell_anchors.device
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0)):
    """detectron2's decoding of (dx, dy, dw, dh) deltas: widths x2 - x1, log-sizes clamped."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw, dh = (deltas[:, 2] / ww).clamp(max=SCALE_CLAMP), (deltas[:, 3] / wh).clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        dim=1,
    )


def clip_boxes(boxes, height, width):
    """Into the image: [0, w] x [0, h] (detectron2's)."""
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
