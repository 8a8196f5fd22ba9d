"""The bottom-up-attention detector: the LXMERT demo's outputs reproduced (policy='hf'), the
generate_tsv.py selection (policy='caffe') against a transcription, loading and refusing files."""

import argparse
import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.ops import box_iou, nms

from detection import (
    boxes as detection_boxes,
    caffe_ops,
    config as detection_config,
    extract,
    policies,
    preprocess,
    proposals,
    selection,
)
from detection.settings import RegionSettings
from detection.weights import load_detector
from conftest import CreatesFile, shared_file
from tiny_detector import tiny_detector_state_dict
from utils.errors import CheckpointError, DataError, OptionError

REFERENCE = "frcnn_reference"


# ----------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def reference():
    """The demo's stage-by-stage outputs and the real-size detector with the recipe's weights."""
    ref = np.load(shared_file(REFERENCE, "reference_small.npz"))
    inputs = np.load(shared_file(REFERENCE, "reference_inputs_small.npz"))
    spec = importlib.util.spec_from_file_location("weights_recipe", shared_file(REFERENCE, "weights_recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    state_dict = recipe.make_state_dict(recipe.template_from_reference(ref), seed=recipe.seed_of(ref))
    assert recipe.matches_fingerprint(state_dict, ref)
    config = json.loads(str(ref["meta_json"]))["config"]
    torch.manual_seed(0)
    return ref, inputs, load_detector(state_dict, config)


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def rgb_image(inputs, i):
    # The reference stores what cv2.imread gives (BGR); our API takes RGB.
    return np.ascontiguousarray(inputs[f"img{i}_raw_bgr"][..., ::-1])


@pytest.mark.parametrize("i", [0, 1])
def test_reference_network_input(reference, i):
    ref, inputs, detector = reference
    plan = policies.make_policy(detector, RegionSettings(policy="hf"))
    x, scale_yx, _ = plan.prepare(rgb_image(inputs, i))
    assert tuple(x.shape[1:]) == tuple(ref[f"img{i}_input_hw"][0])
    assert relative_error(x.numpy(), inputs[f"img{i}_net_input"][0]) < 1e-6
    np.testing.assert_allclose(scale_yx, ref[f"img{i}_scales_yx"][0], rtol=1e-6)


@pytest.mark.parametrize("i", [0, 1])
def test_reference_backbone(reference, i):
    ref, inputs, detector = reference
    with torch.inference_mode():
        res4 = detector.backbone(torch.from_numpy(inputs[f"img{i}_net_input"]))
    assert relative_error(res4.numpy(), ref[f"img{i}_res4"]) < 1e-4


@pytest.mark.parametrize("i", [0, 1])
def test_reference_proposals_as_a_set(reference, i):
    ref, _, detector = reference
    res4 = torch.from_numpy(ref[f"img{i}_res4"])
    plan = policies.make_policy(detector, RegionSettings(policy="hf"))
    height, width = ref[f"img{i}_input_hw"][0]
    with torch.inference_mode():
        logits, deltas = detector.proposal_generator.rpn_head(res4)
        anchors = detection_boxes.grid_anchors(plan.cell_anchors, res4.shape[2], res4.shape[3])
        boxes, scores = proposals.hf_proposals(
            logits[0], deltas[0], anchors, height, width, detector.config, plan.post_nms
        )
    expected, expected_logits = ref[f"img{i}_proposals"], ref[f"img{i}_proposal_logits"]
    assert boxes.shape == expected.shape
    # Each proposal matched to one of the reference's, one to one, with its logit.
    distance = np.abs(boxes.numpy()[:, None, :] - expected[None]).max(axis=2)
    match = distance.argmin(axis=1)
    assert sorted(match) == list(range(len(expected)))
    assert distance.min(axis=1).max() < 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(scores.numpy(), expected_logits[match], atol=1e-4 * np.abs(expected_logits).max())


@pytest.mark.parametrize("i", [0, 1])
def test_reference_region_outputs(reference, i):
    """res5 + mean pooling on (a third of) the reference's proposals, then the heads on its pooled features."""
    ref, _, detector = reference
    proposals = torch.from_numpy(ref[f"img{i}_proposals"][::3].copy())
    pooled_expected = ref[f"img{i}_roi_pooled"]
    predictor = detector.roi_heads.box_predictor
    with torch.inference_mode():
        rois = torch.cat([torch.zeros(len(proposals), 1), proposals], dim=1)
        pooled = detector.region_features(torch.from_numpy(ref[f"img{i}_res4"]), rois)
        obj_logits, attr_logits = predictor(torch.from_numpy(pooled_expected))
        deltas = predictor.bbox_pred(torch.from_numpy(pooled_expected))
        classes = torch.from_numpy(ref[f"img{i}_roi_obj_logits"][:, :-1].argmax(axis=1))
        best_deltas = predictor.box_deltas(torch.from_numpy(pooled_expected), classes)
    assert relative_error(pooled.numpy(), pooled_expected[::3]) < 1e-4
    assert relative_error(obj_logits.numpy(), ref[f"img{i}_roi_obj_logits"]) < 1e-4
    assert relative_error(attr_logits.numpy(), ref[f"img{i}_roi_attr_logits"]) < 1e-4
    assert relative_error(deltas.numpy(), ref[f"img{i}_roi_box_deltas"]) < 1e-4
    np.testing.assert_allclose(
        best_deltas.numpy(),
        deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas)), classes].numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_reference_end_to_end_in_one_batch(reference):
    """Both images through extract_regions_batch: the regions the demo keeps, in its order."""
    ref, inputs, detector = reference
    results = extract.extract_regions_batch(
        detector, [rgb_image(inputs, 0), rgb_image(inputs, 1)], RegionSettings(policy="hf", boxes=10)
    )
    for i, regions in enumerate(results):
        assert (regions["img_h"], regions["img_w"]) == tuple(ref[f"img{i}_raw_hw"])
        assert relative_error(regions["features"], ref[f"img{i}_roi_features"][0]) < 1e-4
        assert relative_error(regions["boxes"], ref[f"img{i}_boxes"][0]) < 1e-4
        np.testing.assert_allclose(regions["objects_conf"], ref[f"img{i}_obj_probs"][0], rtol=1e-4)
        np.testing.assert_allclose(regions["attrs_conf"], ref[f"img{i}_attr_probs"][0], rtol=1e-4)
        # Ids where the top two logits are clearly apart (random weights give near-ties).
        kept = ref[f"img{i}_keep_idx"]
        for name, logits, ids in (
            ("obj", "roi_obj_logits", regions["objects_id"]),
            ("attr", "roi_attr_logits", regions["attrs_id"]),
        ):
            top2 = np.sort(ref[f"img{i}_{logits}"][kept, :-1], axis=1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 1e-3
            assert clear.sum() >= len(kept) - 2
            np.testing.assert_array_equal(ids[clear], ref[f"img{i}_{name}_ids"][0][clear])


# ----------------------------------------------------------------------------- policy='caffe'
# Plain transcriptions, in Caffe's layout (background / "no attribute" first, anchors ratio-major),
# of what bottom-up-attention's pipeline ran: numpy 1.x's argsort, py-faster-rcnn's
# generate_anchors, bbox_transform_inv, clip_boxes, ProposalLayer.forward and cpu_nms (float32
# variables, `ovr >= thresh` against the threshold as a C double), and generate_tsv.py's selection.
# Two things are not transcribed: exponentials are rounded from double here as in the code under
# test (the C library's expf of the original is not reproducible bit for bit), and numpy 1.x's
# float32 / float64-scalar division, which stayed float32, is written with a float32 scalar.


def legacy_argsort(values):
    """numpy 1.x's `argsort()` (its quicksort: median-of-3 partitions, insertion sort of 16 or fewer)."""
    v = [float(x) for x in values]
    index = list(range(len(v)))
    stack, low, high = [], 0, len(v) - 1
    while True:
        while high - low > 15:
            middle = low + ((high - low) >> 1)
            if v[index[middle]] < v[index[low]]:
                index[middle], index[low] = index[low], index[middle]
            if v[index[high]] < v[index[middle]]:
                index[high], index[middle] = index[middle], index[high]
            if v[index[middle]] < v[index[low]]:
                index[middle], index[low] = index[low], index[middle]
            pivot = v[index[middle]]
            i, j = low, high - 1
            index[middle], index[j] = index[j], index[middle]
            while True:
                i += 1
                while v[index[i]] < pivot:
                    i += 1
                j -= 1
                while pivot < v[index[j]]:
                    j -= 1
                if i >= j:
                    break
                index[i], index[j] = index[j], index[i]
            index[i], index[high - 1] = index[high - 1], index[i]
            if i - low < high - i:
                stack.append((i + 1, high))
                high = i - 1
            else:
                stack.append((low, i - 1))
                low = i + 1
        for i in range(low + 1, high + 1):
            moving, j = index[i], i
            while j > low and v[moving] < v[index[j - 1]]:
                index[j] = index[j - 1]
                j -= 1
            index[j] = moving
        if not stack:
            return np.array(index, dtype=np.int64)
        low, high = stack.pop()


def exp32(x):
    return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def transcribed_nms(dets, thresh):
    x1, y1, x2, y2, scores = (np.ascontiguousarray(dets[:, k], dtype=np.float32) for k in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = legacy_argsort(scores)[::-1]
    suppressed = np.zeros(len(dets), dtype=bool)
    keep = []
    for _i in range(len(dets)):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(i)
        j = order[_i + 1 :]
        xx1, yy1 = np.maximum(x1[i], x1[j]), np.maximum(y1[i], y1[j])
        xx2, yy2 = np.minimum(x2[i], x2[j]), np.minimum(y2[i], y2[j])
        w = np.maximum(np.float32(0.0), xx2 - xx1 + 1)
        h = np.maximum(np.float32(0.0), yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[j] - inter)
        suppressed[j[ovr.astype(np.float64) >= thresh]] = True
    return keep


def transcribed_generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(4, 8, 16, 32)):
    def mkanchors(ws, hs, x_ctr, y_ctr):
        ws, hs = ws[:, np.newaxis], hs[:, np.newaxis]
        return np.hstack(
            (x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1))
        )

    def whctrs(anchor):
        w, h = anchor[2] - anchor[0] + 1, anchor[3] - anchor[1] + 1
        return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)

    w, h, x_ctr, y_ctr = whctrs(np.array([1, 1, base_size, base_size]) - 1)
    size_ratios = w * h / np.array(ratios)
    ws = np.round(np.sqrt(size_ratios))
    ratio_anchors = mkanchors(ws, np.round(ws * np.array(ratios)), x_ctr, y_ctr)
    anchors = []
    for anchor in ratio_anchors:
        w, h, x_ctr, y_ctr = whctrs(anchor)
        anchors.append(mkanchors(w * np.array(scales), h * np.array(scales), x_ctr, y_ctr))
    return np.vstack(anchors)


