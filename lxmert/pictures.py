"""LXMERT on your own pictures and captions, in one step: regions extracted once (detection.cache),
every pair scored, rankings printed, the score matrix saved."""

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from detection.settings import FIXED_BOXES, RegionSettings
from evaluation import metrics_dict, print_recall, ranks_i2t, ranks_t2i, recall_metrics
from lxmert.loading import load_lxmert
from lxmert.request import LxmertRequest
from lxmert.scoring import PairScorer, caption_tokens, lxmert_scores, normalised_boxes
from utils.atomic import atomic_write
from utils.captions import numbered_lines
from utils.device import check_device
from utils.errors import DataError, OptionError
from utils.hub import hub_unavailable
from utils.images import list_images
from utils.text import plural

DEFAULT_SCORES = "lxmert_scores.csv"
SCORE_FORMATS = (".csv", ".json")


def read_pictures_captions(path):
    """(captions, their image ids or None) of a caption file: one caption per line, or
    `image_id<TAB>caption` on every line. Blank lines are skipped, and counted on stdout."""
    captions, image_ids, blank = [], [], 0
    for number, line in numbered_lines(path):
        line = line.strip(" ")
        if not line.strip():
            blank += 1
            continue
        image_id, tab, caption = line.partition("\t")
        image_id, caption = image_id.strip(), caption.strip()
        if tab and not image_id:
            raise DataError(f"{path}: line {number}: no image id before the tab (expected `image_id<TAB>caption`)")
        if tab and not caption:
            raise DataError(f"{path}: line {number}: image {image_id} has an empty caption after the tab")
        if captions and bool(tab) != bool(image_ids):
            raise DataError(
                f"{path}: line {number} "
                + ("has" if tab else "has no")
                + " image id and tab, unlike the lines before; "
                "give every line as `caption` or every line as `image_id<TAB>caption`"
            )
        if tab:
            image_ids.append(image_id)
        captions.append(caption if tab else line.strip())
    if not captions:
        raise DataError(f"{path}: no captions")
    if blank:
        print(f"{path}: {plural(blank, 'blank line')} skipped")
    return captions, image_ids or None


class RegionSet:
    """Pictures' regions as LXMERT takes them (features and normalised boxes), in a fixed order."""

    def __init__(self, ids, paths, regions, visual_feat_dim, detector):
        self.ids = list(ids)
        width = regions[0]["features"].shape[1]
        if width != visual_feat_dim:
            raise DataError.naming(
                "{detector} {path}: its regions have {width} dims; the LXMERT model's visual_feat_dim is {dim}",
                path=detector,
                width=width,
                dim=visual_feat_dim,
            )
        self.features = np.stack([r["features"] for r in regions]).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(self.features).reshape(len(self.ids), -1).all(1))
        if len(bad):
            raise DataError.naming(
                "{path}: NaN or Inf in its region features ({detector} {weights})", path=paths[bad[0]], weights=detector
            )
        sizes = [(r["img_h"], r["img_w"]) for r in regions]
        self.boxes = normalised_boxes(np.stack([r["boxes"] for r in regions]), sizes, list(paths))

    def images(self, indices):
        """Features (len, regions, dim) and normalised boxes (len, regions, 4) of some pictures."""
        indices = np.asarray(indices)
        return torch.from_numpy(self.features[indices]), torch.from_numpy(self.boxes[indices])


def print_rankings(scores, image_ids, captions, top):
    """Each caption's pictures and each picture's captions, best first (`top` of them; 0: all)."""
    count = lambda n: n if top <= 0 else min(top, n)  # noqa: E731
    width = max(len(i) for i in image_ids)
    for j, caption in enumerate(captions):
        print(f"Caption {j + 1}: {caption}")
        for rank, i in enumerate(
            torch.argsort(scores[:, j], descending=True, stable=True)[: count(len(image_ids))].tolist(), start=1
        ):
            print(f"  {rank:>3}. {image_ids[i]:<{width}}  {scores[i, j]:.4f}")
    for i, image_id in enumerate(image_ids):
        print(f"Picture {image_id}:")
        for rank, j in enumerate(
            torch.argsort(scores[i], descending=True, stable=True)[: count(len(captions))].tolist(), start=1
        ):
            print(f"  {rank:>3}. {scores[i, j]:.4f}  {captions[j]}")


def save_score_matrix(path, scores, image_ids, captions, mode, model_path):
    """The (pictures, captions) scores as CSV (a row per picture, a column per caption) or JSON, atomically."""
    if os.path.splitext(path)[1].lower() == ".json":
        record = {
            "mode": mode,
            "model": model_path,
            "images": image_ids,
            "captions": captions,
            "scores": scores.tolist(),
        }
        with atomic_write(path, "w") as f:
            json.dump(record, f, ensure_ascii=False, indent=1)
    else:
        with atomic_write(path, "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image_id", *captions])
            writer.writerows(
                [image_id, *(repr(float(v)) for v in row)] for image_id, row in zip(image_ids, scores.tolist())
            )


