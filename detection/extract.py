"""Regions of pictures: the network run around a policy (detection.policies).

from detection.weights import load_detector
from detection.extract import extract_regions, extract_regions_batch
from detection.settings import RegionSettings
det = load_detector("frcnn/pytorch_model.bin", config="frcnn/config.yaml", device="cuda")
r = extract_regions(det, "photo.jpg")                   # or an RGB uint8 array (H, W, 3); caffe, 36 regions
rs = extract_regions_batch(det, [img1, img2], RegionSettings(policy="hf"))  # same results as one at a time

Many pictures (folders, torchrun shares) go through detection.pipeline.detect_pictures, which calls these.
"""

import os
from contextlib import nullcontext

import numpy as np
import torch
from torchvision.ops import roi_pool

from detection.network import FEATURE_STRIDE
from detection.policies import make_policy
from detection.settings import RegionSettings


def as_rgb_array(image, read_picture):
    """An RGB uint8 (H, W, 3) array of a picture given as a path (read with `read_picture`, a
    policy's) or an array."""
    if isinstance(image, (str, os.PathLike)):
        return read_picture(image)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an RGB uint8 image array (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _timed(timer, name):
    return timer(name) if timer is not None else nullcontext()


def _backbone_groups(inputs):
    """Indices of the images grouped by network-input shape: equal shapes share one backbone pass
    (no padding, so every image's res4 is the one it has alone)."""
    groups = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def _score(detector, images, policy, timer=None):
    """Every proposal of every image: its box in network-input pixels, feature, object and
    attribute logits, with the image's input and scale factors."""
    device = detector.device
    with _timed(timer, "preprocess"):
        prepared = [policy.prepare(image) for image in images]
        inputs = [x.to(device) for x, _, _ in prepared]
    res4 = [None] * len(images)
    with _timed(timer, "backbone"):
        for group in _backbone_groups(inputs):
            out = detector.backbone(torch.stack([inputs[i] for i in group]))
            for i, features in zip(group, out):
                res4[i] = features.unsqueeze(0)
    rpn_head = detector.proposal_generator.rpn_head
    proposals = []
    with _timed(timer, "rpn"):
        for x, features, (_, _, scale) in zip(inputs, res4, prepared):
            logits, deltas = rpn_head(features)
            proposals.append(policy.propose(logits[0], deltas[0], features.shape[2:], x.shape[1:], scale))
    with _timed(timer, "roi_pool"):
        pooled = torch.cat(
            [
                roi_pool(features, [boxes], detector.pooler_resolution, 1.0 / FEATURE_STRIDE)
                for features, boxes in zip(res4, proposals)
            ]
        )
    with _timed(timer, "res5"):
        features = detector.res5_mean(pooled)
    with _timed(timer, "heads"):
        obj_logits, attr_logits = detector.roi_heads.box_predictor(features)
    counts = [len(boxes) for boxes in proposals]
    return [
        {
            "proposals": boxes,
            "features": f,
            "obj_logits": o,
            "attr_logits": a,
            "input": x,
            "scale_yx": scale_yx,
            "scale": scale,
        }
        for boxes, f, o, a, (x, scale_yx, scale) in zip(
            proposals, *(t.split(counts) for t in (features, obj_logits, attr_logits)), prepared
        )
    ]


def score_regions(detector, images, settings=RegionSettings()):
    """Every proposal before selection, per image (list of RGB uint8 arrays or paths): a dict
    with `proposals` (P, 4) in network-input pixels, `features` (P, D), `obj_logits` (P, C + 1,
    background last), `attr_logits` (P, A + 1, "no attribute" last), `input` (3, h, w) and
    `scale_yx` (image pixels per network-input pixel; caffe: also `scale`, py-faster-rcnn's
    im_scale, network-input pixels per image pixel). Paths are read as the policy reads pictures;
    of the settings, the policy, sizes and proposals count."""
    chosen = make_policy(detector, settings)
    arrays = [as_rgb_array(image, chosen.read_picture) for image in images]
    with torch.inference_mode():
        return _score(detector, arrays, chosen) if arrays else []


def extract_regions_batch(detector, images, settings=RegionSettings(), timer=None):
    """`extract_regions` for a list of images (paths or RGB uint8 arrays), run together: images of
    equal network-input size share the backbone, all regions share res5. Same results as one at a
    time. `timer(stage)`, if given, returns a context manager wrapped around each stage."""
    chosen = make_policy(detector, settings)
    arrays = [as_rgb_array(image, chosen.read_picture) for image in images]
    if not arrays:
        return []
    with torch.inference_mode():
        scored = _score(detector, arrays, chosen, timer)
        with _timed(timer, "selection"):
            # Caffe's class c (1..1600) is column c - 1 here: its background, column 0, is assumed
            # our last (detection.network).
            probs = [s["obj_logits"].float().softmax(dim=1)[:, :-1] for s in scored]
            return chosen.select(scored, probs, arrays, detector.roi_heads.box_predictor)


def extract_regions(detector, image, settings=RegionSettings()):
    """The regions of one image (a path, read as the policy reads pictures, or an RGB uint8 array),
    chosen as `settings` (a detection.settings.RegionSettings; by default the caffe policy's 36) say.

    Returns a dict: boxes (N, 4) float32 x1 y1 x2 y2 in the image's pixels, features (N, D)
    float32, objects_id / attrs_id (N,) int64 (no background / "no attribute"), objects_conf /
    attrs_conf (N,) float32, img_h, img_w. Regions come in the order the policy keeps them.
    """
    return extract_regions_batch(detector, [image], settings)[0]
