"""The caption branch as a captioner: inference against the original's loop, sampling, beam search."""
import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from bench import reference_caption
from conftest import make_opt
from model import END_ID, PAD_ID, START_ID, VSRN, beam_search

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
