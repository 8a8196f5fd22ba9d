import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LxmertConfig, LxmertForPreTraining, LxmertModel  # noqa: E402

from conftest import error_line, make_opt  # noqa: E402
from evaluation import i2t, recall_metrics, t2i  # noqa: E402
from lxmert import scoring  # noqa: E402
from lxmert.loading import import_transformers, load_lxmert, load_tokenizer  # noqa: E402
from lxmert.rerank import rerank, top_candidates  # noqa: E402
from lxmert.scoring import PairScorer, caption_tokens, lxmert_scores, normalised_boxes, pair_blocks  # noqa: E402
from lxmert.splits import Split, SplitRequest  # noqa: E402
from lxmert import splits  # noqa: E402
from lxmert_match import main  # noqa: E402
from utils import hub  # noqa: E402
from utils.hub import hub_reachable  # noqa: E402
from utils.errors import CheckpointError, DataError, ScoreError, VSRNError, as_flag  # noqa: E402
from detection import pipeline

NAME = "lx_precomp"
IMAGES, REGIONS, FEAT_DIM = 8, 36, 12
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a",
    "dog",
    "cat",
    "man",
    "woman",
    "runs",
    "sits",
    "on",
    "the",
    "grass",
    "red",
    "blue",
    "ball",
    "car",
    "street",
    "with",
    "near",
    "water",
]
VOCAB = SPECIAL + WORDS
HEIGHT_WIDTH = (300, 500)


def evaluate(model, data_path, data_name, split, **fields):
    """lxmert.splits.evaluate of the request of these fields."""
    return splits.evaluate(SplitRequest(model=model, data_path=data_path, data_name=data_name, split=split, **fields))


def tiny_config(feat_dim=FEAT_DIM):
    return LxmertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        l_layers=2,
        r_layers=1,
        x_layers=2,
        visual_feat_dim=feat_dim,
        num_qa_labels=3,
        num_object_labels=5,
        num_attr_labels=4,
        max_position_embeddings=32,
        initializer_range=0.5,
    )


def save_model(folder, model_class=LxmertForPreTraining, vocab=True, feat_dim=FEAT_DIM):
    torch.manual_seed(0)
    model = model_class(tiny_config(feat_dim))
    model.save_pretrained(folder)
    if vocab:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(folder)


def write_split(folder, feat_dim=FEAT_DIM, boxes=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "test_ims.npy", rng.normal(size=(IMAGES, REGIONS, feat_dim)).astype(np.float32))
    captions = []
    for i in range(5 * IMAGES):
        words = rng.choice(WORDS, size=rng.integers(3, 9))
        captions.append(" ".join(words).capitalize())
    captions[3] = " ".join(WORDS[:12] * 2)  # 24 words: cut to 18 word pieces
    (folder / "test_caps.txt").write_text("\n".join(captions) + "\n")
    if boxes:
        height, width = HEIGHT_WIDTH
        corners = rng.uniform(0, 1, size=(IMAGES, REGIONS, 2, 2))
        low, high = corners.min(2), corners.max(2)
        xyxy = np.concatenate([low, high], axis=-1) * np.array([width, height, width, height])
        np.save(folder / "test_boxes.npy", xyxy.astype(np.float32))
        np.save(folder / "test_image_sizes.npy", np.tile(np.array(HEIGHT_WIDTH, dtype=np.int64), (IMAGES, 1)))
        (folder / "test_image_ids.txt").write_text("\n".join(str(100 + i) for i in range(IMAGES)) + "\n")
    return captions


@pytest.fixture(autouse=True)
def _no_model_hub(monkeypatch):
    """No test reaches the model hub: as on a machine where HF_HUB_OFFLINE is set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lxmert")
    captions = write_split(root / "data" / NAME)
    model_dir = save_model(root / "lxmert")
    return str(root / "data"), model_dir, captions


def hand_inputs(data_path, captions):
    """Inputs built by hand as LXMERT's pretraining did: ids of [CLS] words[:18] [SEP], 0-padded to 20."""
    ids = np.zeros((len(captions), 20), dtype=np.int64)
    for row, caption in enumerate(captions):
        pieces = ["[CLS]"] + caption.lower().split()[:18] + ["[SEP]"]
        ids[row, : len(pieces)] = [VOCAB.index(p) for p in pieces]
    folder = os.path.join(data_path, NAME)
    features = np.load(os.path.join(folder, "test_ims.npy"))
    boxes = np.load(os.path.join(folder, "test_boxes.npy"))
    height, width = HEIGHT_WIDTH
    positions = boxes / np.array([width, height, width, height], dtype=np.float32)
    return (
        torch.from_numpy(ids),
        torch.from_numpy(ids != 0).long(),
        torch.from_numpy(features),
        torch.from_numpy(positions),
    )


def all_pair_inputs(data_path, captions):
    ids, mask, features, positions = hand_inputs(data_path, captions)
    image = torch.arange(IMAGES).repeat_interleave(len(captions))
    caption = torch.arange(len(captions)).repeat(IMAGES)
    return dict(
        input_ids=ids[caption],
        attention_mask=mask[caption],
        visual_feats=features[image],
        visual_pos=positions[image],
        token_type_ids=torch.zeros_like(ids[caption]),
    ), mask[caption]


def metrics_of(sims):
    r, ri = i2t(None, None, sims=sims), t2i(None, None, sims=sims)
    metrics = dict(zip(("r1", "r5", "r10", "medr", "meanr", "r1i", "r5i", "r10i", "medri", "meanri"), r + ri))
    metrics["rsum"] = sum(r[:3]) + sum(ri[:3])
    return metrics


