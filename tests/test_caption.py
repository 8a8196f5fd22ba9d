"""The caption branch as a captioner: inference against the original's loop, sampling, beam search."""

import itertools
import json
import math
import os
import shutil
import sys

import pytest
import torch
from torch.nn import functional as F

import caption
import captioning
import reference_caption
from conftest import make_opt
from data import PrecompDataset
from model import END_ID, PAD_ID, START_ID, VSRN, beam_search
from utils.checkpoint import load_checkpoint
from vocab import load_vocab_by_name

MAX_LEN = 12


def random_caption_model(bidirectional=0, end_bias=0.0, seed=0):
    """An eval-mode caption branch with spread-out random weights; `end_bias` makes <end> likelier."""
    torch.manual_seed(seed)
    model = VSRN(make_opt(bidirectional=bidirectional, max_len=MAX_LEN), training=False).caption_model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        model.decoder.out.bias[END_ID] += end_bias
    return model.eval()


def regions(batch=6, seed=1):
    return torch.randn(batch, 36, 32, generator=torch.Generator().manual_seed(seed))


def teacher_forced_logprobs(model, inputs, preds):
    """Log-probability of each word of `preds` when the decoder is fed <start> + preds."""
    encoder_outputs, encoder_hidden = model.encoder(inputs)
    labels = torch.cat([torch.full((len(preds), 1), START_ID), preds], dim=1)
    logprobs = model.decoder(encoder_outputs, encoder_hidden, labels, steps=preds.size(1))
    return logprobs.gather(2, preds.unsqueeze(2)).squeeze(2)


def ended_mask(preds):
    """True at the words up to and including each sequence's first <end>."""
    after_end = torch.cumsum((preds == END_ID).int(), dim=1) - (preds == END_ID).int()
    return after_end == 0


@pytest.mark.parametrize("bidirectional", [0, 1])
def test_greedy_inference_equals_the_original_loop(bidirectional):
    model = random_caption_model(bidirectional, end_bias=2.5)
    inputs = regions()
    with torch.no_grad():
        logprobs, preds = model(inputs, mode="inference", opt={"sample_max": 1})
        expected_logprobs, expected_preds = reference_caption.caption_inference(model, inputs)
    assert preds.shape == expected_preds.shape == (6, MAX_LEN - 2)
    assert logprobs.shape == expected_logprobs.shape == (6, MAX_LEN - 2)
    kept = ended_mask(expected_preds)
    # The case must exercise both: sequences that end early, and ones that never end.
    assert (~kept).any(dim=1).any() and kept.all(dim=1).any()
    assert torch.equal(preds[kept], expected_preds[kept])
    torch.testing.assert_close(logprobs[kept], expected_logprobs[kept], atol=1e-5, rtol=1e-5)
    # After <end> the original kept decoding words nobody reads; here they are <pad>, log-probability 0.
    assert (preds[~kept] == PAD_ID).all() and (logprobs[~kept] == 0).all()


def test_inference_is_the_default_opt_and_needs_no_labels():
    model = random_caption_model()
    with torch.no_grad():
        default = model(regions(), mode="inference")
        greedy = model(regions(), None, "inference", {"sample_max": 1, "beam_size": 1, "temperature": 1.0})
    assert torch.equal(default[1], greedy[1])
    with pytest.raises(ValueError, match="mode must be 'train' or 'inference'"):
        model(regions(), mode="sample")


def test_sampling_records_the_drawn_words_log_probabilities():
    model = random_caption_model(end_bias=1.0)
    inputs = regions(8)
    torch.manual_seed(3)
    with torch.no_grad():
        logprobs, preds = model(inputs, mode="inference", opt={"sample_max": 0})
        greedy_logprobs, greedy_preds = model(inputs, mode="inference")
        expected = teacher_forced_logprobs(model, inputs, preds)
    kept = ended_mask(preds)
    torch.testing.assert_close(logprobs[kept], expected[kept], atol=1e-5, rtol=1e-5)
    assert not torch.equal(preds, greedy_preds)  # at temperature 1 a sample is not the argmax
    with torch.no_grad():
        cold_logprobs, cold_preds = model(inputs, mode="inference", opt={"sample_max": 0, "temperature": 1e-4})
    assert torch.equal(cold_preds, greedy_preds)
    torch.testing.assert_close(cold_logprobs, greedy_logprobs)


