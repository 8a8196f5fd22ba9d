"""What every script shares: one-line errors for bad flags, unwritable outputs and devices, --help that states
each default once, progress bars kept out of logs, and a one-line stop on Ctrl-C."""

import os
from conftest import ROOT, error_line, one_line
from utils.options import build_parser
import extract_regions
from data import get_loaders
from utils import make_toy_data
import pytest
import re
import runpy
import sys
import torch
from data import usable_workers
import visualize
import vocab as vocab_module
import warnings


@pytest.mark.parametrize(
    "script,args,expected",
    [
        (vocab_module, ["--vocab_path", "/dev/null/x"], "error: /dev/null/x"),
        (make_toy_data, ["--data_path", "/proc/forbidden"], "error: /proc/forbidden"),
    ],
    ids=["vocab-under-a-file", "toy-data-unwritable"],
)
def test_unwritable_output_paths_are_one_line(toy_data, capsys, script, args, expected):
    data_path, _ = toy_data
    extra = ["--data_path", data_path, "--data_name", "toy_precomp"] if script is vocab_module else ["--img_dim", "8"]
    assert script.main([*extra, *args]) == 1
    assert error_line(capsys).startswith(expected)


def test_help_shows_defaults_and_workers_are_capped(toy_data):
    text = build_parser().format_help()
    assert "(default: 128)" in text and "(default: 0.0002)" in text
    for parser in (build_parser(), vocab_module.build_parser(), make_toy_data.build_parser()):
        assert all(action.help for action in parser._actions), parser.prog
    assert usable_workers(10_000) == len(os.sched_getaffinity(0))
    data_path, vocab_path = toy_data
    from conftest import make_opt
    from vocab import load_vocab_by_name

    opt = make_opt()
    train_loader, _ = get_loaders(
        data_path,
        "toy_precomp",
        load_vocab_by_name(vocab_path, "toy_precomp"),
        batch_size=16,
        workers=10_000,
        max_len=opt.max_len,
        img_dim=opt.img_dim,
    )
    assert train_loader.num_workers == len(os.sched_getaffinity(0))


def test_progress_bars_stay_out_of_redirected_logs(capsys):
    from data import encode_captions
    from vocab import vocabulary_from_words

    vocab = vocabulary_from_words(["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])
    ids, offsets = encode_captions(["a dog"] * 3, vocab)
    assert ids.tolist() == [4, 5] * 3 and offsets.tolist() == [0, 2, 4, 6]
    assert capsys.readouterr().err == ""  # stderr is not a terminal here


def script_paths():
    """Every script with a command line: the top-level ones, utils/ and bench/."""
    paths = [
        os.path.join(folder, name)
        for folder in ("", "utils", "bench")
        for name in sorted(os.listdir(os.path.join(ROOT, folder) if folder else ROOT))
        if name.endswith(".py")
    ]
    texts = {path: open(os.path.join(ROOT, path)).read() for path in paths}
    return [path for path, text in texts.items() if "argparse" in text and re.search(r"__name__ == .__main__.", text)]


@pytest.mark.parametrize("script", script_paths())
def test_help_states_each_default_once_and_only_informative_ones(script, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    path = os.path.join(ROOT, script)
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    with pytest.raises(SystemExit) as exit_:
        if script.startswith(
            "utils"
        ):  # `python3 -m utils.NAME`; other tests imported it already, which runpy warns about
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                runpy.run_module(script[:-3].replace("/", "."), run_name="__main__", alter_sys=True)
        else:
            monkeypatch.syspath_prepend(os.path.dirname(path))  # as `python3 SCRIPT` would
            runpy.run_path(path, run_name="__main__")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    for line in text.splitlines():
        assert line.count("(default") <= 1, line
        assert not re.search(r"\(default: (None|False|)\)", line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_every_device_flag_answers_in_one_line(own_photos, tmp_path, capsys):
    photos, weights, checkpoint, _ = own_photos
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