def test_inputs_are_lxmert_pretraining_ones(setup):
    data_path, model_dir, captions = setup
    tokenizer = load_tokenizer(model_dir, len(VOCAB))
    ids, mask = caption_tokens(tokenizer, captions)
    expected_ids, expected_mask, _, _ = hand_inputs(data_path, captions)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    assert int(mask[3].sum()) == 20 and ids[3, -1] == VOCAB.index("[SEP]")
    boxes = np.array([[[10, 20, 110, 220]]], dtype=np.float32)
    np.testing.assert_allclose(normalised_boxes(boxes, np.array([[400, 200]])), [[[0.05, 0.05, 0.55, 0.55]]])


def test_matched_recall_equals_all_pairs_with_transformers(setup, tmp_path, capsys):
    data_path, model_dir, captions = setup
    scores_path = tmp_path / "scores.npy"
    metrics = evaluate(model_dir, data_path, NAME, "test", mode="matched", batch_size=7, save_scores=str(scores_path))
    assert f"expected time for {IMAGES * len(captions)} pairs:" in capsys.readouterr().out
    model = LxmertForPreTraining.from_pretrained(model_dir).eval()
    inputs, _ = all_pair_inputs(data_path, captions)
    with torch.no_grad():
        logits = model(**inputs).cross_relationship_score
    expected = torch.softmax(logits, dim=-1)[:, 1].reshape(IMAGES, len(captions))
    assert expected.std() > 0.05  # scores spread enough for recall to test the ranking
    scores = np.load(scores_path)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    assert metrics == pytest.approx(metrics_of(expected.numpy()))
    assert set(metrics) == {"r1", "r5", "r10", "medr", "meanr", "r1i", "r5i", "r10i", "medri", "meanri", "rsum"}


def test_cosine_mode_is_cosine_of_mean_language_and_vision_outputs(setup, tmp_path):
    data_path, model_dir, captions = setup
    scores_path = tmp_path / "scores.npy"
    metrics = evaluate(model_dir, data_path, NAME, "test", mode="cosine", batch_size=16, save_scores=str(scores_path))
    model = LxmertModel.from_pretrained(model_dir).eval()
    inputs, mask = all_pair_inputs(data_path, captions)
    with torch.no_grad():
        out = model(**inputs)
    mask = mask[:, :, None].float()
    text = (out.language_output * mask).sum(1) / mask.sum(1)
    image = out.vision_output.mean(1)
    expected = ((text * image).sum(1) / (text.norm(dim=1) * image.norm(dim=1))).reshape(IMAGES, len(captions))
    np.testing.assert_allclose(np.load(scores_path), expected.numpy(), atol=1e-5)
    assert metrics == pytest.approx(metrics_of(expected.numpy()))


@pytest.fixture(scope="module")
def vsrn_checkpoint(setup, tmp_path_factory):
    from vocab import build_vocab, save_vocab
    from model import VSRN

    _, _, captions = setup
    root = tmp_path_factory.mktemp("vsrn")
    vocab = build_vocab(captions, threshold=1)
    save_vocab(vocab, str(root / "vocab" / f"{NAME}_vocab.json"))
    opt = make_opt(
        data_name=NAME, img_dim=FEAT_DIM, vocab_size=len(vocab), vocab_path=str(root / "vocab"), batch_size=8
    )
    torch.manual_seed(0)
    model = VSRN(opt, training=False)
    path = str(root / "vsrn.pth.tar")
    torch.save({"model": model.state_dict(), "opt": opt}, path)
    return path


def test_rerank_of_whole_gallery_equals_full_lxmert_ranking(setup, vsrn_checkpoint, capsys):
    data_path, model_dir, _ = setup
    full = evaluate(model_dir, data_path, NAME, "test", batch_size=16)
    reranked = evaluate(model_dir, data_path, NAME, "test", vsrn=vsrn_checkpoint, topk=5 * IMAGES, batch_size=16)
    assert reranked == full
    out = capsys.readouterr().out
    assert "VSRN (first stage):" in out and f"reranking VSRN's top-{5 * IMAGES}" in out


