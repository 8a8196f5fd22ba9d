import os
import pickle
import warnings

import nltk
import pytest

import vocab as vocab_module
from conftest import CreatesFile, shared_file
from utils.errors import VocabularyError
from vocab import Vocabulary, build_vocab, load_vocab, load_vocab_by_name, save_vocab, tokenize, vocabulary_from_words

LEGACY_SIZES = {
    "f30k_precomp": 8481, "coco_precomp": 10006, "f8k_precomp": 3178, "10crop_precomp": 11360,
    "coco": 11755, "f30k": 8590, "f8k": 3388,
}


@pytest.fixture
def without_punkt(monkeypatch):
    """NLTK as on a machine without the punkt data: sentence splitting raises LookupError."""
    real = nltk.word_tokenize

    def word_tokenize(text, language="english", preserve_line=False):
        if not preserve_line:
            raise LookupError("Resource punkt_tab not found.")
        return real(text, language, preserve_line=True)

    monkeypatch.setattr(nltk, "word_tokenize", word_tokenize)
    monkeypatch.setattr(vocab_module, "_punkt_available", None)


def test_tokenize_falls_back_without_punkt_and_warns_once(without_punkt):
    with pytest.warns(UserWarning, match="download_nltk.py") as record:
        first = tokenize("A Man's dog, running.")
        second = tokenize("Two cats")
    assert first == ["a", "man", "'s", "dog", ",", "running", "."]
    assert second == ["two", "cats"]
    assert len([w for w in record if "punkt" in str(w.message)]) == 1


def test_tokenize_uses_sentence_splitting_when_punkt_is_there(monkeypatch):
    calls = []

    def word_tokenize(text, language="english", preserve_line=False):
        calls.append(preserve_line)
        return text.split()

    monkeypatch.setattr(nltk, "word_tokenize", word_tokenize)
    monkeypatch.setattr(vocab_module, "_punkt_available", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenize("Hello World") == ["hello", "world"]
    assert calls[-1] is False


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
    save_vocab(vocabulary_from_words(["<pad>", "<start>", "<end>", "<unk>", "json", "words"]), str(tmp_path / "toy_vocab.json"))
    assert len(load_vocab_by_name(str(tmp_path), "toy")) == 6
    os.remove(tmp_path / "toy_vocab.json")
    assert len(load_vocab_by_name(str(tmp_path), "toy")) == 5


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
    with pytest.raises(VocabularyError, match=r"evil_vocab.pkl.*refusing global (builtins|io)\.open"):
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
    assert vocab_module.main(["--data_path", data_path, "--data_name", "toy_precomp", "--vocab_path", str(tmp_path), "--threshold", "1"]) == 0
    vocab = load_vocab(str(tmp_path / "toy_precomp_vocab.json"))
    assert vocab("dog") > 3 and vocab("picture") > 3


def test_vocab_script_reports_missing_captions(tmp_path, capsys):
    assert vocab_module.main(["--data_path", str(tmp_path), "--data_name", "nope_precomp", "--vocab_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope_precomp/train_caps.txt: caption file not found" in err
