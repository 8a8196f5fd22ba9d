"""Where a dataset's region features come from, in one place (`dataset_regions`):

- the detector: each picture extracted once (a detection.settings.RegionSettings: the caffe policy's 36
  boxes, VSRN's input) through detection.pipeline's front door (extract_to_tsv) into
  DATA/NAME/regions_obj36.tsv, one obj36 row per picture keyed by its SHA-256. That file is the resume
  point: a run killed at any moment leaves whole rows (a torn last one is cut off), and the same command
  extracts only the pictures it lacks. Under torchrun every process extracts its shares and the first
  writes the rows, in the single-process order;
- published rows (`--regions ROWS.tsv ...`, obj36 or generate_tsv.py), matched to a picture by its file
  name without extension, an id its annotation gives it (COCO's image id) or its SHA-256;
- a photo library's kept regions (`--library LIB`, photo_library.store.Library), by SHA-256.
"""

import json
import os

import numpy as np

from utils.digest import file_digest
from detection.pipeline import Counts, extract_to_tsv
from detection.weights import load_detector
from utils.atomic import atomic_write
from utils.device import check_device
from utils.distributed import SINGLE_PROCESS
from utils.errors import DataError, OptionError
from utils.obj36 import check_resumable, parse_row, read_written
from utils.tsv_to_precomp import canonical_id

REGIONS_TSV = "regions_obj36.tsv"
REGIONS_RECORD = "regions_obj36.json"  # the detector and settings the rows were extracted with


class RegionRows:
    """Rows of obj36 / generate_tsv.py files found by key (their image id, canonicalised) and read when asked."""

    def __init__(self, paths):
        self.where = {}  # key -> (path, byte offset, line number)
        for path in paths:
            if not os.path.isfile(path):
                raise OptionError(f"--regions {path}: file not found")
            with open(path, "rb") as f:
                offset = 0
                for number, line in enumerate(f, start=1):
                    key = line.split(b"\t", 1)[0].decode("utf-8", "replace").strip()
                    if line.strip():
                        self.where.setdefault(canonical_id(key), (path, offset, number))
                    offset += len(line)

    def read(self, key):
        path, offset, number = self.where[key]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline().rstrip(b"\r\n")
        return parse_row(line, f"{path}:{number}")


class RowsByPicture:
    """Regions of pictures from RegionRows, each picture matched by any of its keys."""

    def __init__(self, rows, pictures, keys_of, why_missing):
        self.rows, self.why_missing = rows, why_missing
        claimed = {}
        for picture in pictures:
            for key in keys_of(picture):
                claimed.setdefault(key, set()).add(picture.digest)
        # A key two different pictures answer to (cat.jpg in two folders) finds neither.
        self.keys = {
            picture.digest: [key for key in keys_of(picture) if key in rows.where and len(claimed[key]) == 1]
            for picture in pictures
        }

    def has(self, picture):
        return bool(self.keys[picture.digest])

    def regions(self, picture):
        return self.rows.read(self.keys[picture.digest][0])

    def missing(self, picture):
        return f"{picture.path}: {self.why_missing}"


def published_keys(picture):
    """How a published row may name a picture: its file names without extension, its annotation's ids, its digest."""
    stems = [os.path.splitext(os.path.basename(name))[0] for name in picture.ids]
    return list(dict.fromkeys(canonical_id(key) for key in [*stems, *picture.ids, picture.digest]))


class LibraryRegions:
    """A photo library's kept regions of the pictures, found by their SHA-256 (its photos' key)."""

    def __init__(self, folder):
        from photo_library.store import Library

        self.folder = folder
        self.library = Library.open(folder)

    def has(self, picture):
        return self.library.photo_of_digest(picture.digest) is not None

    def regions(self, picture):
        photo = self.library.photo_of_digest(picture.digest)
        record = self.library.photo(photo)
        features = self.library.features(photo)
        return {"img_h": record["height"], "img_w": record["width"], "boxes": record["boxes"], "features": features}

    def missing(self, picture):
        return f"{picture.path}: not among the photos of the library {self.folder}"


