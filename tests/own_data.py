"""Small collections of pictures with their published rows, for make_dataset.py's tests."""

import numpy as np
from PIL import Image

from utils.obj36 import format_obj36_line

DIM = 8  # the rows' feature size


def make_pictures(folder, names):
    """Small pictures, one a name, and the obj36 rows of their regions (random features of DIM dims)."""
    rng = np.random.RandomState(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        regions = {
            "img_h": 20,
            "img_w": 30,
            "objects_id": np.zeros(36),
            "objects_conf": np.ones(36),
            "attrs_id": np.zeros(36),
            "attrs_conf": np.ones(36),
            "boxes": rng.uniform(0, 20, (36, 4)),
            "features": rng.uniform(0, 1, (36, DIM)),
        }
        rows.append(format_obj36_line(name, regions))
    (folder.parent / "rows.tsv").write_text("".join(rows))
    return str(folder.parent / "rows.tsv")
