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

import detector as D
from conftest import CreatesFile, shared_file
from tiny_detector import tiny_detector_state_dict
from utils.errors import CheckpointError, OptionError

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
    return ref, inputs, D.load_detector(state_dict, config)


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / np.abs(expected).max()


def rgb_image(inputs, i):
    # The reference stores what cv2.imread gives (BGR); our API takes RGB.
    return np.ascontiguousarray(inputs[f"img{i}_raw_bgr"][..., ::-1])


@pytest.mark.parametrize("i", [0, 1])
def test_reference_network_input(reference, i):
    ref, inputs, detector = reference
    plan = D._Plan(detector, "hf", None, 10, 100, 0.2, None, None, None)
    x, scale_yx, _ = plan.prepare(rgb_image(inputs, i))
    assert tuple(x.shape[1:]) == tuple(ref[f"img{i}_input_hw"][0])
    assert relative_error(x.numpy(), inputs[f"img{i}_net_input"][0]) < 1e-6
    np.testing.assert_allclose([float(s) for s in scale_yx], ref[f"img{i}_scales_yx"][0], rtol=1e-6)


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
    plan = D._Plan(detector, "hf", None, 10, 100, 0.2, None, None, None)
    height, width = ref[f"img{i}_input_hw"][0]
    with torch.inference_mode():
        logits, deltas = detector.proposal_generator.rpn_head(res4)
        anchors = D.grid_anchors(plan.cell_anchors, res4.shape[2], res4.shape[3])
        boxes, scores = D.hf_proposals(logits[0], deltas[0], anchors, height, width, detector.config, plan.post_nms)
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
    np.testing.assert_allclose(best_deltas.numpy(), deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas)), classes].numpy(), rtol=1e-5, atol=1e-5)


def test_reference_end_to_end_in_one_batch(reference):
    """Both images through extract_regions_batch: the regions the demo keeps, in its order."""
    ref, inputs, detector = reference
    results = D.extract_regions_batch(detector, [rgb_image(inputs, 0), rgb_image(inputs, 1)], policy="hf", num_boxes=10)
    for i, regions in enumerate(results):
        assert (regions["img_h"], regions["img_w"]) == tuple(ref[f"img{i}_raw_hw"])
        assert relative_error(regions["features"], ref[f"img{i}_roi_features"][0]) < 1e-4
        assert relative_error(regions["boxes"], ref[f"img{i}_boxes"][0]) < 1e-4
        np.testing.assert_allclose(regions["objects_conf"], ref[f"img{i}_obj_probs"][0], rtol=1e-4)
        np.testing.assert_allclose(regions["attrs_conf"], ref[f"img{i}_attr_probs"][0], rtol=1e-4)
        # Ids where the top two logits are clearly apart (random weights give near-ties).
        kept = ref[f"img{i}_keep_idx"]
        for name, logits, ids in (("obj", "roi_obj_logits", regions["objects_id"]), ("attr", "roi_attr_logits", regions["attrs_id"])):
            top2 = np.sort(ref[f"img{i}_{logits}"][kept, :-1], axis=1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 1e-3
            assert clear.sum() >= len(kept) - 2
            np.testing.assert_array_equal(ids[clear], ref[f"img{i}_{name}_ids"][0][clear])
