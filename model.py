"""VSRN: region-graph image encoder, GRU text encoder, hinge ranking loss and the caption branch.

The mathematics follow the original release exactly, quirks included (docs/differences.md lists
the few deliberate deviations).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from GCN_lib.Rs_GCN import Rs_GCN
from utils.device import check_device
from utils.distributed import SINGLE_PROCESS
from utils.errors import CheckpointError, OptionError
from utils.optim import CaptionRepeatingAdam

# Word ids fixed by the vocabulary's first entries (<pad>, <start>, <end>), the original's too.
PAD_ID, START_ID, END_ID = 0, 1, 2


def l2norm(x):
    """Divide by the L2 norm over dim 1, as the original.

    On (batch, regions, dim) tensors this normalises across the regions, not the
    features: a quirk of the original that the pretrained models depend on.
    """
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


class EncoderImagePrecompAttn(nn.Module):
    """fc -> [l2norm] -> 4 x Rs_GCN -> l2norm -> GRU -> last state -> [BN] -> l2norm."""

    def __init__(self, img_dim, embed_size, data_name, use_abs=False, no_imgnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.data_name = data_name
        self.use_abs = use_abs
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        r = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)
        self.img_rnn = nn.GRU(embed_size, embed_size, 1, batch_first=True)
        self.Rs_GCN_1 = Rs_GCN(embed_size, embed_size)
        self.Rs_GCN_2 = Rs_GCN(embed_size, embed_size)
        self.Rs_GCN_3 = Rs_GCN(embed_size, embed_size)
        self.Rs_GCN_4 = Rs_GCN(embed_size, embed_size)
        # The released Flickr30K models were trained with this variant, COCO's without it.
        self.uses_f30k_variant = data_name == "f30k_precomp"
        if self.uses_f30k_variant:
            self.bn = nn.BatchNorm1d(embed_size)

    def forward(self, images):
        """images (B, regions, img_dim) -> (embedding (B, D), GCN region features (B, regions, D))."""
        regions = self.fc(images)
        if not self.uses_f30k_variant:
            regions = l2norm(regions)
        for gcn in (self.Rs_GCN_1, self.Rs_GCN_2, self.Rs_GCN_3, self.Rs_GCN_4):
            regions = gcn.forward_regions(regions)
        regions = l2norm(regions)
        _, hidden = self.img_rnn(regions)
        features = hidden[0]
        if self.uses_f30k_variant:
            features = self.bn(features)
        if not self.no_imgnorm:
            features = l2norm(features)
        if self.use_abs:
            features = torch.abs(features)
        return features, regions


class EncoderText(nn.Module):
    """Word embedding -> GRU -> state at each caption's last word -> l2norm."""

    def __init__(self, vocab_size, word_dim, embed_size, num_layers, use_abs=False):
        super().__init__()
        self.use_abs = use_abs
        self.embed_size = embed_size
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, captions, lengths):
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        packed = pack_padded_sequence(self.embed(captions), lengths, batch_first=True, enforce_sorted=False)
        # The top layer's final state is the output at each caption's last word.
        _, hidden = self.rnn(packed)
        out = l2norm(hidden[-1])
        if self.use_abs:
            out = torch.abs(out)
        return out


def cosine_sim(im, s):
    return im.mm(s.t())


def order_sim(im, s):
    """Order-embedding score -||max(0, s - im)||, as an (n_images, n_captions) matrix."""
    diff = s.unsqueeze(1) - im.unsqueeze(0)
    return -diff.clamp(min=0).pow(2).sum(2).sqrt().t()