@pytest.mark.parametrize("bidirectional", [0, 1])
def test_beam_of_one_is_greedy(bidirectional):
    model = random_caption_model(bidirectional, end_bias=2.5)
    with torch.no_grad():
        greedy_logprobs, greedy_preds = model(regions(), mode="inference")
        beam_logprobs, beam_preds = model(regions(), mode="inference", opt={"beam_size": 1})
        # beam_size 1 dispatches to the greedy loop; the beam search itself must agree with it.
        encoder_outputs, encoder_hidden = model.encoder(regions())
        search_logprobs, search_preds = model.decoder.beam_search(encoder_outputs, encoder_hidden, 1)
    assert torch.equal(beam_preds, greedy_preds) and torch.equal(search_preds, greedy_preds)
    torch.testing.assert_close(search_logprobs, greedy_logprobs, atol=1e-5, rtol=1e-5)


def test_beam_search_scores_are_the_decoders_and_beat_greedy():
    model = random_caption_model(end_bias=1.5)
    inputs = regions(8)
    with torch.no_grad():
        greedy_logprobs, _ = model(inputs, mode="inference")
        logprobs, preds = model(inputs, mode="inference", opt={"beam_size": 4})
        expected = teacher_forced_logprobs(model, inputs, preds)
    assert preds.shape == logprobs.shape == (8, MAX_LEN - 2)
    kept = ended_mask(preds)
    torch.testing.assert_close(logprobs[kept], expected[kept], atol=1e-5, rtol=1e-5)
    assert (preds[~kept] == PAD_ID).all() and (logprobs[~kept] == 0).all()
    assert (logprobs.sum(1) >= greedy_logprobs.sum(1) - 1e-5).all()
    assert (logprobs.sum(1) > greedy_logprobs.sum(1) + 1e-3).any()


def bigram_advance(table):
    """A decoder whose next-word log-probabilities depend only on the word it is fed."""

    def advance(state, words, rows):
        return table[words], state

    return advance


def test_beam_search_finds_the_best_sequence_greedy_misses():
    # Words: 0 <pad>, 1 <start>, 2 <end>, 3 "a", 4 "b". Greedy takes "a" (0.6) and then can only
    # reach 0.6 * 0.4; "b <end>" scores 0.4 * 0.9 = 0.36 > 0.24.
    p = torch.full((5, 5), 1e-9)
    p[START_ID, 3], p[START_ID, 4] = 0.6, 0.4
    p[3, 2], p[3, 3], p[3, 4] = 0.4, 0.3, 0.3
    p[4, 2], p[4, 3] = 0.9, 0.1
    table = (p / p.sum(1, keepdim=True)).log()
    state = torch.zeros(2, 1)  # one item, two beams
    logprobs, preds = beam_search(bigram_advance(table), state, 2, 4)
    assert preds.tolist() == [[4, END_ID, PAD_ID, PAD_ID]]
    assert logprobs.sum().item() == pytest.approx(math.log(0.36), abs=1e-6)
    _, greedy = beam_search(bigram_advance(table), state[:1], 1, 4)
    assert greedy.tolist() == [[3, END_ID, PAD_ID, PAD_ID]]


def best_sequence_by_enumeration(table, length):
    """The highest-scoring word sequence of a bigram table, over all sequences (ended or not)."""
    best_score, best = -math.inf, None
    for words in itertools.product(range(table.size(0)), repeat=length):
        score, previous = 0.0, START_ID
        for i, word in enumerate(words):
            score += table[previous, word].item()
            previous = word
            if word == END_ID:
                words = words[: i + 1] + (PAD_ID,) * (length - i - 1)
                break
        if score > best_score:
            best_score, best = score, list(words)
    return best_score, best


def test_a_wide_beam_is_exhaustive_on_random_tables():
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        table = F.log_softmax(torch.randn(5, 5, generator=generator) * 2, dim=1)
        best_score, best = best_sequence_by_enumeration(table, 3)
        # 5 + 25 + 125 hypotheses exist: a beam of 125 keeps them all.
        logprobs, preds = beam_search(bigram_advance(table), torch.zeros(125, 1), 125, 3)
        assert preds[0].tolist() == best
        assert logprobs.sum().item() == pytest.approx(best_score, abs=1e-5)


