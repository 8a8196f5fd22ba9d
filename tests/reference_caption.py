"""The caption branch computed step by step as the original VSRN wrote it, on the parameters
of a model.CaptionModel: teacher forcing over all max_len - 1 steps, and the inference loop.

It is the yardstick for model.CaptionDecoder (tests and bench/train_step.py): same weights,
none of its hoisting of step-independent products, and inference that decodes every
sequence for all steps, past its <end>.
"""

import torch
from torch.nn import functional as F


def attention(attn, hidden, encoder_outputs):
    """The original Attention.forward: linear1 over [encoder_i; hidden] for every region."""
    batch, regions, _ = encoder_outputs.size()
    hidden = hidden.unsqueeze(1).repeat(1, regions, 1)
    inputs = torch.cat((encoder_outputs, hidden), 2).view(-1, attn.dim * 2)
    scores = attn.linear2(torch.tanh(attn.linear1(inputs))).view(batch, regions)
    alpha = F.softmax(scores, dim=1)
    return torch.bmm(alpha.unsqueeze(1), encoder_outputs).squeeze(1)


def encode(caption_model, regions):
    """The caption encoder, and the decoder's initial state (1, B, directions * H)."""
    encoder, decoder = caption_model.encoder, caption_model.decoder
    batch, num_regions, dim_vid = regions.size()
    features = encoder.input_dropout(encoder.vid2hid(regions.reshape(-1, dim_vid)))
    encoder_outputs, hidden = encoder.rnn(features.view(batch, num_regions, encoder.dim_hidden))
    if decoder.bidirectional_encoder:  # (2, B, H) -> (1, B, 2H), forward and backward side by side
        hidden = torch.cat([hidden[0::2], hidden[1::2]], 2)
    return encoder_outputs, hidden


def caption_logprobs(caption_model, regions, labels):
    """Log-probabilities (B, max_len - 1, vocab), one decoder step and one nn.GRU call at a time."""
    decoder = caption_model.decoder
    encoder_outputs, hidden = encode(caption_model, regions)
    words = decoder.embedding(labels)
    logprobs = []
    for t in range(decoder.max_length - 1):
        context = attention(decoder.attention, hidden.squeeze(0), encoder_outputs)
        step_input = decoder.input_dropout(torch.cat([words[:, t], context], dim=1)).unsqueeze(1)
        output, hidden = decoder.rnn(step_input, hidden)
        logprobs.append(F.log_softmax(decoder.out(output.squeeze(1)), dim=1).unsqueeze(1))
    return torch.cat(logprobs, 1)


def caption_loss(caption_model, regions, labels, masks):
    """sum(NLL(labels[:, 1:]) * masks[:, 1:]) / batch over the original's max_len - 1 steps."""
    logprobs = caption_logprobs(caption_model, regions, labels)
    steps = logprobs.size(1)
    nll = F.nll_loss(
        logprobs.reshape(-1, logprobs.size(2)).float(), labels[:, 1 : steps + 1].reshape(-1), reduction="none"
    )
    return (nll * masks[:, 1 : steps + 1].reshape(-1)).sum() / labels.size(0)


def caption_inference(caption_model, regions, sample_max=1, temperature=1.0, start_id=1):
    """The original DecoderRNN's inference mode: (seq_logprobs, seq_preds), each (B, max_len - 2).

    Step 0 feeds <start>; each later step feeds the previous step's argmax (or a sample of
    exp(logprobs / temperature)) and records it; the last step's output is never used.
    """
    decoder = caption_model.decoder
    encoder_outputs, hidden = encode(caption_model, regions)
    batch = regions.size(0)
    seq_logprobs, seq_preds = [], []
    logprobs = None  # each step's output, read by the next
    for t in range(decoder.max_length - 1):
        context = attention(decoder.attention, hidden.squeeze(0), encoder_outputs)
        if t == 0:
            it = torch.full((batch,), start_id, dtype=torch.int64, device=regions.device)
        elif sample_max:
            sample_logprobs, it = torch.max(logprobs, 1)
            seq_logprobs.append(sample_logprobs.view(-1, 1))
        else:
            prob_prev = torch.exp(logprobs if temperature == 1.0 else torch.div(logprobs, temperature))
            it = torch.multinomial(prob_prev, 1)
            seq_logprobs.append(logprobs.gather(1, it).view(-1, 1))
            it = it.view(-1)
        seq_preds.append(it.view(-1, 1))
        step_input = decoder.input_dropout(torch.cat([decoder.embedding(it), context], dim=1)).unsqueeze(1)
        output, hidden = decoder.rnn(step_input, hidden)
        logprobs = F.log_softmax(decoder.out(output.squeeze(1)), dim=1)
    return torch.cat(seq_logprobs, 1), torch.cat(seq_preds[1:], 1)
