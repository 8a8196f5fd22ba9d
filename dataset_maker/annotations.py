"""Caption annotations in the formats people hold them, read into records: a picture's name, its captions,
its split when the annotation gives one.

    karpathy     Karpathy's dataset_{coco,flickr30k,flickr8k}.json: images[] of filepath, filename, split
                 (train, val, test, restval), sentences[].raw, cocoid
    coco         COCO's captions_*.json: images[] of id, file_name; annotations[] of image_id, caption
    lavis        LAVIS / ALBEF / BLIP JSON: [{"image": path, "caption": str or [str, ...], "image_id": ...}]
    imagefolder  Hugging Face imagefolder metadata.jsonl: a JSON object a line, file_name and text (or caption)
    csv          CSV or TSV with a header: open_clip's filepath and title columns (others with --columns)
    folder       a folder where cat.jpg has cat.txt, one caption a line
    flickr30k    Flickr30K's results_20130124.token: `1000092795.jpg#0<TAB>caption` lines (or without #0)

A record that cannot be read is one line on stderr naming the file and its line (or its index in the
JSON), skipped and counted; a file that cannot be read at all (not JSON, no picture column) is a DataError.
Captions keep their text with runs of white space (newlines included) made one space.
"""

import csv
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

from utils.errors import DataError, OptionError
from utils.images import IMAGE_EXTENSIONS

FORMATS = ("karpathy", "coco", "lavis", "imagefolder", "csv", "folder", "flickr30k")
# Split names as annotations spell them -> the precomputed layout's.
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "dev": "dev",
    "val": "dev",
    "valid": "dev",
    "validation": "dev",
    "test": "test",
}
KARPATHY_SPLITS = ("train", "val", "test", "restval")
IMAGE_COLUMNS = ("filepath", "file_name", "image", "filename", "image_path", "path")
CAPTION_COLUMNS = ("title", "text", "caption", "sentence", "raw")


@dataclass
class Record:
    """One picture as one place of an annotation gives it."""

    name: str  # its path as the annotation writes it: relative to --images, or absolute
    where: str  # "FILE:LINE" or "FILE: images[3]"
    captions: list = field(default_factory=list)
    split: str = None  # train, dev or test, when the annotation gives it
    ids: tuple = ()  # ids the annotation gives the picture (COCO's image id, LAVIS's image_id)


class Reading:
    """The records of annotation files, and what was skipped: each malformed record said on stderr and counted."""

    def __init__(self, use_restval=False):
        self.records = []
        self.malformed = 0
        self.left_out = Counter()  # records left out on purpose, by why (Karpathy's restval)
        self.use_restval = use_restval

    def skip(self, where, why):
        print(f"{where}: {why}; skipped", file=sys.stderr)
        self.malformed += 1

    def add(self, record):
        if any(c in record.name for c in "\t\r\n") or not record.name.strip():
            self.skip(record.where, f"picture name {record.name!r} is empty or holds a tab or a line break")
            return
        self.records.append(record)

    def caption(self, record, text, where):
        """Add `text` to the record's captions, or skip it (one line) when it is not a caption."""
        if text is None:
            self.skip(where, "no caption")
        elif not isinstance(text, str):
            self.skip(where, f"caption is {type(text).__name__}, not text")
        elif not text.split():
            self.skip(where, "empty caption")
        else:
            record.captions.append(" ".join(text.split()))


def split_name(text):
    """The layout's name (train, dev, test) of a split as an annotation spells it, or None."""
    return SPLIT_NAMES.get(str(text).strip().lower())


class _UnknownSplit(Exception):
    """A record names a split that is not train, val (dev) or test."""


# ---- which format


def detect_format(path):
    """(format name, the parsed JSON document or None) of an annotation file or folder."""
    if os.path.isdir(path):
        return "folder", None
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf")
    first = head.lstrip()[:1]
    if first in (b"{", b"["):
        line, newline, rest = head.lstrip().partition(b"\n")
        if newline and rest.strip() and _is_json_object(line):
            return "imagefolder", None  # a JSON object a line
        document = _json_document(path)
        return _json_format(path, document), document
    line = head.split(b"\n", 1)[0].decode("utf-8", "replace")
    name, tab, _ = line.partition("\t")
    _, hash_sign, number = name.strip().rpartition("#")
    if tab and (hash_sign and number.isdigit() or name.strip().lower().endswith(IMAGE_EXTENSIONS)):
        return "flickr30k", None  # picture.jpg#N<TAB>caption, or picture.jpg<TAB>caption
    if head.strip():
        return "csv", None
    raise DataError(f"{path}: empty annotation file")