def loop_ranks(first, second, topk):
    """Per query (row), by explicit sorting: ranks of its ground truths' best under the two-stage order."""
    ranks = []
    for query, (f_row, s_row) in enumerate(zip(first, second)):
        candidates = sorted(range(len(f_row)), key=lambda t: -f_row[t])[:topk]
        rest = [t for t in sorted(range(len(f_row)), key=lambda t: -f_row[t]) if t not in candidates]
        order = sorted(candidates, key=lambda t: -s_row[t]) + rest
        truths = range(5 * query, 5 * query + 5) if first.shape[1] > first.shape[0] else [query // 5]
        ranks.append(min(order.index(t) for t in truths))
    return np.array(ranks, dtype=float)


def test_rerank_with_small_topk_only_reorders_inside_the_topk(setup, tmp_path):
    data_path, model_dir, captions = setup
    vsrn = np.random.default_rng(1).normal(size=(IMAGES, len(captions))).astype(np.float32)
    scores_path = tmp_path / "scores.npy"
    topk = 3
    metrics = evaluate(
        model_dir, data_path, NAME, "test", vsrn=vsrn, topk=topk, batch_size=16, save_scores=str(scores_path)
    )
    lxmert = np.load(scores_path)
    i2t_pairs = top_candidates(vsrn, topk, dim=1).numpy()
    t2i_pairs = top_candidates(vsrn, topk, dim=0).numpy()
    assert np.array_equal(~np.isnan(lxmert), i2t_pairs | t2i_pairs)  # LXMERT scored only the candidates
    r = recall_metrics(loop_ranks(vsrn, lxmert, topk))
    ri = recall_metrics(loop_ranks(vsrn.T, lxmert.T, topk))
    assert [metrics[k] for k in ("r1", "r5", "r10", "medr", "meanr")] == pytest.approx(r)
    assert [metrics[k] for k in ("r1i", "r5i", "r10i", "medri", "meanri")] == pytest.approx(ri)
    full = evaluate(model_dir, data_path, NAME, "test", batch_size=16)
    first_stage = metrics_of(vsrn)
    assert metrics != full and metrics != first_stage
    # the top-k sets do not change, so recall at K >= topk is VSRN's
    assert [metrics[k] for k in ("r5", "r10", "r5i", "r10i")] == [first_stage[k] for k in ("r5", "r10", "r5i", "r10i")]


def test_rerank_keeps_the_candidate_set_and_the_first_stage_order_behind_it():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(6, 30)), rng.uniform(size=(6, 30))
    candidates = top_candidates(torch.from_numpy(first), 4, dim=1)
    result = rerank(first, second, candidates).numpy()
    for row in range(6):
        order = np.argsort(-result[row], kind="stable")
        chosen = candidates[row].numpy()
        assert set(order[:4]) == set(np.flatnonzero(chosen))
        assert list(order[:4]) == list(np.flatnonzero(chosen)[np.argsort(-second[row][chosen])])
        assert list(order[4:]) == list(np.argsort(-np.where(chosen, -np.inf, first[row]))[:26])
    # alpha 0 ranks the candidates by the first stage too: the first stage's order throughout
    assert np.array_equal(np.argsort(-rerank(first, second, candidates, alpha=0.0).numpy(), 1), np.argsort(-first, 1))


def test_split_without_boxes_is_one_line_error(setup, tmp_path):
    data_path, model_dir, _ = setup
    folder = tmp_path / "data" / NAME
    write_split(folder, boxes=False)
    with pytest.raises(DataError, match=r"test_boxes\.npy: not found; LXMERT"):
        evaluate(model_dir, str(tmp_path / "data"), NAME, "test")


def test_model_without_matching_head_is_refused_for_matched_mode(setup, tmp_path):
    data_path, _, _ = setup
    backbone = save_model(tmp_path / "backbone", LxmertModel)
    with pytest.raises(CheckpointError, match=r"no image-text matching head \(cls\.seq_relationship\)"):
        evaluate(backbone, data_path, NAME, "test", mode="matched")
    assert evaluate(backbone, data_path, NAME, "test", mode="cosine", batch_size=64)["rsum"] >= 0


def test_missing_tokenizer_is_one_line_error(setup, tmp_path):
    data_path, _, _ = setup
    no_vocab = save_model(tmp_path / "no_vocab", vocab=False)
    with pytest.raises(CheckpointError, match=r"no tokenizer \(vocab\.txt or tokenizer\.json\)"):
        evaluate(no_vocab, data_path, NAME, "test")
    with pytest.raises(CheckpointError, match="tokenizer"):
        evaluate(no_vocab, data_path, NAME, "test", tokenizer=str(tmp_path / "absent"))


def test_feature_dimension_other_than_visual_feat_dim_is_one_line_error(setup, tmp_path):
    _, model_dir, _ = setup
    write_split(tmp_path / "data" / NAME, feat_dim=FEAT_DIM + 4)
    with pytest.raises(DataError, match=f"16 dims per region; the LXMERT model's visual_feat_dim is {FEAT_DIM}"):
        evaluate(model_dir, str(tmp_path / "data"), NAME, "test")


def test_non_finite_features_are_one_line_error(setup, tmp_path):
    _, model_dir, _ = setup
    folder = tmp_path / "data" / NAME
    write_split(folder)
    features = np.load(folder / "test_ims.npy")
    features[5, 3, 1] = np.nan
    np.save(folder / "test_ims.npy", features)
    with pytest.raises(DataError, match=r"test_ims\.npy: NaN or Inf in the features of image 5"):
        evaluate(model_dir, str(tmp_path / "data"), NAME, "test", mode="cosine")


@pytest.mark.parametrize(
    "fields, library, flags",
    [
        ({"topk": 0}, "topk 0: must be at least 1", "--topk 0: must be at least 1"),
        ({"alpha": 1.5}, "alpha 1.5: must lie in [0, 1]", "--alpha 1.5: must lie in [0, 1]"),
        (
            {"alpha": 0.5},
            "alpha 0.5: mixes VSRN's scores in, so it needs vsrn",
            "--alpha 0.5: mixes VSRN's scores in, so it needs --vsrn",
        ),
        ({"batch_size": 0}, "batch_size 0: must be at least 1", "--batch_size 0: must be at least 1"),
        ({"mode": "dot"}, "mode dot: expected one of matched, cosine", None),
        (
            {"save_scores": "s.csv"},
            "save_scores s.csv: a split's scores are saved as one PATH.npy",
            "--save_scores s.csv: a split",
        ),
    ],
)
def test_a_request_is_refused_when_made_in_the_library_words_and_the_script_names_its_flags(
    setup, fields, library, flags, capsys
):
    data_path, model_dir, _ = setup
    with pytest.raises(VSRNError) as refused:
        SplitRequest(model=model_dir, data_path=data_path, data_name=NAME, **fields)
    assert str(refused.value) == library and "--" not in str(refused.value)
    if flags:
        args = [f"--{name}={value}" for name, value in fields.items()]
        assert main(["--model", model_dir, "--data_path", data_path, "--data_name", NAME, *args]) == 2
        assert error_line(capsys).startswith(f"error: {flags}")


