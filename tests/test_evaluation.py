import os

import numpy as np
import pytest
import torch

from conftest import drop_last_caption, error_line, make_opt, shared_file
from data import get_test_loader
from evaluation import encode_data, evalrank, evaluate_embeddings, i2t, similarity, t2i
from model import VSRN
from vocab import load_vocab, load_vocab_by_name
from toy_training import SMALL, train_args
import evaluate_models
from inference import load_models
from vocab import save_vocab
import train
from vocab import vocabulary_from_words


def test_encode_data_equals_encoding_every_caption_row(toy_data):
    data_path, vocab_path = toy_data
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    opt = make_opt(data_path=data_path, vocab_size=len(vocab), batch_size=7)
    torch.manual_seed(0)
    model = VSRN(opt)
    loader = get_test_loader(
        data_path, "toy_precomp", "test", vocab, batch_size=7, workers=0, max_len=opt.max_len, img_dim=opt.img_dim
    )
    img_embs, cap_embs = encode_data(model, loader)
    assert img_embs.dtype == np.float32 and img_embs.shape == (100, 32) and cap_embs.shape == (100, 32)
    expected_img, expected_cap = np.zeros_like(img_embs), np.zeros_like(cap_embs)
    with torch.no_grad():
        for images, captions, lengths, ids, _, _ in loader:
            img, cap, _ = model.forward_emb(images, captions, lengths)
            expected_img[list(ids)], expected_cap[list(ids)] = img.numpy(), cap.numpy()
    np.testing.assert_allclose(img_embs, expected_img, atol=1e-6)
    np.testing.assert_array_equal(cap_embs, expected_cap)
    assert np.array_equal(img_embs[0], img_embs[4]) and not np.array_equal(img_embs[0], img_embs[5])


def random_embeddings(n_images, dim, seed):
    rng = np.random.default_rng(seed)
    images = np.repeat(rng.normal(size=(n_images, dim)), 5, axis=0)
    captions = images + rng.normal(scale=1.5, size=images.shape)
    return images.astype(np.float32), captions.astype(np.float32)


def test_fold5_averages_the_five_1k_folds(capsys):
    embeddings = [random_embeddings(5000, 8, 0)]
    metrics, (rt, rti) = evaluate_embeddings(embeddings, fold5=True)
    img, cap = embeddings[0]
    folds = [
        i2t(img[f * 5000 : (f + 1) * 5000], cap[f * 5000 : (f + 1) * 5000])
        + t2i(img[f * 5000 : (f + 1) * 5000], cap[f * 5000 : (f + 1) * 5000])
        for f in range(5)
    ]
    expected = np.mean(folds, axis=0)
    names = ("r1", "r5", "r10", "medr", "meanr", "r1i", "r5i", "r10i", "medri", "meanri")
    assert [metrics[n] for n in names] == pytest.approx(list(expected))
    assert metrics["rsum"] == pytest.approx(sum(expected[[0, 1, 2, 5, 6, 7]]))
    assert len(rt[0]) == 1000 and len(rti[0]) == 5000  # the first fold's ranks, as the original
    out = capsys.readouterr().out
    assert out.count("Image to text:") == 6 and "Mean metrics:" in out


def test_ensemble_averages_similarity_matrices(capsys):
    first, second = random_embeddings(40, 6, 1), random_embeddings(40, 6, 2)
    metrics, _ = evaluate_embeddings([first, second])
    sims = (similarity(*first) + similarity(*second)) / 2
    r = i2t(*first, sims=sims.numpy())
    ri = t2i(*first, sims=sims.numpy())
    assert (metrics["r1"], metrics["r5"], metrics["meanr"], metrics["r1i"], metrics["meanri"]) == (
        r[0],
        r[1],
        r[4],
        ri[0],
        ri[4],
    )
    alone, _ = evaluate_embeddings([first])
    assert alone != metrics


