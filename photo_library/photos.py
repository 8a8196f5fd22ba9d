"""A new photo on its way into the library: its content and files, then its regions, thumbnail and vectors
(or why it failed), as small named types."""

import io
from dataclasses import dataclass

import numpy as np

from photo_library.embedding import image_vectors
from utils.images import pillow

THUMBNAIL_SIDE = 256


@dataclass
class NewPhoto:
    """Content the library does not hold yet: its digest and files ((path, size, mtime_ns), copies included)."""

    digest: str
    files: list

    @property
    def path(self):
        """The file its picture is read from."""
        return self.files[0][0]


@dataclass
class EmbeddedPhoto:
    """A new photo ready to be committed: its regions (a regions dict), thumbnail (JPEG), vector and each
    model's attention scores of its regions."""

    photo: NewPhoto
    regions: dict
    thumbnail: bytes
    vector: np.ndarray
    region_scores: np.ndarray


@dataclass
class FailedPhoto:
    """A new photo that cannot be one (unreadable, refused by the detector), with the reason (without its path)."""

    photo: NewPhoto
    reason: str


def thumbnail(picture):
    """A JPEG of the picture (RGB array) at most THUMBNAIL_SIDE pixels on its longer side."""
    image = pillow().Image.fromarray(picture, "RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), pillow().Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def embed(models, features_dtype, photos):
    """The EmbeddedPhoto of each (NewPhoto, regions, thumbnail), embedded in one batch; the features are rounded
    to the library's storage type first, so that kept regions re-embed alike."""
    if not photos:
        return []
    dtype = np.dtype(features_dtype)
    for _, regions, _ in photos:
        regions["features"] = regions["features"].astype(dtype).astype(np.float32)
    vectors, scores = image_vectors(models, np.stack([regions["features"] for _, regions, _ in photos]))
    return [
        EmbeddedPhoto(photo, regions, jpeg, vector, score)
        for (photo, regions, jpeg), vector, score in zip(photos, vectors, scores)
    ]
