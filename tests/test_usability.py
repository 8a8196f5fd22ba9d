"""What a new user runs into: stops in the last epoch, resuming from the checkpoint alone,
folders that already hold a run, file modes, and one-line errors for bad output paths."""

import contextlib
import glob
import os
import re
import runpy
import shlex
import shutil
import stat
import subprocess
import warnings
import sys

import pytest

import evaluate_models
import train
import vocab as vocab_module
from data import get_loaders, usable_workers
from inference import load_models
from conftest import ROOT
from test_reliability import error_line, train_args
from test_train import SMALL, final_state
from utils import make_toy_data
from utils.options import build_parser


def stop_at_iteration(monkeypatch, iteration):
    """Make the run stop as a SIGTERM would, right after iteration `iteration`."""
    original = train.Trainer.train_epoch

    def train_epoch(self, epoch, start_batch):
        original_emb = self.model.train_emb

        def train_emb(*batch):
            result = original_emb(*batch)
            if self.model.Eiters == iteration:
                self.stop.signal_name = "SIGTERM"
            return result

        self.model.train_emb = train_emb
        return original(self, epoch, start_batch)

    monkeypatch.setattr(train.Trainer, "train_epoch", train_epoch)
    return lambda: monkeypatch.setattr(train.Trainer, "train_epoch", original)


DEMO_SMALL = [
    "--img_dim",
    "32",
    "--embed_size",
    "32",
    "--dim_vid",
    "32",
    "--word_dim",
    "16",
    "--dim_hidden",
    "16",
    "--dim_word",
    "16",
    "--max_len",
    "20",
]


def test_a_stop_in_the_last_epoch_is_not_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    restore = stop_at_iteration(monkeypatch, 10)  # the demo's toy train split has 40 batches per epoch
    assert train.main(["--demo", "--num_epochs", "1", *DEMO_SMALL]) == 143
    restore()
    captured = capsys.readouterr()
    assert "Demo: recall" not in captured.out  # no evaluation of a stale model_best
    assert "Stopped by SIGTERM before the last epoch ended; the run is not complete" in captured.err
    hint = captured.err.strip().splitlines()[-1].strip()
    assert hint == "python3 train.py --resume runs/demo/checkpoint.pth.tar"
    assert train.main(shlex.split(hint)[2:]) == 0
    assert "Demo: recall of runs/demo/model_best.pth.tar" in capsys.readouterr().out
    assert final_state("runs/demo")["Eiters"] == 40


def test_resume_refuses_contradicting_flags_and_accepts_safe_ones(toy_data, tmp_path, monkeypatch, capsys):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    restore = stop_at_iteration(monkeypatch, 3)
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 143
    restore()
    checkpoint = str(run / "checkpoint.pth.tar")
    for flags, expected in (
        (["--embed_size", "64"], f"--embed_size 64 contradicts the checkpoint's 32 ({checkpoint})"),
        (["--seed", "7"], "--seed 7 contradicts the checkpoint's 1"),
        (["--max_violation"], "--max_violation True contradicts the checkpoint's False"),
    ):
        assert train.main(["--resume", checkpoint, *flags]) == 2
        assert expected in error_line(capsys)
    # Same values as recorded are fine; so are the safe overrides.
    opt, _ = train.parse_options(["--resume", checkpoint, "--embed_size", "32", "--num_epochs", "3", "--workers", "1"])
    assert (opt.embed_size, opt.num_epochs, opt.workers, opt.logger_name) == (32, 3, 1, str(run))
    assert opt.data_path == data_path and opt.seed == 1 and opt.resume == checkpoint


def test_demo_resume_of_another_run_writes_into_that_run(toy_data, tmp_path, monkeypatch):
    data_path, vocab_path = toy_data
    other = tmp_path / "other"
    restore = stop_at_iteration(monkeypatch, 3)
    assert train.main(train_args(data_path, vocab_path, other, "--num_epochs", "1")) == 143
    restore()
    monkeypatch.chdir(tmp_path)
    assert train.main(["--resume", str(other / "checkpoint.pth.tar"), "--demo"]) == 2  # not a demo run
    assert train.main(["--resume", str(other / "checkpoint.pth.tar")]) == 0
    assert not (tmp_path / "runs").exists() and final_state(str(other))["Eiters"] == 25


