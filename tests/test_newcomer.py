"""What a new user ran into, answered in one line: devices, Ctrl-C, caption files, unknown query words,
a checkpoint's vocabulary found from anywhere, the region cache left clean."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import extract_regions
import visualize
from conftest import make_opt
from detection import cache, pipeline
from detection.settings import RegionSettings
from inference import encode_query, load_models, vocabulary_folder
from model import VSRN
from tiny_detector import TINY_ARCH, tiny_detector_state_dict
from utils.checkpoint import save_checkpoint
from utils.errors import OptionError
from vocab import save_vocab, vocab_digest, vocabulary_from_words

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "on", "bench", "."]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(pictures folder, tiny detector weights, a VSRN checkpoint reading its regions, that checkpoint's run folder)."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.RandomState(0)
    (root / "photos").mkdir()
    for n in range(3):
        Image.fromarray(rng.randint(0, 256, (50 + 10 * n, 70, 3), dtype=np.uint8)).save(root / "photos" / f"p{n}.png")
    weights = root / "detector.bin"
    torch.save(tiny_detector_state_dict(), weights)
    # A run as train.py leaves it: vocabulary and checkpoint recorded relative to where training ran.
    vocab = vocabulary_from_words(WORDS)
    save_vocab(vocab, str(root / "project" / "vocab" / "mine_precomp_vocab.json"))
    opt = make_opt(
        data_name="mine_precomp",
        vocab_path="vocab",
        logger_name="runs/mine",
        vocab_size=len(vocab),
        img_dim=TINY_ARCH["res5"][-1],
    )
    run = root / "project" / "runs" / "mine"
    state = {"model": VSRN(opt, training=False).state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab)}
    checkpoint = save_checkpoint(state, False, str(run))
    return root / "photos", str(weights), checkpoint, root


def one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_every_device_flag_answers_in_one_line(own, tmp_path, capsys):
    photos, weights, checkpoint, _ = own
    runs = {
        "extract_regions.py": lambda device: extract_regions.main(
            ["--images", str(photos), "--weights", weights, "--out", str(tmp_path / "r.tsv"), "--device", device]
        ),
        "visualize.py": lambda device: visualize.main(
            [
                "--checkpoint",
                checkpoint,
                "--images",
                str(photos),
                "--detector",
                weights,
                "--query",
                "a dog",
                "--device",
                device,
            ]
        ),
    }
    for script, run in runs.items():
        assert run("cuda") == 2, script
        assert (
            one_line(capsys) == "error: --device cuda: this torch build or machine has no CUDA device; use --device cpu"
        )
        assert run("gpu") == 2, script
        assert one_line(capsys) == "error: --device gpu: expected cpu or cuda (cuda:N)"
    assert not (tmp_path / "r.tsv").exists()


def test_ctrl_c_during_the_extraction_says_what_the_cache_kept(own, monkeypatch, capsys):
    photos, weights, checkpoint, _ = own
    detect_share, calls = pipeline.detect_share, []

    def stopped_at_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return detect_share(*args)

    monkeypatch.setattr(pipeline, "detect_share", stopped_at_the_second)
    args = ["--checkpoint", checkpoint, "--images", str(photos), "--detector", weights, "--query", "a dog"]
    assert visualize.main(args) == 130
    path = cache.regions_cache_path(weights)
    assert one_line(capsys) == (
        f"error: interrupted; the regions of the 1 picture extracted before the stop are kept in {path}; "
        "rerun the same command to continue"
    )
    monkeypatch.setattr(pipeline, "detect_share", detect_share)
    calls.clear()
    assert visualize.main([*args, "--out", str(photos.parent / "g.png")]) == 0
    assert "Regions of 2 pictures extracted (caffe policy, 36 boxes) and cached in" in capsys.readouterr().out


def test_the_region_cache_leaves_no_lock_files_nor_empty_tables(own, tmp_path, capsys):
    photos, weights, _, _ = own
    not_a_detector = tmp_path / "vsrn.bin"
    torch.save({"model": [{}], "opt": make_opt()}, not_a_detector)
    with pytest.raises(Exception, match="not the detector's weights"):
        cache.cached_regions([str(photos / "p0.png")], str(not_a_detector), settings=RegionSettings(boxes=10))
    cache.cached_regions([str(photos / "p0.png")], weights, settings=RegionSettings(boxes=10))
    folder = os.path.join(os.environ["VSRN_CACHE"], "regions")
    expected = os.path.basename(cache.regions_cache_path(weights, settings=RegionSettings(boxes=10)))
    assert [name for name in os.listdir(folder)] == [expected]


def test_a_query_names_its_unknown_words_and_one_of_only_unknown_words_is_refused(own):
    _, _, checkpoint, _ = own
    _, vocab, models = load_models([checkpoint], vocab_path=str(own[3] / "project" / "vocab"), need_data=False)
    query, _ = encode_query(models, vocab, "a kayak on a bench")
    assert query.unknown == ["kayak"] and query.notice() == "'kayak' is not in the vocabulary: read as <unk>"
    assert encode_query(models, vocab, "a dog . ")[0].notice() is None
    assert "'kayaks', 'paddles' are not" in encode_query(models, vocab, "a dog kayaks paddles")[0].notice()
    with pytest.raises(OptionError, match=r"none of its words is in the model's vocabulary \('kayak', 'paddle'\)"):
        encode_query(models, vocab, "Kayak paddle")
    with pytest.raises(OptionError, match="has no words"):
        encode_query(models, vocab, "   ")


def test_a_checkpoints_relative_vocabulary_is_found_from_any_folder(own, tmp_path, monkeypatch):
    _, _, checkpoint, root = own
    monkeypatch.chdir(tmp_path)  # neither the project's folder nor the run's
    opt, vocab, _ = load_models([checkpoint], need_data=False)
    assert vocab.path == str(root / "project" / "vocab" / "mine_precomp_vocab.json")
    # A copy of the run elsewhere: found from the checkpoint's folder upward.
    moved = tmp_path / "elsewhere" / "deep"
    shutil.copytree(root / "project" / "runs" / "mine", moved / "run")
    shutil.copytree(root / "project" / "vocab", tmp_path / "elsewhere" / "vocab")
    copied = str(moved / "run" / "checkpoint.pth.tar")
    assert vocabulary_folder(opt, copied) == str(tmp_path / "elsewhere" / "vocab")
    shutil.rmtree(tmp_path / "elsewhere" / "vocab")
    with pytest.raises(
        Exception, match="vocabulary not found, from here nor from the checkpoint's folder; pass --vocab_path"
    ):
        load_models([copied], need_data=False)


def test_a_caption_file_names_its_real_problem_and_counts_blank_lines(tmp_path, capsys):
    from lxmert.pictures import read_pictures_captions

    path = tmp_path / "captions.txt"
    path.write_text("000123\ta dog\n\n000456\t\n")
    with pytest.raises(Exception, match=r"line 3: image 000456 has an empty caption after the tab$"):
        read_pictures_captions(str(path))
    path.write_text("\ta dog\n")
    with pytest.raises(Exception, match=r"line 1: no image id before the tab"):
        read_pictures_captions(str(path))
    path.write_text("a dog on a bench\n\n  \na cat\n")
    assert read_pictures_captions(str(path)) == (["a dog on a bench", "a cat"], None)
    assert capsys.readouterr().out == f"{path}: 2 blank lines skipped\n"
    path.write_text("7\ta dog\n8\ta cat")
    assert read_pictures_captions(str(path)) == (["a dog", "a cat"], ["7", "8"])
    assert capsys.readouterr().out == ""


def test_lxmert_says_it_cached_regions_only_once_they_are(own, tmp_path, capsys):
    pytest.importorskip("transformers")
    import lxmert_match

    photos, _, checkpoint, _ = own
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\n")
    (tmp_path / "lxmert").mkdir()
    args = [
        "--images",
        str(photos),
        "--captions",
        str(captions),
        "--detector",
        checkpoint,
        "--model",
        str(tmp_path / "lxmert"),
    ]
    assert lxmert_match.main(args) == 2
    out, err = capsys.readouterr()
    assert "Regions of" not in out and "a VSRN checkpoint" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "script, target, args, kept",
    [
        ("evaluate_models", "evalrank", ["m.pth.tar"], "nothing was written"),
        ("caption", "caption_split", ["--checkpoint", "m.pth.tar"], "no captions were written"),
        ("vocab", "build_dataset_vocab", [], "no vocabulary was written"),
        (
            "utils.tsv_to_precomp",
            "convert",
            ["--tsv", "a.tsv", "--captions", "c", "--data_path", "d", "--data_name", "x_precomp", "--split", "test"],
            "no split was written",
        ),
        ("utils.make_toy_data", "make_toy_data", [], "the files written so far are whole"),
        ("utils.make_toy_images", "make_toy_images", [], "the files written so far are whole"),
        ("index", "Indexer", ["--library", "lib"], "lib keeps the photos committed so far"),
        ("search", "run", ["--library", "lib", "a dog"], "searches change nothing"),
    ],
)
def test_every_script_stops_on_ctrl_c_with_one_line(script, target, args, kept, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(script)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, target, interrupted)
    assert module.main(args) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: interrupted; {kept}"), err


def test_lxmert_extracts_one_picture_per_detector_pass_whatever_its_batch_size(own, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import lxmert_match

    photos, weights, _, _ = own
    passes = []

    def detect_share(detector, share, paths, pictures, settings):
        passes.append(len(share))
        raise KeyboardInterrupt  # enough: the pass was seen

    monkeypatch.setattr(pipeline, "detect_share", detect_share)
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\n")
    (tmp_path / "lxmert").mkdir()
    args = [
        "--images",
        str(photos),
        "--captions",
        str(captions),
        "--detector",
        weights,
        "--model",
        str(tmp_path / "lxmert"),
    ]
    assert lxmert_match.main([*args, "--batch_size", "64"]) == 130
    assert passes == [1]  # 0.5 GB a picture on the CPU: LXMERT's batch of pairs is no detector batch
