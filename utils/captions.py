"""Caption files: UTF-8 text, one caption per line (also the image-id files of converted data).

One home for them, read by data.py, vocab.py and the scripts alike.
"""

import os

from utils.errors import DataError


def read_captions(path):
    """Lines of a caption file as stripped str, decoded as UTF-8 (never bytes)."""
    return decode_captions(read_caption_bytes(path), path)


def read_caption_bytes(path):
    """The file's bytes, as its cache key hashes them."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: caption file not found")
    with open(path, "rb") as f:
        return f.read()


def numbered_lines(path):
    """(number, text) of each line of a UTF-8 text file, its line end left out, read one at a time; a
    line that is not UTF-8 is a DataError naming `path` and its number."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def decode_captions(raw, path):
    """Lines of `raw` as stripped str; a line that is not UTF-8 is one error naming `path` and its number."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    try:
        return [line.decode("utf-8").strip() for line in lines]
    except UnicodeDecodeError:
        for number, line in enumerate(lines, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {number} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        raise
