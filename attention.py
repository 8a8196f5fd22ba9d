"""What VSRN's final image representation attends to (paper, Sec. 4.5), drawn over the picture.

The inner product of each GCN region feature V*_i with the final image embedding I ranks the k
regions (rank 1 = highest); region i gets s_i = lam * (k - r_i)^2 (lam = 50) and a pixel the sum
of s_i over the boxes that contain it. The map is the image's own, whatever the query.

The picture is drawn at a readable size, the map shown by dimming the photo where the map is
low, the top-ranked boxes outlined and numbered (utils.figures); figures of one picture or of a
gallery carry a title, captions and a brightness scale.
"""

import os
from dataclasses import dataclass

import numpy as np

from data import caption_images_of, read_image_ids, read_region_boxes
from inference import encode_regions
from utils.captions import read_captions
from utils.errors import DataError, OptionError
from utils.figures import DIM, compose, dim_outside, outline_boxes, resize_longer_side
from utils.images import pillow, read_image

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
MAP_SIDE = 640  # pixels of the longer side of a picture drawn alone
TILE_SIDE = 400  # and of each picture of a gallery
GALLERY_COLUMNS = 3
SCALE_NOTE = (
    f"Brightness shows each picture's attention map (the image's own, whatever the query): the photo as it "
    f"is where the map peaks, dimmed to {DIM:.0%} where it is 0. The map sums lambda (k - r)^2 over the boxes "
    "that hold a pixel (r: a region's rank by the inner product of its GCN feature with the image embedding). "
    "Numbered: the boxes of the top-ranked regions."
)


def region_ranks(scores):
    """Rank of each region by descending score, 1 for the highest; ties rank in region order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def region_attention_map(scores, boxes, height, width, lam=50.0):
    """(height, width) map: the sum of lam * (k - r_i)^2 over the boxes (x1 y1 x2 y2, pixels) that
    contain each pixel; pixel (row y, column x) lies in a box when x1 <= x + 0.5 < x2 and y1 <= y + 0.5 < y2."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(scores)} scores for {len(boxes)} boxes")
    weights = lam * (len(scores) - region_ranks(scores)) ** 2
    columns, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    attention = np.zeros((height, width), dtype=np.float64)
    for weight, (x1, y1, x2, y2) in zip(weights, boxes):
        # Pixel centres are exact halves, so these bounds are exactly the containment rule.
        left, right = np.searchsorted(columns, [x1, x2], side="left")
        top, bottom = np.searchsorted(rows, [y1, y2], side="left")
        attention[top:bottom, left:right] += weight
    return attention


@dataclass
class Tile:
    """A picture with its attention map: the image, the map at its pixels, its rank labels' rectangles."""

    image: object
    attention: np.ndarray
    labels: list


def render_attention(picture, scores, boxes, size, lam=50.0, top_boxes=3, side=MAP_SIDE, names=None):
    """The picture scaled to a longer side of `side` pixels and dimmed where its attention map is low
    (utils.figures.dim_outside), the boxes of its `top_boxes` highest-ranked regions outlined and
    labelled with their rank, followed by their name from `names` (one per region) when given (a Tile).

    `boxes` are in the pixels of `size` (height, width), the image the features were extracted
    from; they are scaled to the drawn picture, and the map is computed at its pixels.
    """
    picture = resize_longer_side(picture, side)
    width, height = picture.size
    scale = np.array([width / size[1], height / size[0]] * 2)
    boxes = np.asarray(boxes, dtype=np.float64) * scale
    attention = region_attention_map(scores, boxes, height, width, lam)
    image = pillow().Image.fromarray(dim_outside(np.asarray(picture), attention), "RGB")
    ranks = region_ranks(scores)
    top = np.argsort(ranks, kind="stable")[:top_boxes]
    texts = [f"{ranks[region]}" + (f" {names[region]}" if names is not None else "") for region in top]
    labels = outline_boxes(image, boxes[top], texts)
    return Tile(image, attention, labels)


