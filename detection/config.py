"""The detector's configuration: the published config.yaml's values, overridden by a user's."""

import os

from utils.errors import CheckpointError, first_line

# The published config.yaml's values that inference uses (keys in lower case).
PUBLISHED_CONFIG = {
    "model": {"pixel_mean": [102.9801, 115.9465, 122.7717], "pixel_std": [1.0, 1.0, 1.0]},
    "input": {"min_size_test": 800, "max_size_test": 1333},
    "anchor_generator": {"sizes": [[64, 128, 256, 512]], "aspect_ratios": [[0.5, 1.0, 2.0]]},
    "proposal_generator": {"min_size": 0.0},
    "rpn": {
        "pre_nms_topk_test": 6000,
        "post_nms_topk_test": 300,
        "nms_thresh": 0.7,
        "bbox_reg_weights": [1.0, 1.0, 1.0, 1.0],
    },
    "roi_heads": {"nms_thresh_test": [0.5, 0.6, 0.7]},
    "roi_box_head": {"bbox_reg_weights": [10.0, 10.0, 5.0, 5.0], "pooler_resolution": 14, "res5halve": False},
    "min_detections": 36,
    "max_detections": 36,
}


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
        raise CheckpointError(f"{path}: not a readable YAML config ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected the detector's config.yaml (a mapping), found {type(config).__name__}")
    return config
