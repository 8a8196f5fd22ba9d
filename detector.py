"""The bottom-up-attention Faster R-CNN (Anderson et al., CVPR 2018) that made VSRN's and LXMERT's features.

ResNet-101 C4 with frozen batch norm, an RPN on res4 (12 anchors), RoI pooling 14x14 at 1/16,
res5 on each region (stride 1, dilation 2, as the Visual Genome model has it) mean-pooled to the
region feature, heads for 1600 objects + background (LAST, as in the published PyTorch
conversion), class-specific boxes and 400 attributes + "no attribute" (last).

Module and parameter names are those of the published checkpoint (`unc-nlp/frcnn-vg-finetuned`,
`pytorch_model.bin`), and every width and depth is read off its shapes, so a small state dict
gives a small detector.

Two ways to choose the regions (`POLICIES`):
- 'caffe': the `generate_tsv.py` procedure of bottom-up-attention on py-faster-rcnn, with which
  SCAN's and LXMERT's features were made;
- 'hf': the LXMERT demo's pipeline (its `modeling_frcnn.py` with the published `config.yaml`).
"""
import math
import os
import pickle
import re
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, box_iou, nms, roi_pool

from utils.checkpoint import safe_torch_load
from utils.errors import CheckpointError, DataError, OptionError

POLICIES = ("caffe", "hf")

# The published config.yaml's values that inference uses (keys in lower case).
PUBLISHED_CONFIG = {
    "model": {"pixel_mean": [102.9801, 115.9465, 122.7717], "pixel_std": [1.0, 1.0, 1.0]},
    "input": {"min_size_test": 800, "max_size_test": 1333},
    "anchor_generator": {"sizes": [[64, 128, 256, 512]], "aspect_ratios": [[0.5, 1.0, 2.0]]},
    "proposal_generator": {"min_size": 0.0},
    "rpn": {"pre_nms_topk_test": 6000, "post_nms_topk_test": 300, "nms_thresh": 0.7, "bbox_reg_weights": [1.0, 1.0, 1.0, 1.0]},
    "roi_heads": {"nms_thresh_test": [0.5, 0.6, 0.7]},
    "roi_box_head": {"bbox_reg_weights": [10.0, 10.0, 5.0, 5.0], "pooler_resolution": 14, "res5halve": False},
    "min_detections": 36,
    "max_detections": 36,
}

# The published checkpoint's architecture, as `architecture` reads it off its state dict.
PUBLISHED_ARCH = {
    "stem": 64, "res2": (3, 64, 256), "res3": (4, 128, 512), "res4": (23, 256, 1024), "res5": (3, 512, 2048),
    "rpn_hidden": 512, "anchors": 12, "classes": 1600, "embedding": 256, "attr_hidden": 512, "attributes": 400,
}

# py-faster-rcnn's test settings in bottom-up-attention's generate_tsv.py.
CAFFE_SCALE, CAFFE_MAX_SIZE = 600, 1000
CAFFE_PRE_NMS, CAFFE_POST_NMS, CAFFE_RPN_NMS, CAFFE_RPN_MIN_SIZE = 6000, 300, 0.7, 16
CAFFE_CLASS_NMS = 0.3
CAFFE_ANCHOR_BASE = 16
FEATURE_STRIDE = 16
# detectron2's clamp on the log-size deltas (py-faster-rcnn has none).
SCALE_CLAMP = math.log(1000.0 / 16)
# The stem's stride-2 convolution and unpadded 3x3 pooling need 3 input pixels on each side.
MIN_INPUT_SIDE = 3
# Regions through res5 at once: bounds memory (a region's res5 activations are 1.6 MB in fp32).
# On the CPU, chunks of 16 keep each activation under glibc's mmap threshold, so that memory is
# reused instead of mapped afresh (a third less system time than 64, same compute).
RES5_CHUNK = {"cpu": 16, "cuda": 512}


# ----------------------------------------------------------------------------- the network