class ContrastiveLoss(nn.Module):
    """VSE++ hinge loss in both directions, summed over negatives or their hardest one."""

    def __init__(self, margin=0.0, measure="cosine", max_violation=False):
        super().__init__()
        self.margin = margin
        self.sim = order_sim if measure == "order" else cosine_sim
        self.max_violation = max_violation

    def forward(self, im, s):
        scores = self.sim(im, s)
        diagonal = scores.diag().view(-1, 1)
        cost_s = (self.margin + scores - diagonal).clamp(min=0)
        cost_im = (self.margin + scores - diagonal.t()).clamp(min=0)
        positives = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
        cost_s = cost_s.masked_fill(positives, 0)
        cost_im = cost_im.masked_fill(positives, 0)
        if self.max_violation:
            cost_s = cost_s.max(1)[0]
            cost_im = cost_im.max(0)[0]
        return cost_s.sum() + cost_im.sum()


class CaptionEncoder(nn.Module):
    """Linear(dim_vid -> dim_hidden) -> dropout -> GRU over the regions."""

    def __init__(self, dim_vid, dim_hidden, input_dropout_p=0.2, bidirectional=False):
        super().__init__()
        self.dim_hidden = dim_hidden
        self.vid2hid = nn.Linear(dim_vid, dim_hidden)
        self.input_dropout = nn.Dropout(input_dropout_p)
        self.rnn = nn.GRU(dim_hidden, dim_hidden, 1, batch_first=True, bidirectional=bidirectional)
        nn.init.xavier_normal_(self.vid2hid.weight)

    def forward(self, regions):
        return self.rnn(self.input_dropout(self.vid2hid(regions)))


