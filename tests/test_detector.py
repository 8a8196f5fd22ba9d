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
from torchvision.ops import nms

from detection import (
    boxes as detection_boxes,
    config as detection_config,
    extract,
    policies,
    preprocess,
    proposals,
    selection,
)
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
    plan = policies.make_policy(detector, "hf")
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
    plan = policies.make_policy(detector, "hf")
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
        detector, [rgb_image(inputs, 0), rgb_image(inputs, 1)], policy="hf", num_boxes=10
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
# A plain transcription of py-faster-rcnn's NMS and bottom-up-attention's generate_tsv.py
# selection, in Caffe's layout (background / "no attribute" first).


def transcribed_nms(dets, thresh):
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        inds = np.where(ovr <= thresh)[0]
        order = order[inds + 1]
    return keep


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
        keep_boxes = np.argsort(max_conf)[::-1][:MIN_BOXES]
    elif len(keep_boxes) > MAX_BOXES:
        keep_boxes = np.argsort(max_conf)[::-1][:MAX_BOXES]
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
        boxes, probs = synthetic_regions(seed)
        ours = selection.per_class_max_conf(torch.from_numpy(boxes), torch.from_numpy(probs[:, 1:])).numpy()
        np.testing.assert_allclose(ours, transcribed_max_conf(boxes, probs), rtol=0, atol=0)
        # Clusters make NMS bite: many regions are suppressed in their best class.
        assert (ours < probs[:, 1:].max(axis=1)).mean() >= 0.05


def test_per_class_max_conf_of_a_batch_is_that_of_each_image():
    images = [synthetic_regions(seed, regions) for seed, regions in ((0, 150), (1, 40), (2, 0), (3, 90))]
    boxes = [torch.from_numpy(b) for b, _ in images]
    probs = [torch.from_numpy(p[:, 1:]) for _, p in images]
    together = selection.per_class_max_conf_batch(boxes, probs)
    for (caffe_boxes, caffe_probs), b, p, conf in zip(images, boxes, probs, together):
        np.testing.assert_array_equal(conf.numpy(), selection.per_class_max_conf(b, p).numpy())
        if len(b):
            np.testing.assert_array_equal(
                conf.numpy(), transcribed_max_conf(caffe_boxes, caffe_probs).astype(np.float32)
            )


@pytest.mark.parametrize(
    "count, low, high",
    [
        (36, 36, 36),
        (20, 36, 36),
        (60, 36, 36),  # fixed 36 (obj36): exactly reached, too few, too many
        (50, 10, 100),
        (4, 10, 100),
        (130, 10, 100),  # 10 to 100: within, too few, too many
    ],
)
def test_select_caffe_matches_transcription(count, low, high):
    boxes, probs = synthetic_regions(7)
    max_conf = transcribed_max_conf(boxes, probs)
    conf_thresh = thresh_for(max_conf, count)
    expected = transcribed_keep_boxes(max_conf, conf_thresh, low, high)
    ours = selection.select_caffe(torch.from_numpy(max_conf), low, high, conf_thresh).numpy()
    np.testing.assert_array_equal(ours, expected)
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
        {"num_boxes": 36},
        {"min_boxes": 10, "max_boxes": 100, "conf_thresh": "within"},
        {"min_boxes": 10, "max_boxes": 100, "conf_thresh": 0.99},
        {"min_boxes": 10, "max_boxes": 30, "conf_thresh": 0.0},
    ],
)
def test_caffe_policy_matches_generate_tsv_transcription(small_vocabulary_detector, selection):
    """extract_regions(policy='caffe') against the transcription run on the same proposals' outputs."""
    image = photo(3)
    scored = extract.score_regions(small_vocabulary_detector, [image], policy="caffe", proposals=120)[0]
    cls_boxes = (scored["proposals"] / scored["scale"]).numpy()
    cls_prob = background_first(scored["obj_logits"].softmax(dim=1).numpy())
    attr_prob = background_first(scored["attr_logits"].softmax(dim=1).numpy())
    pool5 = scored["features"].numpy()
    selection = dict(selection)
    if selection.get("conf_thresh") == "within":
        selection["conf_thresh"] = thresh_for(transcribed_max_conf(cls_boxes, cls_prob), 50)
    low = selection.get("num_boxes", selection.get("min_boxes"))
    high = selection.get("num_boxes", selection.get("max_boxes"))
    expected = transcribed_generate_tsv(
        cls_boxes, cls_prob, attr_prob, pool5, selection.get("conf_thresh", 0.2), low, high
    )
    regions = extract.extract_regions(small_vocabulary_detector, image, policy="caffe", proposals=120, **selection)
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
    ours = detection_boxes.caffe_cell_anchors([128, 256, 512], [0.5, 1.0, 2.0]).numpy()
    # Ours are size-major, the checkpoint's channel order.
    np.testing.assert_array_equal(ours, published.reshape(3, 3, 4).transpose(1, 0, 2).reshape(9, 4))
    assert detection_boxes.caffe_cell_anchors([64, 128, 256, 512], [0.5, 1.0, 2.0]).shape == (12, 4)


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