def detector_record(weights, config, settings):
    """What the rows of REGIONS_TSV depend on: the detector's and its config's contents, and the region settings
    (their record holds the implementation's version)."""
    return {
        "weights_sha256": file_digest(weights),
        "config_sha256": file_digest(config) if config else None,
        **settings.record(),
    }


def check_detector_record(folder, record):
    """Write the record beside a new REGIONS_TSV; refuse to add rows of another detector or settings."""
    path = os.path.join(folder, REGIONS_RECORD)
    tsv = os.path.join(folder, REGIONS_TSV)
    if os.path.isfile(path) and os.path.isfile(tsv) and os.path.getsize(tsv):
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        if kept != record:
            changed = sorted(key for key in set(kept) | set(record) if kept.get(key) != record.get(key))
            raise OptionError(
                f"{tsv}: holds regions of another detector or settings ({', '.join(changed)} differ); "
                "delete it (and regions_obj36.json) to extract them again, or choose another --data_name"
            )
        return
    with atomic_write(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


def extract_with_detector(pictures, folder, detector, world, batch_size=1, workers=4):
    """Extract the pictures REGIONS_TSV lacks (every process of `world` takes its shares); returns the rows'
    RowsByPicture on the main process. `detector`: dict of weights, config, device and settings (a
    RegionSettings)."""
    tsv = os.path.join(folder, REGIONS_TSV)
    settings = detector["settings"]
    if world.is_main:
        os.makedirs(folder, exist_ok=True)
        check_detector_record(folder, detector_record(detector["weights"], detector["config"], settings))
        done, last_row = read_written(tsv)
        check_resumable(tsv, last_row, settings.boxes)
        todo = [(picture.digest, picture.path) for picture in pictures if picture.digest not in done]
        counts = Counts(len(pictures) - len(todo))
    else:
        todo, counts = None, None
    todo = world.broadcast(todo)
    if todo:
        device = check_device(detector["device"]) if world is SINGLE_PROCESS else world.device
        network = load_detector(detector["weights"], detector["config"], device)
        extract_to_tsv(network, todo, tsv, settings, counts, world, batch_size=batch_size, workers=workers)
    if not world.is_main:
        return None
    print(counts.summary(tsv))
    return RowsByPicture(
        RegionRows([tsv]),
        pictures,
        lambda picture: [canonical_id(picture.digest)],
        "no regions (the detector's line above says why)",
    )


def dataset_regions(pictures, folder, world=SINGLE_PROCESS, detector=None, rows=None, library=None, **extraction):
    """The regions of the pictures from one source: `detector` (a dict of weights, config, device and the
    extraction settings; every process of a torchrun `world` takes part), published `rows` (TSV paths) or a
    photo `library`'s folder. Returns, on the main process, an object with has(picture), regions(picture)
    (a regions dict: img_h, img_w, boxes, features) and missing(picture) (the line saying why it has none);
    None on the others."""
    if detector is not None:
        return extract_with_detector(pictures, folder, detector, world, **extraction)
    if not world.is_main:
        return None
    if rows:
        return RowsByPicture(RegionRows(rows), pictures, published_keys, f"no row in {' or '.join(rows)}")
    return LibraryRegions(library)


def check_regions(regions, where, num_boxes, feature_dim):
    """The (features, boxes) of a regions dict as float32, of the dataset's fixed box count and size."""
    features = np.asarray(regions["features"], dtype=np.float32)
    boxes = np.asarray(regions["boxes"], dtype=np.float32)
    if features.shape != (num_boxes, feature_dim) or boxes.shape != (num_boxes, 4):
        raise DataError(
            f"{where}: {features.shape[0]} regions of {features.shape[1] if features.ndim == 2 else '?'} dims; "
            f"the dataset's pictures have {num_boxes} of {feature_dim} (VSRN reads a fixed number per picture)"
        )
    return features, boxes