def open_picture(path):
    """The picture as the detector saw it (upright, RGB; utils.images.read_image), as a Pillow image."""
    return pillow().Image.fromarray(read_image(path), "RGB")


def find_picture(image_dir, image_id, pattern=None):
    """The file of image `image_id` in `image_dir`: `pattern` formatted with it (a number when it is
    digits), else <id>.jpg / .png."""
    if pattern:
        try:
            names = [pattern.format(int(image_id) if image_id.isdigit() else image_id)]
        except (ValueError, IndexError, KeyError):
            raise OptionError(f"--image_pattern {pattern}: cannot format the image id {image_id!r} with it") from None
    else:
        names = [image_id + suffix for suffix in IMAGE_SUFFIXES]
    for name in names:
        path = os.path.join(image_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"{image_dir}: no picture of image {image_id} (looked for {', '.join(names[:3])}; see --image_pattern)"
    )


class SplitPictures:
    """Boxes, sizes, ids and pictures of a converted split, or a DataError that names everything missing."""

    def __init__(self, folder, split, image_dir, pattern=None):
        missing = []
        if not image_dir:
            missing.append("--image_dir (the folder of the split's pictures)")
        absent = [
            f"{split}_{name}"
            for name in ("boxes.npy", "image_sizes.npy", "image_ids.txt")
            if not os.path.isfile(os.path.join(folder, f"{split}_{name}"))
        ]
        if absent:
            missing.append(
                f"{', '.join(absent)} in {folder} (written by utils.tsv_to_precomp; "
                "SCAN's precomputed features have no boxes)"
            )
        if image_dir and not os.path.isdir(image_dir):
            missing.append(f"the folder --image_dir {image_dir}")
        if missing:
            raise DataError(
                f"an attention map needs the pictures and their region boxes; missing: {'; '.join(missing)}"
            )
        self.boxes, self.sizes = read_region_boxes(folder, split, "an attention map")
        self.ids = read_image_ids(folder, split)
        self.image_dir, self.pattern = image_dir, pattern

    def picture(self, index):
        return open_picture(find_picture(self.image_dir, self.ids[index], self.pattern))


class OwnPhotos:
    """Pictures of your own with their regions (detection.cache.photo_regions' ids, paths, regions)."""

    def __init__(self, ids, paths, regions):
        self.ids, self.paths = ids, paths
        self.features = [r["features"] for r in regions]
        self.boxes = [r["boxes"] for r in regions]
        self.sizes = [(r["img_h"], r["img_w"]) for r in regions]

    def picture(self, index):
        return open_picture(self.paths[index])


def attention_tile(model, features, pictures, index, lam=50.0, top_boxes=3, side=MAP_SIDE):
    """(the Tile of image `index` of `pictures` (SplitPictures or OwnPhotos), its embedding (1, D))."""
    embedding, scores = encode_regions(model, features[index][None])
    tile = render_attention(
        pictures.picture(index),
        scores[0].cpu().numpy(),
        pictures.boxes[index],
        pictures.sizes[index],
        lam,
        top_boxes,
        side,
    )
    return tile, embedding.cpu()


def first_caption(folder, split, index, num_images):
    """Image `index`'s first caption (five captions per image, one, or as SPLIT_caption_images.npy says),
    or None without a caption file."""
    path = os.path.join(folder, f"{split}_caps.txt")
    if not os.path.isfile(path):
        return None
    captions = read_captions(path)
    caption_images, _ = caption_images_of(folder, split, len(captions), num_images)
    return captions[int(np.searchsorted(caption_images, index))]


def gallery_figure(title, model, features, pictures, scores, top, lam=50.0, top_boxes=3):
    """The `top` images of `pictures` (best first), each drawn with its map under its rank, id and score."""
    tiles = [attention_tile(model, features, pictures, index, lam, top_boxes, TILE_SIDE)[0].image for index in top]
    captions = [
        f"{place}. {pictures.ids[index]}, score {scores[index]:.3f}" for place, index in enumerate(top, start=1)
    ]
    return compose(title, tiles, captions, GALLERY_COLUMNS, SCALE_NOTE)
