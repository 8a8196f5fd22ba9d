import os
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LxmertConfig, LxmertForPreTraining, LxmertModel  # noqa: E402

from conftest import make_opt  # noqa: E402
from evaluation import i2t, recall_metrics, t2i  # noqa: E402
from lxmert_match import caption_tokens, evaluate, load_tokenizer, main, normalised_boxes, rerank, top_candidates  # noqa: E402
from test_reliability import error_line  # noqa: E402
from utils.errors import CheckpointError, DataError, VSRNError  # noqa: E402

NAME = "lx_precomp"
IMAGES, REGIONS, FEAT_DIM = 8, 36, 12
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "dog", "cat", "man", "woman", "runs", "sits", "on", "the", "grass", "red", "blue", "ball", "car", "street", "with", "near", "water"]
VOCAB = SPECIAL + WORDS
HEIGHT_WIDTH = (300, 500)


def tiny_config():
    return LxmertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=2, r_layers=1,
        x_layers=2, visual_feat_dim=FEAT_DIM, num_qa_labels=3, num_object_labels=5, num_attr_labels=4,
        max_position_embeddings=32, initializer_range=0.5,
    )


def save_model(folder, model_class=LxmertForPreTraining, vocab=True):
    torch.manual_seed(0)
    model = model_class(tiny_config())
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
    return torch.from_numpy(ids), torch.from_numpy(ids != 0).long(), torch.from_numpy(features), torch.from_numpy(positions)


def all_pair_inputs(data_path, captions):
    ids, mask, features, positions = hand_inputs(data_path, captions)
    image = torch.arange(IMAGES).repeat_interleave(len(captions))
    caption = torch.arange(len(captions)).repeat(IMAGES)
    return dict(input_ids=ids[caption], attention_mask=mask[caption], visual_feats=features[image], visual_pos=positions[image],
                token_type_ids=torch.zeros_like(ids[caption])), mask[caption]


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
    opt = make_opt(data_name=NAME, img_dim=FEAT_DIM, vocab_size=len(vocab), vocab_path=str(root / "vocab"), batch_size=8)
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
    metrics = evaluate(model_dir, data_path, NAME, "test", vsrn=vsrn, topk=topk, batch_size=16, save_scores=str(scores_path))
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
        evaluate(no_vocab, data_path, NAME, "test", tokenizer_path=str(tmp_path / "absent"))


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


def test_command_line_prints_recall_and_saves_scores(setup, tmp_path, capsys):
    data_path, model_dir, _ = setup
    scores_path = tmp_path / "out" / "scores.npy"
    code = main(["--model", model_dir, "--data_path", data_path, "--data_name", NAME, "--mode", "cosine", "--save_scores", str(scores_path)])
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
    with pytest.raises(VSRNError, match="needs the transformers package"):
        evaluate(model_dir, data_path, NAME, "test")


def test_a_bad_vsrn_checkpoint_is_one_line(setup, tmp_path, capsys):
    data_path, model_dir, _ = setup
    path = tmp_path / "vsrn.pth.tar"
    path.write_bytes(bytes(range(256)) * 8)
    code = main(["--model", model_dir, "--data_path", data_path, "--data_name", NAME, "--vsrn", str(path)])
    assert code == 2
    assert error_line(capsys) == f"error: {path}: not a PyTorch checkpoint (torch.save writes a zip archive or, before PyTorch 1.6, its legacy pickle format)"