@dataclass(frozen=True, kw_only=True)
class PicturesRequest(LxmertRequest):
    """LXMERT's scores of your own pictures and captions, in one step (LxmertRequest's fields, and these).

    images: a folder or picture files (a list); captions: a file of one caption per line, or of
    `image_id<TAB>caption` lines, which add recall (evaluation.py's, against those ground truths);
    detector, detector_config: the detector's weights and config.yaml (None: its published values);
    policy: its region selection; save_scores: .csv and/or .json paths for the (pictures, captions) matrix;
    top: the pictures printed per caption and captions per picture (0: all).
    """

    images: tuple
    captions: str
    detector: str
    detector_config: str | None = None
    policy: str = "caffe"
    save_scores: tuple = (DEFAULT_SCORES,)
    top: int = 5
    regions: RegionSettings = field(init=False)  # 36 per picture with the policy, as LXMERT's obj36 features

    def __post_init__(self):
        super().__post_init__()
        images = [self.images] if isinstance(self.images, (str, os.PathLike)) else list(self.images)
        object.__setattr__(self, "images", tuple(images))
        for path in self.save_scores:
            if os.path.splitext(path)[1].lower() not in SCORE_FORMATS:
                raise OptionError.naming(
                    "{save_scores} {path}: expected a {formats} file", path=path, formats=" or ".join(SCORE_FORMATS)
                )
        object.__setattr__(self, "regions", RegionSettings(policy=self.policy, boxes=FIXED_BOXES))


def match_pictures(request):
    """LXMERT's (pictures, captions) scores of your own pictures and captions (a PicturesRequest), in one step.

    Regions: the detector's, through the region cache (detection.cache), extracted before LXMERT is loaded,
    so that the two are never in memory together. Prints the rankings and writes the matrix to each of
    `save_scores`. Returns (scores (pictures, captions) float64, picture ids, captions, recall dict or None).
    """
    from detection.cache import photo_regions  # the detector needs torchvision

    captions, truth_ids = read_pictures_captions(request.captions)
    paths = dict(list_images(request.images))
    unknown = sorted(set(truth_ids or ()) - set(paths))
    if unknown:
        raise DataError.naming(
            "{path}: image id {name} is not a picture of {images} ({count} unknown ids)",
            path=request.captions,
            name=repr(unknown[0]),
            count=len(unknown),
        )
    if not os.path.isfile(request.detector):
        raise OptionError.naming(
            "{detector} {path}: detector weights not found (see docs/regions.md)", path=request.detector
        )
    device = check_device(request.device)
    hub_unavailable(request.model, "model")  # a model that cannot be found is said before the extraction
    # One picture per detector pass: batch_size is LXMERT's pairs, and a detector batch of B pictures
    # holds about 0.5 GB each on the CPU (measured at 480x640) for no speed a CPU would gain.
    ids, picture_paths, regions = photo_regions(
        request.images, request.detector, request.detector_config, request.regions, device
    )
    model, tokenizer = load_lxmert(request.model, request.mode, request.tokenizer)
    pictures = RegionSet(ids, picture_paths, regions, model.config.visual_feat_dim, request.detector)
    input_ids, mask = caption_tokens(tokenizer, captions)
    pairs = torch.ones(len(pictures.ids), len(captions), dtype=torch.bool)
    scorer = PairScorer(model, request.mode, device, amp=request.amp and device.type == "cuda")
    with torch.inference_mode():
        scores = lxmert_scores(scorer, pictures, input_ids, mask, pairs, request.batch_size, f"LXMERT {request.mode}")
    print_rankings(scores, pictures.ids, captions, request.top)
    for path in request.save_scores:
        save_score_matrix(path, scores, pictures.ids, captions, request.mode, request.model)
        print(f"Scores of {plural(len(pictures.ids), 'picture')} x {plural(len(captions), 'caption')} saved to {path}")
    recall = None if truth_ids is None else pictures_recall(scores, pictures.ids, truth_ids)
    return scores, pictures.ids, captions, recall


def pictures_recall(scores, image_ids, truth_ids):
    """evaluation.py's recall of the scores against `image_id<TAB>caption` ground truths: picture to
    captions over the pictures that have captions, caption to pictures over every caption whose
    picture could be used. Prints the table; returns its dict."""
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    kept = [j for j, image_id in enumerate(truth_ids) if image_id in row]
    if len(kept) < len(truth_ids):
        print(f"{len(truth_ids) - len(kept)} captions of pictures that could not be used are left out of the recall")
    if not kept:
        return None
    scores = scores[:, kept]
    caption_images = torch.tensor([row[truth_ids[j]] for j in kept])
    described = caption_images.unique()  # sorted picture rows that have captions
    as_described = torch.searchsorted(described, caption_images)
    r = recall_metrics(ranks_i2t(scores[described], "LXMERT's scores", caption_images=as_described)[0])
    ri = recall_metrics(ranks_t2i(scores, "LXMERT's scores", caption_images=caption_images)[0])
    print(f"Recall against the ground truths of the caption file ({len(described)} pictures, {len(kept)} captions):")
    print_recall(r, ri)
    return metrics_dict(r + ri)
