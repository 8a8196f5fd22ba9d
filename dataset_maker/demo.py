"""make_dataset.py --demo: your own pictures and captions to a fine-tuned VSRN, on the toy world.

New pictures of the toy world (utils.make_toy_images' drawing: each shows three of its 24 objects, its 36
regions rows of an obj36 TSV, standing in for the detector's) with captions in another style than the
demo's training data and in an open_clip CSV, 1 to 5 a picture: made into a dataset by make_dataset.py's
steps, then the demo's checkpoint (`python3 train.py --demo`, trained first when absent) evaluated on its
test split, fine-tuned on it with `train.py --init_from` (the new words appended to its vocabulary), and
evaluated again.
"""

import csv
import os
import subprocess
import sys

import numpy as np

from dataset_maker.make import DatasetRequest, make_dataset
from utils.atomic import atomic_write
from utils.errors import DataError
from utils.make_toy_data import CONCEPTS, make_prototypes, make_split
from utils.make_toy_images import draw, layout, obj36_line, region_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join("runs", "demo", "model_best.pth.tar")
PICTURES = os.path.join("data", "toy_demo_pictures")
DATA_PATH, DATA_NAME, VOCAB_PATH = "data", "toy_demo_precomp", "vocab"
RUN = os.path.join("runs", "demo_finetune")
IMG_DIM = 128  # the demo's feature size
WORLD_SEED = 0  # the toy world's objects (their region features) are the demo's
PICTURES_SEED = 1  # new pictures of them
COUNT = 1000
# Another way of describing the pictures than the demo's captions, with words its vocabulary lacks.
TEMPLATES = (
    "a drawing of a {x} , a {y} and a {z}",
    "labelled shapes : {x} , {y} , {z}",
    "three rounded boxes showing {x} , {y} and {z}",
    "{x} and {y} beside a {z} on a grey background",
    "cartoon of a {z} with a {y} and a {x}",
)
# The fine-tuning run: the demo's settings, fewer epochs.
FINE_TUNING = [
    "--batch_size", "128", "--num_epochs", "4", "--learning_rate", "0.001", "--lr_update", "10",
    "--grad_clip", "0", "--max_len", "24", "--workers", "0", "--log_step", "10", "--val_step", "1000000000",
    "--seed", "0",
]  # fmt: skip


def draw_pictures(out, count):
    """OUT/images/*.png, OUT/captions.csv (filepath,title: one row a caption, 1 to 5 a picture) and
    OUT/regions_obj36.tsv (the pictures' regions); returns the CSV's and the TSV's paths."""
    prototypes = make_prototypes(np.random.RandomState(WORLD_SEED), IMG_DIM)
    rng = np.random.RandomState(PICTURES_SEED)
    features, _, owners = make_split(rng, prototypes, count)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    captions_path, regions_path = os.path.join(out, "captions.csv"), os.path.join(out, "regions_obj36.tsv")
    with atomic_write(captions_path, "w") as table, atomic_write(regions_path, "w") as rows:
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["filepath", "title"])
        for i in range(count):
            image_id = f"demo_{i:05d}"
            concepts = np.unique(owners[i][owners[i] >= 0])
            rectangles = layout(rng, concepts)
            with atomic_write(os.path.join(out, "images", f"{image_id}.png"), "wb") as f:
                draw(rectangles).save(f, format="PNG")
            rows.write(obj36_line(image_id, region_boxes(rng, owners[i], rectangles), features[i], owners[i]))
            writer.writerows([f"images/{image_id}.png", caption] for caption in demo_captions(rng, concepts))
    return captions_path, regions_path


def demo_captions(rng, concepts):
    """1 to 5 captions of a picture showing three `concepts` (ids), in the demo's other wording (TEMPLATES)."""
    captions = []
    for template in rng.choice(TEMPLATES, size=rng.randint(1, 6), replace=False):
        x, y, z = (CONCEPTS[c] for c in rng.permutation(concepts))
        captions.append(template.format(x=x, y=y, z=z))
    return captions


def train(arguments, what):
    """Run train.py with `arguments` in a process of its own; DataError when it fails."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *arguments])
    if done.returncode != 0:
        raise DataError(f"{what} did not finish (exit code {done.returncode})")


def free_folder(folder):
    """`folder`, or folder_2, folder_3, ... when it holds a run: the demo never writes over one."""
    candidate, n = folder, 1
    while os.path.exists(os.path.join(candidate, "checkpoint.pth.tar")):
        n += 1
        candidate = f"{folder}_{n}"
    return candidate


def recall_line(metrics):
    return f"rsum {metrics['rsum']:.1f}, image to text R@1 {metrics['r1']:.1f}, text to image R@1 {metrics['r1i']:.1f}"


def run_demo():
    from evaluation import evalrank

    if not os.path.isfile(CHECKPOINT):
        print(f"Training the demo's checkpoint first ({CHECKPOINT}): python3 train.py --demo --logger_name runs/demo")
        train(["--demo", "--logger_name", os.path.dirname(CHECKPOINT)], f"{CHECKPOINT}: the demo's training")
    if os.path.isfile(os.path.join(PICTURES, "regions_obj36.tsv")):
        captions, regions = os.path.join(PICTURES, "captions.csv"), os.path.join(PICTURES, "regions_obj36.tsv")
    else:
        print(f"Drawing {COUNT} new pictures of the toy world with their captions and regions into {PICTURES}")
        captions, regions = draw_pictures(PICTURES, COUNT)
    request = DatasetRequest(
        DATA_PATH, DATA_NAME, annotations=[(None, captions)], regions=[regions], vocab_path=VOCAB_PATH
    )
    print(f"\npython3 make_dataset.py --annotations {captions} --regions {regions} --data_name {DATA_NAME}")
    summary = make_dataset(request)
    print("\n".join(summary.lines()))
    run = free_folder(RUN)
    os.makedirs(run, exist_ok=True)
    print(f"\nThe demo's checkpoint on the {DATA_NAME} test split, before fine-tuning (new words read as <unk>):")
    before = evalrank(
        CHECKPOINT,
        data_path=DATA_PATH,
        data_name=DATA_NAME,
        split="test",
        ranks_path=os.path.join(run, "ranks_before.pth.tar"),
    )
    arguments = ["--init_from", CHECKPOINT, "--data_path", DATA_PATH, "--data_name", DATA_NAME]
    arguments += ["--vocab_path", VOCAB_PATH, "--logger_name", run, *FINE_TUNING]
    print(f"\nFine-tuning: python3 train.py {' '.join(arguments)}")
    train(arguments, f"{run}: the fine-tuning")
    print(f"\nThe fine-tuned model on the {DATA_NAME} test split:")
    after = evalrank(os.path.join(run, "model_best.pth.tar"), data_path=DATA_PATH, split="test")
    print(f"\nBefore fine-tuning: {recall_line(before)}\nAfter fine-tuning:  {recall_line(after)}")
