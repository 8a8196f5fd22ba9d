"""Generate `toy_precomp`, a small dataset in the precomputed layout that a model can learn.

Each image shows three of a few dozen concepts: its 36 region features are noisy copies
of those concepts' prototype vectors (plus background regions), and each of its five
captions names the three concepts in a different sentence. Deterministic for a seed.

    python3 -m utils.make_toy_data --data_path data [--img_dim 128]
"""

import argparse
import os
import sys

import numpy as np

if not __package__:
    # run as a file, the project's modules cannot be imported: only as a module from the project's folder
    raise SystemExit(
        f"error: run it from the project's folder as: python3 -m utils.make_toy_data {' '.join(sys.argv[1:])}".rstrip()
    )

from utils.atomic import atomic_write
from utils.errors import run_job
from utils.options import ScriptHelpFormatter

CONCEPTS = (
    "dog cat horse bird cow sheep bicycle car bus boat train kite "
    "ball tree bench umbrella guitar pizza surfboard skateboard frisbee clock tent ladder"
).split()
ADJECTIVES = "red blue green small large old young wooden".split()
TEMPLATES = (
    "a {a} {x} next to a {y} and a {z} .",
    "there is a {x} , a {y} and a {z} in this picture",
    "a {y} near a {a} {z} with a {x}",
    "the {z} is beside a {x} and a {y} .",
    "a photo showing a {x} , some {y} and a {a} {z}",
)
SPLITS = {"train": 1000, "dev": 100, "test": 100}
REGIONS = 36


def make_prototypes(rng, img_dim):
    return np.maximum(rng.normal(0.0, 1.0, size=(len(CONCEPTS), img_dim)), 0.0) * 2.0


def make_split(rng, prototypes, num_images, concepts=None):
    """Features (num_images, REGIONS, img_dim), 5 captions per image, and each region's
    concept (num_images, REGIONS), -1 for background clutter. `concepts`: the concept ids
    the images may show (None: all of them)."""
    num_concepts, img_dim = prototypes.shape
    pool = num_concepts if concepts is None else np.asarray(concepts)
    features = np.empty((num_images, REGIONS, img_dim), dtype=np.float32)
    owners_of_images = np.empty((num_images, REGIONS), dtype=np.int64)
    captions = []
    for i in range(num_images):
        chosen = rng.choice(pool, size=3, replace=False)
        # Most regions show one of the three concepts; a few are background clutter.
        owners = rng.choice(np.append(chosen, -1), size=REGIONS, p=[0.3, 0.3, 0.3, 0.1])
        owners_of_images[i] = owners
        base = np.where(owners[:, None] >= 0, prototypes[np.maximum(owners, 0)], 0.0)
        noise = rng.normal(0.0, 0.6, size=(REGIONS, img_dim))
        features[i] = np.maximum(base + noise, 0.0)
        for template in TEMPLATES:
            x, y, z = (CONCEPTS[c] for c in rng.permutation(chosen))
            captions.append(template.format(x=x, y=y, z=z, a=rng.choice(ADJECTIVES)))
    return features, captions, owners_of_images


def make_toy_data(data_path, name="toy_precomp", img_dim=128, seed=0, sizes=None):
    """Write DATA/NAME/{train,dev,test}_{ims.npy,caps.txt}; returns the dataset folder."""
    rng = np.random.RandomState(seed)
    prototypes = make_prototypes(rng, img_dim)
    folder = os.path.join(data_path, name)
    for split, num_images in (sizes or SPLITS).items():
        features, captions, _ = make_split(rng, prototypes, num_images)
        with atomic_write(os.path.join(folder, f"{split}_ims.npy"), "wb") as f:
            np.save(f, features)
        with atomic_write(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
            f.write("\n".join(captions) + "\n")
    return folder


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument("--data_path", default="data", help="folder to write NAME/ into")
    parser.add_argument("--data_name", default="toy_precomp", help="dataset folder name")
    parser.add_argument("--img_dim", default=128, type=int, help="dimensionality of the generated region features")
    parser.add_argument("--seed", default=0, type=int, help="random seed (the same seed writes the same files)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    def write():
        print(f"Toy dataset written to {make_toy_data(args.data_path, args.data_name, args.img_dim, args.seed)}")

    return run_job(write, "the files written so far are whole; rerun the same command to write them all")


if __name__ == "__main__":
    sys.exit(main())
