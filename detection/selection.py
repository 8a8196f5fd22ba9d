"""Which regions a policy keeps: generate_tsv.py's per-class NMS and confidence rule (caffe), the
LXMERT demo's NMS thresholds in turn (hf)."""

import torch
from torchvision.ops import box_iou, nms

from detection.boxes import plus_one

CAFFE_CLASS_NMS = 0.3


def per_class_max_conf(boxes, class_scores, thresh=CAFFE_CLASS_NMS):
    """generate_tsv.py's `max_conf`: each region's best class score among the classes for which it
    survives NMS (py-faster-rcnn IoU, suppressed when > thresh) over all regions' boxes.
    boxes (R, 4), class_scores (R, C)."""
    return per_class_max_conf_batch([boxes], [class_scores], thresh)[0]


def per_class_max_conf_batch(boxes, class_scores, thresh=CAFFE_CLASS_NMS):
    """`per_class_max_conf` of several images (lists of (R_i, 4) and (R_i, C)) at once.

    The boxes are the same for every class, so their overlaps are computed once, and the greedy
    NMS runs for all classes and images together, one rank at a time. Images with fewer regions
    are padded with regions scored -1: ranked last, they suppress nothing.
    """
    counts = [len(b) for b in boxes]
    regions = max(counts, default=0)
    if regions == 0:
        return [s.new_zeros(0) for s in class_scores]
    classes, device = class_scores[0].shape[1], class_scores[0].device
    padded_boxes = torch.zeros(len(boxes), regions, 4, device=device)
    scores = torch.full((len(boxes), regions, classes), -1.0, device=device)
    for i, (b, s) in enumerate(zip(boxes, class_scores)):
        padded_boxes[i, : len(b)], scores[i, : len(s)] = b, s
    overlaps = torch.stack([box_iou(plus_one(b), plus_one(b)) for b in padded_boxes]) > thresh
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, R, C)
    kept = torch.zeros(len(boxes), classes, regions, dtype=torch.bool, device=device)
    images = torch.arange(len(boxes), device=device)[:, None]
    for rank in range(regions):
        region = order[:, rank]  # (B, C): each class's region at this rank
        suppressed = (overlaps[images, region] & kept).any(dim=2)
        kept.scatter_(2, region.unsqueeze(2), ~suppressed.unsqueeze(2))
    max_conf = (scores.clamp(min=0) * kept.transpose(1, 2)).max(dim=2).values
    return [conf[:count] for conf, count in zip(max_conf, counts)]


def select_caffe(max_conf, min_boxes=10, max_boxes=100, conf_thresh=0.2):
    """generate_tsv.py's choice: the regions with max_conf >= conf_thresh, in region order, unless
    fewer than min_boxes or more than max_boxes: then the best min_boxes / max_boxes by max_conf,
    best first (ties: the earlier region first). A fixed count N is min_boxes = max_boxes = N."""
    keep = torch.nonzero(max_conf >= conf_thresh).flatten()
    if min_boxes <= len(keep) <= max_boxes:
        return keep
    best = torch.sort(max_conf, descending=True, stable=True).indices
    return best[: (min_boxes if len(keep) < min_boxes else max_boxes)]


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
