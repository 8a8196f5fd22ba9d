"""A trained VSRN at work: checkpoints loaded with their vocabulary, queries and region features
encoded, and scored as the model scores them.

    opt, vocab, models = load_models(["runs/f30k/model_best.pth.tar"], need_data=False)
    query, embeddings = encode_query(models, vocab, "a dog on a bench")  # unknown words named, all-unknown refused
    images, region_scores = encode_regions(models[0], features)  # features (B, regions, img_dim)
    encoder = text_encoder(models[0], "int8")  # the sentence path of search.py: int8 GRU weights on a CPU
    embeddings = encode_token_lists(models[0], vocab, [query.tokens], encoder)
"""

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data import check_data_folder, get_test_loader
from model import VSRN, cosine_sim, order_sim
from utils.checkpoint import is_original_release, load_checkpoint
from utils.errors import CheckpointError, OptionError, VocabularyError, first_line
from vocab import (
    END,
    SPECIAL_TOKENS,
    START,
    load_vocab_by_name,
    load_vocab_with_digest,
    tokenize,
    vocab_digest,
    vocab_files,
    vocabulary_from_words,
)

ENCODE_BATCH = 128
# How search.py encodes a query's sentence: "int8", VSRN's text encoder with its GRU's weights in
# int8 (on a CPU), or "float32", the model itself (the reference). docs/search.md says why int8.
TEXT_PATHS = ("int8", "float32")
# An int8 encoder whose embedding of the probe sentence is further than this from float32's (cosine)
# is not used. A released-size model measured 0.99989 and more over 1,000 sentences
# (docs/search.md#the-sentences-encoding).
INT8_MIN_COSINE = 0.999


def recorded_vocab(checkpoint, path):
    """The vocabulary a checkpoint records word by word (this port's since they do), or None."""
    words = checkpoint.get("vocab_words")
    if words is None:
        return None
    if not (isinstance(words, (list, tuple)) and all(isinstance(w, str) for w in words)):
        raise CheckpointError(f"{path}: its 'vocab_words' is not a list of words")
    vocab = vocabulary_from_words(words)
    if len(vocab) != len(words) or any(token not in vocab.word2idx for token in SPECIAL_TOKENS):
        raise CheckpointError(f"{path}: its 'vocab_words' repeat a word or lack the special tokens")
    if checkpoint.get("vocab_digest", vocab_digest(vocab)) != vocab_digest(vocab):
        raise CheckpointError(f"{path}: its 'vocab_words' do not match its vocabulary digest")
    vocab.path = f"the vocabulary recorded in {path}"
    return vocab


def load_checkpoint_vocab(checkpoint, path, vocab_dir, data_name, data_path=None):
    """The vocabulary the checkpoint at `path` was trained with, from DIR/NAME_vocab.{json,pkl}, else,
    when DIR holds neither, the one the checkpoint records (`recorded_vocab`).

    Ours record its digest (refused when neither file matches); without one, the original
    release's are taken to use the .pkl (the only vocabularies it shipped), ours the .json,
    and the file used is printed.
    """
    recorded = recorded_vocab(checkpoint, path)
    if recorded is not None and not vocab_files(vocab_dir, data_name):
        return recorded
    digest = checkpoint.get("vocab_digest")
    if digest is not None:
        return load_vocab_with_digest(vocab_dir, data_name, digest, path, data_path)
    vocab = load_vocab_by_name(
        vocab_dir, data_name, data_path, prefer="pkl" if is_original_release(checkpoint) else "json"
    )
    print(f"{path} records no vocabulary digest: using the vocabulary {vocab.path}", file=sys.stderr)
    return vocab


def starting_vocab(checkpoint, path, vocab_dir):
    """The vocabulary of a checkpoint to fine-tune (`train.py --init_from`): its data_name's
    NAME_vocab.{json,pkl} in `vocab_dir` (the new run's --vocab_path) or where the checkpoint says
    (`vocabulary_folder`), else the one it records."""
    saved = checkpoint["opt"]
    for folder in (vocab_dir, vocabulary_folder(saved, path)):
        if folder and vocab_files(folder, saved.data_name):
            return load_checkpoint_vocab(checkpoint, path, folder, saved.data_name)
    recorded = recorded_vocab(checkpoint, path)
    if recorded is not None:
        return recorded
    raise VocabularyError(
        f"{path}: its vocabulary {saved.data_name}_vocab.json (or .pkl) is neither in --vocab_path {vocab_dir} "
        f"nor in the folder it records ('{saved.vocab_path}'); put the vocabulary it was trained with in --vocab_path"
    )


