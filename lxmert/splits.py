"""LXMERT's recall on a split of precomputed features, every pair or VSRN's top-k reranked, with
evaluation.py's ranking code."""

import os
from dataclasses import dataclass

import numpy as np
import torch

from data import (
    DEV_CAPTION_LIMIT,
    FeatureFile,
    caption_images_of,
    read_image_ids,
    read_region_boxes,
    whole_images_prefix,
)
from evaluation import (
    average_similarity,
    check_finite,
    encode_data,
    metrics_dict,
    print_recall,
    ranks_i2t,
    ranks_t2i,
    recall_metrics,
    similarity_name,
)
from inference import load_models, split_loader
from lxmert.loading import load_lxmert
from lxmert.request import LxmertRequest
from lxmert.rerank import rerank, top_candidates
from lxmert.scoring import PairScorer, caption_tokens, lxmert_scores, normalised_boxes
from utils.atomic import atomic_write
from utils.captions import read_captions
from utils.device import check_device
from utils.errors import DataError, OptionError


class Split:
    """A split's images (features and normalised boxes) and captions: 5 per image, 1, or any number with
    SPLIT_caption_images.npy (`caption_images`: the image of each caption, None for 5 per image)."""

    def __init__(self, data_path, data_name, split, visual_feat_dim):
        folder = os.path.join(data_path, data_name)
        self.ims_path = os.path.join(folder, f"{split}_ims.npy")
        if not os.path.isfile(self.ims_path):
            raise DataError(
                f"{self.ims_path}: not found; LXMERT needs {split}_ims.npy, {split}_caps.txt, {split}_boxes.npy "
                f"and {split}_image_sizes.npy in {folder} (see docs/lxmert.md)"
            )
        self.features = FeatureFile(self.ims_path)
        if self.features.ndim != 3:
            raise DataError(
                f"{self.ims_path}: features have shape {self.features.shape}; "
                f"expected (num_images, regions, {visual_feat_dim})"
            )
        if self.features.shape[2] != visual_feat_dim:
            raise DataError(
                f"{self.ims_path}: features have {self.features.shape[2]} dims per region; the LXMERT model's "
                f"visual_feat_dim is {visual_feat_dim}"
            )
        boxes, sizes = read_region_boxes(folder, split, needed_by="LXMERT (lxmert_match.py)")
        captions = read_captions(os.path.join(folder, f"{split}_caps.txt"))
        image_of, per_image = caption_images_of(folder, split, len(captions), len(self.features))
        # As evaluation.py: validation (dev) uses the whole images within the first 5000 captions.
        kept = whole_images_prefix(image_of, DEV_CAPTION_LIMIT) if split == "dev" else len(captions)
        self.captions = captions[:kept]
        self.caption_images = None if per_image == 5 else torch.from_numpy(image_of[:kept])
        self.num_images = int(image_of[kept - 1]) + 1 if kept else 0
        ids = read_image_ids(folder, split)
        names = [
            f"{folder}/{split}_boxes.npy, image " + (f"{ids[i]} (row {i})" if ids else str(i))
            for i in range(self.num_images)
        ]
        self.boxes = normalised_boxes(boxes[: self.num_images], sizes[: self.num_images], names)

    def images(self, indices):
        """Features (len, regions, dim) and normalised boxes (len, regions, 4) of some images."""
        features = np.stack([self.features[int(i)] for i in indices])
        if not np.isfinite(features).all():
            bad = int(indices[int(np.flatnonzero(~np.isfinite(features).reshape(len(features), -1).all(1))[0])])
            raise DataError(f"{self.ims_path}: NaN or Inf in the features of image {bad}")
        return torch.from_numpy(features), torch.from_numpy(self.boxes[np.asarray(indices)])


def vsrn_similarity(checkpoints, data_path, data_name, split, vocab_path=None):
    """VSRN's (num_images, num_captions) similarity on the split: one checkpoint or an ensemble's average."""
    opt, vocab, models = load_models(checkpoints, data_path, vocab_path)
    loader = split_loader(opt, vocab, split, data_name)
    embeddings = [encode_data(model, loader) for model in models]
    sims = average_similarity(embeddings, opt.measure, caption_images=loader.dataset.caption_images)
    check_finite(sims, similarity_name(len(embeddings)))
    return sims


def recall_of(i2t_scores, t2i_scores, name="the scores", caption_images=None):
    """evaluation.py's metrics: image-to-text ranks from one score matrix, text-to-image from another
    (`caption_images`: the image of each caption, None for 5 per image)."""
    r = recall_metrics(ranks_i2t(i2t_scores, name, caption_images=caption_images)[0])
    ri = recall_metrics(ranks_t2i(t2i_scores, name, caption_images=caption_images)[0])
    metrics = metrics_dict(r + ri)
    return metrics, r, ri


