"""Region features as TSV rows: bottom-up-attention's layouts, read and written.

One picture per line, tab-separated, arrays base64 of their raw bytes:
  LXMERT obj36 (10 fields): img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features
  bottom-up-attention generate_tsv.py (6 fields): image_id image_w image_h num_boxes boxes features
(ids int64, confidences, boxes and features float32; boxes x1 y1 x2 y2 in the picture's pixels.)

A row is parsed into a regions dict (`parse_row`), the layout detection.extract returns and
`format_obj36_line` writes. Files written row by row (extract_regions.py, the region cache) are
resumable: `read_written` finds the whole rows and cuts off a last one a crash left unfinished.
"""

import base64
import binascii
import os
import re

import numpy as np

from utils.errors import DataError, OptionError

LXMERT_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
BOTTOM_UP_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
# Per-box arrays of the LXMERT layout besides boxes and features.
LXMERT_ARRAYS = (
    ("objects_id", np.int64),
    ("objects_conf", np.float32),
    ("attrs_id", np.int64),
    ("attrs_conf", np.float32),
)


def _integer(where, name, text):
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: field {name} is not an integer ({text[:20]!r})") from None


def _decode(where, name, text):
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: field {name} is not valid base64") from None


def _array(where, name, text, dtype, shape):
    return _reshape(where, name, _decode(where, name, text), dtype, shape)