class AdditiveAttention(nn.Module):
    """score_i = w2 . tanh(W1 [enc_i; h]); context = sum_i softmax(score)_i enc_i."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.linear1 = nn.Linear(dim * 2, dim)
        self.linear2 = nn.Linear(dim, 1, bias=False)

    def project_encoder(self, encoder_outputs):
        """The encoder half of linear1, the same at every decoding step: computed once."""
        return F.linear(encoder_outputs, self.linear1.weight[:, : self.dim], self.linear1.bias)

    @property
    def hidden_weight(self):
        return self.linear1.weight[:, self.dim :]

    def context(self, encoder_outputs, encoder_projection, hidden_projection):
        scores = self.linear2(torch.tanh(encoder_projection + hidden_projection.unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores, dim=1)
        return torch.bmm(alpha.unsqueeze(1), encoder_outputs).squeeze(1)

    def forward(self, hidden, encoder_outputs):
        hidden_projection = F.linear(hidden, self.hidden_weight)
        return self.context(encoder_outputs, self.project_encoder(encoder_outputs), hidden_projection)


class CaptionDecoder(nn.Module):
    """Attention GRU decoder with teacher forcing; its input is [word embedding; context]."""

    def __init__(self, vocab_size, max_len, dim_hidden, dim_word, input_dropout_p=0.2, bidirectional=False):
        super().__init__()
        self.bidirectional_encoder = bool(bidirectional)
        self.dim_hidden = dim_hidden * 2 if bidirectional else dim_hidden
        self.dim_word = dim_word
        self.max_length = max_len
        self.input_dropout = nn.Dropout(input_dropout_p)
        self.embedding = nn.Embedding(vocab_size, dim_word)
        self.attention = AdditiveAttention(self.dim_hidden)
        self.rnn = nn.GRU(self.dim_hidden + dim_word, self.dim_hidden, 1, batch_first=True)
        self.out = nn.Linear(self.dim_hidden, vocab_size)
        nn.init.xavier_normal_(self.out.weight)

    def initial_state(self, encoder_hidden):
        """(directions, B, H) -> (B, directions * H): forward and backward states side by side."""
        if self.bidirectional_encoder:
            return torch.cat([encoder_hidden[0], encoder_hidden[1]], dim=1)
        return encoder_hidden[0]

    def word_gates(self, words):
        """The words' share of the GRU input gates (bias included), for word ids of any shape."""
        embedded = self.input_dropout(self.embedding(words))
        return F.linear(embedded, self.rnn.weight_ih_l0[:, : self.dim_word], self.rnn.bias_ih_l0)

    def fused_state_weights(self):
        """(weight, bias) of the recurrent state's two products, attention and GRU hidden
        gates, as one matrix product per step."""
        weight = torch.cat([self.attention.hidden_weight, self.rnn.weight_hh_l0], dim=0)
        return weight, F.pad(self.rnn.bias_hh_l0, (self.dim_hidden, 0))

    def step(self, h, word_gates, encoder_outputs, encoder_projection, state_weights):
        """One decoder step: attention with the state before it, then nn.GRU's update on
        [word; context]. `word_gates` is `self.word_gates(words)` for this step's words."""
        H = self.dim_hidden
        state_projection = F.linear(h, *state_weights)
        context = self.attention.context(encoder_outputs, encoder_projection, state_projection[:, :H])
        context_weight = self.rnn.weight_ih_l0[:, self.dim_word :]
        input_gates = word_gates + F.linear(self.input_dropout(context), context_weight)
        i_r, i_z, i_n = input_gates.chunk(3, dim=1)
        h_r, h_z, h_n = state_projection[:, H:].chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n)

    def hidden_states(self, encoder_outputs, encoder_hidden, targets, steps):
        """Decoder GRU states (B, steps, H) under teacher forcing on targets[:, :steps].

        Equal to running the attention and nn.GRU step by step on [word; context]; the
        parts that do not depend on the recurrent state (the words' share of the input
        gates, the encoder's share of the attention) are computed once for all steps,
        and the state's two products (attention, hidden gates) are one matrix product.
        """
        word_gates = self.word_gates(targets[:, :steps])
        encoder_projection = self.attention.project_encoder(encoder_outputs)
        state_weights = self.fused_state_weights()
        h = self.initial_state(encoder_hidden)
        states = []
        for t in range(steps):
            h = self.step(h, word_gates[:, t], encoder_outputs, encoder_projection, state_weights)
            states.append(h)
        return torch.stack(states, dim=1)

    def forward(self, encoder_outputs, encoder_hidden, targets, steps=None):
        """Log-probabilities (B, steps, vocab) of targets[:, 1:steps+1]; steps defaults to max_len - 1."""
        steps = self.max_length - 1 if steps is None else steps
        states = self.hidden_states(encoder_outputs, encoder_hidden, targets, steps)
        return F.log_softmax(self.out(states), dim=2)

    def generate(self, encoder_outputs, encoder_hidden, sample_max=True, temperature=1.0):
        """The original's inference loop: <start> first, then each step's argmax (or a sample).

        Returns (seq_logprobs, seq_preds), both (B, max_len - 2), as the original: the words
        after <start> and their log-probabilities. A sequence stops at its <end>; the
        positions after it hold <pad> with log-probability 0, and it costs no more work.
        Sampling draws from softmax(logprobs / temperature) and records the untempered
        log-probability of the drawn word.
        """
        batch, length = encoder_outputs.size(0), self.max_length - 2
        device = encoder_outputs.device
        preds = torch.full((batch, length), PAD_ID, dtype=torch.int64, device=device)
        seq_logprobs = torch.zeros(batch, length, device=device)
        encoder_projection = self.attention.project_encoder(encoder_outputs)
        state_weights = self.fused_state_weights()
        h = self.initial_state(encoder_hidden)
        rows = torch.arange(batch, device=device)  # the unfinished sequences
        words = torch.full((batch,), START_ID, dtype=torch.int64, device=device)
        for t in range(length):
            h = self.step(h, self.word_gates(words), encoder_outputs, encoder_projection, state_weights)
            logprobs = F.log_softmax(self.out(h).float(), dim=1)
            if sample_max:
                word_logprobs, words = logprobs.max(dim=1)
            else:
                words = torch.multinomial(torch.softmax(logprobs / temperature, dim=1), 1).squeeze(1)
                word_logprobs = logprobs.gather(1, words.unsqueeze(1)).squeeze(1)
            preds[rows, t] = words
            seq_logprobs[rows, t] = word_logprobs
            running = words != END_ID
            if not bool(running.all()):
                if not bool(running.any()):
                    break
                rows, words, h = rows[running], words[running], h[running]
                encoder_outputs, encoder_projection = encoder_outputs[running], encoder_projection[running]
        return seq_logprobs, preds

    def beam_search(self, encoder_outputs, encoder_hidden, beam_size):
        """(seq_logprobs, seq_preds) as `generate`, of the highest-scoring of `beam_size` beams."""
        state_weights = self.fused_state_weights()
        encoder_outputs = encoder_outputs.repeat_interleave(beam_size, dim=0)
        encoder_projection = self.attention.project_encoder(encoder_outputs)

        def advance(h, words, rows):
            h = self.step(h, self.word_gates(words), encoder_outputs[rows], encoder_projection[rows], state_weights)
            return F.log_softmax(self.out(h).float(), dim=1), h

        h = self.initial_state(encoder_hidden).repeat_interleave(beam_size, dim=0)
        return beam_search(advance, h, beam_size, self.max_length - 2)


