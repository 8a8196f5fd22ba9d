import os

import numpy as np
import pytest
import torch

from conftest import make_opt, shared_file
from data import get_test_loader
from evaluation import encode_data, evalrank, evaluate_embeddings, i2t, similarity, t2i
from model import VSRN
from vocab import load_vocab, load_vocab_by_name


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
