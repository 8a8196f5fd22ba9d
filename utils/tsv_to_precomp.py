"""Convert bottom-up-attention TSV features and their captions to VSRN's precomputed layout.

    python3 -m utils.tsv_to_precomp --tsv A.tsv [B.tsv ...] --captions CAPS \
        --data_path DATA --data_name NAME_precomp --split SPLIT [--num_boxes 36] [--feature_dim 2048]

TSV layouts (one image per line, tab-separated, arrays base64-encoded, read line by line):
  LXMERT obj36 (10 fields): img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features
  bottom-up-attention generate_tsv.py (6 fields): image_id image_w image_h num_boxes boxes features
(ids int64, confidences, boxes and features float32; boxes x1 y1 x2 y2 in pixels.)

CAPS is one of:
  a text file of `image_id<TAB>caption` lines (Flickr30K's `1000092795.jpg#0` ids are read as 1000092795);
  Karpathy's dataset_coco.json / dataset_flickr30k.json, with --karpathy_split (images of other
    Karpathy splits found in the TSV are skipped and counted);
  a COCO captions_*.json annotation file (read with pycocotools).
Each image keeps its first five captions, in the file's order.

Writes DATA/NAME_precomp/SPLIT_{ims.npy, caps.txt, boxes.npy, image_sizes.npy, image_ids.txt};
each file appears only once the whole conversion succeeded.
"""

import argparse
import contextlib
import json
import os
import re
import sys

import numpy as np

if not __package__:
    # run as a file, the project's modules cannot be imported: only as a module from the project's folder
    raise SystemExit(
        f"error: run it from the project's folder as: python3 -m utils.tsv_to_precomp {' '.join(sys.argv[1:])}".rstrip()
    )

from utils.atomic import atomic_write
from utils.errors import DataError, OptionError, VSRNError, report, report_interrupt
from utils.obj36 import read_rows
from utils.options import ScriptHelpFormatter

CAPTIONS_PER_IMAGE = 5
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# A fixed-size .npy header, written first with a placeholder shape and rewritten with the
# real image count at the end, so the features stream to disk in one pass.
NPY_HEADER_BYTES = 128
_IMAGE_SUFFIX = re.compile(r"(\.(jpe?g|png))?(#\d+)?$", re.IGNORECASE)
MAX_NAMED = 5


def canonical_id(image_id):
    """The key an image id is matched by: without an image extension or Flickr's #N, digits without leading zeros."""
    stem = _IMAGE_SUFFIX.sub("", image_id.strip(), count=1)
    return str(int(stem)) if stem.isdigit() else stem


def name_ids(ids):
    ids = list(ids)
    shown = ", ".join(ids[:MAX_NAMED])
    return shown + (f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else "")


class CaptionTable:
    """Captions by image: each image once, its captions in file order, reachable by any of its ids."""

    def __init__(self, path):
        self.path = path
        self.captions = []  # per image: list of captions
        self.names = []  # per image: the id that error messages show
        self.index = {}  # canonical id -> image position
        self.skipped = set()  # canonical ids of images that belong to other Karpathy splits

    def add(self, ids, caption):
        keys = [canonical_id(str(i)) for i in ids]
        position = next((self.index[k] for k in keys if k in self.index), None)
        if position is None:
            position = len(self.captions)
            self.captions.append([])
            self.names.append(str(ids[0]))
        for key in keys:
            self.index.setdefault(key, position)
        if caption is not None:
            self.captions[position].append(" ".join(caption.split()))

    def check_counts(self):
        short = [self.names[p] for p, caps in enumerate(self.captions) if len(caps) < CAPTIONS_PER_IMAGE]
        if short:
            raise DataError(
                f"{self.path}: {len(short)} image(s) with fewer than {CAPTIONS_PER_IMAGE} captions: {name_ids(short)}"
            )

    def lookup(self, image_id):
        """Position of an image's captions, None for an image of another Karpathy split."""
        key = canonical_id(image_id)
        if key in self.index:
            return self.index[key]
        if key in self.skipped:
            return None
        raise KeyError(image_id)


