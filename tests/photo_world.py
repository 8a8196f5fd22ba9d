"""Small photo collections for the photo library's tests: the toy world's pictures with their obj36 rows,
tiny random VSRN checkpoints reading their regions, and a tiny detector with a checkpoint for its regions."""

import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from conftest import make_opt
from model import VSRN
from tiny_detector import TINY_ARCH, tiny_detector_state_dict
from utils.captions import read_captions
from utils.checkpoint import save_checkpoint
from utils.make_toy_images import make_toy_images
from vocab import build_vocab, save_vocab, vocab_digest

TOY_DIM = 32
DETECTOR_DIM = TINY_ARCH["res5"][-1]


@dataclass
class World:
    root: str
    images: str  # the toy pictures' folder
    rows: list  # their obj36 TSV files
    checkpoints: list  # tiny VSRN checkpoints of TOY_DIM-d regions (different seeds)
    vocab: object
    detector: str = None  # tiny detector weights
    detector_checkpoint: str = None  # a VSRN checkpoint of the detector's regions


def checkpoint(folder, vocab, img_dim, seed, **options):
    torch.manual_seed(seed)
    opt = make_opt(
        data_name="toyimg_precomp",
        vocab_path=os.path.join(folder, "..", "vocab"),
        vocab_size=len(vocab),
        img_dim=img_dim,
        **{"embed_size": 16, "dim_vid": 16, **options},
    )
    state = {"model": VSRN(opt, training=False).state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab)}
    return save_checkpoint(state, False, folder)


def make_world(root, sizes=None, seeds=(0, 1)):
    root = str(root)
    toy = make_toy_images(os.path.join(root, "toy"), img_dim=TOY_DIM, sizes=sizes or {"test": 12, "dev": 6})
    splits = sorted(name[: -len("_obj36.tsv")] for name in os.listdir(toy) if name.endswith("_obj36.tsv"))
    captions = [
        line.split("\t", 1)[1] for split in splits for line in read_captions(os.path.join(toy, f"{split}_captions.txt"))
    ]
    vocab = build_vocab(captions, threshold=1)
    save_vocab(vocab, os.path.join(root, "vocab", "toyimg_precomp_vocab.json"))
    checkpoints = [checkpoint(os.path.join(root, f"run{seed}"), vocab, TOY_DIM, seed) for seed in seeds]
    weights = os.path.join(root, "detector.bin")
    torch.save(tiny_detector_state_dict(), weights)
    detector_checkpoint = checkpoint(os.path.join(root, "run_detector"), vocab, DETECTOR_DIM, 7)
    rows = [os.path.join(toy, f"{split}_obj36.tsv") for split in splits]
    return World(root, os.path.join(toy, "images"), rows, checkpoints, vocab, weights, detector_checkpoint)


def photo_folder(world, folder, count=None):
    """A copy of (the first `count` of) the toy pictures in `folder`; their paths."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(os.listdir(world.images))[:count]
    for name in names:
        shutil.copy(os.path.join(world.images, name), os.path.join(folder, name))
    return [os.path.join(folder, name) for name in names]


def random_photo(path, seed, size=(60, 90)):
    """A new picture of random pixels (new content) at `path`."""
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