class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by frozen batch norm (`NAME.weight`, `NAME.norm.*`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x):
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride in the first 1x1 convolution (as in the Caffe ResNets)."""

    def __init__(self, in_channels, width, out_channels, stride=1, dilation=1, shortcut=False):
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride) if shortcut else None
        self.conv1 = ConvNorm(in_channels, width, 1, stride)
        self.conv2 = ConvNorm(width, width, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(width, out_channels, 1)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def resnet_stage(blocks, in_channels, width, out_channels, stride, dilation=1):
    layers = [Bottleneck(in_channels, width, out_channels, stride, dilation, shortcut=True)]
    layers += [Bottleneck(out_channels, width, out_channels, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    def __init__(self, out_channels):
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3)

    def forward(self, x):
        # Caffe's pooling: no padding, ceil mode.
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """Stem, res2, res3, res4: the image to res4 at 1/16."""

    def __init__(self, arch):
        super().__init__()
        self.stem = Stem(arch["stem"])
        channels = arch["stem"]
        for name, stride in (("res2", 1), ("res3", 2), ("res4", 2)):
            blocks, width, out = arch[name]
            setattr(self, name, resnet_stage(blocks, channels, width, out, stride))
            channels = out

    def forward(self, x):
        return self.res4(self.res3(self.res2(self.stem(x))))


class RPNHead(nn.Module):
    def __init__(self, in_channels, hidden, num_anchors):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden, num_anchors * 4, 1)

    def forward(self, x):
        """(N, C, H, W) -> objectness logits (N, H*W*A) and deltas (N, H*W*A, 4): location-major, anchor-minor."""
        t = F.relu(self.conv(x))
        n, _, h, w = x.shape
        logits = self.objectness_logits(t).permute(0, 2, 3, 1).reshape(n, -1)
        deltas = self.anchor_deltas(t).view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        # Boxes are computed in fp32 also under autocast (bf16 would round them to pixels and more).
        return logits.float(), deltas.float()


class ProposalGenerator(nn.Module):
    def __init__(self, in_channels, hidden, num_anchors):
        super().__init__()
        self.rpn_head = RPNHead(in_channels, hidden, num_anchors)


class BoxPredictor(nn.Module):
    """Object logits, class-specific box deltas, and attribute logits conditioned on the best class."""

    def __init__(self, in_channels, num_classes, embedding, attr_hidden, num_attributes):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes + 1, embedding)
        self.fc_attr = nn.Linear(in_channels + embedding, attr_hidden)
        self.attr_score = nn.Linear(attr_hidden, num_attributes + 1)

    def forward(self, features):
        """(R, D) -> object logits (R, C+1, background last), attribute logits (R, A+1, none last)."""
        obj_logits = self.cls_score(features)
        # The class embedding of the best class, background included, as the Caffe net's ArgMax.
        embedded = self.cls_embedding(obj_logits.argmax(dim=1))
        attr_logits = self.attr_score(F.relu(self.fc_attr(torch.cat([features, embedded], dim=1))))
        return obj_logits, attr_logits

    def box_deltas(self, features, classes):
        """The box deltas (R, 4) of one class per region, without computing all the others."""
        weight = self.bbox_pred.weight.view(-1, 4, features.shape[1])[classes]
        bias = self.bbox_pred.bias.view(-1, 4)[classes]
        return (torch.einsum("rd,rkd->rk", features, weight) + bias).float()


class ROIHeads(nn.Module):
    def __init__(self, arch, res5_halve=False):
        super().__init__()
        blocks, width, out = arch["res5"]
        # The Visual Genome model keeps res5 at 14x14: stride 1 and dilation 2 (unless res5halve).
        stride, dilation = (2, 1) if res5_halve else (1, 2)
        self.res5 = resnet_stage(blocks, arch["res4"][2], width, out, stride, dilation)
        self.box_predictor = BoxPredictor(out, arch["classes"], arch["embedding"], arch["attr_hidden"], arch["attributes"])


class BottomUpDetector(nn.Module):
    """The network; `extract_regions` runs it. Build it with `load_detector`."""

    def __init__(self, arch, config=None):
        super().__init__()
        self.config = merged_config(config)
        self.arch = arch
        self.backbone = Backbone(arch)
        self.proposal_generator = ProposalGenerator(arch["res4"][2], arch["rpn_hidden"], arch["anchors"])
        self.roi_heads = ROIHeads(arch, self.config["roi_box_head"]["res5halve"])
        self.pooler_resolution = int(self.config["roi_box_head"]["pooler_resolution"])

    @property
    def device(self):
        return self.backbone.stem.conv1.weight.device

    def region_features(self, res4, rois):
        """RoI-pooled res4 (rois: (R, 5) batch index, x1 y1 x2 y2 in network-input pixels) -> (R, D)."""
        pooled = roi_pool(res4, rois, self.pooler_resolution, 1.0 / FEATURE_STRIDE)
        return self.res5_mean(pooled)

    def res5_mean(self, pooled):
        """res5 on each pooled region, then the mean over its positions; in chunks to bound memory."""
        chunk = RES5_CHUNK.get(pooled.device.type, RES5_CHUNK["cpu"])
        res5 = self.roi_heads.res5
        out = [res5(part).mean(dim=(2, 3)) for part in pooled.split(chunk)] if len(pooled) else []
        return torch.cat(out) if out else pooled.new_zeros((0, self.arch["res5"][2]))


# ----------------------------------------------------------------------------- configuration

def _lower_keys(value):
    if isinstance(value, dict):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    return value


def _merge(base, override):
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def merged_config(config):
    """The published values overridden by `config` (a dict or a config.yaml path; any key case)."""
    if config is None:
        return _merge(PUBLISHED_CONFIG, {})
    if isinstance(config, (str, os.PathLike)):
        config = read_config(config)
    return _merge(PUBLISHED_CONFIG, _lower_keys(config))


def read_config(path):
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: detector config not found") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected the detector's config.yaml (a mapping), found {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------- loading

# Keys the architecture is read from; a state dict without them is not this detector.
_ARCH_KEYS = (
    "backbone.stem.conv1.weight",
    "backbone.res2.0.conv1.weight", "backbone.res2.0.conv3.weight",
    "backbone.res3.0.conv1.weight", "backbone.res3.0.conv3.weight",
    "backbone.res4.0.conv1.weight", "backbone.res4.0.conv3.weight",
    "roi_heads.res5.0.conv1.weight", "roi_heads.res5.0.conv3.weight",
    "proposal_generator.rpn_head.conv.weight", "proposal_generator.rpn_head.objectness_logits.weight",
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_embedding.weight",
    "roi_heads.box_predictor.fc_attr.weight", "roi_heads.box_predictor.attr_score.weight",
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
        raise CheckpointError(f"{name}: does not fit the bottom-up-attention detector: misshapen {_few(flat)} (not a matrix)")

    def stage(prefix):
        return (_blocks(state_dict, prefix), state_dict[f"{prefix}.0.conv1.weight"].shape[0], state_dict[f"{prefix}.0.conv3.weight"].shape[0])

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
        for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.multiarray", "scalar"), (f"{prefix}.numeric", "_frombuffer"))
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
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a complete pickle (truncated or another format: {type(e).__name__}: {e})") from None


def _unwrap(loaded):
    """The name -> array mapping, also inside detectron2's {'model': {...}} wrapper."""
    while isinstance(loaded, dict) and "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    return loaded