def _is_json_object(line):
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _json_document(path):
    """The file's JSON value; DataError when it is not one JSON document."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not a readable JSON file ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_format(path, document):
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        if "annotations" in document:
            return "coco"
        if any(isinstance(image, dict) and "sentences" in image for image in document["images"][:10]):
            return "karpathy"
    if isinstance(document, list):
        return "lavis"
    if isinstance(document, dict) and "file_name" in document:
        return "imagefolder"  # a metadata.jsonl of one line
    raise DataError(
        f"{path}: JSON of no known annotation format (Karpathy's images[].sentences, COCO's images and "
        "annotations, LAVIS's [{image, caption}], imagefolder's file_name lines); give --format"
    )


# ---- the readers


def read_karpathy(path, document, reading):
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: not Karpathy's dataset_*.json (expected an object with an images list)")
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            reading.skip(where, "no filename")
            continue
        given = image.get("split")
        if given not in KARPATHY_SPLITS:
            reading.skip(where, f"split {given!r} is not one of {', '.join(KARPATHY_SPLITS)}")
            continue
        if given == "restval" and not reading.use_restval:
            reading.left_out["Karpathy's restval (--use_restval puts them in train)"] += 1
            continue
        name = os.path.join(image["filepath"], image["filename"]) if image.get("filepath") else image["filename"]
        ids = (str(image["cocoid"]),) if "cocoid" in image else ()
        record = Record(name, where, split="train" if given == "restval" else SPLIT_NAMES[given], ids=ids)
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            reading.skip(where, "no sentences list")
            continue
        for number, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            reading.caption(record, raw, f"{where}.sentences[{number}].raw")
        reading.add(record)


def read_coco(path, document, reading, split=None):
    if not (isinstance(document, dict) and isinstance(document.get("annotations"), list)):
        raise DataError(f"{path}: not a COCO captions file (expected an object with images and annotations lists)")
    by_id = {}
    for index, image in enumerate(document.get("images") or []):
        where = f"{path}: images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            reading.skip(where, "no id and file_name")
        elif image["id"] in by_id:
            reading.skip(where, f"image id {image['id']} again (first at {by_id[image['id']].where})")
        else:
            by_id[image["id"]] = Record(image["file_name"], where, split=split, ids=(str(image["id"]),))
    for index, annotation in enumerate(document["annotations"]):
        where = f"{path}: annotations[{index}]"
        record = by_id.get(annotation.get("image_id")) if isinstance(annotation, dict) else None
        if record is None:
            image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
            reading.skip(where, f"image_id {image_id!r} is none of the images'")
        else:
            reading.caption(record, annotation.get("caption"), f"{where}.caption")
    for record in by_id.values():
        reading.add(record)


def read_lavis(path, document, reading, split=None):
    if not isinstance(document, list):
        raise DataError(f"{path}: not LAVIS / ALBEF / BLIP JSON (expected a list of {{image, caption}} objects)")
    for index, item in enumerate(document):
        where = f"{path}: [{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            reading.skip(where, "no image")
            continue
        try:
            record = Record(item["image"], where, split=_given_split(item, split), ids=_ids(item, "image_id"))
        except _UnknownSplit as e:
            reading.skip(where, str(e))
            continue
        _captions(reading, record, item.get("caption"), f"{where}.caption")
        reading.add(record)


def read_imagefolder(path, reading, split=None):
    for number, text in _lines(path, reading):
        where = f"{path}:{number}"
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            reading.skip(where, f"not JSON ({e.msg})")
            continue
        if not isinstance(item, dict) or not isinstance(item.get("file_name"), str):
            reading.skip(where, "no file_name")
            continue
        column = "text" if "text" in item else "caption"
        try:
            record = Record(item["file_name"], where, split=_given_split(item, split))
        except _UnknownSplit as e:
            reading.skip(where, str(e))
            continue
        _captions(reading, record, item.get(column), f"{where}: {column}")
        reading.add(record)


def read_csv(path, reading, columns=None, split=None):
    numbers = []

    def decoded():  # with their line ends: a quoted field may hold one
        for number, text in _lines(path, reading, keep_ends=True):
            numbers.append(number)
            yield text

    lines = decoded()
    header_line = next(lines, None)
    if header_line is None:
        raise DataError(f"{path}: empty annotation file")
    delimiter = "\t" if "\t" in header_line else ","
    header = [name.strip() for name in next(csv.reader([header_line], delimiter=delimiter))]
    image_column, caption_column = _columns(path, header, columns)
    for row in csv.reader(lines, delimiter=delimiter):
        where = f"{path}:{numbers[-1]}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            reading.skip(where, f"{len(row)} fields, the header has {len(header)}")
            continue
        values = dict(zip(header, row))
        if not values[image_column].strip():
            reading.skip(where, f"empty {image_column}")
            continue
        try:
            record = Record(values[image_column].strip(), where, split=_given_split(values, split))
        except _UnknownSplit as e:
            reading.skip(where, str(e))
            continue
        reading.caption(record, values[caption_column], f"{where}: {caption_column}")
        reading.add(record)


def read_folder(root, reading, split=None, exclude=()):
    """Pictures under `root` (its subfolders too, hidden ones and `exclude` left out), each with the
    captions of the .txt file of the same name; a picture without one is a record without captions."""
    excluded = {os.path.realpath(path) for path in exclude}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(
            name
            for name in subfolders
            if not name.startswith(".") and os.path.realpath(os.path.join(folder, name)) not in excluded
        )
        stems = {}
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                stems.setdefault(stem, []).append(name)
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension == ".txt" and stem not in stems and not name.startswith("."):
                reading.skip(os.path.join(folder, name), "a caption file without a picture of the same name")
        for stem, names in stems.items():
            captions = os.path.join(folder, stem + ".txt")
            for name in names:
                path = os.path.join(folder, name)
                record = Record(os.path.relpath(path, root), path, split=split)
                if os.path.isfile(captions):
                    for number, text in _lines(captions, reading):
                        if text.strip():
                            reading.caption(record, text, f"{captions}:{number}")
                reading.add(record)


def read_flickr30k(path, reading, split=None):
    by_name = {}
    for number, text in _lines(path, reading):
        where = f"{path}:{number}"
        if not text.strip():
            continue
        name, tab, caption = text.partition("\t")
        name = name.strip().rsplit("#", 1)[0] if "#" in name else name.strip()
        if not tab or not name:
            reading.skip(where, "not `picture.jpg#N<TAB>caption`")
            continue
        if name not in by_name:
            by_name[name] = Record(name, where, split=split)
        reading.caption(by_name[name], caption, where)
    for record in by_name.values():
        reading.add(record)


# ---- helpers of the readers


def _lines(path, reading, keep_ends=False):
    """(number, text) of each line of a text file (its line end kept or not); a line that is not UTF-8 is
    skipped (one line, counted)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
                yield number, text if keep_ends else text.rstrip("\r\n")
            except UnicodeDecodeError as e:
                reading.skip(f"{path}:{number}", f"not UTF-8 text ({e.reason} at byte {e.start})")


