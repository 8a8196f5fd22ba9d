"""A dataset's splits written in the precomputed layout VSRN reads (data.py), with utils.tsv_to_precomp's
writer: features streamed to disk a picture at a time, every file appearing only when whole.

    SPLIT_ims.npy             (pictures, boxes, dim) float32
    SPLIT_caps.txt            the captions, one a line, grouped by picture in picture order
    SPLIT_boxes.npy           (pictures, boxes, 4) float32 x1 y1 x2 y2 in pixels
    SPLIT_image_sizes.npy     (pictures, 2) int64 height, width
    SPLIT_image_ids.txt       each picture's name, as its annotation gives it
    SPLIT_caption_images.npy  (captions,) int64 the picture of each caption: only when the counts are not
                              5 per picture (nor 1), the layouts data.py reads without it
"""

import contextlib
import os

import numpy as np

from dataset_maker.regions import check_regions
from utils.atomic import atomic_write
from utils.tsv_to_precomp import ArrayAppender

LAYOUT_FILES = ("ims.npy", "caps.txt", "boxes.npy", "image_sizes.npy", "image_ids.txt", "caption_images.npy")


def layout_paths(folder, split):
    return {name: os.path.join(folder, f"{split}_{name}") for name in LAYOUT_FILES}


def needs_caption_map(counts):
    """Whether captions-per-picture `counts` need SPLIT_caption_images.npy (data.py reads 5 or 1 a picture without)."""
    return not (all(count == 5 for count in counts) or all(count == 1 for count in counts))


def write_split(folder, split, pictures, regions, shape):
    """Write SPLIT_* of `pictures` (in order), their features from `regions` (dataset_maker.regions), each
    of `shape` (boxes, dim). A caption map an earlier run left that this split no longer needs is removed."""
    paths = layout_paths(folder, split)
    counts = [len(picture.captions) for picture in pictures]
    sizes = []
    with contextlib.ExitStack() as files:
        opened = {
            name: files.enter_context(atomic_write(paths[name], "w" if name.endswith(".txt") else "wb"))
            for name in LAYOUT_FILES[:5]
        }
        features = ArrayAppender(opened["ims.npy"], np.float32, shape)
        boxes = ArrayAppender(opened["boxes.npy"], np.float32, (shape[0], 4))
        for picture in pictures:
            picture_regions = regions.regions(picture)
            picture_features, picture_boxes = check_regions(picture_regions, picture.path, *shape)
            features.append(picture_features)
            boxes.append(picture_boxes)
            sizes.append((int(picture_regions["img_h"]), int(picture_regions["img_w"])))
            opened["image_ids.txt"].write(picture.name + "\n")
            opened["caps.txt"].writelines(caption + "\n" for caption in picture.captions)
        features.finish()
        boxes.finish()
        np.save(opened["image_sizes.npy"], np.asarray(sizes, dtype=np.int64).reshape(-1, 2))
        if needs_caption_map(counts):
            with atomic_write(paths["caption_images.npy"], "wb") as f:
                np.save(f, np.repeat(np.arange(len(pictures), dtype=np.int64), counts))
    if not needs_caption_map(counts):
        with contextlib.suppress(FileNotFoundError):
            os.remove(paths["caption_images.npy"])


def remove_split(folder, split):
    """Remove the files of a split this run has no pictures for (an earlier run's); the names of those removed."""
    removed = []
    for path in layout_paths(folder, split).values():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    return removed