def read_state_dict(weights):
    """A state dict of tensors from a `.bin`/`.pth` torch file, a detectron2 `.pkl`, or a dict."""
    name = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "state dict"
    if isinstance(weights, dict):
        loaded = weights
    elif str(name).endswith(".pkl"):
        loaded = _read_pickle(name)
    else:
        loaded = safe_torch_load(name, "cpu", kind="detector checkpoint")
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
    anchors = len(detector.config["anchor_generator"]["sizes"][0]) * len(detector.config["anchor_generator"]["aspect_ratios"][0])
    if arch["anchors"] != anchors:
        raise CheckpointError(
            f"{name}: proposal_generator.rpn_head.objectness_logits.weight has {arch['anchors']} anchors, the config {anchors}"
        )
    expected = detector.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [f"{label} {_few(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if problems:
        raise CheckpointError(f"{name}: does not fit the bottom-up-attention detector: " + "; ".join(problems))
    detector.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return detector.to(device).eval()


# ----------------------------------------------------------------------------- boxes

def hf_cell_anchors(sizes, ratios):
    """detectron2's anchors: centred at 0, unrounded; size-major, as the checkpoint's channels."""
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def caffe_cell_anchors(sizes, ratios, base=CAFFE_ANCHOR_BASE):
    """py-faster-rcnn's `generate_anchors` (widths rounded on the base box, centred at 7.5), in
    the checkpoint's channel order (size-major: detectron2's order, into which the conversion
    put the Caffe model's ratio-major anchors)."""
    centre = (base - 1) / 2.0
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = np.round(np.sqrt(base * base / ratio))
            h = np.round(w * ratio)
            w, h = w * size / base, h * size / base
            anchors.append([centre - 0.5 * (w - 1), centre - 0.5 * (h - 1), centre + 0.5 * (w - 1), centre + 0.5 * (h - 1)])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell_anchors, height, width, stride=FEATURE_STRIDE):
    """The cell anchors at every res4 position: (H*W*A, 4), location-major like the RPN's outputs."""
    device = cell_anchors.device
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0), caffe=False):
    """Apply (dx, dy, dw, dh) deltas to boxes. caffe: py-faster-rcnn's `bbox_transform_inv`
    (widths x2 - x1 + 1, no clamp); else detectron2's (widths x2 - x1, log-sizes clamped)."""
    one = 1.0 if caffe else 0.0
    widths = boxes[:, 2] - boxes[:, 0] + one
    heights = boxes[:, 3] - boxes[:, 1] + one
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy, dw, dh = deltas[:, 0] / wx, deltas[:, 1] / wy, deltas[:, 2] / ww, deltas[:, 3] / wh
    if not caffe:
        dw, dh = dw.clamp(max=SCALE_CLAMP), dh.clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=1)