@dataclass(frozen=True, kw_only=True)
class SplitRequest(LxmertRequest):
    """LXMERT's recall on a split of precomputed features (LxmertRequest's fields, and these).

    data_path, data_name, split: the split, as evaluate_models.py names it (it needs the boxes and image
    sizes utils.tsv_to_precomp writes). vsrn: None scores every pair; VSRN checkpoint path(s) (several: an
    ensemble) or an (num_images, num_captions) first-stage score matrix make it two-stage: LXMERT rescores
    each query's `topk` best targets by VSRN, which rank above the rest in VSRN's order. alpha: candidates
    rank by alpha * LXMERT + (1 - alpha) * VSRN (two-stage only). vocab_path: the VSRN checkpoint's
    vocabulary folder, when not the recorded one. save_scores: a .npy path for LXMERT's (num_images,
    num_captions) float64 scores (NaN where not scored).
    """

    data_path: str
    data_name: str
    split: str = "test"
    vsrn: object = None
    topk: int = 20
    alpha: float = 1.0
    vocab_path: str | None = None
    save_scores: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.topk < 1:
            raise OptionError.naming("{topk} {value}: must be at least 1", value=self.topk)
        if not 0 <= self.alpha <= 1:
            raise OptionError.naming("{alpha} {value}: must lie in [0, 1]", value=self.alpha)
        if self.alpha != 1 and self.vsrn is None:
            raise OptionError.naming("{alpha} {value}: mixes VSRN's scores in, so it needs {vsrn}", value=self.alpha)
        if self.save_scores and not self.save_scores.endswith(".npy"):
            raise OptionError.naming(
                "{save_scores} {path}: a split's scores are saved as one PATH.npy", path=self.save_scores
            )


def evaluate(request):
    """Recall of LXMERT image-text matching on a split (a SplitRequest): dict r1 r5 r10 medr meanr r1i ...
    meanri rsum."""
    device = check_device(request.device)
    model, tokenizer = load_lxmert(request.model, request.mode, request.tokenizer)
    data = Split(request.data_path, request.data_name, request.split, model.config.visual_feat_dim)
    num_images, num_captions = data.num_images, len(data.captions)
    print(f"LXMERT {request.mode} on {request.data_name} {request.split}: {num_images} images, {num_captions} captions")
    first_stage = first_stage_scores(request, num_images, num_captions)
    if first_stage is None:
        pairs = torch.ones(num_images, num_captions, dtype=torch.bool)
        desc = f"LXMERT {request.mode}, all pairs"
    else:
        i2t_candidates = top_candidates(first_stage, request.topk, dim=1)
        t2i_candidates = top_candidates(first_stage, request.topk, dim=0)
        pairs = i2t_candidates | t2i_candidates
        desc = f"LXMERT {request.mode}, VSRN top-{request.topk}"

    input_ids, mask = caption_tokens(tokenizer, data.captions)
    scorer = PairScorer(model, request.mode, device, amp=request.amp and device.type == "cuda")
    with torch.inference_mode():
        scores = lxmert_scores(scorer, data, input_ids, mask, pairs, request.batch_size, desc)

    if first_stage is None:
        metrics, r, ri = recall_of(scores, scores, "LXMERT's scores", data.caption_images)
    else:
        _, vr, vri = recall_of(first_stage, first_stage, "VSRN's scores", data.caption_images)
        print("VSRN (first stage):")
        print_recall(vr, vri)
        i2t_scores = rerank(first_stage, scores, i2t_candidates, request.alpha)
        t2i_scores = rerank(first_stage.T, scores.T, t2i_candidates.T, request.alpha).T
        metrics, r, ri = recall_of(i2t_scores, t2i_scores, "the reranked scores", data.caption_images)
        fusion = f", alpha {request.alpha:g}" if request.alpha != 1 else ""
        print(f"LXMERT {request.mode} reranking VSRN's top-{request.topk}{fusion}:")
    print_recall(r, ri)
    if request.save_scores:
        with atomic_write(request.save_scores, "wb") as f:
            np.save(f, scores.numpy())
        print(f"LXMERT scores saved to {request.save_scores}")
    return metrics


def first_stage_scores(request, num_images, num_captions):
    """VSRN's (num_images, num_captions) scores of a two-stage request (its checkpoints' similarity, or the
    matrix it gives), or None for every pair."""
    vsrn = request.vsrn
    if vsrn is None:
        return None
    if isinstance(vsrn, (str, os.PathLike)):
        vsrn = [vsrn]
    if isinstance(vsrn, (list, tuple)):
        paths = [os.fspath(p) for p in vsrn]
        scores = vsrn_similarity(paths, request.data_path, request.data_name, request.split, request.vocab_path)
    else:
        scores = torch.as_tensor(np.asarray(vsrn), dtype=torch.float32)
        check_finite(scores, "the first-stage scores")
    if tuple(scores.shape) != (num_images, num_captions):
        raise DataError(
            f"VSRN's scores are {tuple(scores.shape)}; "
            f"the {request.split} split has {num_images} images and {num_captions} captions"
        )
    return scores
