"""The detector's weights: a torch state dict, detectron2's .pkl of numpy arrays, or a dict; read
safely, checked against the architecture their shapes describe, refused in one line otherwise."""

import os
import pickle
import re

import numpy as np
import torch

from detection.network import BottomUpDetector
from utils.checkpoint import load_checkpoint, safe_torch_load
from utils.errors import CheckpointError

# Keys the architecture is read from; a state dict without them is not this detector.
_ARCH_KEYS = (
    "backbone.stem.conv1.weight",
    "backbone.res2.0.conv1.weight",
    "backbone.res2.0.conv3.weight",
    "backbone.res3.0.conv1.weight",
    "backbone.res3.0.conv3.weight",
    "backbone.res4.0.conv1.weight",
    "backbone.res4.0.conv3.weight",
    "roi_heads.res5.0.conv1.weight",
    "roi_heads.res5.0.conv3.weight",
    "proposal_generator.rpn_head.conv.weight",
    "proposal_generator.rpn_head.objectness_logits.weight",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.cls_embedding.weight",
    "roi_heads.box_predictor.fc_attr.weight",
    "roi_heads.box_predictor.attr_score.weight",
)
# In the checkpoint but not learned: the anchors are computed, batch norm is frozen.
_IGNORED = re.compile(r"(^|\.)(cell_anchors\.\d+|num_batches_tracked)$")


def _few(keys, limit=3):
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _blocks(state_dict, prefix):
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for key in state_dict for m in [pattern.match(key)] if m]
    return max(found) + 1 if found else 0


def architecture(state_dict, name="state dict"):
    """Depths, widths and class counts of the detector a state dict holds."""
    missing = [key for key in _ARCH_KEYS if key not in state_dict]
    if missing:
        raise CheckpointError(f"{name}: not a bottom-up-attention detector: missing {_few(missing)}")
    flat = [key for key in _ARCH_KEYS if state_dict[key].dim() < 2]
    if flat:
        raise CheckpointError(
            f"{name}: does not fit the bottom-up-attention detector: misshapen {_few(flat)} (not a matrix)"
        )

    def stage(prefix):
        return (
            _blocks(state_dict, prefix),
            state_dict[f"{prefix}.0.conv1.weight"].shape[0],
            state_dict[f"{prefix}.0.conv3.weight"].shape[0],
        )

    predictor = "roi_heads.box_predictor."
    return {
        "stem": state_dict["backbone.stem.conv1.weight"].shape[0],
        "res2": stage("backbone.res2"),
        "res3": stage("backbone.res3"),
        "res4": stage("backbone.res4"),
        "res5": stage("roi_heads.res5"),
        "rpn_hidden": state_dict["proposal_generator.rpn_head.conv.weight"].shape[0],
        "anchors": state_dict["proposal_generator.rpn_head.objectness_logits.weight"].shape[0],
        "classes": state_dict[predictor + "cls_score.weight"].shape[0] - 1,
        "embedding": state_dict[predictor + "cls_embedding.weight"].shape[1],
        "attr_hidden": state_dict[predictor + "fc_attr.weight"].shape[0],
        "attributes": state_dict[predictor + "attr_score.weight"].shape[0] - 1,
    }


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays (and the plain containers around them), nothing that runs code."""

    ALLOWED = {
        (module, name)
        for prefix in ("numpy.core", "numpy._core")
        for module, name in (
            (f"{prefix}.multiarray", "_reconstruct"),
            (f"{prefix}.multiarray", "scalar"),
            (f"{prefix}.numeric", "_frombuffer"),
        )
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"it needs the global {module}.{name}")


def _read_pickle(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with open(path, "rb") as f:
            # Detectron's pickles come from Python 2: bytes are latin-1.
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise CheckpointError(f"{path}: refusing to load: {e} (a detectron2 .pkl holds numpy arrays only)") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
    ) as e:
        raise CheckpointError(
            f"{path}: not a complete pickle (truncated or another format: {type(e).__name__}: {e})"
        ) from None


def _unwrap(loaded):
    """The name -> array mapping, also inside detectron2's {'model': {...}} wrapper."""
    while isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    return loaded


def _read_torch_file(path):
    """A torch file's content; a VSRN checkpoint (whose options no detector file holds) is named as such."""
    try:
        return safe_torch_load(path, "cpu", kind="detector checkpoint")
    except CheckpointError:
        if not _is_vsrn_checkpoint(path):
            raise
    raise CheckpointError(
        f"{path}: a VSRN checkpoint (it holds 'model' and 'opt'), not the detector's weights: give the "
        "bottom-up-attention detector's pytorch_model.bin (unc-nlp/frcnn-vg-finetuned) or "
        "faster_rcnn_from_caffe_attr.pkl"
    )


def _is_vsrn_checkpoint(path):
    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def read_state_dict(weights):
    """A state dict of tensors from a `.bin`/`.pth` torch file, a detectron2 `.pkl`, or a dict."""
    name = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "state dict"
    if isinstance(weights, dict):
        loaded = weights
    elif str(name).endswith(".pkl"):
        loaded = _read_pickle(name)
    else:
        loaded = _read_torch_file(name)
    loaded = _unwrap(loaded)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{name}: expected a state dict of the detector, found {type(loaded).__name__}")
    state_dict, bad = {}, []
    for key, value in loaded.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not torch.is_tensor(value):
            bad.append(str(key))
            continue
        state_dict[str(key)] = value
    if bad:
        raise CheckpointError(f"{name}: not a state dict of arrays: {_few(bad)} hold no tensor")
    return state_dict, name


def load_detector(weights, config=None, device="cpu"):
    """The detector (eval mode, on `device`) with the weights of `weights`.

    weights: `pytorch_model.bin` (a torch state dict, read with weights_only=True), a detectron2
    `.pkl` (numpy arrays under the same names, read by an unpickler that admits nothing else), or
    a state dict. config: the published config.yaml's path, a dict, or None for its values.
    """
    state_dict, name = read_state_dict(weights)
    state_dict = {k: v for k, v in state_dict.items() if not _IGNORED.search(k)}
    arch = architecture(state_dict, name)
    detector = BottomUpDetector(arch, config)
    anchors = len(detector.config["anchor_generator"]["sizes"][0]) * len(
        detector.config["anchor_generator"]["aspect_ratios"][0]
    )
    if arch["anchors"] != anchors:
        raise CheckpointError(
            f"{name}: proposal_generator.rpn_head.objectness_logits.weight has {arch['anchors']} anchors, "
            f"the config {anchors}"
        )
    expected = detector.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{label} {_few(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{name}: does not fit the bottom-up-attention detector: " + "; ".join(problems))
    detector.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return detector.to(device).eval()