def vocabulary_folder(opt, checkpoint_path):
    """Where the checkpoint's vocabulary is: the folder it records (`opt.vocab_path`), which is
    often relative to where training ran. Tried in turn: that path from here; from where training
    ran (the checkpoint's folder less the `--logger_name` it records); from the checkpoint's folder
    and each folder above it. None when none of them holds NAME_vocab.json or .pkl."""
    recorded = opt.vocab_path
    candidates = [recorded]
    if not os.path.isabs(recorded):
        folder = os.path.dirname(os.path.abspath(checkpoint_path))
        logger = os.path.normpath(getattr(opt, "logger_name", "") or "")
        if logger and not os.path.isabs(logger) and folder.endswith(os.sep + logger):
            candidates.append(os.path.join(folder[: -len(logger) - 1], recorded))
        while True:
            candidates.append(os.path.join(folder, recorded))
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    return next((path for path in candidates if vocab_files(path, opt.data_name)), None)


def load_models(
    model_paths, data_path=None, vocab_path=None, need_caption_branch=False, need_data=True, device=None, vocab=None
):
    """Checkpoints -> (opt of the first, vocabulary, [VSRN in eval mode, float32, on `device`]).

    vocab_path: the vocabulary's folder (None: the one the checkpoint records, found as
    `vocabulary_folder` says). need_caption_branch: refuse checkpoints without caption-branch
    weights (the original release saved only the two encoders). need_data: refuse a missing data
    folder (False for callers that read no split). device: None for CUDA when available.
    vocab: the vocabulary itself, when the caller keeps a copy (the photo library): no file is read,
    and it must be the one the checkpoints were trained with.
    """
    checkpoints = [load_checkpoint(path) for path in model_paths]
    for path, checkpoint in zip(model_paths, checkpoints):
        if need_caption_branch and isinstance(checkpoint["model"], (list, tuple)) and len(checkpoint["model"]) == 2:
            raise CheckpointError(
                f"{path}: has no caption-branch weights (an original-release checkpoint holds only the image and "
                "text encoders); generate captions with a checkpoint trained by this port's train.py"
            )
    opt = checkpoints[0]["opt"]
    if data_path is not None:
        opt.data_path = data_path
    if need_data:
        check_data_folder(
            opt.data_path,
            opt.data_name,
            "check --data_path" if data_path else f"pass --data_path (the checkpoint records '{opt.data_path}')",
        )
    if vocab is None and vocab_path is None:
        vocab_path = vocabulary_folder(opt, model_paths[0])
        if vocab_path is None:
            vocab = recorded_vocab(checkpoints[0], model_paths[0])
    if vocab is not None:
        vocab_path = vocab.path
    elif vocab_path is None:
        raise VocabularyError(
            f"{os.path.join(opt.vocab_path, opt.data_name)}_vocab.json (or .pkl): vocabulary not found, "
            "from here nor from the checkpoint's folder; "
            f"pass --vocab_path (the checkpoint records '{opt.vocab_path}')"
        )
    if vocab is None:
        vocab = load_checkpoint_vocab(checkpoints[0], model_paths[0], vocab_path, opt.data_name, opt.data_path)
    models = []
    for path, checkpoint in zip(model_paths, checkpoints):
        model_opt = checkpoint["opt"]
        if model_opt.data_name != opt.data_name:
            raise CheckpointError(
                f"{path}: trained on {model_opt.data_name}, the ensemble's first model on {opt.data_name}"
            )
        if checkpoint.get("vocab_digest", vocab_digest(vocab)) != vocab_digest(vocab):
            raise CheckpointError(
                f"{path}: trained with another vocabulary than {vocab.path}, which the ensemble's first model uses"
            )
        trained_size = getattr(model_opt, "vocab_size", len(vocab))
        if trained_size != len(vocab):
            raise CheckpointError(
                f"{path}: trained with a vocabulary of {trained_size} words, but the {opt.data_name} vocabulary "
                f"in {vocab_path} has {len(vocab)}"
            )
        model_opt.vocab_size = len(vocab)
        # Run on this machine, in float32, whatever the training run used.
        model_opt.device, model_opt.amp = device, False
        model = VSRN(model_opt, training=False)
        model.load_state_dict(checkpoint["model"], source=path)
        model.val_start()
        models.append(model)
    return opt, vocab, models


def split_loader(opt, vocab, split, data_name=None):
    """A split of the checkpoint options' dataset (or of `data_name` under their data_path), in order,
    for evaluation."""
    return get_test_loader(
        opt.data_path,
        data_name or opt.data_name,
        split,
        vocab,
        batch_size=opt.batch_size,
        workers=opt.workers,
        max_len=opt.max_len,
        img_dim=opt.img_dim,
    )


@torch.no_grad()
def encode_regions(model, features):
    """Region features (B, regions, img_dim) -> (image embeddings (B, D), the inner products of the
    GCN region features with them (B, regions), which rank the regions of the paper's attention map)."""
    model.val_start()
    images = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=model.device)
    embeddings, regions = model.img_enc(images)
    return embeddings.float(), torch.einsum("brd,bd->br", regions.float(), embeddings.float())


