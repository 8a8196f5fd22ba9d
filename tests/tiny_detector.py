"""A small random bottom-up-attention detector state dict, with the published checkpoint's key names."""

import numpy as np
import torch

from detection.network import BottomUpDetector

TINY_ARCH = {
    "stem": 8,
    "res2": (1, 4, 16),
    "res3": (1, 8, 32),
    "res4": (2, 8, 32),
    "res5": (1, 16, 64),
    "rpn_hidden": 16,
    "anchors": 12,
    "embedding": 8,
    "attr_hidden": 16,
}


def _draw(key, shape, rng):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if key.endswith("norm.running_mean") or key.endswith("norm.bias"):
        return rng.normal(0, 0.1, shape)
    if key.endswith("norm.running_var"):
        return rng.uniform(0.5, 2.0, shape)
    if key.endswith("norm.weight"):
        # The last norm of a block starts small, so the residual stream stays near unit scale.
        return rng.uniform(0.5, 1.5, shape) * (0.2 if "conv3" in key else 1.0)
    if key.endswith("cls_embedding.weight"):
        return rng.normal(0, 1, shape)
    if key.endswith("cls_score.weight") or key.endswith("attr_score.weight"):
        w = rng.normal(0, 3 / np.sqrt(fan_in), shape)
        return w - w.mean(axis=1, keepdims=True)
    if key.endswith("anchor_deltas.weight") or key.endswith("bbox_pred.weight"):
        return rng.normal(0, 0.2 / np.sqrt(fan_in), shape)
    if key == "backbone.stem.conv1.weight":
        # Pixels minus their means span about +-128.
        return rng.normal(0, np.sqrt(1 / fan_in) / 64, shape)
    if key.endswith("weight"):
        return rng.normal(0, np.sqrt(2 / fan_in), shape)
    return rng.normal(0, 0.01, shape)


def tiny_detector_state_dict(seed=0, num_classes=1600, num_attributes=400):
    """A random state dict that `detector.load_detector` accepts: few blocks, narrow widths, and
    the published checkpoint's names, including its unused `num_batches_tracked` and anchors."""
    arch = dict(TINY_ARCH, classes=num_classes, attributes=num_attributes)
    rng = np.random.RandomState(seed)
    state_dict = {}
    for key, value in BottomUpDetector(arch).state_dict().items():
        state_dict[key] = torch.from_numpy(_draw(key, tuple(value.shape), rng).astype(np.float32))
        if key.endswith("norm.running_var"):
            state_dict[key[: -len("running_var")] + "num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    state_dict["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(12, 4)
    return state_dict
