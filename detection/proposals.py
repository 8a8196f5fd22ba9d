"""Region proposals from the RPN's outputs: the LXMERT demo's (hf) and py-faster-rcnn's ProposalLayer (caffe)."""

import numpy as np
import torch
from torchvision.ops import nms

from detection import caffe_ops
from detection.boxes import clip_boxes, decode_boxes

# py-faster-rcnn's test settings in bottom-up-attention's generate_tsv.py.
CAFFE_PRE_NMS, CAFFE_POST_NMS, CAFFE_RPN_NMS, CAFFE_RPN_MIN_SIZE = 6000, 300, 0.7, 16


def hf_proposals(logits, deltas, anchors, height, width, config, post_nms):
    """The demo's RPN: top-k logits, detectron2 decoding, clip, drop empty boxes, NMS, keep post_nms."""
    rpn = config["rpn"]
    order = logits.argsort(descending=True)[: int(rpn["pre_nms_topk_test"])]
    boxes = decode_boxes(deltas[order], anchors[order], rpn["bbox_reg_weights"])
    boxes = clip_boxes(boxes, height, width)
    scores = logits[order]
    min_side = float(config["proposal_generator"]["min_size"])
    nonempty = ((boxes[:, 2] - boxes[:, 0]) > min_side) & ((boxes[:, 3] - boxes[:, 1]) > min_side)
    boxes, scores = boxes[nonempty], scores[nonempty]
    keep = nms(boxes, scores, float(rpn["nms_thresh"]))[:post_nms]
    return boxes[keep], scores[keep]


def checkpoint_anchor_order(sizes, ratios):
    """For each of Caffe's anchors (ratio-major, as generate_anchors makes them), its channel in
    the checkpoint's RPN outputs, assumed size-major (detection.network)."""
    return np.arange(len(sizes) * len(ratios)).reshape(len(sizes), len(ratios)).T.reshape(-1)


def caffe_proposals(logits, deltas, cell_anchors, anchor_order, feature_hw, input_hw, scale, post_nms):
    """py-faster-rcnn's ProposalLayer (TEST) with generate_tsv.py's settings, as it computed them
    (detection.caffe_ops): decode, clip, drop boxes under 16 x scale, rank by foreground
    probability, the best 6000 through cpu_nms at 0.7, keep post_nms in cpu_nms's order.

    logits (H*W*A,) and deltas (H*W*A, 4): the RPN head's outputs at the res4 positions
    (feature_hw), channels in the checkpoint's order; `anchor_order` takes them to Caffe's, that
    of `cell_anchors`, so that ties rank as Caffe's layout ranked them. input_hw: the network
    input's size; scale: py-faster-rcnn's im_scale. -> boxes (P, 4) float32 on the logits'
    device, in network-input pixels, and their foreground probabilities."""
    device, count = logits.device, len(anchor_order)
    logits = logits.detach().float().cpu().numpy().reshape(-1, count)[:, anchor_order].reshape(-1)
    deltas = deltas.detach().float().cpu().numpy().reshape(-1, count, 4)[:, anchor_order].reshape(-1, 4)
    anchors = caffe_ops.grid_anchors(cell_anchors, *feature_hw)
    boxes = caffe_ops.clip(caffe_ops.decode(anchors, deltas), *input_hw)
    scores = caffe_ops.foreground_probability(logits)
    # Caffe's im_info holds the scale as float32; 16 times it is exact in float32 either way.
    min_side = np.float32(CAFFE_RPN_MIN_SIZE * np.float32(scale))
    widths, heights = boxes[:, 2] - boxes[:, 0] + np.float32(1), boxes[:, 3] - boxes[:, 1] + np.float32(1)
    big = np.flatnonzero((widths >= min_side) & (heights >= min_side))
    best = big[caffe_ops.caffe_rank(scores[big])[:CAFFE_PRE_NMS]]
    keep = best[caffe_ops.nms(boxes[best], scores[best], CAFFE_RPN_NMS, limit=post_nms)]
    return torch.from_numpy(boxes[keep]).to(device), torch.from_numpy(scores[keep])