def test_a_split_of_any_number_of_captions_per_image_is_ranked_by_its_caption_map(setup, tmp_path):
    """As evaluation.py ranks it: an image is found at K when any of its captions is, each caption on its own."""
    data_path, model_dir, captions = setup
    folder = tmp_path / "data" / NAME
    shutil.copytree(os.path.join(data_path, NAME), folder)
    counts = [1, 3, 5, 2, 4, 1, 6, 2]  # captions of each of the 8 images
    caption_images = np.repeat(np.arange(IMAGES), counts)
    (folder / "test_caps.txt").write_text("\n".join(captions[: len(caption_images)]) + "\n")
    np.save(folder / "test_caption_images.npy", caption_images)
    metrics = evaluate(
        model_dir, str(tmp_path / "data"), NAME, "test", batch_size=16, save_scores=str(tmp_path / "s.npy")
    )
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (IMAGES, len(caption_images))
    i2t_ranks = [
        min(int((scores[i] > scores[i, j]).sum()) for j in np.flatnonzero(caption_images == i)) for i in range(IMAGES)
    ]
    t2i_ranks = [int((scores[:, j] > scores[caption_images[j], j]).sum()) for j in range(len(caption_images))]
    for direction, ranks in (("", i2t_ranks), ("i", t2i_ranks)):
        for k in (1, 5, 10):
            assert metrics[f"r{k}{direction}"] == pytest.approx(100.0 * np.mean(np.array(ranks) < k))