def test_a_new_run_never_overwrites_a_folder_holding_a_run(toy_data, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 0
    before = (run / "checkpoint.pth.tar").read_bytes()
    assert train.main(train_args(data_path, vocab_path, run, "--num_epochs", "1")) == 2
    assert (
        f"{run} already holds a run; continue it with `python3 train.py --resume {run}/checkpoint.pth.tar`"
        in error_line(capsys)
    )
    assert (run / "checkpoint.pth.tar").read_bytes() == before
    # Resuming a checkpoint into a folder that holds another run is refused too.
    assert train.main(train_args(data_path, vocab_path, tmp_path / "b", "--num_epochs", "1")) == 0
    assert train.main(["--resume", str(tmp_path / "b" / "checkpoint.pth.tar"), "--logger_name", str(run)]) == 2
    assert "holds another run's checkpoint.pth.tar" in error_line(capsys)
    # The demo, which users rerun as is, moves on to the next free folder instead.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model_best.pth.tar").write_bytes(b"an earlier demo")
    opt, _ = train.parse_options(["--demo"])
    assert opt.logger_name == "runs/demo_2"


@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def test_written_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("VSRN_CACHE", str(cache))
    with umask(0o027):
        assert train.main(["--demo", "--num_epochs", "1", *DEMO_SMALL]) == 0
    written = [
        "runs/demo/checkpoint.pth.tar",
        "runs/demo/model_best.pth.tar",
        "runs/demo/ranks.pth.tar",
        "vocab/toy_precomp_vocab.json",
        "data/toy_precomp/train_ims.npy",
        "data/toy_precomp/test_caps.txt",
    ] + [str(p) for p in cache.iterdir()]
    assert len(written) > 6
    for path in written:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, path


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


def test_a_missing_data_folder_is_named_before_the_vocabulary(tmp_path, capsys, monkeypatch):
    assert (
        train.main(
            [
                "--data_path",
                str(tmp_path / "nowhere"),
                "--data_name",
                "f30k_precomp",
                "--logger_name",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    line = error_line(capsys)
    assert f"{tmp_path}/nowhere/f30k_precomp: dataset folder not found" in line and "--data_path" in line
    monkeypatch.chdir(tmp_path)
    opt, _ = train.parse_options(["--demo", "--data_path", str(tmp_path / "elsewhere"), "--num_epochs", "1"])
    with pytest.MonkeyPatch.context() as patch:
        messages = []
        patch.setattr(train.logging, "info", lambda msg, *args: messages.append(msg % args))
        train.prepare_demo(opt)
    assert f"Writing the toy dataset to {tmp_path}/elsewhere/toy_precomp" in messages


def test_evaluation_points_at_the_path_flags(toy_data, tmp_path, capsys, monkeypatch):
    data_path, vocab_path = toy_data
    run = tmp_path / "run"
    relative = os.path.relpath(data_path, tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--data_path", relative, "--vocab_path", vocab_path, "--logger_name", str(run), *SMALL, "--num_epochs", "1"]
    assert train.main(args) == 0
    monkeypatch.chdir(run)  # the checkpoint's relative data_path no longer resolves
    assert evaluate_models.main([str(run / "model_best.pth.tar")]) == 2
    line = error_line(capsys)
    assert f"{relative}/toy_precomp: dataset folder not found" in line and "pass --data_path" in line
    assert evaluate_models.main([]) == 2  # the editable blocks point at checkpoints users may not have
    line = error_line(capsys)
    assert "pretrain_model/flickr/model_fliker_1.pth.tar: checkpoint not found" in line
    assert "python3 evaluate_models.py --data_path DATA --split test CHECKPOINT" in line
    _, _, models = load_models([str(run / "model_best.pth.tar")], data_path, vocab_path)
    assert models[0].optimizer is None  # evaluation builds no optimizer


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


def test_readme_commands_never_write_over_files_of_the_repository():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: its shipped files are unknown")
    shipped = set(listed.stdout.split())
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    text = "".join(open(page, encoding="utf-8").read() for page in pages)
    commands = " ".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    outputs = re.findall(r"--(?:out|save_scores|logger_name) (\S+(?: [^-#\s]\S*)*)", commands)
    outputs = [path for paths in outputs for path in paths.split()]
    assert "map.png" in outputs  # the search finds the visualize.py commands of docs/visualize.md
    assert "scores.json" in outputs  # and every path of a flag that takes several
    for path in outputs:
        assert os.path.normpath(path) not in shipped, path


def test_the_demo_on_other_data_names_that_data(toy_data, tmp_path, monkeypatch, capsys):
    data_path, vocab_path = toy_data
    shutil.copytree(os.path.join(data_path, "toy_precomp"), tmp_path / "data" / "mine_precomp")
    shutil.copy(os.path.join(vocab_path, "toy_precomp_vocab.json"), tmp_path / "mine_precomp_vocab.json")
    monkeypatch.chdir(tmp_path)
    assert (
        train.main(["--demo", "--data_name", "mine_precomp", "--vocab_path", ".", "--num_epochs", "1", *DEMO_SMALL])
        == 0
    )
    out = capsys.readouterr().out
    assert "Demo: recall of runs/demo/model_best.pth.tar on the test split of data/mine_precomp\n" in out
    assert "toy" not in out


def test_pytest_shows_why_tests_skip(tmp_path):
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    (tmp_path / "test_skips.py").write_text('import pytest\n\n\ndef test_it():\n    pytest.skip("the reason")\n')
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_skips.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "SKIPPED [1] test_skips.py:5: the reason" in done.stdout, done.stdout