def clip_boxes(boxes, height, width, caffe=False):
    """Into the image: [0, w] x [0, h] (detectron2), or [0, w - 1] x [0, h - 1] (py-faster-rcnn)."""
    one = 1 if caffe else 0
    x = boxes[:, 0::2].clamp(min=0, max=width - one)
    y = boxes[:, 1::2].clamp(min=0, max=height - one)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def plus_one(boxes):
    """Boxes whose torchvision IoU is py-faster-rcnn's (areas (x2 - x1 + 1) (y2 - y1 + 1))."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- preprocessing

def hf_resize_shape(height, width, short, longest):
    """The demo's ResizeShortestEdge: scale the shortest side to `short`, cap the longest, round half up."""
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > longest:
        cap = longest / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def hf_input(image, config, min_size, max_size):
    """RGB uint8 (H, W, 3) -> the demo's BGR network input (3, h, w) and its scales_yx (raw / resized)."""
    bgr = torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).float()
    height, width = image.shape[:2]
    new_h, new_w = hf_resize_shape(height, width, min_size, max_size)
    x = F.interpolate(bgr.permute(2, 0, 1).unsqueeze(0), (new_h, new_w), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(config["model"]["pixel_mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config["model"]["pixel_std"], dtype=torch.float32).view(3, 1, 1)
    scales_yx = torch.tensor([height, width]).true_divide(torch.tensor([new_h, new_w]))
    return (x - mean) / std, scales_yx


def caffe_scale(height, width, short=CAFFE_SCALE, longest=CAFFE_MAX_SIZE):
    """py-faster-rcnn's `_get_image_blob` scale and cv2.resize's output size (rounded half to even)."""
    scale = float(short) / float(min(height, width))
    if np.round(scale * max(height, width)) > longest:
        scale = float(longest) / float(max(height, width))
    return scale, int(round(height * scale)), int(round(width * scale))


def _linear_taps(out_size, in_size, scale):
    """cv2.INTER_LINEAR's source taps for one axis at the given scale (not the size ratio)."""
    src = ((np.arange(out_size, dtype=np.float64) + 0.5) * (1.0 / scale) - 0.5).astype(np.float32)
    low = np.floor(src)
    frac = (src - low).astype(np.float32)
    low = low.astype(np.int64)
    frac[low < 0] = 0
    low[low < 0] = 0
    frac[low >= in_size - 1] = 0
    low[low >= in_size - 1] = in_size - 1
    high = np.minimum(low + 1, in_size - 1)
    return torch.from_numpy(low), torch.from_numpy(high), torch.from_numpy(frac)


def caffe_input(image, short=CAFFE_SCALE, longest=CAFFE_MAX_SIZE):
    """RGB uint8 (H, W, 3) -> py-faster-rcnn's network input (3, h, w): BGR minus the pixel means,
    resized by cv2.resize(fx=fy=scale, INTER_LINEAR); and the scale."""
    height, width = image.shape[:2]
    scale, new_h, new_w = caffe_scale(height, width, short, longest)
    x = torch.from_numpy(np.ascontiguousarray(image[..., ::-1])).float()
    x = (x - torch.tensor(PUBLISHED_CONFIG["model"]["pixel_mean"], dtype=torch.float32)).permute(2, 0, 1)
    lo, hi, frac = _linear_taps(new_w, width, scale)
    x = x[:, :, lo] * (1 - frac) + x[:, :, hi] * frac
    lo, hi, frac = _linear_taps(new_h, height, scale)
    x = x[:, lo, :] * (1 - frac)[:, None] + x[:, hi, :] * frac[:, None]
    return x.contiguous(), scale


# ----------------------------------------------------------------------------- proposals

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


# ----------------------------------------------------------------------------- selection

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


# ----------------------------------------------------------------------------- extraction

def _as_rgb_array(image):
    if isinstance(image, (str, os.PathLike)):
        from utils.images import read_image

        return read_image(image)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an RGB uint8 image array (H, W, 3), got {image.dtype} {image.shape}")
    return image


class _Plan:
    """One policy's settings, with the caller's overrides."""

    def __init__(self, detector, policy, num_boxes, min_boxes, max_boxes, conf_thresh, min_size, max_size, proposals):
        if policy not in POLICIES:
            raise OptionError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        config = detector.config
        self.policy, self.config = policy, config
        caffe = policy == "caffe"
        self.min_size = int(min_size or (CAFFE_SCALE if caffe else config["input"]["min_size_test"]))
        self.max_size = int(max_size or (CAFFE_MAX_SIZE if caffe else config["input"]["max_size_test"]))
        self.post_nms = int(proposals or (CAFFE_POST_NMS if caffe else config["rpn"]["post_nms_topk_test"]))
        default = (min_boxes, max_boxes) if caffe else (int(config["min_detections"]), int(config["max_detections"]))
        # (fewest, most) regions per image.
        self.boxes = (num_boxes, num_boxes) if num_boxes is not None else default
        self.conf_thresh = conf_thresh
        sizes, ratios = config["anchor_generator"]["sizes"][0], config["anchor_generator"]["aspect_ratios"][0]
        cell = caffe_cell_anchors(sizes, ratios) if caffe else hf_cell_anchors(sizes, ratios)
        self.cell_anchors = cell.to(detector.device)

    def prepare(self, image):
        """-> network input (3, h, w), the factors (y, x) from its pixels to the image's, and
        py-faster-rcnn's im_scale (caffe; None for hf)."""
        height, width = image.shape[:2]
        new_h, new_w = caffe_scale(height, width, self.min_size, self.max_size)[1:] if self.policy == "caffe" \
            else hf_resize_shape(height, width, self.min_size, self.max_size)
        if min(new_h, new_w) < MIN_INPUT_SIDE:
            raise DataError(
                f"a {height}x{width} picture is too elongated for the detector: resized to {new_h}x{new_w} "
                f"(longest side {self.max_size}), it is under {MIN_INPUT_SIDE} pixels across"
            )
        if self.policy == "caffe":
            x, scale = caffe_input(image, self.min_size, self.max_size)
            return x, (1.0 / scale, 1.0 / scale), scale
        x, scales_yx = hf_input(image, self.config, self.min_size, self.max_size)
        return x, (float(scales_yx[0]), float(scales_yx[1])), None


def _timed(timer, name):
    return timer(name) if timer is not None else nullcontext()


def _backbone_groups(inputs):
    """Indices of the images grouped by network-input shape: equal shapes share one backbone pass
    (no padding, so every image's res4 is the one it has alone)."""
    groups = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def _score(detector, images, plan, timer=None):
    """Every proposal of every image: its box in network-input pixels, feature, object and
    attribute logits, with the image's input and scale factors."""
    device = detector.device
    with _timed(timer, "preprocess"):
        prepared = [plan.prepare(image) for image in images]
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
            anchors = grid_anchors(plan.cell_anchors, features.shape[2], features.shape[3])
            h, w = x.shape[1:]
            if plan.policy == "caffe":
                boxes, _ = caffe_proposals(logits[0], deltas[0], anchors, h, w, scale, plan.post_nms)
            else:
                boxes, _ = hf_proposals(logits[0], deltas[0], anchors, h, w, plan.config, plan.post_nms)
            proposals.append(boxes)
    with _timed(timer, "roi_pool"):
        pooled = torch.cat([
            roi_pool(features, [boxes], detector.pooler_resolution, 1.0 / FEATURE_STRIDE)
            for features, boxes in zip(res4, proposals)
        ])
    with _timed(timer, "res5"):
        features = detector.res5_mean(pooled)
    with _timed(timer, "heads"):
        obj_logits, attr_logits = detector.roi_heads.box_predictor(features)
    counts = [len(boxes) for boxes in proposals]
    return [
        {"proposals": boxes, "features": f, "obj_logits": o, "attr_logits": a, "input": x, "scale_yx": scale_yx, "scale": scale}
        for boxes, f, o, a, (x, scale_yx, scale) in zip(proposals, *(t.split(counts) for t in (features, obj_logits, attr_logits)), prepared)
    ]


def _select(plan, predictor, scored, probs, image, max_conf=None):
    """The regions the policy keeps; probs: the object probabilities without background
    (caffe: and max_conf, from `per_class_max_conf`)."""
    proposals, features = scored["proposals"], scored["features"]
    if plan.policy == "caffe":
        boxes = proposals / scored["scale"]
        keep = select_caffe(max_conf, plan.boxes[0], plan.boxes[1], plan.conf_thresh)
        objects_conf, objects_id = probs[keep].max(dim=1)
        # Caffe's attribute softmax covers all 401 outputs; ids and scores leave "no attribute" out.
        attrs_conf, attrs_id = scored["attr_logits"][keep].float().softmax(dim=1)[:, :-1].max(dim=1)
        boxes = boxes[keep]
    else:
        classes_conf, classes = probs.max(dim=1)
        deltas = predictor.box_deltas(features, classes)
        height, width = scored["input"].shape[1:]
        boxes = clip_boxes(decode_boxes(deltas, proposals, plan.config["roi_box_head"]["bbox_reg_weights"]), height, width)
        thresholds = plan.config["roi_heads"]["nms_thresh_test"]
        thresholds = thresholds if isinstance(thresholds, (list, tuple)) else [thresholds]
        keep = select_hf(boxes, classes_conf, plan.boxes[0], plan.boxes[1], thresholds)
        objects_conf, objects_id = classes_conf[keep], classes[keep]
        # The demo's attribute softmax leaves "no attribute" out.
        attrs_conf, attrs_id = scored["attr_logits"][keep, :-1].float().softmax(dim=1).max(dim=1)
        scale_y, scale_x = scored["scale_yx"]
        boxes = boxes[keep] * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    return {
        "boxes": boxes.float().cpu().numpy(),
        "features": features[keep].float().cpu().numpy(),
        "objects_id": objects_id.cpu().numpy().astype(np.int64),
        "objects_conf": objects_conf.float().cpu().numpy(),
        "attrs_id": attrs_id.cpu().numpy().astype(np.int64),
        "attrs_conf": attrs_conf.float().cpu().numpy(),
        "img_h": int(image.shape[0]),
        "img_w": int(image.shape[1]),
    }


def score_regions(detector, images, policy="caffe", min_size=None, max_size=None, proposals=None):
    """Every proposal before selection, per image (list of RGB uint8 arrays or paths): a dict
    with `proposals` (P, 4) in network-input pixels, `features` (P, D), `obj_logits` (P, C + 1,
    background last), `attr_logits` (P, A + 1, "no attribute" last), `input` (3, h, w) and
    `scale_yx` (image pixels per network-input pixel; caffe: also `scale`, py-faster-rcnn's
    im_scale, network-input pixels per image pixel)."""
    plan = _Plan(detector, policy, None, 10, 100, 0.2, min_size, max_size, proposals)
    arrays = [_as_rgb_array(image) for image in images]
    with torch.inference_mode():
        return _score(detector, arrays, plan) if arrays else []


def extract_regions_batch(detector, images, policy="caffe", num_boxes=None, min_boxes=10, max_boxes=100, conf_thresh=0.2,
                          min_size=None, max_size=None, proposals=None, timer=None):
    """`extract_regions` for a list of images (paths or RGB uint8 arrays), run together: images of
    equal network-input size share the backbone, all regions share res5. Same results as one at a
    time. `timer(stage)`, if given, returns a context manager wrapped around each stage."""
    plan = _Plan(detector, policy, num_boxes, min_boxes, max_boxes, conf_thresh, min_size, max_size, proposals)
    arrays = [_as_rgb_array(image) for image in images]
    if not arrays:
        return []
    predictor = detector.roi_heads.box_predictor
    with torch.inference_mode():
        scored = _score(detector, arrays, plan, timer)
        with _timed(timer, "selection"):
            # Caffe's class c (1..1600) is column c - 1 here: its background, column 0, is our last.
            probs = [s["obj_logits"].float().softmax(dim=1)[:, :-1] for s in scored]
            max_conf = [None] * len(scored)
            if plan.policy == "caffe":
                max_conf = per_class_max_conf_batch([s["proposals"] / s["scale"] for s in scored], probs)
            return [_select(plan, predictor, *args) for args in zip(scored, probs, arrays, max_conf)]


def extract_regions(detector, image, policy="caffe", num_boxes=None, min_boxes=10, max_boxes=100, conf_thresh=0.2,
                    min_size=None, max_size=None, proposals=None):
    """The regions of one image (a path, read with utils.images.read_image, or an RGB uint8 array).

    Returns a dict: boxes (N, 4) float32 x1 y1 x2 y2 in the image's pixels, features (N, D)
    float32, objects_id / attrs_id (N,) int64 (no background / "no attribute"), objects_conf /
    attrs_conf (N,) float32, img_h, img_w. Regions come in the order the policy keeps them.
    None sizes, proposals or num_boxes take the policy's own values (caffe: 600 / 1000 / 300,
    min_boxes..max_boxes regions; hf: the config's 800 / 1333 / 300 and 36 regions).
    """
    return extract_regions_batch(detector, [image], policy, num_boxes, min_boxes, max_boxes, conf_thresh, min_size, max_size, proposals)[0]