def transcribed_bbox_transform_inv(boxes, deltas):
    boxes = boxes.astype(deltas.dtype, copy=False)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    pred_ctr_x = deltas[:, 0::4] * widths[:, np.newaxis] + ctr_x[:, np.newaxis]
    pred_ctr_y = deltas[:, 1::4] * heights[:, np.newaxis] + ctr_y[:, np.newaxis]
    pred_w = exp32(deltas[:, 2::4]) * widths[:, np.newaxis]
    pred_h = exp32(deltas[:, 3::4]) * heights[:, np.newaxis]
    pred_boxes = np.zeros(deltas.shape, dtype=deltas.dtype)
    pred_boxes[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    pred_boxes[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    pred_boxes[:, 2::4] = pred_ctr_x + 0.5 * pred_w
    pred_boxes[:, 3::4] = pred_ctr_y + 0.5 * pred_h
    return pred_boxes


def transcribed_clip_boxes(boxes, im_shape):
    boxes[:, 0::4] = np.maximum(np.minimum(boxes[:, 0::4], im_shape[1] - 1), 0)
    boxes[:, 1::4] = np.maximum(np.minimum(boxes[:, 1::4], im_shape[0] - 1), 0)
    boxes[:, 2::4] = np.maximum(np.minimum(boxes[:, 2::4], im_shape[1] - 1), 0)
    boxes[:, 3::4] = np.maximum(np.minimum(boxes[:, 3::4], im_shape[0] - 1), 0)
    return boxes


def transcribed_proposal_layer(rpn_cls_prob, rpn_bbox_pred, im_info, post_nms_topN, argsort=legacy_argsort):
    """ProposalLayer.forward (TEST: pre 6000, NMS 0.7, min size 16) on Caffe's blobs."""
    pre_nms_topN, nms_thresh, min_size = 6000, 0.7, 16
    anchors_cell = transcribed_generate_anchors()
    num_anchors = anchors_cell.shape[0]
    scores = rpn_cls_prob[:, num_anchors:, :, :]
    height, width = scores.shape[-2:]
    shift_x, shift_y = np.meshgrid(np.arange(0, width) * 16, np.arange(0, height) * 16)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    anchors = anchors_cell.reshape((1, num_anchors, 4)) + shifts.reshape((1, -1, 4)).transpose((1, 0, 2))
    anchors = anchors.reshape((-1, 4))
    bbox_deltas = rpn_bbox_pred.transpose((0, 2, 3, 1)).reshape((-1, 4))
    scores = scores.transpose((0, 2, 3, 1)).reshape((-1, 1))
    proposals = transcribed_clip_boxes(transcribed_bbox_transform_inv(anchors, bbox_deltas), im_info[:2])
    ws = proposals[:, 2] - proposals[:, 0] + 1
    hs = proposals[:, 3] - proposals[:, 1] + 1
    keep = np.where((ws >= min_size * im_info[2]) & (hs >= min_size * im_info[2]))[0]
    proposals, scores = proposals[keep, :], scores[keep]
    order = argsort(scores.ravel())[::-1][:pre_nms_topN]
    proposals, scores = proposals[order, :], scores[order]
    keep = transcribed_nms(np.hstack((proposals, scores)), nms_thresh)[:post_nms_topN]
    return proposals[keep, :], scores[keep]


def transcribed_max_conf(cls_boxes, cls_prob, nms_thresh=0.3):
    max_conf = np.zeros((cls_boxes.shape[0]))
    for cls_ind in range(1, cls_prob.shape[1]):
        cls_scores = cls_prob[:, cls_ind]
        dets = np.hstack((cls_boxes, cls_scores[:, np.newaxis])).astype(np.float32)
        keep = np.array(transcribed_nms(dets, nms_thresh))
        max_conf[keep] = np.where(cls_scores[keep] > max_conf[keep], cls_scores[keep], max_conf[keep])
    return max_conf


def transcribed_keep_boxes(max_conf, conf_thresh, MIN_BOXES, MAX_BOXES):
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) < MIN_BOXES:
        keep_boxes = legacy_argsort(max_conf)[::-1][:MIN_BOXES]
    elif len(keep_boxes) > MAX_BOXES:
        keep_boxes = legacy_argsort(max_conf)[::-1][:MAX_BOXES]
    return keep_boxes


def transcribed_generate_tsv(cls_boxes, cls_prob, attr_prob, pool5, conf_thresh, MIN_BOXES, MAX_BOXES):
    keep_boxes = transcribed_keep_boxes(transcribed_max_conf(cls_boxes, cls_prob), conf_thresh, MIN_BOXES, MAX_BOXES)
    return {
        "boxes": cls_boxes[keep_boxes],
        "features": pool5[keep_boxes],
        "objects_id": np.argmax(cls_prob[keep_boxes][:, 1:], axis=1),
        "objects_conf": np.max(cls_prob[keep_boxes][:, 1:], axis=1),
        "attrs_id": np.argmax(attr_prob[keep_boxes][:, 1:], axis=1),
        "attrs_conf": np.max(attr_prob[keep_boxes][:, 1:], axis=1),
    }


def background_first(probs):
    """Our layout (background last) in Caffe's."""
    return np.concatenate([probs[:, -1:], probs[:, :-1]], axis=1)


def tied(rng, size, levels):
    """Numbers drawn from `levels` distinct values: many ties."""
    return rng.randint(0, levels, size).astype(np.float32) / levels


@pytest.mark.parametrize("size, levels", [(10, 3), (17, 2), (300, 40), (5000, 7), (30000, 300)])
def test_caffe_argsort_orders_ties_as_numpy_1(size, levels):
    values = tied(np.random.RandomState(size), size, levels)
    ours = caffe_ops.caffe_argsort(values)
    np.testing.assert_array_equal(ours, legacy_argsort(values))
    assert (np.diff(values[ours]) >= 0).all()
    # Column by column, and float64 alike.
    table = tied(np.random.RandomState(1), (size, 3), levels).astype(np.float64)
    for column in range(3):
        np.testing.assert_array_equal(caffe_ops.caffe_argsort(table)[:, column], legacy_argsort(table[:, column]))
    if size >= 300:  # a stable sort would order these ties otherwise
        assert not np.array_equal(ours, np.argsort(values, kind="stable"))


def caffe_softmax_foreground(bg, fg):
    """Caffe's SoftmaxLayer over the two channels (bg, fg), float32: subtract the max, exp, sum, divide."""
    top = np.maximum(bg, fg)
    e_bg, e_fg = exp32(bg - top), exp32(fg - top)
    return e_fg / (e_bg + e_fg)


def rpn_scores(rng, count):
    """Caffe's two RPN scores per anchor, foreground often far above background (as a trained RPN
    has it for the anchors on objects), and the converted single logit fg - bg."""
    bg = rng.normal(0, 2, count).astype(np.float32)
    margin = np.where(rng.uniform(size=count) < 0.3, rng.uniform(8, 30, count), rng.normal(-4, 4, count))
    fg = (bg + margin).astype(np.float32)
    return bg, fg, fg - bg


def test_foreground_probability_is_caffes_softmax_ties_included():
    bg, fg, logits = rpn_scores(np.random.RandomState(0), 20000)
    probability = caffe_ops.foreground_probability(logits)
    np.testing.assert_array_equal(probability, caffe_softmax_foreground(bg, fg))
    top = np.sort(probability)[-300:]
    assert len(top) - len(np.unique(top)) >= 40  # the float32 probability saturates: ties
    assert len(np.unique(np.sort(logits)[-300:])) == 300  # which the logits do not have


def test_cpu_nms_suppresses_at_iou_equal_or_above_the_threshold_as_a_double():
    # IoU 3/10 and 7/10 in float32: 0.3f is just above 0.3, 0.7f just below 0.7.
    boxes = np.array([[0, 0, 2, 0], [0, 0, 9, 0], [0, 10, 6, 10], [0, 10, 9, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert float(np.float32(3) / np.float32(10)) > 0.3 and float(np.float32(7) / np.float32(10)) < 0.7
    np.testing.assert_array_equal(caffe_ops.nms(boxes[:2], scores[:2], 0.3), [0])
    np.testing.assert_array_equal(caffe_ops.nms(boxes[2:], scores[2:], 0.7), [0, 1])
    # The float32 comparison torch makes of a float32 IoU with a threshold would keep both.
    assert not (box_iou(torch.from_numpy(boxes[:1] + [0, 0, 1, 1]), torch.from_numpy(boxes[1:2] + [0, 0, 1, 1])) > 0.3)
    np.testing.assert_array_equal(selection.per_class_max_conf(boxes[:2], scores[:2, None]), [scores[0], 0])


def test_cpu_nms_matches_transcription_and_stops_at_the_limit():
    rng = np.random.RandomState(3)
    boxes, _ = synthetic_regions(3, regions=400)
    scores = tied(rng, 400, 25)
    expected = transcribed_nms(np.hstack([boxes, scores[:, None]]), 0.5)
    np.testing.assert_array_equal(caffe_ops.nms(boxes, scores, 0.5), expected)
    np.testing.assert_array_equal(caffe_ops.nms(boxes, scores, 0.5, limit=7), expected[:7])


def caffe_blobs(logits_map, deltas_map, bg_map, fg_map):
    """Caffe's rpn_cls_prob (1, 2A, H, W) and rpn_bbox_pred (1, 4A, H, W) of the same RPN. The
    conversion is assumed to have put Caffe's anchor a = ratio * 4 + size (ratio-major) at the
    checkpoint's channel size * 3 + ratio (size-major)."""
    height, width, anchors = logits_map.shape
    prob = np.zeros((1, 2 * anchors, height, width), np.float32)
    bbox = np.zeros((1, 4 * anchors, height, width), np.float32)
    for ratio in range(3):
        for size in range(4):
            caffe, ours = ratio * 4 + size, size * 3 + ratio
            fg = caffe_softmax_foreground(bg_map[..., ours], fg_map[..., ours])
            prob[0, caffe], prob[0, anchors + caffe] = 1 - fg, fg
            bbox[0, 4 * caffe : 4 * caffe + 4] = deltas_map[:, :, ours].transpose(2, 0, 1)
    return prob, bbox


@pytest.mark.parametrize("post_nms", [300, 60])
def test_caffe_proposals_match_proposal_layer_transcription_ties_included(post_nms):
    rng = np.random.RandomState(post_nms)
    height, width, scale = 20, 25, 1.25
    bg, fg, logits = rpn_scores(rng, height * width * 12)
    deltas = rng.normal(0, 0.15, (height * width * 12, 4)).astype(np.float32)
    shaped = [a.reshape(height, width, 12, *a.shape[1:]) for a in (logits, deltas, bg, fg)]
    prob, bbox = caffe_blobs(*shaped)
    im_info = np.array([320, 400, scale], np.float32)
    expected_boxes, expected_scores = transcribed_proposal_layer(prob, bbox, im_info, post_nms)

    sizes, ratios = [64, 128, 256, 512], [0.5, 1.0, 2.0]
    boxes, scores = proposals.caffe_proposals(
        torch.from_numpy(logits),
        torch.from_numpy(deltas),
        caffe_ops.cell_anchors(sizes, ratios),
        proposals.checkpoint_anchor_order(sizes, ratios),
        (height, width),
        (320, 400),
        scale,
        post_nms,
    )
    np.testing.assert_array_equal(boxes.numpy(), expected_boxes)
    np.testing.assert_array_equal(scores.numpy(), expected_scores.ravel())
    # Ties among the kept proposals decided their order and which of two overlapping boxes stayed:
    # ranked stably instead, the same layer keeps other proposals.
    assert len(expected_scores) - len(np.unique(expected_scores)) >= 20
    stable = transcribed_proposal_layer(prob, bbox, im_info, post_nms, argsort=lambda v: np.argsort(v, kind="stable"))
    assert not np.array_equal(stable[0], expected_boxes)


def synthetic_regions(seed, regions=150, classes=40):
    """Boxes in clusters (so that NMS suppresses) and class probabilities, Caffe's layout
    (background first)."""
    rng = np.random.RandomState(seed)
    centres = rng.uniform(50, 450, (12, 2))[rng.randint(0, 12, regions)] + rng.normal(0, 15, (regions, 2))
    sizes = rng.uniform(20, 120, (regions, 2))
    boxes = np.hstack([centres - sizes / 2, centres + sizes / 2]).astype(np.float32)
    logits = rng.normal(0, 2.5, (regions, classes + 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return boxes, probs.astype(np.float32)


def thresh_for(max_conf, count):
    """A confidence threshold that exactly `count` regions reach."""
    ranked = np.sort(max_conf)[::-1]
    return float((ranked[count - 1] + ranked[count]) / 2)


def test_per_class_max_conf_matches_transcription():
    for seed in range(3):
        boxes, probs = synthetic_regions(seed, regions=150 + 40 * seed)
        if seed == 2:  # tied class scores: the order of ties decides which of two overlapping boxes stays
            probs = np.round(probs, 2)
        ours = selection.per_class_max_conf(boxes, probs[:, 1:])
        np.testing.assert_array_equal(ours, transcribed_max_conf(boxes, probs))
        # Clusters make NMS bite: many regions are suppressed in their best class.
        assert (ours < probs[:, 1:].max(axis=1)).mean() >= 0.05
    assert len(selection.per_class_max_conf(np.zeros((0, 4), np.float32), np.zeros((0, 40), np.float32))) == 0


@pytest.mark.parametrize(
    "count, low, high, ties",
    [
        (36, 36, 36, False),
        (20, 36, 36, False),
        (60, 36, 36, False),  # fixed 36 (obj36): exactly reached, too few, too many
        (50, 10, 100, False),
        (4, 10, 100, False),
        (130, 10, 100, False),  # 10 to 100: within, too few, too many
        (20, 36, 36, True),
        (130, 10, 100, True),  # the best of tied confidences, in numpy 1.x's order
    ],
)
def test_select_caffe_matches_transcription(count, low, high, ties):
    boxes, probs = synthetic_regions(7)
    max_conf = transcribed_max_conf(boxes, probs)
    if ties:
        max_conf = np.round(max_conf, 1)
    conf_thresh = thresh_for(max_conf, count) if not ties else (0.95 if count < low else 0.05)
    expected = transcribed_keep_boxes(max_conf, conf_thresh, low, high)
    ours = selection.select_caffe(max_conf, low, high, conf_thresh)
    np.testing.assert_array_equal(ours, expected)
    if ties:
        assert not np.array_equal(ours, np.argsort(-max_conf, kind="stable")[: len(ours)])
    else:
        assert len(ours) == min(max(count, low), high)
    if low <= count <= high:
        assert list(ours) == sorted(ours)  # in region order, as np.where gives them


@pytest.fixture(scope="module")
def small_vocabulary_detector():
    """The tiny detector with 60 classes and 20 attributes, so that the transcription is quick."""
    return load_detector(tiny_detector_state_dict(seed=1, num_classes=60, num_attributes=20))


def photo(seed, height=120, width=160):
    """A random picture with some structure: smooth blobs over noise."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = rng.uniform(0, 60, (height, width, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 40)
        image += rng.uniform(0, 190, 3) * (((y - cy) ** 2 + (x - cx) ** 2) < r * r)[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "selection",
    [
        {"boxes": 36},
        {"min_boxes": 10, "max_boxes": 100, "conf_thresh": "within"},
        {"min_boxes": 10, "max_boxes": 100, "conf_thresh": 0.99},
        {"min_boxes": 10, "max_boxes": 30, "conf_thresh": 0.0},
    ],
)
def test_caffe_policy_matches_generate_tsv_transcription(small_vocabulary_detector, selection):
    """extract_regions(policy='caffe') against the transcription run on the same proposals' outputs."""
    image = photo(3)
    scored = extract.score_regions(small_vocabulary_detector, [image], RegionSettings(proposals=120))[0]
    cls_boxes = scored["proposals"].numpy() / np.float32(scored["scale"])
    cls_prob = background_first(scored["obj_logits"].softmax(dim=1).numpy())
    attr_prob = background_first(scored["attr_logits"].softmax(dim=1).numpy())
    pool5 = scored["features"].numpy()
    selection = dict(selection)
    if selection.get("conf_thresh") == "within":
        selection["conf_thresh"] = thresh_for(transcribed_max_conf(cls_boxes, cls_prob), 50)
    low = selection.get("boxes", selection.get("min_boxes"))
    high = selection.get("boxes", selection.get("max_boxes"))
    expected = transcribed_generate_tsv(
        cls_boxes, cls_prob, attr_prob, pool5, selection.get("conf_thresh", 0.2), low, high
    )
    settings = RegionSettings(proposals=120, **{"boxes": None, **selection})
    regions = extract.extract_regions(small_vocabulary_detector, image, settings)
    assert (regions["img_h"], regions["img_w"]) == image.shape[:2]
    for key, value in expected.items():
        np.testing.assert_allclose(regions[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
        assert regions[key].dtype == (np.int64 if key.endswith("_id") else np.float32)


def test_caffe_anchors_are_py_faster_rcnn_generate_anchors():
    # What py-faster-rcnn's generate_anchors() returns for scales 8, 16, 32 (ratio-major; its
    # docstring shows the MATLAB version's, one pixel off).
    published = np.array(
        [
            [-84, -40, 99, 55],
            [-176, -88, 191, 103],
            [-360, -184, 375, 199],
            [-56, -56, 71, 71],
            [-120, -120, 135, 135],
            [-248, -248, 263, 263],
            [-36, -80, 51, 95],
            [-80, -168, 95, 183],
            [-168, -344, 183, 359],
        ]
    )
    np.testing.assert_array_equal(caffe_ops.cell_anchors([128, 256, 512], [0.5, 1.0, 2.0]), published)
    sizes, ratios = [64, 128, 256, 512], [0.5, 1.0, 2.0]
    caffe = caffe_ops.cell_anchors(sizes, ratios)
    np.testing.assert_array_equal(caffe, transcribed_generate_anchors())
    # The assumed channel order pairs each Caffe anchor with the checkpoint's of the same shape.
    paired = detection_boxes.hf_cell_anchors(sizes, ratios).numpy()[proposals.checkpoint_anchor_order(sizes, ratios)]
    np.testing.assert_allclose(caffe[:, 2:] - caffe[:, :2] + 1, paired[:, 2:] - paired[:, :2], rtol=0.1)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((480, 640), (1.25, 600, 800)),
        ((300, 1000), (1.0, 300, 1000)),  # 600 / 300 would make the longest side 2000
        ((333, 500), (600 / 333, 600, 901)),
        ((10, 17), (60.0, 600, 1000)),  # 17 * 60 = 1020 rounds above 1000: scale from the longest side
    ],
)
def test_caffe_scale(size, expected):
    scale, height, width = preprocess.caffe_scale(*size)
    if size == (10, 17):
        expected = (1000 / 17, 588, 1000)
    assert (height, width) == expected[1:]
    assert scale == pytest.approx(expected[0], rel=1e-12)


def test_caffe_resize_is_cv2_linear_at_the_given_scale():
    """cv2.resize(fx=fy=scale, INTER_LINEAR) samples at (dst + 0.5) / scale - 0.5, clamped."""
    image = np.zeros((2, 4, 3), np.uint8)
    image[..., 0] = [[0, 40, 80, 120], [0, 40, 80, 120]]  # red: the first channel in RGB, the last in BGR
    x, scale = preprocess.caffe_input(image, short=3, longest=100)
    assert scale == 1.5 and x.shape == (3, 3, 6)
    red = x[2, 0].numpy() + detection_config.PUBLISHED_CONFIG["model"]["pixel_mean"][2]
    # Sources: -1/6 (clamped to 0), 1/2, 7/6, 11/6, 5/2 and 19/6 (past the last pixel: clamped).
    np.testing.assert_allclose(red, [0, 20, 40 * 7 / 6, 40 * 11 / 6, 100, 120], rtol=1e-5)


# ----------------------------------------------------------------------------- policy='hf'


def test_select_hf_fills_with_the_best_suppressed_when_too_few_survive():
    """The demo crashes when fewer than num_boxes survive NMS even at 0.7; we keep the survivors
    of that last NMS, best first, then the best of the suppressed regions."""
    rng = np.random.RandomState(0)
    # Two clusters of nearly equal boxes: NMS keeps about one box per cluster.
    base = np.array([[10, 10, 100, 100], [200, 50, 300, 200]], np.float32)
    boxes = torch.from_numpy(base[rng.randint(0, 2, 30)] + rng.normal(0, 1, (30, 4)).astype(np.float32))
    scores = torch.from_numpy(rng.uniform(0, 1, 30).astype(np.float32))
    survivors = nms(boxes, scores, 0.7)
    assert len(survivors) < 10
    keep = selection.select_hf(boxes, scores, 10, 10, [0.5, 0.6, 0.7])
    assert len(keep) == 10 and len(set(keep.tolist())) == 10
    assert keep[: len(survivors)].tolist() == survivors.tolist()
    rest = [i for i in np.argsort(-scores.numpy(), kind="stable") if i not in survivors.tolist()]
    assert keep[len(survivors) :].tolist() == rest[: 10 - len(survivors)]
    # When enough survive, the first threshold that leaves num_boxes decides, best first.
    keep = selection.select_hf(boxes, scores, 2, 2, [0.5, 0.6, 0.7])
    assert keep.tolist() == nms(boxes, scores, 0.5)[:2].tolist()


@pytest.fixture(scope="module")
def tiny():
    return load_detector(tiny_detector_state_dict())


# Smaller network inputs and fewer proposals where the policies' own sizes are not the point.
QUICK = {"min_size": 200, "max_size": 320, "proposals": 100}


def settings(policy="caffe", boxes=36, **values):
    return RegionSettings(policy=policy, boxes=boxes, **values)


def test_fewer_proposals_than_num_boxes_gives_all_of_them(tiny):
    for policy in policies.POLICIES:
        regions = extract.extract_regions(tiny, photo(0), settings(policy, proposals=20))
        assert len(regions["boxes"]) == len(regions["features"]) == 20


def test_tiny_and_elongated_pictures(tiny):
    # py-faster-rcnn drops proposals under 16 pixels of the picture: a smaller picture has none.
    assert len(extract.extract_regions(tiny, photo(0, 12, 12), settings(proposals=100))["boxes"]) == 0
    assert len(extract.extract_regions(tiny, photo(0, 12, 12), settings("hf", proposals=100))["boxes"]) == 36
    for policy in policies.POLICIES:
        with pytest.raises(DataError, match=r"a 3x2000 picture is too elongated for the detector: resized to 2x1\d+ "):
            extract.extract_regions(tiny, photo(0, 3, 2000), settings(policy))


def test_hf_policy_defaults_to_the_configs_36_regions(tiny):
    regions = extract.extract_regions(tiny, photo(1), settings("hf", boxes=None))
    assert regions["boxes"].shape == (36, 4) and regions["features"].shape == (36, 64)
    assert (regions["boxes"][:, 2] <= regions["img_w"] + 1e-3).all() and (
        regions["boxes"][:, 3] <= regions["img_h"] + 1e-3
    ).all()
    assert (np.diff(regions["objects_conf"]) <= 0).all()  # NMS order: best first


# ----------------------------------------------------------------------------- the API


@pytest.mark.parametrize("policy", policies.POLICIES)
def test_batch_gives_the_results_of_one_at_a_time(tiny, policy):
    # Two images of one size (they share a backbone pass) and one of another.
    images = [photo(0), photo(1, 90, 200), photo(2)]
    together = extract.extract_regions_batch(tiny, images, settings(policy, **QUICK))
    for image, batched in zip(images, together):
        alone = extract.extract_regions(tiny, image, settings(policy, **QUICK))
        assert batched.keys() == alone.keys()
        for key in alone:
            np.testing.assert_allclose(batched[key], alone[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_policies_and_colour_order_matter(tiny):
    image = photo(4)
    caffe = extract.extract_regions(tiny, image, settings(boxes=10, **QUICK))
    hf = extract.extract_regions(tiny, image, settings("hf", boxes=10, **QUICK))
    swapped = extract.extract_regions(tiny, np.ascontiguousarray(image[..., ::-1]), settings(boxes=10, **QUICK))
    assert not np.allclose(caffe["features"], hf["features"])
    assert not np.allclose(caffe["features"], swapped["features"])


def test_each_policy_reads_a_path_as_its_original_did(tiny, tmp_path):
    """caffe: as cv2.imread reads it (a transparent picture's stored colours); hf: as
    utils.images.read_image does (over white)."""
    image = photo(5)
    alpha = np.where(photo(6)[..., :1] > 40, 255, 0).astype(np.uint8)
    path = tmp_path / "transparent.png"
    Image.fromarray(np.concatenate([image, alpha], axis=2), "RGBA").save(path)
    over_white = np.where(alpha > 0, image, 255).astype(np.uint8)
    assert 0.2 < (alpha == 0).mean() < 0.8
    for policy, seen in (("caffe", image), ("hf", over_white)):
        from_path = extract.extract_regions(tiny, str(path), settings(policy, boxes=10, **QUICK))
        from_array = extract.extract_regions(tiny, seen, settings(policy, boxes=10, **QUICK))
        np.testing.assert_array_equal(from_path["features"], from_array["features"])


def test_unknown_policy_and_bad_arrays_are_refused(tiny):
    with pytest.raises(OptionError, match="policy 'detectron': expected one of caffe, hf"):
        extract.extract_regions(tiny, photo(0), settings("detectron"))
    with pytest.raises(ValueError, match="RGB uint8"):
        extract.extract_regions(tiny, photo(0).astype(np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        extract.extract_regions(tiny, photo(0)[..., 0])


# ----------------------------------------------------------------------------- loading


def same_detector(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_the_bin_and_the_detectron2_pickle(tiny, tmp_path):
    state_dict = tiny_detector_state_dict()
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    assert same_detector(load_detector(str(tmp_path / "pytorch_model.bin")), tiny)
    arrays = {k: v.numpy() for k, v in state_dict.items()}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"faster_rcnn_from_caffe_attr_{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": arrays, "__author__": "Caffe"}, f, protocol=protocol)
        assert same_detector(load_detector(str(path)), tiny)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(arrays))
    assert same_detector(load_detector(str(plain)), tiny)


def test_architecture_is_read_off_the_state_dict(tiny):
    assert tiny.arch["res4"] == (2, 8, 32) and tiny.arch["classes"] == 1600 and tiny.arch["attributes"] == 400
    assert len(tiny.roi_heads.res5) == 1 and tiny.roi_heads.res5[0].conv2.dilation == (2, 2)


def test_config_yaml_in_any_case(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"INPUT": {"MIN_SIZE_TEST": 320}, "ROI_HEADS": {"NMS_THRESH_TEST": [0.4]}, "max_detections": 12})
    )
    detector = load_detector(tiny_detector_state_dict(), config=str(path))
    assert detector.config["input"] == {"min_size_test": 320, "max_size_test": 1333}
    assert detector.config["roi_heads"]["nms_thresh_test"] == [0.4] and detector.config["max_detections"] == 12
    # One threshold may be written without a list, as detectron2 configs do.
    scalar = load_detector(
        tiny_detector_state_dict(),
        config={"roi_heads": {"nms_thresh_test": 0.5}, "min_detections": 5, "max_detections": 5},
    )
    assert len(extract.extract_regions(scalar, photo(0), settings("hf", boxes=None, **QUICK))["boxes"]) == 5


def refusal(weights):
    with pytest.raises(CheckpointError) as error:
        load_detector(weights)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_refuses_other_checkpoints(tmp_path):
    vsrn = tmp_path / "model_best.pth.tar"
    torch.save({"model": [{"w": torch.zeros(1)}], "opt": argparse.Namespace(embed_size=1024), "epoch": 3}, vsrn)
    assert refusal(str(vsrn)) == (
        f"{vsrn}: a VSRN checkpoint (it holds 'model' and 'opt'), not the detector's weights: give the "
        "bottom-up-attention detector's pytorch_model.bin (unc-nlp/frcnn-vg-finetuned) or "
        "faster_rcnn_from_caffe_attr.pkl"
    )
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1), "opt": argparse.Namespace(x=1)}, other)  # a Namespace, but no VSRN checkpoint
    assert (
        refusal(str(other))
        == f"{other}: refusing to load: it needs the global argparse.Namespace, which a detector checkpoint never holds"
    )
    bert = tmp_path / "pytorch_model.bin"
    torch.save(
        {"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2), "cls.predictions.bias": torch.zeros(4)}, bert
    )
    message = refusal(str(bert))
    assert message.startswith(f"{bert}: not a bottom-up-attention detector: missing backbone.res2.0.conv1.weight")
    lxmert = {
        "lxmert.encoder.x_layers.0.visual_attention.att.query.weight": torch.zeros(2, 2),
        "answer_head.logit_fc.0.weight": torch.zeros(2, 2),
    }
    assert "not a bottom-up-attention detector: missing" in refusal(lxmert)


def test_refuses_truncated_files(tmp_path):
    good = tmp_path / "good.bin"
    torch.save(tiny_detector_state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    assert "cut.bin: truncated PyTorch checkpoint" in refusal(str(tmp_path / "cut.bin"))
    pickled = pickle.dumps({k: v.numpy() for k, v in tiny_detector_state_dict().items()})
    (tmp_path / "cut.pkl").write_bytes(pickled[: len(pickled) // 2])
    assert "cut.pkl: not a complete pickle" in refusal(str(tmp_path / "cut.pkl"))
    assert refusal(str(tmp_path / "absent.bin")) == f"{tmp_path / 'absent.bin'}: checkpoint not found"


def test_refuses_missing_and_misshapen_keys():
    state_dict = tiny_detector_state_dict()
    del state_dict["backbone.res4.1.conv2.weight"]
    state_dict["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(4 * 1599, 64)
    state_dict["roi_heads.box_predictor.extra.weight"] = torch.zeros(1)
    message = refusal(state_dict)
    assert message == (
        "state dict: does not fit the bottom-up-attention detector: missing backbone.res4.1.conv2.weight; "
        "unexpected roi_heads.box_predictor.extra.weight; "
        "misshapen roi_heads.box_predictor.bbox_pred.weight [6396, 64] (expected [6400, 64])"
    )


def test_refuses_pickles_that_would_run_code(tmp_path):
    victim = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": CreatesFile(str(victim))}}))
    assert f"evil.pkl: refusing to load: it needs the global {CreatesFile.GLOBAL}" in refusal(str(path))
    assert not victim.exists()
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": [1.0, 2.0]}}))
    assert "not a state dict of arrays: backbone.stem.conv1.weight" in refusal(str(tmp_path / "objects.pkl"))
