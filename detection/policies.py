"""The two ways of running the detector, as two objects behind one interface (`Policy`).

- `CaffePolicy` ('caffe'): the `generate_tsv.py` procedure of bottom-up-attention on py-faster-rcnn,
  with which SCAN's and LXMERT's features were made;
- `HFPolicy` ('hf'): the LXMERT demo's pipeline (its `modeling_frcnn.py` with the published
  `config.yaml`), its bugs fixed.

A policy reads a picture file, prepares the network input of a picture, turns the RPN's outputs
into proposals and chooses the regions among the scored proposals; detection.extract runs the
network around it.
"""

import numpy as np
import torch

from detection import caffe_ops
from detection.boxes import clip_boxes, decode_boxes, grid_anchors, hf_cell_anchors
from detection.preprocess import (
    CAFFE_MAX_SIZE,
    CAFFE_SCALE,
    MIN_INPUT_SIDE,
    caffe_input,
    caffe_scale,
    hf_input,
    hf_resize_shape,
)
from detection.proposals import CAFFE_POST_NMS, caffe_proposals, checkpoint_anchor_order, hf_proposals
from detection.selection import per_class_max_conf, select_caffe, select_hf
from detection.settings import POLICY_NAMES
from utils.errors import DataError
from utils.images import read_image


class Policy:
    """One policy run with one RegionSettings: input sizes, proposals kept, (fewest, most) regions per picture.

    Subclasses give the defaults (`default_sizes`, `default_boxes`), the anchors (`make_anchors`)
    and the four steps: `read_picture`, `network_input`, `propose`, `select`. Settings left None
    take the policy's defaults.
    """

    name = None

    def __init__(self, detector, settings):
        self.config = detector.config
        sizes = self.default_sizes()
        self.min_size, self.max_size = int(settings.min_size or sizes[0]), int(settings.max_size or sizes[1])
        self.post_nms = int(settings.proposals or sizes[2])
        self.boxes = settings.box_range(self.default_boxes())
        self.conf_thresh = settings.conf_thresh
        self.anchor_sizes = self.config["anchor_generator"]["sizes"][0]
        self.anchor_ratios = self.config["anchor_generator"]["aspect_ratios"][0]
        self.make_anchors(detector.device)

    def default_boxes(self):
        """The policy's own (fewest, most) regions for a variable count; None where the settings say it."""
        return None

    def prepare(self, image):
        """-> network input (3, h, w), the factors (y, x) from its pixels to the image's, and
        py-faster-rcnn's im_scale (caffe; None for hf). A picture too elongated for the network is a DataError."""
        height, width = image.shape[:2]
        new_h, new_w = self.input_shape(height, width)
        if min(new_h, new_w) < MIN_INPUT_SIDE:
            raise DataError(
                f"a {height}x{width} picture is too elongated for the detector: resized to {new_h}x{new_w} "
                f"(longest side {self.max_size}), it is under {MIN_INPUT_SIDE} pixels across"
            )
        return self.network_input(image)

    def propose(self, logits, deltas, feature_hw, input_hw, scale):
        """The proposals (P, 4), in network-input pixels, of the RPN head's outputs for one picture:
        logits (H*W*A,) and deltas (H*W*A, 4) at the res4 positions (feature_hw)."""
        raise NotImplementedError

    def select(self, scored, probs, images, predictor):
        """The regions kept of each picture (detection.extract's scored proposals, their object
        probabilities without background, the RGB arrays), as regions dicts."""
        raise NotImplementedError


def regions_dict(boxes, features, objects_conf, objects_id, attrs_conf, attrs_id, image):
    """The regions of a picture as numpy arrays, in the layout of an obj36 row (utils.obj36)."""
    return {
        "boxes": boxes.float().cpu().numpy(),
        "features": features.float().cpu().numpy(),
        "objects_id": objects_id.cpu().numpy().astype(np.int64),
        "objects_conf": objects_conf.float().cpu().numpy(),
        "attrs_id": attrs_id.cpu().numpy().astype(np.int64),
        "attrs_conf": attrs_conf.float().cpu().numpy(),
        "img_h": int(image.shape[0]),
        "img_w": int(image.shape[1]),
    }


