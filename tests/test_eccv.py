"""ECCV Caption / CxC / COCO metrics through the eccv_caption package, against our own recall."""

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_models
import evaluation
from conftest import make_opt
from evaluation import eccv_caption_metrics, evaluate_embeddings, i2t, similarity, t2i
from model import VSRN

eccv_caption = pytest.importorskip("eccv_caption")


def coco5k_embeddings(seed, dim=8):
    """Random (img_embs, cap_embs) of 5000 images x 5 captions, one image row per caption."""
    rng = np.random.default_rng(seed)
    images = np.repeat(rng.normal(size=(5000, dim)), 5, axis=0)
    captions = images + rng.normal(scale=1.5, size=images.shape)
    return images.astype(np.float32), captions.astype(np.float32)


@pytest.fixture(scope="module")
def embeddings():
    return coco5k_embeddings(0)


def test_package_coco_5k_and_1k_recall_equal_ours(embeddings, capsys):
    scores = eccv_caption_metrics(*embeddings)
    sims = similarity(*embeddings)
    r, ri = i2t(*embeddings, sims=sims), t2i(*embeddings, sims=sims)
    for k, (ours_i2t, ours_t2i) in zip((1, 5, 10), zip(r[:3], ri[:3])):
        assert scores[f"coco_5k_r{k}"]["i2t"] == pytest.approx(ours_i2t, abs=1e-9)
        assert scores[f"coco_5k_r{k}"]["t2i"] == pytest.approx(ours_t2i, abs=1e-9)
    fold5, _ = evaluate_embeddings([embeddings], fold5=True)
    for k in (1, 5, 10):
        assert scores[f"coco_1k_r{k}"]["i2t"] == pytest.approx(fold5[f"r{k}"], abs=1e-9)
        assert scores[f"coco_1k_r{k}"]["t2i"] == pytest.approx(fold5[f"r{k}i"], abs=1e-9)
    assert 0 < scores["coco_1k_r1"]["i2t"] < 100 and scores["coco_5k_r1"]["i2t"] < scores["coco_1k_r1"]["i2t"]
    expected = {f"{d}_r{k}" for d in ("coco_1k", "coco_5k", "cxc") for k in (1, 5, 10)}
    assert set(scores) == expected | {"eccv_map_at_r", "eccv_rprecision", "eccv_r1"}
    assert all(set(v) == {"i2t", "t2i"} and 0 <= v["i2t"] <= 100 for v in scores.values())


def test_caption_ids_give_the_rows_order(embeddings):
    """The same images in another order, with their caption ids: the same figures."""
    default = eccv_caption_metrics(*embeddings)
    coco_ids = eccv_caption.Metrics().coco_ids
    image_order = np.random.default_rng(1).permutation(5000)
    rows = (image_order[:, None] * 5 + np.arange(5)).ravel()
    permuted = eccv_caption_metrics(embeddings[0][rows], embeddings[1][rows], caption_ids=coco_ids[rows])
    assert permuted.keys() == default.keys()
    for name in default:
        assert permuted[name] == pytest.approx(default[name]), name
    with pytest.raises(ValueError, match="caption_ids must be the 25000 COCO 5K test caption ids"):
        eccv_caption_metrics(*embeddings, caption_ids=np.arange(25000))


