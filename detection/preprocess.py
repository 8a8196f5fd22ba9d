"""Network inputs from RGB pictures: the LXMERT demo's resize (hf) and py-faster-rcnn's (caffe)."""

import numpy as np
import torch
import torch.nn.functional as F

from detection.config import PUBLISHED_CONFIG

# py-faster-rcnn's test scales in bottom-up-attention's generate_tsv.py.
CAFFE_SCALE, CAFFE_MAX_SIZE = 600, 1000
# The stem's stride-2 convolution and unpadded 3x3 pooling need 3 input pixels on each side.
MIN_INPUT_SIDE = 3


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
