"""The self-check: our caffe-policy regions of some pictures against published rows of the same
pictures, made by bottom-up-attention's Caffe pipeline (LXMERT's obj36 rows of COCO photos, say).

How the published PyTorch weights were converted from the Caffe model is assumed, not documented
(detection.network); with the weights in hand, a few pictures settle it:

    python3 extract_regions.py --check_against val2014_obj36.tsv --images photos/ --weights pytorch_model.bin

Each picture, named after its row's image id, is extracted under the caffe policy with its row's
box count. A published region is matched when one of ours has all four coordinates within 1
pixel of its box; a picture agrees when at least 90% of its published regions are matched, every
matched pair's features have a cosine of at least 0.99 and at least 90% of the pairs have the same
object id. What fewer `--proposals` change shows in the regions matched at IoU >= 0.9 and their
features' cosine (the rows were made with 300 proposals).
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from detection.extract import extract_regions
from detection.policies import CaffePolicy
from detection.proposals import CAFFE_POST_NMS
from detection.settings import RegionSettings
from utils.errors import DataError, OptionError
from utils.images import ImageError
from utils.obj36 import parse_row

PIXELS = 1.0
MATCH_IOU = 0.9
MIN_COSINE = 0.99
AGREEING_SHARE = 0.9
NAMED = 5


def published_rows(path, ids, flag="--check_against"):
    """{image id: regions dict} of the rows of `path` (LXMERT's obj36 or generate_tsv.py's
    layout) whose image id is one of `ids`; the file is streamed, only those rows parsed."""
    wanted, found = set(ids), {}
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                image_id = line[: line.find(b"\t")].decode("utf-8", "replace").strip()
                if image_id in wanted and image_id not in found:
                    found[image_id] = parse_row(line.rstrip(b"\r\n"), f"{path}:{number}")
    except (FileNotFoundError, IsADirectoryError):
        raise OptionError(f"{flag} {path}: no such file (the published rows to compare with)") from None
    return found


def box_iou(a, b):
    """IoU of every box of `a` (N, 4) with every box of `b` (M, 4), x1 y1 x2 y2."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def cosines(a, b):
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a.astype(np.float64) * b).sum(axis=1) / norms


@dataclass
class Agreement:
    """How our regions of a picture match its published row's."""

    regions: int  # published regions
    close: int  # of them, with one of ours within PIXELS on every coordinate
    close_cosines: np.ndarray  # features' cosine of those pairs
    same_ids: int | None  # of those pairs, with the same object id (None: the row has no ids)
    overlapping: int  # published regions with one of ours at IoU >= MATCH_IOU
    overlapping_cosines: np.ndarray

    @property
    def agrees(self):
        return (
            self.close >= AGREEING_SHARE * self.regions
            and (self.close == 0 or self.close_cosines.min() >= MIN_COSINE)
            and (self.same_ids is None or self.same_ids >= AGREEING_SHARE * self.close)
        )

    def line(self, image_id):
        ids = "" if self.same_ids is None else f", object ids {self.same_ids}/{self.close} the same"
        return (
            f"{image_id}: {self.close}/{self.regions} boxes within {PIXELS:g} px "
            f"(feature cosine min {_figure(self.close_cosines, np.min)}){ids}; "
            f"{self.overlapping}/{self.regions} at IoU >= {MATCH_IOU:g} "
            f"(cosine mean {_figure(self.overlapping_cosines, np.mean)}): {'agrees' if self.agrees else 'DIFFERS'}"
        )


def _figure(values, summary):
    return f"{summary(values):.4f}" if len(values) else "-"