def test_decoding_stops_working_on_finished_sequences(monkeypatch):
    model = random_caption_model(end_bias=2.5)
    rows_per_step = []
    original = type(model.decoder).step

    def step(self, h, *args):
        rows_per_step.append(h.size(0))
        return original(self, h, *args)

    monkeypatch.setattr(type(model.decoder), "step", step)
    with torch.no_grad():
        _, preds = model(regions(), mode="inference")
    # Before step t only the sequences without an <end> among their first t words still run.
    running = [int((preds[:, :t] == END_ID).any(1).logical_not().sum()) for t in range(len(rows_per_step))]
    assert rows_per_step == running and rows_per_step[-1] < 6


# --- caption.py: generation for a split, scores, errors ---------------------------------------


def load_checkpoint_opt(path):
    return load_checkpoint(path)["opt"]


@pytest.fixture(scope="module")
def captioner(toy_data, tmp_path_factory):
    """A checkpoint whose caption branch was trained (its own loss, 150 Adam steps) on the toy
    train split, from the GCN region features of the image encoder at initialisation."""
    data_path, vocab_path = toy_data
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    opt = make_opt(vocab_size=len(vocab), dim_hidden=64, max_len=16, data_path=data_path, vocab_path=vocab_path)
    torch.manual_seed(0)
    model = VSRN(opt, training=False)
    train = PrecompDataset(os.path.join(data_path, "toy_precomp"), "train", vocab, opt.max_len, opt.img_dim)
    items = [train[i] for i in range(len(train))]
    labels, masks = torch.stack([item[4] for item in items]), torch.stack([item[5] for item in items])
    model.val_start()
    with torch.no_grad():
        _, regions = model.img_enc(torch.stack([item[0] for item in items]))
    branch = model.caption_model.train()
    optimizer = torch.optim.Adam(branch.parameters(), lr=0.005)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randperm(len(items), generator=generator)[:64]
        loss = branch.loss(regions[batch], labels[batch], masks[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = str(tmp_path_factory.mktemp("captioner") / "model.pth.tar")
    torch.save({"model": model.state_dict(), "opt": opt}, path)
    return path


def test_trained_captions_name_the_concepts_of_their_images(captioner, no_java, tmp_path, capsys):
    out = str(tmp_path / "captions.json")
    assert caption.main(["--checkpoint", captioner, "--split", "test", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "METEOR skipped" in printed and "CIDEr-D" in printed and "BLEU-4" in printed
    generated = json.load(open(out))
    assert [g["image_id"] for g in generated] == list(range(20))  # no test_image_ids.txt: the indices
    captions = [g["caption"] for g in generated]
    assert all(captions) and all("<" not in c for c in captions)
    data_path = load_checkpoint_opt(captioner).data_path
    references = captioning.split_references(os.path.join(data_path, "toy_precomp"), "test", 20)
    own = captioning.evaluate_captions(references, captions)["CIDEr-D"]
    shuffled = captioning.evaluate_captions(references, captions[1:] + captions[:1])["CIDEr-D"]
    assert own > 0.3 and own > 2 * shuffled, (own, shuffled)


def test_image_ids_file_names_the_captions_and_beam_search_runs(captioner, no_java, tmp_path):
    source = os.path.join(load_checkpoint_opt(captioner).data_path, "toy_precomp")
    folder = tmp_path / "data" / "toy_precomp"
    folder.mkdir(parents=True)
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(os.path.join(source, name), folder / name)
    (folder / "test_image_ids.txt").write_text("".join(f"{391895 + i}\n" for i in range(20)))
    out = str(tmp_path / "beam.json")
    scores = captioning.caption_split(captioner, str(tmp_path / "data"), "test", beam_size=3, out=out)
    generated = json.load(open(out))
    assert [g["image_id"] for g in generated] == [391895 + i for i in range(20)]
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}


def test_original_release_checkpoint_has_no_captioner(captioner, tmp_path, capsys):
    checkpoint = torch.load(captioner, weights_only=False)
    legacy = str(tmp_path / "legacy.pth.tar")
    torch.save({"model": checkpoint["model"][:2], "opt": checkpoint["opt"]}, legacy)
    assert caption.main(["--checkpoint", legacy]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {legacy}: has no caption-branch weights" in err
    assert caption.main(["--checkpoint", captioner, "--beam_size", "0"]) == 2
    assert capsys.readouterr().err == "error: --beam_size 0: must be at least 1\n"


def test_missing_packages_are_one_line(captioner, monkeypatch, capsys):
    import evaluate_models

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    assert caption.main(["--checkpoint", captioner]) == 2
    assert capsys.readouterr().err == "error: caption scores need pycocoevalcap: pip install pycocoevalcap\n"
    monkeypatch.setitem(sys.modules, "eccv_caption", None)
    assert evaluate_models.main(["--split", "testall", "--eccv", captioner]) == 2
    assert (
        capsys.readouterr().err
        == "error: ECCV Caption metrics need the eccv_caption package: pip install eccv_caption\n"
    )


def test_validation_logs_generated_captions_without_drawing_random_numbers(captioner, toy_data):
    data_path, vocab_path = toy_data
    opt = load_checkpoint_opt(captioner)
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    model = VSRN(opt, training=False)
    model.load_state_dict(torch.load(captioner, weights_only=False)["model"])
    dataset = PrecompDataset(os.path.join(data_path, "toy_precomp"), "dev", vocab, opt.max_len, opt.img_dim)
    texts = []

    class Writer:
        def add_text(self, tag, text, step):
            texts.append((tag, text, step))

    state = torch.get_rng_state()
    captioning.log_generated_captions(Writer(), model, dataset, 7)
    assert torch.equal(state, torch.get_rng_state())
    ((tag, text, step),) = texts
    lines = text.split("  \n")
    assert tag == "captions" and step == 7 and len(lines) == 3
    reference = captioning.caption_text(vocab, dataset.caption(0)[1:])
    assert lines[0].startswith("0: **a ") and lines[0].endswith(f"(reference: {reference})")


HAND_MADE_REFERENCES = {
    1: ["a dog runs on the grass", "a brown dog is running outside", "the dog plays in a field"],
    2: ["two people ride bicycles down a street", "cyclists on a city road", "two men riding bikes"],
}
HAND_MADE_CAPTIONS = {1: ["a dog running on the grass"], 2: ["two people riding bikes on a road"]}


def test_scores_are_pycocoevalcaps_scorers(no_java):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores = captioning.score_captions(HAND_MADE_REFERENCES, HAND_MADE_CAPTIONS)
    bleu, _ = Bleu(4).compute_score(HAND_MADE_REFERENCES, HAND_MADE_CAPTIONS, verbose=0)
    assert [scores[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu)
    assert scores["ROUGE-L"] == pytest.approx(Rouge().compute_score(HAND_MADE_REFERENCES, HAND_MADE_CAPTIONS)[0])
    assert scores["CIDEr-D"] == pytest.approx(Cider().compute_score(HAND_MADE_REFERENCES, HAND_MADE_CAPTIONS)[0])
    assert 0 < scores["BLEU-4"] < scores["BLEU-1"] < 1 and scores["CIDEr-D"] > 0
    perfect = captioning.score_captions(HAND_MADE_REFERENCES, {k: [v[0]] for k, v in HAND_MADE_REFERENCES.items()})
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["ROUGE-L"] == pytest.approx(1.0)


@pytest.mark.skipif(not captioning.java_available(), reason="java is not on PATH")
def test_with_java_meteor_and_the_ptb_tokenizer_run():
    from pycocoevalcap.meteor.meteor import Meteor

    scores = captioning.score_captions(HAND_MADE_REFERENCES, HAND_MADE_CAPTIONS)
    meteor = Meteor()
    assert scores["METEOR"] == pytest.approx(meteor.compute_score(HAND_MADE_REFERENCES, HAND_MADE_CAPTIONS)[0])
    del meteor
    raw = {"a": ["A dog, running on the grass.", 'Two men "riding" bikes!']}
    ptb = captioning.tokenize_for_scoring(raw)
    assert ptb == {"a": ["a dog running on the grass", "two men riding bikes"]}
    captioning.java_available, java = (lambda: False), captioning.java_available
    try:
        assert captioning.tokenize_for_scoring(raw) == ptb  # the fallback agrees on plain captions
    finally:
        captioning.java_available = java
