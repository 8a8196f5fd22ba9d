"""Files known by their content: what the photo library keys photos by, and what a dataset's record of its
pictures and detector weights names."""

import hashlib

CHUNK = 1 << 20  # read a megabyte at a time: a picture of any size in bounded memory


def file_digest(path):
    """SHA-256 of the file's bytes, as hex (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