def _reshape(where, name, raw, dtype, shape):
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        dims = " x ".join(str(d) for d in shape)
        hint = " (--num_boxes x --feature_dim)" if name == "features" else ""
        raise DataError(
            f"{where}: field {name} holds {len(raw)} bytes; expected {dims} {np.dtype(dtype).name} "
            f"({expected} bytes){hint}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _features(where, image_id, text, count, feature_dim):
    """The (count, feature_dim) features of a row (feature_dim None: read off the field); a row
    whose features have another size per box says which."""
    raw = _decode(where, "features", text)
    box_bytes = count * np.dtype(np.float32).itemsize
    if feature_dim is None and count == 0:
        feature_dim = 0
    elif feature_dim is None:
        feature_dim = len(raw) // box_bytes if len(raw) % box_bytes == 0 else -1
    elif raw and box_bytes and len(raw) % box_bytes == 0 and len(raw) != box_bytes * feature_dim:
        dim = len(raw) // box_bytes
        raise DataError(
            f"{where}: image {image_id} has {dim}-dimensional region features, not {feature_dim} (--feature_dim): "
            f"pass --feature_dim {dim}"
        )
    if feature_dim < 0:
        raise DataError(
            f"{where}: field features holds {len(raw)} bytes, not a whole number of float32 features per box"
        )
    return _reshape(where, "features", raw, np.float32, (count, feature_dim))


def _fields(line, where):
    fields = line.split(b"\t")
    if len(fields) == len(LXMERT_FIELDS):
        return dict(zip(LXMERT_FIELDS, fields)), True
    if len(fields) == len(BOTTOM_UP_FIELDS):
        named = dict(zip(BOTTOM_UP_FIELDS, fields))
        return {"img_id": named["image_id"], "img_h": named["image_h"], "img_w": named["image_w"], **named}, False
    raise DataError(
        f"{where}: {len(fields)} tab-separated fields; expected {len(LXMERT_FIELDS)} (LXMERT obj36) "
        f"or {len(BOTTOM_UP_FIELDS)} (bottom-up-attention generate_tsv.py)"
    )


def parse_row(line, where, num_boxes=None, feature_dim=None):
    """The regions dict of one row (bytes without its newline) of either layout: img_id (str),
    img_h, img_w, boxes (R, 4), features (R, D) and, from an obj36 row, objects_id, objects_conf,
    attrs_id, attrs_conf (R,) (None from a generate_tsv.py row).

    num_boxes / feature_dim: the box count and feature size the caller needs (None: any, read
    off the row); another one is a DataError naming `where` (a file:line) and the image.
    """
    named, obj36 = _fields(line, where)
    try:
        image_id = named["img_id"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{where}: the image id is not UTF-8 text") from None
    if not image_id:
        raise DataError(f"{where}: empty image id")
    count = _integer(where, "num_boxes", named["num_boxes"])
    if num_boxes is not None and count != num_boxes:
        raise DataError(
            f"{where}: image {image_id} has {count} boxes; VSRN needs a fixed count of {num_boxes} per image "
            "(--num_boxes): variable-box (10-100) features do not fit, extract a fixed number of boxes "
            "(e.g. LXMERT's obj36)"
        )
    height, width = _integer(where, "image height", named["img_h"]), _integer(where, "image width", named["img_w"])
    if height <= 0 or width <= 0:
        raise DataError(f"{where}: image {image_id} has size {height} x {width} (height x width); expected positive")
    regions = {"img_id": image_id, "img_h": height, "img_w": width}
    for name, dtype in LXMERT_ARRAYS:
        regions[name] = _array(where, name, named[name], dtype, (count,)) if obj36 else None
    regions["boxes"] = _array(where, "boxes", named["boxes"], np.float32, (count, 4))
    regions["features"] = _features(where, image_id, named["features"], count, feature_dim)
    if not (np.isfinite(regions["features"]).all() and np.isfinite(regions["boxes"]).all()):
        raise DataError(f"{where}: NaN or Inf in the boxes or features of image {image_id}")
    return regions


def read_rows(paths, num_boxes=None, feature_dim=None):
    """(regions dict, "file:line") of every row of the files in order, one at a time (each file is streamed)."""
    for path in paths:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                line = line.rstrip(b"\r\n")
                if line.strip():
                    where = f"{path}:{number}"
                    yield parse_row(line, where, num_boxes, feature_dim), where


def encode_array(array, dtype):
    """A TSV array field: base64 of the array's raw bytes as `dtype`."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def format_obj36_line(image_id, regions):
    """One LXMERT obj36 TSV line, with its newline, of a detector's regions (a dict with
    boxes, features, objects_id, objects_conf, attrs_id, attrs_conf, img_h, img_w)."""
    if not image_id or any(c in image_id for c in "\t\r\n"):
        raise ValueError(f"image id {image_id!r}: must be non-empty without tabs or newlines")
    arrays = [encode_array(regions[name], dtype) for name, dtype in LXMERT_ARRAYS]
    fields = [
        image_id,
        str(int(regions["img_h"])),
        str(int(regions["img_w"])),
        *arrays,
        str(len(regions["boxes"])),
        encode_array(regions["boxes"], np.float32),
        encode_array(regions["features"], np.float32),
    ]
    return "\t".join(fields) + "\n"


# ---- files written row by row, resumable

_ROW_FIELD = re.compile(rb"[0-9A-Za-z+/=]*")


def read_written(path):
    """The ids of the whole rows of an obj36 TSV (a missing file has none) and its last whole row.

    A row is whole when its newline was written: a crash mid-write leaves a last line without
    one, which is cut off here so that the next row starts on a line of its own."""
    ids, last, end = set(), None, 0
    if not os.path.exists(path):
        return ids, last
    with open(path, "r+b") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                if not (ids or _row_start(line)):  # another kind of file: leave it as it is
                    raise DataError(f"{path}:{number}: not an obj36 row; choose another --out")
                f.truncate(end)
                break
            fields = line.count(b"\t") + 1
            try:
                if fields != len(LXMERT_FIELDS):
                    raise ValueError(f"{fields} tab-separated fields")
                ids.add(line[: line.index(b"\t")].decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError is one
                raise DataError(f"{path}:{number}: not an obj36 row ({str(e)[:60]}); choose another --out") from None
            last, end = line, end + len(line)
    return ids, last


def _row_start(fragment):
    """Whether `fragment` can be the beginning of an obj36 row: an id, then digits and base64."""
    fields = fragment.split(b"\t")
    return 2 <= len(fields) <= len(LXMERT_FIELDS) and all(_ROW_FIELD.fullmatch(field) for field in fields[1:])


def check_resumable(path, last_row, num_boxes):
    """That the rows already in `path` have this run's fixed box count (other runs' rows would mix in)."""
    if last_row is None or num_boxes is None:
        return
    fields = last_row.split(b"\t")
    held = int(fields[LXMERT_FIELDS.index("num_boxes")])
    if held != num_boxes:
        raise OptionError(
            f"--out {path} holds rows of {held} boxes; this run extracts {num_boxes}: choose another --out"
        )


def append_rows(f, rows):
    """Write whole rows and make them durable before the next ones."""
    f.write(b"".join(rows))
    f.flush()
    os.fsync(f.fileno())