@torch.no_grad()
def encode_images(model, features, batch_size=ENCODE_BATCH):
    """Embeddings (on the CPU) of a sequence of images' region features (a split's FeatureFile, a list
    of arrays), in batches."""
    chunks = []
    for start in range(0, len(features), batch_size):
        batch = np.stack([features[i] for i in range(start, min(start + batch_size, len(features)))])
        chunks.append(encode_regions(model, batch)[0].cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_text(model, vocab, text):
    """The caption embedding (1, D), on the CPU, of `text` tokenized as the training captions were."""
    return encode_token_lists(model, vocab, [tokenize(text)])


@torch.no_grad()
def encode_token_lists(model, vocab, token_lists, encoder=None):
    """The caption embeddings (B, D), on the CPU, of tokenized sentences, encoded as one batch by
    `encoder` (a `text_encoder` of the model; None: the model's own, float32)."""
    ids = [[vocab(START)] + [vocab(w) for w in tokens] + [vocab(END)] for tokens in token_lists]
    lengths = [len(words) for words in ids]
    captions = torch.zeros(len(ids), max(lengths), dtype=torch.int64)
    for row, words in enumerate(ids):
        captions[row, : len(words)] = torch.tensor(words)
    model.val_start()
    return (encoder or model.txt_enc)(captions.to(model.device), lengths).float().cpu()


def text_encoder(model, path="int8"):
    """The module that encodes sentences on `path` (TEXT_PATHS): the model's own text encoder for
    float32, and on a GPU, whose memory serves its weights fast enough; for int8 on a CPU,
    `int8_text_encoder`'s copy of it. Where the int8 copy cannot be made (torch's dynamic
    quantization is deprecated: a release may drop it) or strays from float32 on a probe sentence,
    one line on stderr says so and the float32 encoder answers."""
    if path not in TEXT_PATHS:
        raise OptionError(f"--text_encoder {path}: expected one of {', '.join(TEXT_PATHS)}")
    reference = model.txt_enc
    if path == "float32" or model.device.type != "cpu":
        return reference
    try:
        encoder = int8_text_encoder(reference)
        cosine = probe_cosine(reference, encoder)
    except Exception as e:  # noqa: BLE001  (whatever a torch release does to a deprecated API, float32 answers)
        print(
            f"the int8 text encoder is not available ({first_line(e, 200)}): sentences are encoded in float32",
            file=sys.stderr,
        )
        return reference
    if not cosine >= INT8_MIN_COSINE:
        print(
            f"the int8 text encoder strays from float32 (cosine {cosine:.6f} on a probe sentence, below "
            f"{INT8_MIN_COSINE}): sentences are encoded in float32",
            file=sys.stderr,
        )
        return reference
    return encoder


@torch.no_grad()
def int8_text_encoder(encoder):
    """A copy of VSRN's text encoder (model.EncoderText) whose GRU keeps its weights in int8 and
    multiplies them with int8 activations quantized at each step (torch's dynamic quantization,
    fbgemm's x86 kernels): the released models' recurrent weights, read once per word, take 12.6 MB
    instead of 50 MB and stay in the CPU's cache. The word embeddings, the final normalisation and
    everything else are the float32 encoder's."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # Its deprecation notices: tests/test_fast_text.py pins what it does, text_encoder falls back without it.
        warnings.simplefilter("ignore")
        return quantize_dynamic(encoder, {nn.GRU}, dtype=torch.qint8).eval()


@torch.no_grad()
def probe_cosine(reference, encoder, words=12, seed=0):
    """The cosine of two text encoders' embeddings of one sentence of random words (fixed seed)."""
    vocab_size = reference.embed.num_embeddings
    ids = torch.randint(min(4, vocab_size - 1), vocab_size, (1, words), generator=torch.Generator().manual_seed(seed))
    return float((reference(ids, [words]) * encoder(ids, [words])).sum())


@dataclass
class Query:
    """A typed query: its tokens, and those outside the vocabulary (read as <unk>)."""

    text: str
    tokens: list
    unknown: list

    def notice(self):
        """The line that names the unknown words, or None."""
        if not self.unknown:
            return None
        names = ", ".join(repr(word) for word in self.unknown)
        return f"{names} {'is' if len(self.unknown) == 1 else 'are'} not in the vocabulary: read as <unk>"


def read_query(vocab, text):
    """The Query of `text`. A query with no word of the vocabulary (or no word at all) is an
    OptionError: it would rank the pictures by <unk> alone."""
    tokens = tokenize(text)
    unknown = list(dict.fromkeys(token for token in tokens if token not in vocab.word2idx))
    if not tokens:
        raise OptionError(f"the query {text!r} has no words")
    if len(unknown) == len(set(tokens)):
        names = ", ".join(repr(word) for word in unknown)
        raise OptionError(f"the query {text!r}: none of its words is in the model's vocabulary ({names}); rephrase it")
    return Query(text, tokens, unknown)


def encode_query(models, vocab, text):
    """(the Query of `text`, its embedding (1, D) by each model's text encoder)."""
    query = read_query(vocab, text)
    return query, [encode_token_lists(model, vocab, [query.tokens]) for model in models]


def scores_against(images, captions, measure):
    """(n_images, n_captions) scores, as the model ranks them."""
    return (order_sim if measure == "order" else cosine_sim)(images, captions)