def test_original_release_checkpoint_evaluates_without_conversion(tmp_path):
    checkpoint = shared_file("fixtures", "legacy_vsrn_f30k_tiny.pth.tar")
    vocab_pkl = shared_file("vocab", "f30k_precomp_vocab.pkl")
    vocab = load_vocab(vocab_pkl)
    folder = tmp_path / "data" / "f30k_precomp"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(folder / "test_ims.npy", rng.random((6, 36, 2048), dtype=np.float32))
    words = [vocab.idx2word[i] for i in range(4, 400)]
    captions = [" ".join(rng.choice(words, size=rng.integers(5, 15))) for _ in range(30)]
    (folder / "test_caps.txt").write_text("\n".join(captions) + "\n")
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    os.symlink(vocab_pkl, vocab_dir / "f30k_precomp_vocab.pkl")
    metrics = evalrank(
        checkpoint,
        data_path=str(tmp_path / "data"),
        split="test",
        vocab_path=str(vocab_dir),
        ranks_path=str(tmp_path / "ranks.pth.tar"),
    )
    assert 0 <= metrics["r1"] <= 100 and 1 <= metrics["medr"] <= 6 and 1 <= metrics["medri"] <= 6
    ranks = torch.load(tmp_path / "ranks.pth.tar")
    assert ranks["rt"][0].shape == (6,) and ranks["rti"][0].shape == (30,)


def test_original_release_checkpoint_prefers_the_pkl_and_says_so(tmp_path, capsys):
    from inference import load_models
    from vocab import save_vocab, vocabulary_from_words

    checkpoint = shared_file("fixtures", "legacy_vsrn_f30k_tiny.pth.tar")
    vocab_pkl = shared_file("vocab", "f30k_precomp_vocab.pkl")
    words = load_vocab(vocab_pkl).idx2word
    # A vocabulary of the same size and other word order, as vocab.py would build it.
    save_vocab(
        vocabulary_from_words([words[i] for i in range(4)] + sorted(words[i] for i in range(4, len(words)))),
        str(tmp_path / "f30k_precomp_vocab.json"),
    )
    os.symlink(vocab_pkl, tmp_path / "f30k_precomp_vocab.pkl")
    (tmp_path / "data" / "f30k_precomp").mkdir(parents=True)
    _, vocab, _ = load_models([checkpoint], str(tmp_path / "data"), str(tmp_path))
    assert vocab.path == str(tmp_path / "f30k_precomp_vocab.pkl") and vocab.idx2word == words
    assert (
        f"records no vocabulary digest: using the vocabulary {tmp_path / 'f30k_precomp_vocab.pkl'}"
        in capsys.readouterr().err
    )


def test_ensemble_with_a_diverged_model_is_one_line(tmp_path, toy_data, capsys):
    """evaluate_models.py on an ensemble whose second model has NaN weights: refused, not ranked."""
    import evaluate_models
    from conftest import make_opt
    from vocab import vocab_digest

    data_path, vocab_path = toy_data
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    opt = make_opt(data_path=data_path, vocab_path=vocab_path, vocab_size=len(vocab))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = VSRN(opt, training=False).state_dict()
        if seed == 1:
            state[0]["fc.weight"] = torch.full_like(state[0]["fc.weight"], float("nan"))  # the image encoder's
        paths.append(str(tmp_path / f"model_{seed}.pth.tar"))
        torch.save({"model": state, "opt": opt, "vocab_digest": vocab_digest(vocab)}, paths[-1])
    assert evaluate_models.main(["--data_path", data_path, "--split", "test", *paths]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: the 2-model ensemble's averaged similarity: 2,000 of the 2,000 scores are NaN or infinite, "
        "the first at image 0, caption 0 (a diverged model or non-finite features?); they cannot be ranked\n"
    )
    assert evaluate_models.main(["--data_path", data_path, "--split", "test", paths[1]]) == 2
    assert capsys.readouterr().err.startswith("error: VSRN's similarity: 2,000 of the 2,000 scores are NaN")
    assert not (tmp_path / "ranks.pth.tar").exists()