def test_rankings_reach_every_eccv_positive():
    """Scores that put each image's ECCV positive captions first (up to 48 of them) give it
    mAP@R = R-Precision = (its positives among the 25000 test captions) / (its positives):
    nothing was cut from the ranking."""
    metrics = eccv_caption.Metrics()
    caption_row = {int(c): j for j, c in enumerate(metrics.coco_ids)}
    image_row = {metrics.coco_gts["t2i"][int(c)][0]: j // 5 for j, c in enumerate(metrics.coco_ids)}
    sims = torch.rand(5000, 25000, generator=torch.Generator().manual_seed(0))
    reachable = []
    for image, captions in metrics.eccv_gts["i2t"].items():
        rows = [caption_row[c] for c in captions if c in caption_row]
        sims[image_row[image], rows] += 1
        reachable.append(len(rows) / len(captions))
    assert max(len(v) for v in metrics.eccv_gts["i2t"].values()) > 10
    scores = eccv_caption_metrics(None, None, sims=sims)
    assert scores["eccv_map_at_r"]["i2t"] == pytest.approx(100 * np.mean(reachable))
    assert scores["eccv_rprecision"]["i2t"] == pytest.approx(100 * np.mean(reachable))


def test_ranked_targets_are_exact_overall_and_within_each_fold():
    scores = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    query_folds, target_folds = np.repeat([0, 1, 2], 4), np.tile([0, 1, 2], 10)
    ranked = evaluation._ranked_targets(scores, 7, query_folds, target_folds, fold_depth=3)
    full = scores.argsort(dim=1, descending=True).tolist()
    for row, (mine, everything) in enumerate(zip(ranked, full)):
        assert mine[:7] == everything[:7]
        fold = query_folds[row]
        assert [t for t in mine if target_folds[t] == fold][:3] == [t for t in everything if target_folds[t] == fold][
            :3
        ]


def coco_checkpoint(tmp_path, toy_data, name, seed):
    from vocab import load_vocab_by_name

    _, vocab_path = toy_data
    vocab_dir = tmp_path / "vocab"
    if not vocab_dir.exists():
        vocab_dir.mkdir()
        shutil.copy(os.path.join(vocab_path, "toy_precomp_vocab.json"), vocab_dir / "coco_precomp_vocab.json")
    vocab = load_vocab_by_name(str(vocab_dir), "coco_precomp")
    torch.manual_seed(seed)
    opt = make_opt(data_name="coco_precomp", vocab_size=len(vocab), vocab_path=str(vocab_dir), data_path=str(tmp_path))
    path = str(tmp_path / f"{name}.pth.tar")
    torch.save({"model": VSRN(opt, training=False).state_dict(), "opt": opt}, path)
    return path


def test_evalrank_eccv_scores_the_ensembles_averaged_similarity(tmp_path, toy_data, monkeypatch, capsys):
    """The averaged similarity of the ensemble, computed once, feeds both the table and ECCV."""
    (tmp_path / "coco_precomp").mkdir()  # the checkpoints' data folder (its loader is replaced below)
    paths = [coco_checkpoint(tmp_path, toy_data, name, seed) for seed, name in enumerate(("one", "two"))]
    ensemble = [coco5k_embeddings(1), coco5k_embeddings(2)]
    per_model = iter(ensemble)
    monkeypatch.setattr(evaluation, "split_loader", lambda *a: SimpleNamespace(dataset=range(25000)))
    monkeypatch.setattr(evaluation, "encode_data", lambda model, loader: next(per_model))
    received = {}

    def table(embeddings, measure, fold5, sims):
        received["table"] = sims
        print("Text to image: ...")
        ranks = (np.zeros(5000), np.zeros(5000))
        return {"r1": 50.0}, (ranks, ranks)

    def eccv_metrics(img_embs, cap_embs, sims):
        received["eccv"] = sims
        return {name: {"i2t": 1.0 + k, "t2i": 2.0 + k} for k, name in enumerate(evaluation.ECCV_TARGET_NAMES)}

    monkeypatch.setattr(evaluation, "evaluate_embeddings", table)
    monkeypatch.setattr(evaluation, "eccv_caption_metrics", eccv_metrics)
    metrics = evaluation.evalrank(*paths, split="testall", eccv=True, ranks_path=str(tmp_path / "ranks.pth.tar"))
    assert received["table"] is received["eccv"]
    torch.testing.assert_close(received["eccv"], (similarity(*ensemble[0]) + similarity(*ensemble[1])) / 2)
    assert metrics["r1"] == 50.0 and metrics["eccv_map_at_r_i2t"] == 1.0 and metrics["coco_5k_r10_t2i"] == 2.0 + 11
    out = capsys.readouterr().out
    assert (
        out.index("Text to image:")
        < out.index("ECCV mAP@R")
        < out.index("CxC R@1/5/10")
        < out.index("COCO 5K R@1/5/10")
    )
    assert "  COCO 5K R@1/5/10   10.0 / 11.0 / 12.0 | 11.0 / 12.0 / 13.0" in out


def test_eccv_outside_coco_testall_is_one_line(tmp_path, toy_data, capsys):
    assert evaluate_models.main(["--split", "test", "--eccv", "model.pth.tar"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --eccv: ECCV Caption and CxC annotate COCO's 5K test images; use --split testall, not test"
    )
    from vocab import load_vocab_by_name

    data_path, vocab_path = toy_data
    opt = make_opt(vocab_size=len(load_vocab_by_name(vocab_path, "toy_precomp")))
    path = str(tmp_path / "toy.pth.tar")
    torch.save({"model": VSRN(opt, training=False).state_dict(), "opt": opt}, path)
    args = ["--split", "testall", "--eccv", "--data_path", data_path, "--vocab_path", vocab_path, path]
    assert evaluate_models.main(args) == 2
    assert "the checkpoint is for toy_precomp" in capsys.readouterr().err


def test_non_finite_scores_are_refused(embeddings):
    sims = similarity(*embeddings)
    sims[4999, 3] = float("nan")
    with pytest.raises(
        evaluation.ScoreError,
        match=r"^the similarity: 1 of the 125,000,000 scores are NaN or infinite, the first at image 4999, caption 3 ",
    ):
        eccv_caption_metrics(None, None, sims=sims)