def test_command_line_prints_recall_and_saves_scores(setup, tmp_path, capsys):
    data_path, model_dir, _ = setup
    scores_path = tmp_path / "out" / "scores.npy"
    code = main(
        [
            "--model",
            model_dir,
            "--data_path",
            data_path,
            "--data_name",
            NAME,
            "--mode",
            "cosine",
            "--save_scores",
            str(scores_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Image to text:" in out and "Text to image:" in out and "rsum:" in out
    assert np.load(scores_path).shape == (IMAGES, 5 * IMAGES)
    shutil.rmtree(tmp_path / "out")
    code = main(["--model", str(tmp_path / "absent"), "--data_path", data_path, "--data_name", NAME])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --model") and err.count("\n") == 1


def test_missing_transformers_is_one_line_error(setup, monkeypatch):
    data_path, model_dir, _ = setup
    monkeypatch.setitem(sys.modules, "transformers", None)
    for model in (model_dir, "unc-nlp/lxmert-base-uncased"):
        with pytest.raises(VSRNError, match="needs the transformers package"):
            evaluate(model, data_path, NAME, "test")


# ---------------------------------------------------------------------------------------------
# Precision, ties, boxes, non-finite scores, batches, --model


def scores_of_every_pair(data_path, model_dir, amp):
    model, tokenizer = load_lxmert(model_dir, "matched")
    split = Split(data_path, NAME, "test", FEAT_DIM)
    input_ids, mask = caption_tokens(tokenizer, split.captions)
    pairs = torch.ones(IMAGES, len(split.captions), dtype=torch.bool)
    with torch.inference_mode():
        return lxmert_scores(
            PairScorer(model, "matched", torch.device("cpu"), amp=amp), split, input_ids, mask, pairs, 16, "pairs"
        )


def test_amp_keeps_the_matching_head_in_float32_so_scores_do_not_tie(setup):
    """bfloat16 autocast (here the CPU's, as --amp does on CUDA): every pair keeps its own score."""
    data_path, model_dir, captions = setup
    assert len(set(captions)) == len(captions)
    exact = scores_of_every_pair(data_path, model_dir, amp=False)
    mixed = scores_of_every_pair(data_path, model_dir, amp=True)
    assert len(np.unique(mixed.numpy())) == mixed.numel() == IMAGES * len(captions)  # 290 with a bfloat16 head
    assert not torch.equal(mixed, exact)  # the layers did run in bfloat16
    torch.testing.assert_close(mixed, exact, atol=0.1, rtol=0)


def test_top_candidates_take_every_target_tied_with_the_kth():
    scores = torch.tensor([[5.0, 3.0, 4.0, 3.0, 1.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert top_candidates(scores, 2, dim=1).tolist() == [
        [True, False, True, False, False, False],
        [False] * 4 + [True] * 2,
    ]
    assert top_candidates(scores, 3, dim=1).tolist() == [
        [True, True, True, True, False, True],
        [False] * 3 + [True] * 3,
    ]
    assert top_candidates(scores.T, 3, dim=0).tolist() == top_candidates(scores, 3, dim=1).T.tolist()
    assert top_candidates(scores, 10, dim=1).all()


def test_rerank_boundary_tie_keeps_vsrn_recall_at_topk(setup, tmp_path):
    """A ground truth tied with another image's duplicate caption at VSRN's k-th place is a candidate."""
    data_path, model_dir, captions = setup
    shutil.copytree(os.path.join(data_path, NAME), tmp_path / NAME)
    captions = list(captions)
    captions[3] = captions[12]  # image 0's caption 3 duplicates image 2's caption 12
    (tmp_path / NAME / "test_caps.txt").write_text("\n".join(captions) + "\n")
    topk = 5
    vsrn = np.random.default_rng(2).uniform(-1, 1, size=(IMAGES, len(captions))).astype(np.float32)
    vsrn[2] = np.linspace(-3, -2, len(captions))
    vsrn[2, [20, 21, 22, 23]] = [9, 8, 7, 6]
    vsrn[2, [3, 12]] = 5  # tied at the 5th place: image 2's ground truth 12 and image 0's caption 3
    assert top_candidates(vsrn, topk, dim=1)[2].nonzero()[:, 0].tolist() == [3, 12, 20, 21, 22, 23]
    scores_path = tmp_path / "scores.npy"
    metrics = evaluate(
        model_dir, str(tmp_path), NAME, "test", vsrn=vsrn, topk=topk, batch_size=16, save_scores=str(scores_path)
    )
    lxmert = np.load(scores_path)
    assert not np.isnan(lxmert[2, [3, 12]]).any() and lxmert[2, 3] == lxmert[2, 12]  # the same caption: the same score
    first_stage = metrics_of(vsrn)
    assert [metrics[k] for k in ("r5", "r10", "r5i", "r10i")] == [first_stage[k] for k in ("r5", "r10", "r5i", "r10i")]


def test_duplicate_captions_score_exactly_alike_whatever_their_batches(setup, tmp_path, monkeypatch):
    """A batch pads to its longest caption, which moves the scores in their last bits: duplicates are scored once."""
    data_path, model_dir, captions = setup
    shutil.copytree(os.path.join(data_path, NAME), tmp_path / NAME)
    captions = list(captions)
    captions[12] = captions[3] = "a red ball on the grass"
    captions[2], captions[13] = " ".join(WORDS[:15]), "a dog"  # what captions 3 and 12 share a batch with
    (tmp_path / NAME / "test_caps.txt").write_text("\n".join(captions) + "\n")
    monkeypatch.setattr(scoring, "BATCHES_PER_BLOCK", 1)  # batches of (image, 2) and 3, (image, 12) and 13
    scores_path = tmp_path / "scores.npy"
    evaluate(model_dir, str(tmp_path), NAME, "test", batch_size=2, save_scores=str(scores_path))
    scores = np.load(scores_path)
    assert np.array_equal(scores[:, 3], scores[:, 12]) and len(np.unique(scores)) == IMAGES * (len(captions) - 1)


def test_boxes_are_checked_and_clipped_as_lxmert_does():
    sizes = np.array([[200, 400], [100, 100]])
    boxes = np.array(
        [[[0, 0, 400, 200], [-0.001, 10, 400.002, 200.001]], [[10, 10, 20, 20], [0, 0, 100, 100]]], dtype=np.float32
    )
    result = normalised_boxes(boxes, sizes)
    assert result.min() == 0 and result.max() == 1  # within LXMERT's tolerance of 1e-5: clipped
    np.testing.assert_allclose(result[1, 0], [0.1, 0.1, 0.2, 0.2])
    outside = boxes.copy()
    outside[1, 1, 3] = 100.01  # 1e-4 beyond the bottom
    with pytest.raises(
        DataError,
        match=r"^b: region 1's box \(x1 y1 x2 y2 0 0 100 100.01\) is not within the 100 x 100 \(width x height\) image",
    ):
        normalised_boxes(outside, sizes, ["a", "b"])
    outside[1, 1, 3] = np.nan
    with pytest.raises(DataError, match=r"^image 1: region 1's box \(x1 y1 x2 y2 0 0 100 nan\)"):
        normalised_boxes(outside, sizes)
    with pytest.raises(DataError, match=r"^a: image size 0 x 400 \(height x width\); sizes must be positive"):
        normalised_boxes(boxes, np.array([[0, 400], [100, 100]]), ["a", "b"])


def test_split_with_a_box_outside_its_image_or_a_bad_size_is_one_line_naming_the_image(setup, tmp_path):
    data_path, model_dir, _ = setup
    folder = tmp_path / NAME
    shutil.copytree(os.path.join(data_path, NAME), folder)
    boxes = np.load(folder / "test_boxes.npy")
    boxes[5, 2, 2] = HEIGHT_WIDTH[1] * 1.1
    np.save(folder / "test_boxes.npy", boxes)
    with pytest.raises(
        DataError,
        match=rf"^{folder}/test_boxes\.npy, image 105 \(row 5\): region 2's box .* is not within the 500 x 300",
    ):
        evaluate(model_dir, str(tmp_path), NAME, "test")
    boxes[5, 2, 2] = HEIGHT_WIDTH[1]
    np.save(folder / "test_boxes.npy", boxes)
    sizes = np.load(folder / "test_image_sizes.npy")
    sizes[6, 1] = -500
    np.save(folder / "test_image_sizes.npy", sizes)
    with pytest.raises(
        DataError, match=r"image 106 \(row 6\): image size 300 x -500 \(height x width\); sizes must be positive"
    ):
        evaluate(model_dir, str(tmp_path), NAME, "test")


def test_non_finite_first_stage_scores_are_refused(setup):
    data_path, model_dir, captions = setup
    vsrn = np.random.default_rng(1).normal(size=(IMAGES, len(captions))).astype(np.float32)
    vsrn[6, 30:35] = np.nan
    with pytest.raises(
        ScoreError,
        match=r"^the first-stage scores: 5 of the 320 scores are NaN or infinite, the first at image 6, caption 30",
    ):
        evaluate(model_dir, data_path, NAME, "test", vsrn=vsrn, topk=3)


def test_non_finite_lxmert_scores_are_refused_at_once(setup, tmp_path, monkeypatch, capsys):
    data_path, _, _ = setup
    model = LxmertForPreTraining.from_pretrained(save_model(tmp_path / "lxmert"))
    with torch.no_grad():
        model.cls.seq_relationship.weight[1, 0] = float("nan")  # diverged weights
    model.save_pretrained(tmp_path / "diverged")
    shutil.copy(tmp_path / "lxmert" / "vocab.txt", tmp_path / "diverged")
    capsys.readouterr()
    code = main(
        ["--model", str(tmp_path / "diverged"), "--data_path", data_path, "--data_name", NAME, "--batch_size", "16"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert (
        err.startswith("error: LXMERT's scores: ")
        and "of the last 16 pairs scored (of 16 so far) are NaN or infinite" in err
    )


def test_pair_blocks_fill_whole_batches_however_sparse_the_rows():
    rng = np.random.default_rng(0)
    pairs = torch.from_numpy(rng.uniform(size=(9, 40)) < 0.1)
    pairs[4] = True
    blocks = list(pair_blocks(pairs, 8))
    assert [len(images) for images, _ in blocks[:-1]] == [8] * (len(blocks) - 1) and 0 < len(blocks[-1][0]) <= 8
    images, captions = (torch.cat(ids) for ids in zip(*blocks))
    assert torch.equal(torch.stack([images, captions], 1), pairs.nonzero())
    assert list(pair_blocks(torch.zeros(3, 4, dtype=torch.bool), 8)) == []


def test_two_stage_batches_are_full(setup, monkeypatch):
    """Blocks of one batch (as 256 pairs are on COCO 5K's 25000 captions): every batch but the last is full."""
    data_path, model_dir, captions = setup
    monkeypatch.setattr(scoring, "BATCHES_PER_BLOCK", 1)
    sizes = []
    score = PairScorer.score
    monkeypatch.setattr(
        PairScorer,
        "score",
        lambda self, language, mask, vision: sizes.append(len(vision)) or score(self, language, mask, vision),
    )
    vsrn = np.random.default_rng(1).normal(size=(IMAGES, len(captions))).astype(np.float32)
    evaluate(model_dir, data_path, NAME, "test", vsrn=vsrn, topk=2, batch_size=16)
    pairs = int((top_candidates(vsrn, 2, dim=1) | top_candidates(vsrn, 2, dim=0)).sum())
    assert sum(sizes) == pairs and sizes[:-1] == [16] * (len(sizes) - 1)


def test_model_path_that_is_no_folder_fails_at_once_without_the_hub(setup, tmp_path, monkeypatch, capsys):
    data_path, _, _ = setup
    monkeypatch.setattr(hub, "hub_reachable", lambda: pytest.fail("the hub was asked about a path"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    expected = {
        str(tmp_path / "absent"): "folder not found",
        "./lxmert-base": "folder not found",
        "runs/lxmert": "folder not found",
        "a/b/c": "folder not found",
        "weights.bin": "a file, not a folder; LXMERT's weights are a folder (see docs/lxmert.md)",
    }
    for value, message in expected.items():
        assert main(["--model", value, "--data_path", data_path, "--data_name", NAME]) == 2
        assert capsys.readouterr().err == f"error: --model {value}: {message}\n"
    assert (
        main(["--model", str(setup[1]), "--tokenizer", "runs/vocab", "--data_path", data_path, "--data_name", NAME])
        == 2
    )
    assert capsys.readouterr().err == "error: --tokenizer runs/vocab: folder not found\n"


def test_hub_name_is_tried_only_when_the_hub_is_reachable(setup, monkeypatch, capsys):
    data_path, _, _ = setup
    args = ["--model", "unc-nlp/lxmert-base-uncased", "--data_path", data_path, "--data_name", NAME]
    calls = []

    def config_dict(value, local_files_only):
        calls.append(local_files_only)
        if local_files_only:
            raise OSError(
                f"Cannot find the requested files in the disk cache\nand outgoing traffic has been disabled ({value})"
            )
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files,\n"
            "and couldn't find them in the cached files."
        )

    monkeypatch.setattr(import_transformers().PretrainedConfig, "get_config_dict", config_dict)
    assert main(args) == 2  # HF_HUB_OFFLINE=1: the cache alone, no connection
    assert capsys.readouterr().err == (
        "error: --model unc-nlp/lxmert-base-uncased: no such folder, and not in the hub's cache "
        "(HF_HUB_OFFLINE is set); download the weights into a folder and pass that (see docs/lxmert.md)\n"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    assert main(args) == 2
    assert "not in the hub's cache (the model hub cannot be reached); download" in capsys.readouterr().err
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "error: --model unc-nlp/lxmert-base-uncased: no such folder, and the model hub cannot provide it "
        "(We couldn't connect to 'https://huggingface.co' to load the files,)\n"
    )
    assert calls == [True, True, False]


def test_hub_reachability_is_a_quick_local_check(monkeypatch):
    import socket

    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with monkeypatch.context() as patched:
        patched.setattr(
            socket, "create_connection", lambda *a, **k: pytest.fail("connected although HF_HUB_OFFLINE is set")
        )
        assert not hub_reachable()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable(timeout=1)
    assert not hub_reachable(timeout=1)  # the port is closed now


def test_model_of_another_type_is_refused(setup, tmp_path):
    from transformers import BertConfig

    data_path, _, _ = setup
    BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match=r"^model .*/bert: a bert model \(config\.json\), not LXMERT$") as refused:
        evaluate(str(tmp_path / "bert"), data_path, NAME, "test")
    assert refused.value.worded(as_flag).startswith(f"--model {tmp_path / 'bert'}: a bert model")  # the script's words
    untyped = tmp_path / "untyped"
    untyped.mkdir()
    (untyped / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "hidden_size": 16}')
    with pytest.raises(CheckpointError, match=r"a BertForMaskedLM model \(config\.json\), not LXMERT$"):
        evaluate(str(untyped), data_path, NAME, "test")


def test_mode_help_says_averaged(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "cosine: cosine of the language and vision outputs, each averaged over its positions" in out
        and "pooled" not in out
    )


# ---------------------------------------------------------------------------------------------
# Your own pictures, in one step


@pytest.fixture(scope="module")
def own_pictures(tmp_path_factory):
    """(pictures folder, ground-truth caption file, tiny detector weights, tiny LXMERT reading its 64-d regions)."""
    from PIL import Image
    from tiny_detector import tiny_detector_state_dict

    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.RandomState(0)
    (root / "photos").mkdir()
    for name in ("beach", "dog", "street"):
        height, width = rng.randint(40, 80, size=2)
        Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "photos" / f"{name}.png")
    captions = root / "captions.tsv"
    captions.write_text(
        "dog\ta dog runs on the grass\nbeach\tthe water near a man\n\nstreet\ta red car on the street\n"
        "dog\ta dog with a ball\nbeach\ta woman sits near the water\n"
    )
    weights = root / "tiny_detector.bin"
    torch.save(tiny_detector_state_dict(), weights)
    return root / "photos", captions, str(weights), save_model(root / "lxmert", feat_dim=64)


def test_one_step_demo_scores_every_picture_caption_pair_and_caches_the_regions(
    own_pictures, tmp_path, monkeypatch, capsys
):
    from detection import cache, pipeline

    photos, captions_file, weights, model_dir = own_pictures
    extracted = []
    batch = pipeline.extract_regions_batch
    monkeypatch.setattr(
        pipeline,
        "extract_regions_batch",
        lambda net, images, settings: (extracted.extend(images), batch(net, images, settings))[1],
    )
    csv_path, json_path = tmp_path / "out" / "scores.csv", tmp_path / "scores.json"
    args = [
        "--images",
        str(photos),
        "--captions",
        str(captions_file),
        "--detector",
        weights,
        "--model",
        model_dir,
        "--batch_size",
        "4",
        "--top",
        "0",
    ]
    assert main(args + ["--save_scores", str(csv_path), str(json_path)]) == 0
    out = capsys.readouterr().out
    assert len(extracted) == 3
    cache_path = cache.regions_cache_path(weights)
    assert f"Regions of 3 pictures extracted (caffe policy, 36 boxes) and cached in {cache_path}\n" in out
    assert cache_path.startswith(os.environ["VSRN_CACHE"])

    record = json.loads(json_path.read_text())
    captions = [
        "a dog runs on the grass",
        "the water near a man",
        "a red car on the street",
        "a dog with a ball",
        "a woman sits near the water",
    ]
    assert (
        record["images"] == ["beach", "dog", "street"]
        and record["captions"] == captions
        and record["mode"] == "matched"
    )
    scores = np.array(record["scores"])
    with open(csv_path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["image_id", *captions] and [row[0] for row in table[1:]] == record["images"]
    assert np.array_equal(np.array([[float(v) for v in row[1:]] for row in table[1:]]), scores)

    # LxmertForPreTraining itself on the cached regions (boxes divided by the picture's size) and the captions.
    regions = cache.cached_regions([str(photos / f"{i}.png") for i in record["images"]], weights)
    assert len(extracted) == 3
    model = LxmertForPreTraining.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir, len(VOCAB))
    ids, mask = caption_tokens(tokenizer, captions)
    for i, r in enumerate(regions.values()):
        positions = torch.from_numpy(
            r["boxes"] / np.array([r["img_w"], r["img_h"], r["img_w"], r["img_h"]], dtype=np.float32)
        )
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=torch.zeros_like(ids),
                visual_feats=torch.from_numpy(r["features"])[None].expand(len(captions), -1, -1),
                visual_pos=positions[None].expand(len(captions), -1, -1),
            ).cross_relationship_score
        np.testing.assert_allclose(scores[i], torch.softmax(logits, -1)[:, 1].numpy(), atol=1e-5)

    # The rankings, best first, and recall against the file's ground truths.
    best = np.argsort(-scores[:, 0], kind="stable")
    assert (
        "Caption 1: a dog runs on the grass\n"
        + "".join(f"  {k + 1:>3}. {record['images'][i]:<6}  {scores[i, 0]:.4f}\n" for k, i in enumerate(best))
        in out
    )
    assert f"Picture dog:\n    1. {scores[1].max():.4f}  {captions[int(np.argmax(scores[1]))]}\n" in out
    truth = np.array([1, 0, 2, 1, 0])
    i2t_ranks = [np.sum(scores[i] > scores[i, truth == i].max()) for i in range(3)]
    t2i_ranks = [np.sum(scores[:, j] > scores[truth[j], j]) for j in range(5)]
    expected = recall_metrics(i2t_ranks) + recall_metrics(t2i_ranks)
    assert "Recall against the ground truths of the caption file (3 pictures, 5 captions):" in out
    assert (
        "Image to text: %.1f %.1f %.1f %.1f %.1f" % expected[:5] in out
        and "Text to image: %.1f %.1f %.1f %.1f %.1f" % expected[5:] in out
    )

    # A second run reads the regions from the cache: nothing is extracted again.
    assert main(args + ["--save_scores", str(tmp_path / "again.json")]) == 0
    assert len(extracted) == 3
    assert json.loads((tmp_path / "again.json").read_text())["scores"] == record["scores"]


def test_one_step_demo_with_plain_captions_has_no_recall(own_pictures, tmp_path, monkeypatch, capsys):
    photos, _, weights, model_dir = own_pictures
    captions_file = tmp_path / "captions.txt"
    captions_file.write_text("a dog on the grass\na red car\n")
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "--images",
                str(photos / "dog.png"),
                str(photos / "street.png"),
                "--captions",
                str(captions_file),
                "--detector",
                weights,
                "--model",
                model_dir,
                "--mode",
                "cosine",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Picture street:" in out and "Caption 2: a red car" in out and "Recall" not in out
    with open(tmp_path / "lxmert_scores.csv", newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["image_id", "dog", "street"]


def test_one_step_demo_bad_inputs_are_one_line(own_pictures, tmp_path, capsys):
    photos, captions_file, weights, model_dir = own_pictures
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("dog\ta dog\na cat\n")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("dog\ta dog\ncat\ta cat\n")
    base = ["--images", str(photos), "--detector", weights, "--model", model_dir]
    cases = {
        ("--images", str(photos)): "error: --images: needs --captions (see docs/lxmert.md)",
        (*base, "--captions", str(mixed)): f"error: {mixed}: line 2 has no image id and tab, unlike the lines before; "
        "give every line as `caption` or every line as `image_id<TAB>caption`",
        (
            *base,
            "--captions",
            str(unknown),
        ): f"error: {unknown}: image id 'cat' is not a picture of --images (1 unknown ids)",
        (
            *base,
            "--captions",
            str(captions_file),
            "--save_scores",
            "s.npy",
        ): "error: --save_scores s.npy: expected a .csv or .json file",
        (
            *base,
            "--captions",
            str(captions_file),
            "--topk",
            "3",
        ): "error: --topk: belongs to a split's evaluation, not to --images",
        (
            "--images",
            str(photos),
            "--captions",
            str(captions_file),
            "--detector",
            str(tmp_path / "absent.bin"),
            "--model",
            model_dir,
        ): f"error: --detector {tmp_path / 'absent.bin'}: detector weights not found (see docs/regions.md)",
        (
            "--images",
            str(tmp_path / "nothing"),
            "--captions",
            str(captions_file),
            "--detector",
            weights,
            "--model",
            model_dir,
        ): f"error: --images {tmp_path / 'nothing'}: no such file or folder",
        (
            "--model",
            model_dir,
        ): "error: --data_path and --data_name name the split to evaluate; or match your own pictures with "
        "--images DIR --captions FILE --detector WEIGHTS",
    }
    for args, message in cases.items():
        assert main(list(args)) == 2
        assert capsys.readouterr().err == message + "\n"


def test_a_bad_vsrn_checkpoint_is_one_line(setup, tmp_path, capsys):
    data_path, model_dir, _ = setup
    path = tmp_path / "vsrn.pth.tar"
    path.write_bytes(bytes(range(256)) * 8)
    code = main(["--model", model_dir, "--data_path", data_path, "--data_name", NAME, "--vsrn", str(path)])
    assert code == 2
    assert (
        error_line(capsys) == f"error: {path}: not a PyTorch checkpoint "
        "(torch.save writes a zip archive or, before PyTorch 1.6, its legacy pickle format)"
    )


def test_a_caption_file_names_its_real_problem_and_counts_blank_lines(tmp_path, capsys):
    from lxmert.pictures import read_pictures_captions

    path = tmp_path / "captions.txt"
    path.write_text("000123\ta dog\n\n000456\t\n")
    with pytest.raises(Exception, match=r"line 3: image 000456 has an empty caption after the tab$"):
        read_pictures_captions(str(path))
    path.write_text("\ta dog\n")
    with pytest.raises(Exception, match=r"line 1: no image id before the tab"):
        read_pictures_captions(str(path))
    path.write_text("a dog on a bench\n\n  \na cat\n")
    assert read_pictures_captions(str(path)) == (["a dog on a bench", "a cat"], None)
    assert capsys.readouterr().out == f"{path}: 2 blank lines skipped\n"
    path.write_text("7\ta dog\n8\ta cat")
    assert read_pictures_captions(str(path)) == (["a dog", "a cat"], ["7", "8"])
    assert capsys.readouterr().out == ""


def one_step_args(photos, detector, tmp_path):
    """lxmert_match.py's flags for `photos` and one caption, with `detector` and an empty model folder."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\n")
    (tmp_path / "lxmert").mkdir()
    return [
        "--images",
        str(photos),
        "--captions",
        str(captions),
        "--detector",
        detector,
        "--model",
        str(tmp_path / "lxmert"),
    ]


def test_lxmert_says_it_cached_regions_only_once_they_are(own_photos, tmp_path, capsys):
    pytest.importorskip("transformers")
    import lxmert_match

    photos, _, checkpoint, _ = own_photos
    args = one_step_args(photos, checkpoint, tmp_path)
    assert lxmert_match.main(args) == 2
    out, err = capsys.readouterr()
    assert "Regions of" not in out and "a VSRN checkpoint" in err and err.count("\n") == 1


def test_lxmert_extracts_one_picture_per_detector_pass_whatever_its_batch_size(own_photos, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import lxmert_match

    photos, weights, _, _ = own_photos
    passes = []

    def detect_share(detector, share, paths, pictures, settings):
        passes.append(len(share))
        raise KeyboardInterrupt  # enough: the pass was seen

    monkeypatch.setattr(pipeline, "detect_share", detect_share)
    args = one_step_args(photos, weights, tmp_path)
    assert lxmert_match.main([*args, "--batch_size", "64"]) == 130
    assert passes == [1]  # 0.5 GB a picture on the CPU: LXMERT's batch of pairs is no detector batch
