"""Generate the toy dataset as a user's own images would arrive: pictures, an obj36 TSV, captions.

Each image draws its three toy concepts (see utils.make_toy_data) as labelled shapes; the
boxes of the regions that show a concept lie on its shape, background regions anywhere.
Region features, captions and concepts are make_toy_data's, so a model learns it the same way. A
region's object id is the Visual Genome id of its concept's name, as the detector would name it
(-1 for the one concept Visual Genome's 1600 objects lack, "guitar"); background regions are
"background".

    python3 -m utils.make_toy_images --out data/toy_images [--img_dim 128]

writes OUT/images/<id>.png, OUT/{train,dev,test}_obj36.tsv (LXMERT's 10-field layout) and
OUT/{train,dev,test}_captions.txt (image_id<TAB>caption), ready for utils.tsv_to_precomp.
"""

import argparse
import colorsys
import os
import sys

import numpy as np

if not __package__:
    # run as a file, the project's modules cannot be imported: only as a module from the project's folder
    raise SystemExit(
        (
            f"error: run it from the project's folder as: python3 -m utils.make_toy_images {' '.join(sys.argv[1:])}"
        ).rstrip()
    )

from utils.atomic import atomic_write
from utils.errors import OptionError, VSRNError, report, report_interrupt
from utils.genome import object_id
from utils.make_toy_data import CONCEPTS, REGIONS, SPLITS, make_prototypes, make_split
from utils.options import ScriptHelpFormatter
from utils.obj36 import format_obj36_line

WIDTH, HEIGHT = 240, 160
BACKGROUND = (235, 232, 225)


def concept_colour(concept):
    r, g, b = colorsys.hsv_to_rgb(concept / len(CONCEPTS), 0.55, 0.85)
    return int(255 * r), int(255 * g), int(255 * b)


def layout(rng, concepts):
    """A rectangle (x1, y1, x2, y2) per concept, side by side in a random order."""
    column = WIDTH / len(concepts)
    rectangles = {}
    for slot, concept in enumerate(rng.permutation(concepts)):
        width = column * rng.uniform(0.65, 0.9)
        height = HEIGHT * rng.uniform(0.45, 0.85)
        x1 = slot * column + rng.uniform(0, column - width)
        y1 = rng.uniform(0, HEIGHT - height)
        rectangles[int(concept)] = (x1, y1, x1 + width, y1 + height)
    return rectangles


def region_boxes(rng, owners, rectangles):
    """Boxes of the regions: a large part of their concept's rectangle, or anywhere for background."""
    boxes = np.empty((len(owners), 4), dtype=np.float32)
    for region, owner in enumerate(owners):
        x1, y1, x2, y2 = rectangles.get(int(owner), (0, 0, WIDTH, HEIGHT))
        share = rng.uniform(0.5, 1.0, size=2) if owner >= 0 else rng.uniform(0.15, 0.4, size=2)
        width, height = (x2 - x1) * share[0], (y2 - y1) * share[1]
        left, top = x1 + rng.uniform(0, x2 - x1 - width), y1 + rng.uniform(0, y2 - y1 - height)
        boxes[region] = (left, top, left + width, top + height)
    return boxes


def draw(rectangles):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for concept, (x1, y1, x2, y2) in rectangles.items():
        pen.rounded_rectangle((x1, y1, x2, y2), radius=12, fill=concept_colour(concept), outline=(60, 60, 60))
        pen.text(((x1 + x2) / 2, (y1 + y2) / 2), CONCEPTS[concept], fill=(20, 20, 20), anchor="mm")
    return image


def obj36_line(image_id, boxes, features, owners):
    regions = {
        "img_h": HEIGHT,
        "img_w": WIDTH,
        "objects_id": np.array(
            [object_id(CONCEPTS[owner]) if owner >= 0 else object_id("background") for owner in owners]
        ),
        "objects_conf": np.where(owners >= 0, 0.9, 0.2),
        "attrs_id": np.zeros(REGIONS),
        "attrs_conf": np.zeros(REGIONS),
        "boxes": boxes,
        "features": features,
    }
    return format_obj36_line(image_id, regions)


def make_toy_images(out, img_dim=128, seed=0, sizes=None):
    """Write OUT/images/, OUT/SPLIT_obj36.tsv and OUT/SPLIT_captions.txt; returns OUT."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise OptionError("utils.make_toy_images draws with Pillow: pip install pillow") from None
    rng = np.random.RandomState(seed)
    prototypes = make_prototypes(rng, img_dim)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for split, num_images in (sizes or SPLITS).items():
        features, captions, owners = make_split(rng, prototypes, num_images)
        ids = [f"toy_{split}_{i:05d}" for i in range(num_images)]
        with atomic_write(os.path.join(out, f"{split}_obj36.tsv"), "w") as tsv:
            for i, image_id in enumerate(ids):
                rectangles = layout(rng, np.unique(owners[i][owners[i] >= 0]))
                boxes = region_boxes(rng, owners[i], rectangles)
                with atomic_write(os.path.join(out, "images", f"{image_id}.png"), "wb") as f:
                    draw(rectangles).save(f, format="PNG")
                tsv.write(obj36_line(image_id, boxes, features[i], owners[i]))
        with atomic_write(os.path.join(out, f"{split}_captions.txt"), "w") as f:
            f.writelines(f"{ids[n // 5]}\t{caption}\n" for n, caption in enumerate(captions))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument(
        "--out", default="data/toy_images", help="folder for the pictures, the TSV and the caption files"
    )
    parser.add_argument("--img_dim", default=128, type=int, help="dimensionality of the generated region features")
    parser.add_argument("--seed", default=0, type=int, help="random seed (the same seed writes the same files)")
    args = parser.parse_args(argv)
    try:
        out = make_toy_images(args.out, args.img_dim, args.seed)
    except (VSRNError, OSError) as e:
        return report(e)
    except KeyboardInterrupt:
        return report_interrupt("the files written so far are whole; rerun the same command to write them all")
    print(f"Toy images, TSV features and captions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
