"""Region proposals from the RPN's outputs: the LXMERT demo's (hf) and py-faster-rcnn's ProposalLayer (caffe)."""

from torchvision.ops import nms

from detection.boxes import clip_boxes, decode_boxes, plus_one

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


def caffe_proposals(logits, deltas, anchors, height, width, scale, post_nms):
    """py-faster-rcnn's ProposalLayer (TEST): decode, clip, drop boxes under 16 x scale, top 6000,
    NMS 0.7, keep post_nms.

    The checkpoint's objectness is one logit per anchor: Caffe's foreground minus background
    score, so sigmoid(logit) is Caffe's foreground probability and ranks the anchors the same.
    """
    boxes = clip_boxes(decode_boxes(deltas, anchors, caffe=True), height, width, caffe=True)
    min_side = CAFFE_RPN_MIN_SIZE * scale
    big = ((boxes[:, 2] - boxes[:, 0] + 1) >= min_side) & ((boxes[:, 3] - boxes[:, 1] + 1) >= min_side)
    boxes, logits = boxes[big], logits[big]
    order = logits.argsort(descending=True)[:CAFFE_PRE_NMS]
    boxes, logits = boxes[order], logits[order]
    keep = nms(plus_one(boxes), logits, CAFFE_RPN_NMS)[:post_nms]
    return boxes[keep], logits[keep]