class CaffePolicy(Policy):
    """generate_tsv.py on py-faster-rcnn: pictures as cv2.imread reads them, 600 / 1000 input, 300
    proposals, per-class NMS and the confidence rule (min_boxes..max_boxes regions, or exactly
    num_boxes); its decisions as it took them (detection.caffe_ops)."""

    name = "caffe"

    @staticmethod
    def read_picture(path):
        """As generate_tsv.py's cv2.imread read it: transparent pictures' stored colours, OpenCV's CMYK."""
        return read_image(path, like_opencv=True)

    def default_sizes(self):
        return CAFFE_SCALE, CAFFE_MAX_SIZE, CAFFE_POST_NMS

    def make_anchors(self, device):
        self.cell_anchors = caffe_ops.cell_anchors(self.anchor_sizes, self.anchor_ratios)
        self.anchor_order = checkpoint_anchor_order(self.anchor_sizes, self.anchor_ratios)

    def input_shape(self, height, width):
        return caffe_scale(height, width, self.min_size, self.max_size)[1:]

    def network_input(self, image):
        x, scale = caffe_input(image, self.min_size, self.max_size)
        return x, (1.0 / scale, 1.0 / scale), scale

    def propose(self, logits, deltas, feature_hw, input_hw, scale):
        return caffe_proposals(
            logits, deltas, self.cell_anchors, self.anchor_order, feature_hw, input_hw, scale, self.post_nms
        )[0]

    def select(self, scored, probs, images, predictor):
        kept = []
        for s, p, image in zip(scored, probs, images):
            # generate_tsv.py's boxes: the proposals over im_scale, in float32 (numpy 1.x divided
            # a float32 array by a float64 scalar in float32).
            picture_boxes = s["proposals"].cpu().numpy() / np.float32(s["scale"])
            max_conf = per_class_max_conf(picture_boxes, p.cpu().numpy())
            chosen = select_caffe(max_conf, self.boxes[0], self.boxes[1], self.conf_thresh)
            keep = torch.from_numpy(chosen).to(p.device)
            objects_conf, objects_id = p[keep].max(dim=1)
            # Caffe's attribute softmax covers all 401 outputs; ids and scores leave "no attribute" out.
            attrs_conf, attrs_id = s["attr_logits"][keep].float().softmax(dim=1)[:, :-1].max(dim=1)
            kept.append(
                regions_dict(
                    torch.from_numpy(picture_boxes[chosen]),
                    s["features"][keep],
                    objects_conf,
                    objects_id,
                    attrs_conf,
                    attrs_id,
                    image,
                )
            )
        return kept


class HFPolicy(Policy):
    """The LXMERT demo's pipeline: pictures read with utils.images.read_image, the config's 800 /
    1333 input and 300 proposals, boxes regressed for each region's best class, NMS at its
    thresholds in turn until min_detections survive."""

    name = "hf"

    @staticmethod
    def read_picture(path):
        """As utils.images.read_image reads it: transparent pictures over white."""
        return read_image(path)

    def default_sizes(self):
        config = self.config
        return config["input"]["min_size_test"], config["input"]["max_size_test"], config["rpn"]["post_nms_topk_test"]

    def default_boxes(self):
        """The config's range, for a variable count."""
        return int(self.config["min_detections"]), int(self.config["max_detections"])

    def make_anchors(self, device):
        self.cell_anchors = hf_cell_anchors(self.anchor_sizes, self.anchor_ratios).to(device)

    def input_shape(self, height, width):
        return hf_resize_shape(height, width, self.min_size, self.max_size)

    def network_input(self, image):
        x, scales_yx = hf_input(image, self.config, self.min_size, self.max_size)
        return x, (float(scales_yx[0]), float(scales_yx[1])), None

    def propose(self, logits, deltas, feature_hw, input_hw, scale):
        anchors = grid_anchors(self.cell_anchors, *feature_hw)
        return hf_proposals(logits, deltas, anchors, *input_hw, self.config, self.post_nms)[0]

    def select(self, scored, probs, images, predictor):
        thresholds = self.config["roi_heads"]["nms_thresh_test"]
        thresholds = thresholds if isinstance(thresholds, (list, tuple)) else [thresholds]
        kept = []
        for s, p, image in zip(scored, probs, images):
            classes_conf, classes = p.max(dim=1)
            deltas = predictor.box_deltas(s["features"], classes)
            height, width = s["input"].shape[1:]
            boxes = clip_boxes(
                decode_boxes(deltas, s["proposals"], self.config["roi_box_head"]["bbox_reg_weights"]), height, width
            )
            keep = select_hf(boxes, classes_conf, self.boxes[0], self.boxes[1], thresholds)
            # The demo's attribute softmax leaves "no attribute" out.
            attrs_conf, attrs_id = s["attr_logits"][keep, :-1].float().softmax(dim=1).max(dim=1)
            scale_y, scale_x = s["scale_yx"]
            picture_boxes = boxes[keep] * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
            kept.append(
                regions_dict(
                    picture_boxes, s["features"][keep], classes_conf[keep], classes[keep], attrs_conf, attrs_id, image
                )
            )
        return kept


POLICIES = {policy.name: policy for policy in (CaffePolicy, HFPolicy)}
assert tuple(POLICIES) == POLICY_NAMES


def make_policy(detector, settings):
    """The policy of `settings` (a RegionSettings) for `detector`."""
    return POLICIES[settings.policy](detector, settings)
