"""The Visual Genome names of the bottom-up-attention detector's 1600 objects, in its output order
(line i of genome/objects_vocab.txt names object id i), as bottom-up-attention's data/genome/1600-400-20
lists them. A line may hold synonyms separated by commas: the first is the name shown."""

import functools
import os

OBJECTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "genome", "objects_vocab.txt")


@functools.cache
def _object_synonyms():
    with open(OBJECTS, encoding="utf-8") as f:
        return [line.strip().split(",") for line in f if line.strip()]


@functools.cache
def object_names():
    """Every name (synonyms included) of the detector's 1600 objects."""
    return frozenset(name for names in _object_synonyms() for name in names)


def object_name(object_id):
    """The name of a detector object id; None for no id (-1: regions without object ids) or an unknown one."""
    synonyms = _object_synonyms()
    return synonyms[object_id][0] if 0 <= object_id < len(synonyms) else None


def object_id(name):
    """The detector's object id of a name (or one of its synonyms); -1 when Visual Genome's 1600 lack it."""
    return next((i for i, names in enumerate(_object_synonyms()) if name in names), -1)