def read_caption_text(path):
    table = CaptionTable(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            image_id, tab, caption = line.partition("\t")
            if not tab or not image_id.strip():
                raise DataError(f"{path}: line {number} is not 'image_id<TAB>caption'")
            table.add([image_id], caption)
    return table


def read_karpathy(path, document, splits):
    if not splits:
        raise OptionError(
            f"{path} is a Karpathy split file: choose its images with --karpathy_split {{{','.join(KARPATHY_SPLITS)}}}"
        )
    table = CaptionTable(path)
    for number, image in enumerate(document["images"]):
        try:
            stem = os.path.splitext(image["filename"])[0]
            ids = [stem] + ([str(image["cocoid"])] if "cocoid" in image else [])
            if image["split"] not in splits:
                table.skipped.update(canonical_id(i) for i in ids)
                continue
            table.add(ids, None)
            for sentence in image["sentences"]:
                table.add(ids, sentence["raw"])
        except (KeyError, TypeError) as e:
            raise DataError(
                f"{path}: image {number} lacks {e} (expected Karpathy's filename, split, sentences[].raw)"
            ) from None
    return table


def read_coco_annotations(path, document):
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise OptionError(
            f"{path}: reading COCO caption annotations needs pycocotools (pip install pycocotools)"
        ) from None
    coco = COCO()
    coco.dataset = document
    try:
        with contextlib.redirect_stdout(sys.stderr):  # pycocotools reports its indexing on stdout
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: an image or annotation lacks {e}; expected a COCO captions_*.json file") from None
    table = CaptionTable(path)
    for image_id, image in coco.imgs.items():
        ids = [str(image_id)] + ([os.path.splitext(image["file_name"])[0]] if "file_name" in image else [])
        table.add(ids, None)
        for annotation in coco.imgToAnns.get(image_id, []):
            if "caption" not in annotation:
                raise DataError(
                    f"{path}: annotation {annotation.get('id')} has no caption; expected a COCO captions_*.json file"
                )
            table.add(ids, annotation["caption"])
    return table


def read_caption_source(path, karpathy_splits=None):
    """A CaptionTable of a text file, a Karpathy split file or a COCO captions annotation file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: caption file not found")
    with open(path, "rb") as f:
        looks_json = f.read(64).lstrip()[:1] in (b"{", b"[")
    if karpathy_splits and not looks_json:
        raise OptionError(f"--karpathy_split applies to Karpathy's dataset_*.json; {path} is a text caption file")
    if not looks_json:
        table = read_caption_text(path)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a readable JSON file ({e})") from None
        if isinstance(document, dict) and isinstance(document.get("images"), list) and "annotations" in document:
            if karpathy_splits:
                raise OptionError(
                    f"--karpathy_split applies to Karpathy's dataset_*.json; {path} is a COCO annotation file"
                )
            table = read_coco_annotations(path, document)
        elif (
            isinstance(document, dict)
            and isinstance(document.get("images"), list)
            and document["images"]
            and "sentences" in document["images"][0]
        ):
            table = read_karpathy(path, document, karpathy_splits)
        else:
            raise DataError(
                f"{path}: JSON that is neither Karpathy's dataset_*.json (images[].sentences) "
                "nor a COCO captions file (images, annotations)"
            )
    if not table.captions and not table.skipped:
        empty = os.path.getsize(path) == 0
        raise DataError(f"{path}: the caption file holds no captions" + (" (it is empty)" if empty else ""))
    table.check_counts()
    return table


def npy_header(dtype, shape):
    """A version 1.0 .npy header of exactly NPY_HEADER_BYTES bytes."""
    description = repr(
        {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    length = NPY_HEADER_BYTES - len(np.lib.format.MAGIC_PREFIX) - 4
    text = description.ljust(length - 1) + "\n"
    if len(text) != length:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    return np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + len(text).to_bytes(2, "little") + text.encode("latin1")


class ArrayAppender:
    """Writes a (count, *row_shape) .npy file row by row into an open binary file."""

    def __init__(self, f, dtype, row_shape):
        self.f, self.dtype, self.row_shape, self.count = f, np.dtype(dtype), tuple(row_shape), 0
        f.write(npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, row):
        self.f.write(np.ascontiguousarray(row, dtype=self.dtype).tobytes())
        self.count += 1

    def finish(self):
        self.f.seek(0)
        self.f.write(npy_header(self.dtype, (self.count, *self.row_shape)))
        self.f.seek(0, os.SEEK_END)


def convert(
    tsv_paths, caption_path, folder, split, num_boxes=36, feature_dim=2048, karpathy_splits=None, progress=None
):
    """Write folder/SPLIT_* from the TSV files and captions; returns (images written, images skipped)."""
    first_named = {}  # (device, inode) -> the path that named the file first
    for path in tsv_paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: TSV file not found")
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino)
        if key in first_named:
            also = f" (first as {first_named[key]})" if first_named[key] != path else ""
            raise OptionError(f"--tsv: {path} is given twice{also}; each TSV file is read once")
        first_named[key] = path
    table = read_caption_source(caption_path, karpathy_splits)
    used = {}  # caption position -> where its image's line is
    skipped = 0
    outputs = {
        name: os.path.join(folder, f"{split}_{name}")
        for name in ("ims.npy", "caps.txt", "boxes.npy", "image_sizes.npy", "image_ids.txt")
    }
    sizes = []
    with contextlib.ExitStack() as files:
        opened = {
            name: files.enter_context(atomic_write(path, "w" if name.endswith(".txt") else "wb"))
            for name, path in outputs.items()
        }
        features = ArrayAppender(opened["ims.npy"], np.float32, (num_boxes, feature_dim))
        boxes = ArrayAppender(opened["boxes.npy"], np.float32, (num_boxes, 4))
        for row, where in read_rows(tsv_paths, num_boxes, feature_dim):
            image_id = row["img_id"]
            try:
                position = table.lookup(image_id)
            except KeyError:
                raise DataError(f"{where}: image {image_id} has no captions in {caption_path}") from None
            if position is None:
                skipped += 1
                continue
            if position in used:
                raise DataError(f"{where}: image {image_id} appears again (first at {used[position]})")
            used[position] = where
            features.append(row["features"])
            boxes.append(row["boxes"])
            sizes.append((row["img_h"], row["img_w"]))
            opened["image_ids.txt"].write(image_id + "\n")
            opened["caps.txt"].writelines(c + "\n" for c in table.captions[position][:CAPTIONS_PER_IMAGE])
            if progress:
                progress(features.count)
        if not used:
            raise DataError(
                f"{', '.join(tsv_paths)}: no image of "
                f"{caption_path}{' (split ' + ','.join(karpathy_splits) + ')' if karpathy_splits else ''}"
            )
        unused = [table.names[p] for p in range(len(table.captions)) if p not in used]
        if unused:
            raise DataError(
                f"{caption_path}: captions of {len(unused)} image(s) that have no features in the TSV files: "
                f"{name_ids(unused)}"
            )
        features.finish()
        boxes.finish()
        np.save(opened["image_sizes.npy"], np.asarray(sizes, dtype=np.int64).reshape(-1, 2))
    return features.count, skipped


def add_split_arguments(p, required=True):
    """The flags that name a split's captions and where it goes (shared with extract_regions.py --precomp)."""
    p.add_argument(
        "--captions",
        required=required,
        help="image_id<TAB>caption text, Karpathy's dataset_*.json or COCO captions_*.json",
    )
    p.add_argument("--data_path", required=required, help="folder that holds NAME_precomp/")
    p.add_argument("--data_name", required=required, help="NAME_precomp")
    p.add_argument("--split", required=required, help="train, dev, test, testall or another split name")
    p.add_argument(
        "--karpathy_split", nargs="+", choices=KARPATHY_SPLITS, help="the Karpathy splits to take (e.g. train restval)"
    )


def split_folder(data_path, data_name):
    """DATA_PATH/NAME_precomp; OptionError for a name VSRN does not read."""
    if not data_name.endswith("_precomp"):
        raise OptionError(f"--data_name {data_name}: VSRN reads NAME_precomp folders; end the name with _precomp")
    return os.path.join(data_path, data_name)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument("--tsv", nargs="+", required=True, help="TSV files, read in this order")
    add_split_arguments(p)
    p.add_argument("--num_boxes", type=int, default=36, help="boxes per image (fixed)")
    p.add_argument("--feature_dim", type=int, default=2048, help="dimensions of a region feature")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        folder = split_folder(args.data_path, args.data_name)
        written, skipped = convert(
            args.tsv,
            args.captions,
            folder,
            args.split,
            args.num_boxes,
            args.feature_dim,
            args.karpathy_split,
            progress=_progress,
        )
    except (VSRNError, OSError) as e:
        return report(e)
    except KeyboardInterrupt:
        return report_interrupt(
            "no split was written (its files appear only when the whole conversion succeeded): rerun the command"
        )
    print(
        f"{written} images written to {folder}/{args.split}_*"
        + (f" ({skipped} of other Karpathy splits skipped)" if skipped else "")
    )
    return 0


def _progress(count):
    if count % 10000 == 0:
        print(f"{count} images", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
