"""New photos whose regions come from published TSV rows (`index.py --regions`): matched by file stem,
checked against the picture and the library, embedded without the detector."""

import os

from photo_library.photos import FailedPhoto, embed, thumbnail
from utils.errors import DataError, OptionError, without_path
from utils.images import ImageError, read_image
from utils.obj36 import parse_row
from utils.tsv_to_precomp import canonical_id


def matching_rows(photos, tsv_paths):
    """{digest: (row, "file:line")} of the NewPhotos that have a row in the TSV files, matched by file stem
    (without leading zeros or extension, as utils.tsv_to_precomp matches ids); a photo's first row wins."""
    wanted = {}
    for photo in photos:
        for path, _, _ in photo.files:
            wanted.setdefault(canonical_id(os.path.splitext(os.path.basename(path))[0]), []).append(photo.digest)
    found = {}
    for tsv in tsv_paths:
        if not os.path.isfile(tsv):
            raise OptionError.naming("{regions} {path}: file not found", path=tsv)
        with open(tsv, "rb") as f:
            for number, line in enumerate(f, start=1):
                stem = canonical_id(line[: line.find(b"\t")].decode("utf-8", "replace"))
                for digest in wanted.get(stem, ()):
                    found.setdefault(digest, (line.rstrip(b"\r\n"), f"{tsv}:{number}"))
    return found


def regions_problem(regions, where, boxes, feature_dim):
    """Why a photo's regions (a row's, `where`) cannot go into a library of `boxes` regions (the box count), or
    None; regions of another feature size are a DataError (check_feature_dim)."""
    count = len(regions["features"])
    if count != boxes:
        return f"{where} has {count} regions; this library takes {boxes} per photo"
    check_feature_dim(regions, where, feature_dim)
    return None


def check_feature_dim(regions, where, feature_dim):
    """Refuse regions of another feature size than the checkpoints' image encoder takes: no photo can use them."""
    width = regions["features"].shape[1]
    if width != feature_dim:
        raise DataError(
            f"{where}: regions of {width} dims; the checkpoint's image encoder takes {feature_dim} (img_dim)"
        )


def row_photos(batch, models, library_shape, features_dtype, note):
    """(EmbeddedPhotos, FailedPhotos, unfit NewPhotos) of (NewPhoto, (row, where)) pairs. A row that does not fit
    its photo (another box count or picture size) is said with `note`, and the photo is left to the detector,
    as one without a row (a fault of the rows, not of the photo: not a failure)."""
    ready, failed, unfit = [], [], []
    boxes, feature_dim = library_shape
    for photo, (line, where) in batch:
        try:
            picture = read_image(photo.path)
        except ImageError as e:
            failed.append(FailedPhoto(photo, without_path(str(e), photo.path)))
            continue
        regions = parse_row(line, where)
        problem = regions_problem(regions, where, boxes, feature_dim)
        if problem is None and (regions["img_h"], regions["img_w"]) != picture.shape[:2]:
            problem = (
                f"its row {where} is of a {regions['img_w']} x {regions['img_h']} picture, the file is "
                f"{picture.shape[1]} x {picture.shape[0]}"
            )
        if problem:
            note(f"{photo.path}: {problem}; left to the detector")
            unfit.append(photo)
            continue
        ready.append((photo, regions, thumbnail(picture)))
    return embed(models, features_dtype, ready), failed, unfit