def test_checkpoint_vocabulary_mismatch(toy_data, trained_toy, tmp_path, capsys):
    # Same size, words in another order: the case that size checks cannot catch.
    data_path, vocab_path = toy_data
    words = load_vocab(os.path.join(vocab_path, "toy_precomp_vocab.json")).idx2word
    permuted = [words[i] for i in range(4)] + [words[i] for i in reversed(range(4, len(words)))]
    other = tmp_path / "vocab"
    save_vocab(vocabulary_from_words(permuted), str(other / "toy_precomp_vocab.json"))
    assert evaluate_models.main(["--data_path", data_path, "--vocab_path", str(other), trained_toy]) == 2
    line = error_line(capsys)
    assert f"{trained_toy}: trained with another vocabulary" in line and str(other / "toy_precomp_vocab.json") in line
    resume = ("--resume", trained_toy)
    assert train.main(train_args(data_path, str(other), tmp_path / "run", "--num_epochs", "2", *resume)) == 2
    line = error_line(capsys)
    assert f"{trained_toy}: trained with another vocabulary" in line and str(other / "toy_precomp_vocab.json") in line


def test_evaluate_models_blocks_honour_their_vocab_path(toy_data, trained_toy, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = toy_data
    words = load_vocab(os.path.join(vocab_path, "toy_precomp_vocab.json")).idx2word
    other = tmp_path / "vocab"
    save_vocab(
        vocabulary_from_words([words[i] for i in range(4)] + [words[i] for i in reversed(range(4, len(words)))]),
        str(other / "toy_precomp_vocab.json"),
    )
    block = dict(model_paths=(trained_toy,), data_path=data_path, vocab_path=str(other), split="test", fold5=False)
    monkeypatch.setattr(evaluate_models, "RUN", [block])
    assert evaluate_models.main([]) == 2  # the block's vocabulary is read, and it is not the checkpoint's
    line = error_line(capsys)
    assert f"{trained_toy}: trained with another vocabulary" in line and str(other / "toy_precomp_vocab.json") in line
    assert evaluate_models.main(["--vocab_path", vocab_path]) == 0  # the flag overrides the block
    assert "rsum:" in capsys.readouterr().out
    monkeypatch.setattr(evaluate_models, "RUN", [dict(block, vocab=vocab_path)])
    assert evaluate_models.main([]) == 2
    assert error_line(capsys) == (
        "error: evaluate_models.py: a block has the unknown key(s) vocab; "
        "its keys are model_paths, data_path, vocab_path, split, fold5"
    )


def test_evaluation_split_checks(toy_copy, trained_toy, capsys):
    data_path, vocab_path, folder = toy_copy
    assert (
        evaluate_models.main(
            ["--data_path", data_path, "--vocab_path", vocab_path, "--fold5", "--split", "test", trained_toy]
        )
        == 2
    )
    assert "fold5 needs 5 folds of 5000 captions; the test split of toy_precomp has 100" in error_line(capsys)
    np.save(f"{folder}/test_ims.npy", np.load(f"{folder}/test_ims.npy")[:19])
    drop_last_caption(f"{folder}/test_caps.txt")
    lines = open(f"{folder}/test_caps.txt").read().splitlines()
    # 19 images of one caption each are ranked (each against its own); 20 captions for 19 images are refused.
    open(f"{folder}/test_caps.txt", "w").write("\n".join(lines[:20]) + "\n")
    assert (
        evaluate_models.main(["--data_path", data_path, "--vocab_path", vocab_path, "--split", "test", trained_toy])
        == 2
    )
    expected = "test_caps.txt: 20 captions for the 19 images of test_ims.npy; expected 5 captions per image"
    assert expected in error_line(capsys)


def test_evaluation_points_at_the_path_flags(toy_data, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    relative = os.path.relpath(data_path, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--data_path", relative, "--vocab_path", vocab_path, "--logger_name", str(run), *SMALL, "--num_epochs", "1"]
    assert train.main(args) == 0
    monkeypatch.chdir(run)  # the checkpoint's relative data_path no longer resolves
    assert evaluate_models.main([str(run / "model_best.pth.tar")]) == 2
    line = error_line(capsys)
    assert f"{relative}/toy_precomp: dataset folder not found" in line and "pass --data_path" in line
    assert evaluate_models.main([]) == 2  # the editable blocks point at checkpoints users may not have
    line = error_line(capsys)
    assert "pretrain_model/flickr/model_fliker_1.pth.tar: checkpoint not found" in line
    assert "python3 evaluate_models.py --data_path DATA --split test CHECKPOINT" in line
    _, _, models = load_models([str(run / "model_best.pth.tar")], data_path, vocab_path)
    assert models[0].optimizer is None  # evaluation builds no optimizer
