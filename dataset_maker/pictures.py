"""From annotation records to a dataset's pictures: each file once with all its captions, each picture (by the
SHA-256 of its content) once however many names it has, and every picture in one split.

Pictures that cannot be used are one line each on stderr and counted: missing, unreadable files, pictures
without captions. The same picture in two splits the annotations give is refused, naming both files.
"""

import concurrent.futures
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from utils.digest import file_digest
from utils.errors import DataError, OptionError

SPLITS = ("train", "dev", "test")


@dataclass
class Picture:
    """A picture of the dataset."""

    path: str  # the file, as found (the first one when several files hold the same picture)
    name: str  # as the annotation names it: the layout's image id
    where: str  # the annotation's place that names it first
    captions: list = field(default_factory=list)
    split: str = None
    ids: list = field(default_factory=list)  # every name and id it has, for matching region rows
    digest: str = None  # SHA-256 of the file's bytes
    others: list = field(default_factory=list)  # the other files holding the same picture


class Problems:
    """Pictures left out, each said once on stderr, counted by kind."""

    def __init__(self):
        self.counts = Counter()

    def leave_out(self, kind, line):
        print(f"{line}; left out", file=sys.stderr)
        self.counts[kind] += 1


def gather_pictures(records, root):
    """Pictures of the records (a file named by several records takes all their captions, in order), in the
    order the annotations name them first. A file named in two splits is a DataError naming both places."""
    pictures = {}
    for record in records:
        path = os.path.normpath(os.path.join(root, record.name))
        picture = pictures.get(path)
        if picture is None:
            name = record.name.replace(os.sep, "/")
            pictures[path] = Picture(path, name, record.where, list(record.captions), record.split, [name])
            picture = pictures[path]
        elif record.split != picture.split:
            raise DataError(
                f"{record.where}: {record.name} is in {record.split or 'no split'} there and in "
                f"{picture.split or 'no split'} at {picture.where}; a picture belongs to one split"
            )
        else:
            picture.captions.extend(record.captions)
        picture.ids.extend(i for i in record.ids if i not in picture.ids)
    return list(pictures.values())


def _digest_or_problem(path):
    try:
        return file_digest(path), None
    except FileNotFoundError:
        return None, "missing"
    except IsADirectoryError:
        return None, "a folder, not a picture"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"


def usable_pictures(pictures, problems, workers=4):
    """The pictures that have captions and whose file can be read, each with its digest, in order; the
    others are left out (one line each)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_digest_or_problem, [picture.path for picture in pictures])
        usable = []
        for picture, (digest, problem) in zip(pictures, results):
            named = "" if picture.where == picture.path else f" (named at {picture.where})"
            if problem:
                kind = "missing" if problem == "missing" else "unreadable"
                problems.leave_out(kind, f"{picture.path}: {problem}{named}")
            elif not picture.captions:
                problems.leave_out("without captions", f"{picture.path}: no captions{named}")
            else:
                picture.digest = digest
                usable.append(picture)
    return usable


def merge_duplicates(pictures):
    """Each picture once by its digest: a later file with the same content adds its captions (those not
    already there) and names to the first, and is said on stderr. The same content in two given splits is
    a DataError naming both files. Returns (kept pictures, how many files were merged)."""
    first = {}
    kept, merged = [], 0
    for picture in pictures:
        same = first.get(picture.digest)
        if same is None:
            first[picture.digest] = picture
            kept.append(picture)
            continue
        if same.split != picture.split:
            raise DataError(
                f"{same.path} and {picture.path} are the same picture (SHA-256 {picture.digest[:16]}...) in two "
                f"splits, {same.split} ({same.where}) and {picture.split} ({picture.where}); keep it in one split"
            )
        known = set(same.captions)
        same.captions.extend(c for c in picture.captions if c not in known)
        same.ids.extend(i for i in picture.ids if i not in same.ids)
        same.others.append(picture.path)
        merged += 1
        print(
            f"{picture.path}: the same picture as {same.path} (SHA-256 {picture.digest[:16]}...): kept once, "
            "with the captions of both",
            file=sys.stderr,
        )
    return kept, merged


def parse_ratios(text):
    """--splits "0.8,0.1,0.1" -> (train, dev, test) shares that sum to 1."""
    try:
        ratios = [float(part) for part in text.split(",")]
    except ValueError:
        ratios = []
    if len(ratios) != 3 or any(not r >= 0 for r in ratios) or sum(ratios) <= 0:
        raise OptionError(f"--splits {text}: expected three shares TRAIN,DEV,TEST such as 0.8,0.1,0.1")
    total = sum(ratios)
    return tuple(r / total for r in ratios)


def assign_splits(pictures, ratios, seed):
    """Give each picture a split: the annotations' when they give one (all of them must), else drawn by
    `seed`: the pictures ordered by digest, shuffled, the first round(share x count) to test and dev, the
    rest to train. The draw depends only on the pictures' contents and the seed, not on the annotations'
    order. Returns ({split: its pictures in the annotations' order}, whether the annotations gave them)."""
    given = [picture for picture in pictures if picture.split]
    if given and len(given) != len(pictures):
        lacking = next(picture for picture in pictures if not picture.split)
        raise DataError(
            f"{lacking.where}: {lacking.name} has no split while others have one ({given[0].where}); "
            "give every annotation file its split (SPLIT=FILE) or none"
        )
    if not given:
        order = sorted(range(len(pictures)), key=lambda i: pictures[i].digest)
        shuffled = [order[i] for i in np.random.RandomState(seed).permutation(len(order))]
        count = len(pictures)
        test = round(ratios[2] * count)
        dev = round(ratios[1] * count)
        for position, index in enumerate(shuffled):
            pictures[index].split = "test" if position < test else "dev" if position < test + dev else "train"
    return {split: [picture for picture in pictures if picture.split == split] for split in SPLITS}, bool(given)