def compare(ours, published):
    """The Agreement of our regions dict with a published row's."""
    theirs, mine = published["boxes"].astype(np.float64), ours["boxes"].astype(np.float64)
    count = len(theirs)
    if not len(mine) or not count:
        empty = np.zeros(0)
        return Agreement(count, 0, empty, None if published["objects_id"] is None else 0, 0, empty)
    distance = np.abs(theirs[:, None, :] - mine[None]).max(axis=2)
    nearest = distance.argmin(axis=1)
    close = distance[np.arange(count), nearest] <= PIXELS
    iou = box_iou(theirs, mine)
    best = iou.argmax(axis=1)
    overlapping = iou[np.arange(count), best] >= MATCH_IOU
    same_ids = None
    if published["objects_id"] is not None:
        same_ids = int((published["objects_id"][close] == ours["objects_id"][nearest[close]]).sum())
    return Agreement(
        regions=count,
        close=int(close.sum()),
        close_cosines=cosines(published["features"][close], ours["features"][nearest[close]]),
        same_ids=same_ids,
        overlapping=int(overlapping.sum()),
        overlapping_cosines=cosines(published["features"][overlapping], ours["features"][best[overlapping]]),
    )


def _named(ids):
    ids = list(ids)
    return ", ".join(ids[:NAMED]) + (f" and {len(ids) - NAMED} more" if len(ids) > NAMED else "")


def check_against(detector, items, rows_path, settings=RegionSettings(), say=print):
    """Compare our caffe-policy regions of the pictures `items` ((image id, path)) with the rows of
    `rows_path` of the same ids, saying one line per picture, a summary and a verdict; True when
    every picture agrees. Of `settings`, the sizes and proposals count: each picture is extracted with
    its row's box count. Pictures without a row are named; none with one is a DataError."""
    rows = published_rows(rows_path, [image_id for image_id, _ in items])
    missing = [image_id for image_id, _ in items if image_id not in rows]
    if not rows:
        raise DataError.naming(
            "{check_against} {path}: none of the {count} pictures' ids (file names without extension, e.g. {name}) "
            "has a row there: name each picture after its row's image id",
            path=rows_path,
            count=len(items),
            name=items[0][0],
        )
    proposals = settings.proposals or CAFFE_POST_NMS
    say(
        f"the caffe policy's regions ({proposals} proposals) against {rows_path}, "
        f"{len(rows)} picture{'s' if len(rows) != 1 else ''}"
    )
    if missing:
        say(f"no row for {len(missing)} of the pictures: {_named(missing)}")
    agreements = []
    for image_id, path in items:
        if image_id not in rows:
            continue
        try:
            picture = CaffePolicy.read_picture(path)
        except ImageError as error:
            say(f"{image_id}: not compared: {error}")
            continue
        published = rows[image_id]
        ours = extract_regions(detector, picture, dataclasses.replace(settings, boxes=len(published["boxes"])))
        agreement = compare(ours, published)
        agreements.append(agreement)
        say(agreement.line(image_id))
    if not agreements:
        raise DataError.naming(
            "{check_against} {path}: none of the pictures with a row could be read (see above)", path=rows_path
        )
    return _verdict(agreements, rows_path, proposals, say)


def _verdict(agreements, rows_path, proposals, say):
    regions = sum(a.regions for a in agreements)
    close = sum(a.close for a in agreements)
    overlapping = np.concatenate([a.overlapping_cosines for a in agreements] or [np.zeros(0)])
    say(
        f"overall: {close}/{regions} published regions matched within {PIXELS:g} px, "
        f"{len(overlapping)}/{regions} at IoU >= {MATCH_IOU:g} (feature cosine mean {_figure(overlapping, np.mean)})"
    )
    agreeing = sum(a.agrees for a in agreements)
    if proposals != CAFFE_POST_NMS:
        say(
            f"verdict: with {proposals} proposals (the rows were made with {CAFFE_POST_NMS}), {agreeing} of "
            f"{len(agreements)} pictures agree; {len(overlapping)} of the {regions} published regions have one of "
            f"ours at IoU >= {MATCH_IOU:g}"
        )
    elif agreeing == len(agreements):
        say(
            f"verdict: all {agreeing} pictures agree with {rows_path}: these weights, read as "
            "detection/network.py assumes the conversion left them, reproduce the published regions"
        )
    else:
        say(
            f"verdict: {len(agreements) - agreeing} of {len(agreements)} pictures differ from {rows_path}: these "
            "weights, read as detection/network.py assumes, do not reproduce those rows (other weights or "
            "settings than the rows', or a wrong assumption)"
        )
    return bool(agreements) and agreeing == len(agreements)
