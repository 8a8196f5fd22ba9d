"""search.py --demo: a small library of the toy world, end to end.

The toy world's 1,200 pictures with their regions (utils.make_toy_images: each picture shows three of
24 objects, its 36 regions rows of an obj36 TSV, as an extractor writes them), indexed with the
demo's checkpoint (`python3 train.py --demo`, trained first when absent: about 80 s on an idle 2-core
CPU), then a few queries about the toy objects, answered in the terminal before the page is served.
"""

import os
import subprocess
import sys

from photo_library.indexer import IndexRequest, Indexer
from utils.errors import DataError
from utils.make_toy_data import CONCEPTS, SPLITS
from utils.make_toy_images import make_toy_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join("runs", "demo", "model_best.pth.tar")
PICTURES = os.path.join("data", "toy_images")
LIBRARY = os.path.join("runs", "demo_library")
QUERIES = ("a dog next to a bicycle", "a red umbrella near a tree", "a guitar and a pizza")
IMG_DIM = 128  # the demo's feature size


def demo_library():
    """The demo's library folder (in runs/), made when absent: pictures, checkpoint and index."""
    if not os.path.isfile(CHECKPOINT):
        print(f"Training the demo's checkpoint first ({CHECKPOINT}): python3 train.py --demo --logger_name runs/demo")
        trained = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), "--demo", "--logger_name", "runs/demo"]
        )
        if trained.returncode != 0 or not os.path.isfile(CHECKPOINT):
            raise DataError(f"{CHECKPOINT}: the demo's training did not finish (exit code {trained.returncode})")
    if not os.path.isfile(os.path.join(PICTURES, "test_obj36.tsv")):
        print(f"Drawing the toy world's pictures and their regions into {PICTURES}")
        make_toy_images(PICTURES, img_dim=IMG_DIM)
    regions = [os.path.join(PICTURES, f"{split}_obj36.tsv") for split in SPLITS]
    request = IndexRequest(
        library=LIBRARY, images=[os.path.join(PICTURES, "images")], checkpoints=[CHECKPOINT], regions=regions
    )
    print(Indexer(request).run())
    return LIBRARY


def show_examples(searcher):
    """Answer a few queries about the toy objects in the terminal: the files are named by their split and
    number, and their pictures show the objects (labelled shapes) the query names."""
    print(f"The toy world's objects: {', '.join(CONCEPTS)}")
    for text in QUERIES:
        hits, _ = searcher.text(text, k=3)
        print(f"  {text!r}: " + ", ".join(f"{hit['name']} ({hit['score']:.3f})" for hit in hits))