def test_fewer_proposals_than_num_boxes_gives_all_of_them(tiny):
    for policy in policies.POLICIES:
        regions = extract.extract_regions(tiny, photo(0), policy=policy, num_boxes=36, proposals=20)
        assert len(regions["boxes"]) == len(regions["features"]) == 20


def test_tiny_and_elongated_pictures(tiny):
    # py-faster-rcnn drops proposals under 16 pixels of the picture: a smaller picture has none.
    assert len(extract.extract_regions(tiny, photo(0, 12, 12), num_boxes=36, proposals=100)["boxes"]) == 0
    assert len(extract.extract_regions(tiny, photo(0, 12, 12), policy="hf", num_boxes=36, proposals=100)["boxes"]) == 36
    for policy in policies.POLICIES:
        with pytest.raises(DataError, match=r"a 3x2000 picture is too elongated for the detector: resized to 2x1\d+ "):
            extract.extract_regions(tiny, photo(0, 3, 2000), policy=policy)


def test_hf_policy_defaults_to_the_configs_36_regions(tiny):
    regions = extract.extract_regions(tiny, photo(1), policy="hf")
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
    together = extract.extract_regions_batch(tiny, images, policy=policy, num_boxes=36, **QUICK)
    for image, batched in zip(images, together):
        alone = extract.extract_regions(tiny, image, policy=policy, num_boxes=36, **QUICK)
        assert batched.keys() == alone.keys()
        for key in alone:
            np.testing.assert_allclose(batched[key], alone[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_policies_and_colour_order_matter(tiny):
    image = photo(4)
    caffe = extract.extract_regions(tiny, image, num_boxes=10, **QUICK)
    hf = extract.extract_regions(tiny, image, policy="hf", num_boxes=10, **QUICK)
    swapped = extract.extract_regions(tiny, np.ascontiguousarray(image[..., ::-1]), num_boxes=10, **QUICK)
    assert not np.allclose(caffe["features"], hf["features"])
    assert not np.allclose(caffe["features"], swapped["features"])


def test_image_path_is_read_with_utils_images(tiny, monkeypatch, tmp_path):
    read = []
    monkeypatch.setattr(extract, "read_image", lambda path: read.append(path) or photo(5))
    path = str(tmp_path / "photo.jpg")
    regions = extract.extract_regions(tiny, path, num_boxes=10, **QUICK)
    assert read == [path]
    np.testing.assert_array_equal(
        regions["features"], extract.extract_regions(tiny, photo(5), num_boxes=10, **QUICK)["features"]
    )


def test_unknown_policy_and_bad_arrays_are_refused(tiny):
    with pytest.raises(OptionError, match="policy: expected one of caffe, hf, got 'detectron'"):
        extract.extract_regions(tiny, photo(0), policy="detectron")
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
    assert len(extract.extract_regions(scalar, photo(0), policy="hf", **QUICK)["boxes"]) == 5


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