def _captions(reading, record, value, where):
    """A caption field that holds one caption or a list of them."""
    if isinstance(value, list):
        for number, text in enumerate(value):
            reading.caption(record, text, f"{where}[{number}]")
    else:
        reading.caption(record, value, where)


def _given_split(item, split):
    """A record's split: the file's (SPLIT=FILE), else its own `split` field (a blank one: none)."""
    given = item.get("split")
    if split or given is None or not str(given).strip():
        return split
    name = split_name(given)
    if name is None:
        raise _UnknownSplit(f"split {given!r} is not train, val (or dev) or test")
    return name


def _ids(item, key):
    return (str(item[key]),) if item.get(key) is not None else ()


def _columns(path, header, columns):
    if columns:
        names = [name.strip() for name in columns.split(",")]
        if len(names) != 2:
            raise OptionError(f"--columns {columns}: expected IMAGE,CAPTION (two column names)")
        missing = [name for name in names if name not in header]
        if missing:
            raise DataError(f"{path}:1: no column {missing[0]!r} among {', '.join(header)} (--columns {columns})")
        return names
    image = next((name for name in IMAGE_COLUMNS if name in header), None)
    caption = next((name for name in CAPTION_COLUMNS if name in header), None)
    if image is None or caption is None:
        wanted = "picture" if image is None else "caption"
        known = IMAGE_COLUMNS if image is None else CAPTION_COLUMNS
        raise DataError(
            f"{path}:1: no {wanted} column ({', '.join(known)}) among {', '.join(header)}; "
            "name the columns with --columns IMAGE,CAPTION"
        )
    return image, caption


def read_annotation(path, reading, fmt="auto", columns=None, split=None, exclude=()):
    """Add the records of one annotation file (or folder) to `reading`; returns its format.
    `split`: the split all its pictures belong to (an annotation given as SPLIT=FILE)."""
    found, document = detect_format(path) if fmt == "auto" else (fmt, None)
    if found == "folder" and not os.path.isdir(path):
        raise OptionError(f"--format folder: {path} is not a folder")
    if found != "folder" and not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    if found in ("karpathy", "coco", "lavis") and document is None:
        document = _json_document(path)
    if split and found == "karpathy":
        raise OptionError(f"{split}={path}: Karpathy's files give each picture its split; name the file alone")
    if columns and found != "csv":
        raise OptionError(f"--columns names CSV columns; {path} is read as {found}")
    if found == "karpathy":
        read_karpathy(path, document, reading)
    elif found == "coco":
        read_coco(path, document, reading, split)
    elif found == "lavis":
        read_lavis(path, document, reading, split)
    elif found == "imagefolder":
        read_imagefolder(path, reading, split)
    elif found == "csv":
        read_csv(path, reading, columns, split)
    elif found == "folder":
        read_folder(path, reading, split, exclude)
    else:
        read_flickr30k(path, reading, split)
    return found