class CaptionModel(nn.Module):
    """The caption branch: generates each caption from the GCN region features."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, regions, labels=None, mode="train", opt=None):
        """As the original S2VTAttModel.

        mode='train': (seq_logprobs (B, max_len - 1, vocab), greedy predictions (B, max_len - 1))
        under teacher forcing on `labels`. mode='inference' (labels unused): generated captions
        as (seq_logprobs, seq_preds), each (B, max_len - 2), with the original's `opt` keys
        sample_max (1: greedy, 0: sample), temperature, and beam_size (> 1: beam search).
        """
        encoder_outputs, encoder_hidden = self.encoder(regions)
        if mode == "train":
            logprobs = self.decoder(encoder_outputs, encoder_hidden, labels)
            return logprobs, logprobs.argmax(dim=2)
        if mode != "inference":
            raise ValueError(f"mode must be 'train' or 'inference', got {mode!r}")
        opt = opt or {}
        beam_size = int(opt.get("beam_size", 1))
        if beam_size > 1:
            return self.decoder.beam_search(encoder_outputs, encoder_hidden, beam_size)
        return self.decoder.generate(
            encoder_outputs, encoder_hidden, bool(opt.get("sample_max", 1)), float(opt.get("temperature", 1.0))
        )

    def loss(self, regions, labels, masks, steps=None, batch_size=None):
        """sum(NLL(labels[:, 1:]) * masks[:, 1:]) / batch_size, as the original's criterion.

        Steps past the last unmasked target add exactly zero to the loss and its
        gradient (the decoder is causal), so `steps` may stop there. `batch_size` is
        this batch's by default; a process of data-parallel training passes the global one.
        """
        steps = self.decoder.max_length - 1 if steps is None else steps
        encoder_outputs, encoder_hidden = self.encoder(regions)
        states = self.decoder.hidden_states(encoder_outputs, encoder_hidden, labels, steps)
        logits = self.decoder.out(states)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1 : steps + 1].flatten(), reduction="none")
        return (nll * masks[:, 1 : steps + 1].flatten()).sum() / (batch_size or labels.size(0))


def beam_search(advance, state, beam_size, length):
    """Beam search over sequences of `length` words that start after <start>, for a batch.

    `state` holds one row per beam (batch * beam_size rows, the beams of an item adjacent);
    `advance(state_rows, words, rows)` runs one step for the given rows of beams that
    have not ended, fed `words`, and returns (log-probabilities (rows, vocab), their new
    state). A beam's score is the sum of its words' log-probabilities; a beam that produced
    <end> keeps its score (extended by <pad> at log-probability 0) and is not advanced.
    Returns (seq_logprobs, seq_preds), each (batch, length), of each item's best beam.
    """
    rows_total = state.size(0)
    batch, device = rows_total // beam_size, state.device
    words = torch.full((rows_total,), START_ID, dtype=torch.int64, device=device)
    # Only the first beam of each item is alive at the start; the others are dead ends.
    scores = torch.full((batch, beam_size), -math.inf, device=device)
    scores[:, 0] = 0
    finished = (torch.arange(rows_total, device=device) % beam_size) != 0
    preds = torch.full((batch, beam_size, length), PAD_ID, dtype=torch.int64, device=device)
    seq_logprobs = torch.zeros(batch, beam_size, length, device=device)
    item_rows = torch.arange(batch, device=device).unsqueeze(1) * beam_size
    for t in range(length):
        live = (~finished).nonzero().squeeze(1)
        live_logprobs, live_state = advance(state[live], words[live], live)
        step_logprobs = torch.full((rows_total, live_logprobs.size(1)), -math.inf, device=device)
        step_logprobs[:, PAD_ID] = torch.where(finished, 0.0, -math.inf)
        step_logprobs[live] = live_logprobs
        state = state.index_copy(0, live, live_state)
        vocab = step_logprobs.size(1)
        candidates = (scores.reshape(-1, 1) + step_logprobs).view(batch, beam_size * vocab)
        scores, best = candidates.topk(beam_size, dim=1)
        parents, words = best // vocab, best % vocab
        source = (item_rows + parents).view(-1)
        words = words.view(-1)
        preds = preds.gather(1, parents.unsqueeze(2).expand(-1, -1, length))
        seq_logprobs = seq_logprobs.gather(1, parents.unsqueeze(2).expand(-1, -1, length))
        preds[:, :, t] = words.view(batch, beam_size)
        seq_logprobs[:, :, t] = step_logprobs[source, words].view(batch, beam_size)
        state = state[source]
        finished = finished[source] | (words == END_ID)
        if bool(finished.all()):
            break
    best = scores.argmax(dim=1)
    items = torch.arange(batch, device=device)
    return seq_logprobs[items, best], preds[items, best]


def caption_steps(masks, max_len):
    """Decoder steps that carry loss: up to the last unmasked target, at most max_len - 1."""
    return max(1, min(int(masks[:, 1:].sum(dim=1).max()), max_len - 1))


class TrainingForward(nn.Module):
    """The part of a training step that each process runs on its share of the batch: the
    embeddings and the caption loss. One module over the three parts, so that data-parallel
    training wraps it in one DistributedDataParallel."""

    def __init__(self, model):
        super().__init__()
        self.img_enc, self.txt_enc, self.caption_model = model.modules()
        self.vsrn = model  # not a module: a plain reference

    def forward(self, images, captions, lengths, labels, masks, steps, batch_size):
        img_emb, cap_emb, regions = self.vsrn.forward_emb(images, captions, lengths)
        with self.vsrn.autocast():
            caption_loss = self.caption_model.loss(regions, labels, masks, steps, batch_size)
        return img_emb, cap_emb, caption_loss


def check_options(opt):
    if not opt.data_name.endswith("_precomp"):
        raise OptionError(
            f"--data_name {opt.data_name}: only precomputed features are supported; use one of "
            "coco_precomp, f30k_precomp, f8k_precomp, 10crop_precomp (or another NAME_precomp)"
        )
    if opt.dim_vid != opt.embed_size:
        raise OptionError(
            f"--dim_vid {opt.dim_vid} must equal --embed_size {opt.embed_size}: "
            "the caption branch reads the GCN region features"
        )
    check_device(getattr(opt, "device", None))
    if opt.max_len < 2:
        raise OptionError(f"--max_len {opt.max_len}: must be at least 2 (<start> and <end>)")


def image_encoder_data_name(opt):
    """The data_name that chose the image encoder's variant (Flickr30K's has a final BatchNorm): the run's
    own, or for a fine-tuned model the one of the checkpoint it started from (`opt.encoder_data_name`)."""
    return getattr(opt, "encoder_data_name", None) or opt.data_name


# Parameters with one row per vocabulary word, by module: a larger vocabulary adds rows at their end.
VOCABULARY_ROWS = {
    "txt_enc": ("embed.weight",),
    "caption_model": ("decoder.embedding.weight", "decoder.out.weight", "decoder.out.bias"),
}


class VSRN:
    """The image encoder, text encoder and caption branch, their loss and their optimizer."""

    def __init__(self, opt, training=True):
        """`training=False` builds no optimizer: evaluation and inference need none."""
        check_options(opt)
        self.device = check_device(getattr(opt, "device", None))
        self.grad_clip = opt.grad_clip
        self.max_len = opt.max_len
        self.amp = bool(getattr(opt, "amp", False)) and self.device.type == "cuda"
        self.img_enc = EncoderImagePrecompAttn(
            opt.img_dim, opt.embed_size, image_encoder_data_name(opt), opt.use_abs, opt.no_imgnorm
        )
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers, opt.use_abs)
        encoder = CaptionEncoder(opt.dim_vid, opt.dim_hidden, opt.input_dropout_p, bool(opt.bidirectional))
        decoder = CaptionDecoder(
            opt.vocab_size, opt.max_len, opt.dim_hidden, opt.dim_word, opt.input_dropout_p, bool(opt.bidirectional)
        )
        self.caption_model = CaptionModel(encoder, decoder)
        for module in self.modules():
            module.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.measure = opt.measure
        self.criterion = ContrastiveLoss(opt.margin, opt.measure, opt.max_violation)
        self.optimizer = None
        if training:
            retrieval = [p for module in (self.img_enc, self.txt_enc) for p in module.parameters()]
            self.optimizer = CaptionRepeatingAdam(
                retrieval, self.caption_model.parameters(), opt.learning_rate, opt.caption_updates
            )
        self.Eiters = 0
        self.world = SINGLE_PROCESS
        self.training_forward = TrainingForward(self)

    def distribute(self, world):
        """Train as one process of `world` (utils.distributed): DistributedDataParallel, and the
        hinge loss over the gathered global batch."""
        self.world = world
        self.training_forward = world.wrap(self.training_forward)

    def modules(self):
        """In the order of the checkpoint's 'model' list."""
        return (self.img_enc, self.txt_enc, self.caption_model)

    def state_dict(self):
        return [self.img_enc.state_dict(), self.txt_enc.state_dict(), self.caption_model.state_dict()]

    def load_state_dict(self, state_dict, source="checkpoint"):
        """Accepts [img_enc, txt_enc] (original release) or [img_enc, txt_enc, caption_model]."""
        if not isinstance(state_dict, (list, tuple)) or len(state_dict) not in (2, 3):
            raise CheckpointError(f"{source}: 'model' must be a list of 2 or 3 state dicts")
        for name, module, state in zip(("img_enc", "txt_enc", "caption_model"), self.modules(), state_dict):
            own = module.state_dict()
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            if missing or unexpected:
                raise CheckpointError(
                    f"{source}: {name} does not fit this model (missing {missing[:4]}, unexpected {unexpected[:4]}); "
                    "check --data_name and the checkpoint's options"
                )
            for key, value in state.items():
                if tuple(value.shape) != tuple(own[key].shape):
                    raise CheckpointError(
                        f"{source}: {name}.{key} has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(own[key].shape)}"
                        + (
                            " (vocabulary size differs from the checkpoint's)"
                            if key in ("embed.weight", "decoder.embedding.weight")
                            else ""
                        )
                    )
            module.load_state_dict(state)

    def start_from(self, state_dict, base_vocab_size, source="checkpoint"):
        """Take a trained model's weights ([img_enc, txt_enc] or with the caption branch) as the start
        of a run whose vocabulary extends theirs (of `base_vocab_size` words; vocab.extend_vocab): every
        weight is theirs, the rows of the words they lack keep this model's initialisation (the
        original's), and a caption branch they lack (the original release saved none) stays initialised."""
        if not isinstance(state_dict, (list, tuple)) or len(state_dict) not in (2, 3):
            raise CheckpointError(f"{source}: 'model' must be a list of 2 or 3 state dicts")
        names = ("img_enc", "txt_enc", "caption_model")
        merged = []
        for name, module, state in zip(names, self.modules(), state_dict):
            own = module.state_dict()
            state = dict(state)
            for key in VOCABULARY_ROWS.get(name, ()):
                if key not in state or key not in own:
                    continue  # named by load_state_dict's check below
                rows = state[key]
                if rows.shape[0] != base_vocab_size or tuple(rows.shape[1:]) != tuple(own[key].shape[1:]):
                    raise CheckpointError(
                        f"{source}: {name}.{key} has shape {tuple(rows.shape)}; its vocabulary of "
                        f"{base_vocab_size} words and this model expect {(base_vocab_size, *own[key].shape[1:])}"
                    )
                state[key] = torch.cat([rows.to(own[key].dtype), own[key][base_vocab_size:]])
            merged.append(state)
        if len(merged) == 2:
            merged.append(self.caption_model.state_dict())
        self.load_state_dict(merged, source)

    def train_start(self):
        for module in self.modules():
            module.train()

    def val_start(self):
        for module in self.modules():
            module.eval()

    def autocast(self):
        """The forward pass's autocast: bfloat16 on CUDA with --amp, else float32 as it is."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def forward_emb(self, images, captions, lengths):
        """-> (image embeddings, caption embeddings, GCN region features)."""
        images = images.to(self.device, non_blocking=True)
        captions = captions.to(self.device, non_blocking=True)
        with self.autocast():
            cap_emb = self.txt_enc(captions, lengths)
            img_emb, regions = self.img_enc(images)
        return img_emb.float(), cap_emb.float(), regions

    def train_emb(self, images, captions, lengths, ids, caption_labels, caption_masks):
        """One optimisation step; returns the losses as floats. Raises FloatingPointError,
        before any update, when the loss is not finite.

        In data-parallel training the batch is this process's share of the global batch;
        the losses returned are the global batch's, the same on every process."""
        self.Eiters += 1
        steps = caption_steps(caption_masks, self.max_len)
        labels = caption_labels.to(self.device, non_blocking=True)
        masks = caption_masks.to(self.device, non_blocking=True)
        sizes = self.world.batch_sizes(len(lengths))
        img_emb, cap_emb, caption_loss = self.training_forward(
            images, captions, lengths, labels, masks, steps, sum(sizes)
        )
        retrieval_loss = self.criterion(self.world.gather(img_emb, sizes), self.world.gather(cap_emb, sizes))
        loss = retrieval_loss + caption_loss
        self.optimizer.zero_grad(set_to_none=True)
        if self.world.size > 1:
            # DistributedDataParallel averages the processes' gradients, but the loss is a sum
            # over the global batch (each process holding one share of it): the average of N
            # times each process's part is the single-process gradient, which clipping then sees.
            loss = loss * self.world.size
        loss.backward()
        caption_loss = self.world.sum(caption_loss.detach().float())
        retrieval_loss = retrieval_loss.detach()
        values = torch.stack([retrieval_loss, caption_loss, retrieval_loss + caption_loss]).tolist()
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(
                f"loss is not finite at iteration {self.Eiters} (retrieval {values[0]}, caption {values[1]})"
            )
        if self.grad_clip > 0:
            self.optimizer.clip_grad_norm_(self.grad_clip)
        self.optimizer.step()
        return {"Le_retrieval": values[0], "Le_caption": values[1], "Le": values[2]}
