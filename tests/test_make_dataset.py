"""make_dataset.py: regions through the detector (resumed after a kill, sharded by torchrun with the same files),
from published rows or a photo library; duplicates kept once, a picture in two splits refused; pictures left
out named and counted; bad input one line, exit 2, nothing written lost; the dataset trains and evaluates."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import index
import make_dataset
from conftest import ROOT
from own_data import make_pictures
from photo_world import make_world
from tiny_detector import tiny_detector_state_dict
from vocab import build_dataset_vocab, load_vocab, vocab_digest

FAST = ["--min_size", "128", "--max_size", "200"]  # the tiny detector on small inputs: ~0.1 s a picture
SLOWED = (
    "import sys, time; sys.path.insert(0, sys.argv.pop(1)); "
    "from detection import pipeline; batch = pipeline.extract_regions_batch; "
    "pipeline.extract_regions_batch = lambda *a, **k: (time.sleep(0.3), batch(*a, **k))[1]; "
    "import make_dataset; sys.exit(make_dataset.main(sys.argv[1:]))"
)
WORDS = "dog cat horse bird cow sheep bicycle car bus boat train kite ball tree bench".split()


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    weights = tmp_path_factory.mktemp("detector") / "tiny_detector.bin"
    torch.save(tiny_detector_state_dict(), weights)
    return str(weights)


def make_collection(folder, count, seed=0):
    """`count` random pictures, each with 1 to 4 captions in a CSV (open_clip's columns); the CSV's path."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        height, width = rng.randint(48, 96, size=2)
        Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"pic{i:02d}.png")
        for _ in range(rng.randint(1, 5)):
            rows.append([f"pic{i:02d}.png", "a " + " and a ".join(rng.choice(WORDS, 2))])
    return write_csv(folder / "captions.csv", rows)


def write_csv(path, rows, header=("filepath", "title")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def arguments(annotations, data, *more):
    """make_dataset.py's flags: the dataset in `data`, its vocabulary beside it (unless `more` says otherwise)."""
    where = ["--data_path", str(data), "--data_name", "mine_precomp", "--vocab_path", str(data / "vocab")]
    return ["--annotations", *annotations, *where, *more]


def run(argv, capsys):
    code = make_dataset.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def every_split(folder, name):
    """The text of a layout file, all splits written together."""
    return "".join(
        (folder / f"{s}_{name}").read_text() for s in ("train", "dev", "test") if (folder / f"{s}_{name}").exists()
    )


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_the_detectors_dataset_trains_and_evaluates_with_the_commands_it_prints(detector, tmp_path, capsys):
    import evaluate_models
    import train

    annotations = make_collection(tmp_path / "pics", 10)
    (tmp_path / "pics" / "broken.png").write_text("not a picture")
    write_csv(annotations, list(csv.reader(open(annotations)))[1:] + [["broken.png", "a zebra"]])
    vocab = tmp_path / "vocab"
    argv = arguments([annotations], tmp_path / "data", "--detector", detector, *FAST, "--splits", "0.6,0.2,0.2")
    code, out, err = run([*argv, "--vocab_path", str(vocab), "--threshold", "1"], capsys)
    assert code == 0, err
    folder = tmp_path / "data" / "mine_precomp"
    assert "10 pictures and" in out and "(pictures / captions: train 6 /" in out
    # The vocabulary is vocab.py's of the captions written (the left-out picture's "zebra" is not in it).
    written = load_vocab(str(vocab / "mine_precomp_vocab.json"))
    assert vocab_digest(written) == vocab_digest(build_dataset_vocab(str(tmp_path / "data"), "mine_precomp", 1))
    assert "zebra" not in written.word2idx
    assert np.load(folder / "train_ims.npy").shape == (6, 36, 64)  # the tiny detector's 64-d regions
    assert (folder / "train_caption_images.npy").exists() and (folder / "regions_obj36.tsv").exists()
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("python3 ")]
    assert commands[0].startswith(f"python3 train.py --data_path {tmp_path / 'data'} --data_name mine_precomp")
    assert "--img_dim 64" in commands[0]
    small = ["--embed_size", "16", "--dim_vid", "16", "--word_dim", "8", "--dim_hidden", "8", "--dim_word", "8"]
    small += ["--batch_size", "4", "--num_epochs", "1", "--workers", "0", "--seed", "0", "--device", "cpu"]
    trained = commands[0].split()[2:] + small
    trained[trained.index("--logger_name") + 1] = str(tmp_path / "run")
    assert train.main(trained) == 0
    evaluated = commands[2].split()[2:-1] + [str(tmp_path / "run" / "model_best.pth.tar")]
    capsys.readouterr()
    assert evaluate_models.main(evaluated) == 0
    assert "Images: 2, Captions:" in capsys.readouterr().out


def test_pictures_left_out_are_each_one_line_and_counted(detector, tmp_path, capsys):
    annotations = make_collection(tmp_path / "pics", 4)
    (tmp_path / "pics" / "broken.png").write_text("not a picture")
    rows = list(csv.reader(open(annotations)))[1:]
    rows += [["broken.png", "a broken one"], ["absent.png", "a missing one"], ["pic01.png", " "]]
    (tmp_path / "pics" / "extra.png").write_bytes((tmp_path / "pics" / "pic00.png").read_bytes())
    Image.new("RGB", (50, 50)).save(tmp_path / "pics" / "empty.png")
    rows += [["extra.png", "the same picture as pic00"], ["empty.png", ""]]
    write_csv(annotations, rows)
    code, out, err = run(arguments([annotations], tmp_path / "data", "--detector", detector, *FAST), capsys)
    assert code == 0, err
    pics = tmp_path / "pics"
    assert f"{annotations}:" in err and "empty caption; skipped" in err  # the two empty captions
    assert f"{pics / 'absent.png'}: missing (named at {annotations}:" in err
    assert f"{pics / 'empty.png'}: no captions (named at {annotations}:" in err
    assert f"{pics / 'extra.png'}: the same picture as {pics / 'pic00.png'}" in err
    assert f"skipped: {pics / 'broken.png'}: not a picture file Pillow can read" in err
    assert f"{pics / 'broken.png'}: no regions (the detector's line above says why); left out" in err
    assert "4 pictures and" in out
    assert "left out, each named above: 2 malformed records, 1 missing, 1 without captions, 1 without regions" in out
    assert "1 file held a picture already named: each picture kept once" in out
    folder = tmp_path / "data" / "mine_precomp"
    assert "extra.png" not in every_split(folder, "image_ids.txt")
    assert "the same picture as pic00" in every_split(folder, "caps.txt")


def test_the_same_picture_in_two_given_splits_is_refused(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", ["a", "b"])
    (tmp_path / "pics" / "b_copy.png").write_bytes((tmp_path / "pics" / "b.png").read_bytes())
    train = write_csv(tmp_path / "train.csv", [["pics/a.png", "one"], ["pics/b.png", "two"]])
    test = write_csv(tmp_path / "test.csv", [["pics/b_copy.png", "three"]])
    data = tmp_path / "data"
    code, out, err = run(arguments([f"train={train}", f"test={test}"], data, "--regions", rows), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: {tmp_path / 'pics' / 'b.png'} and {tmp_path / 'pics' / 'b_copy.png'} are the same picture "
    )
    assert "in two splits, train (" in err and not (data / "mine_precomp" / "train_ims.npy").exists()
    # The same file in two splits by name, in one file's split column.
    both = write_csv(
        tmp_path / "both.csv", [["pics/a.png", "x", "train"], ["pics/a.png", "y", "test"]], ("image", "text", "split")
    )
    code, out, err = run(arguments([both], data, "--regions", rows), capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {both}:3: pics/a.png is in test there and in train at {both}:2")


def test_drawn_splits_depend_on_the_pictures_and_the_seed_only(tmp_path, capsys):
    names = [f"n{i:02d}" for i in range(20)]
    rows = make_pictures(tmp_path / "pics", names)
    lines = [[f"pics/{n}.png", f"picture {n}"] for n in names]
    forward = write_csv(tmp_path / "forward.csv", lines)
    backward = write_csv(tmp_path / "backward.csv", lines[::-1])
    members = []
    for annotations, seed in ((forward, "0"), (backward, "0"), (forward, "1")):
        data = tmp_path / f"data_{len(members)}"
        code, out, err = run(
            arguments(
                [annotations],
                data,
                "--regions",
                rows,
                "--splits",
                "0.5,0.25,0.25",
                "--seed",
                seed,
                "--vocab_path",
                str(data),
            ),
            capsys,
        )
        assert code == 0, err
        assert "(pictures / captions: train 10 / 10, dev 5 / 5, test 5 / 5)" in out
        members.append(
            {
                s: set((data / "mine_precomp" / f"{s}_image_ids.txt").read_text().split())
                for s in ("train", "dev", "test")
            }
        )
    assert members[0] == members[1] and members[0] != members[2]


def test_rows_are_matched_by_name_annotation_id_or_digest(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", ["COCO_val2014_000000000042", "b"])
    text = open(rows).read().replace("COCO_val2014_000000000042\t", "42\t", 1)  # a row named by COCO's image id
    open(rows, "w").write(text)
    coco = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.png"}, {"id": 7, "file_name": "b.png"}],
        "annotations": [{"image_id": 42, "caption": "a"}, {"image_id": 7, "caption": "b"}],
    }
    (tmp_path / "pics" / "captions_val2014.json").write_text(json.dumps(coco))
    code, out, err = run(
        arguments(
            [str(tmp_path / "pics" / "captions_val2014.json")],
            tmp_path / "data",
            "--regions",
            rows,
            "--splits",
            "1,0,0",
        ),
        capsys,
    )
    assert code == 0, err
    assert "2 pictures and 2 captions" in out


def test_a_photo_librarys_regions_give_the_rows_files(tmp_path, capsys):
    world = make_world(tmp_path / "world", sizes={"test": 6})
    library = str(tmp_path / "lib")
    assert (
        index.main(
            [
                "--images",
                world.images,
                "--checkpoint",
                world.checkpoints[0],
                "--regions",
                *world.rows,
                "--library",
                library,
            ]
        )
        == 0
    )
    names = sorted(os.listdir(world.images))
    annotations = write_csv(
        tmp_path / "captions.csv", [[os.path.join(world.images, n), f"picture {k}"] for k, n in enumerate(names)]
    )
    capsys.readouterr()
    files = []
    for source in (["--library", library], ["--regions", *world.rows]):
        data = tmp_path / f"data_{len(files)}"
        code, out, err = run(arguments([f"test={annotations}"], data, *source, "--vocab_path", str(data)), capsys)
        assert code == 0, err
        assert "6 pictures and 6 captions" in out
        files.append(
            {
                n: (data / "mine_precomp" / f"test_{n}").read_bytes()
                for n in ("ims.npy", "boxes.npy", "image_sizes.npy", "caps.txt")
            }
        )
    assert files[0] == files[1]


def test_resume_after_kill_9_equals_a_clean_run(detector, tmp_path, capsys):
    annotations = make_collection(tmp_path / "pics", 12)
    args = ["--detector", detector, *FAST, "--vocab_path", str(tmp_path / "vocab")]
    assert make_dataset.main(arguments([annotations], tmp_path / "clean", *args)) == 0
    killed = tmp_path / "killed" / "mine_precomp"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED, ROOT, *arguments([annotations], tmp_path / "killed", *args)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tsv = killed / "regions_obj36.tsv"
    deadline = time.time() + 120
    while not (tsv.exists() and tsv.read_bytes().count(b"\n") >= 3) and time.time() < deadline:
        assert process.poll() is None, "finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survived = tsv.read_bytes().count(b"\n")
    assert 3 <= survived < 12 and not (killed / "train_ims.npy").exists()
    (killed / ".train_ims.npy.x1y2z3.tmp").write_bytes(b"left by a kill during a write")
    capsys.readouterr()
    assert make_dataset.main(arguments([annotations], tmp_path / "killed", *args)) == 0
    assert f"{12 - survived} images written to {tsv}; {survived} were already there" in capsys.readouterr().out
    assert folder_bytes(killed) == folder_bytes(tmp_path / "clean" / "mine_precomp")


def test_torchrun_with_two_processes_writes_the_single_process_files(detector, tmp_path, capsys):
    annotations = make_collection(tmp_path / "pics", 7)
    args = ["--detector", detector, *FAST, "--batch_size", "2", "--vocab_path", str(tmp_path / "vocab")]
    assert make_dataset.main(arguments([annotations], tmp_path / "single", *args)) == 0
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "make_dataset.py"]
        + arguments([annotations], tmp_path / "two", *args),
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stderr
    assert torchrun.stdout.count("7 pictures and") == 1  # the summary, from the main process
    assert folder_bytes(tmp_path / "two" / "mine_precomp") == folder_bytes(tmp_path / "single" / "mine_precomp")


def test_a_rerun_with_other_settings_or_bad_input_loses_nothing(detector, tmp_path, capsys):
    annotations = make_collection(tmp_path / "pics", 4)
    data = tmp_path / "data"
    args = ["--detector", detector, *FAST, "--vocab_path", str(tmp_path / "vocab")]
    assert make_dataset.main(arguments([annotations], data, *args)) == 0
    before = folder_bytes(data / "mine_precomp")
    vocab = (tmp_path / "vocab" / "mine_precomp_vocab.json").read_bytes()
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    other = write_csv(tmp_path / "other.csv", [["pics/pic00.png", "an entirely different caption " * 3]] * 5)
    cases = [
        (arguments([str(broken)], data, *args), f"{broken}: not a readable JSON file"),
        (
            arguments([annotations], data, *args, "--min_size", "100"),
            f"{data / 'mine_precomp' / 'regions_obj36.tsv'}: holds regions of another detector or settings "
            "(min_size differ)",
        ),
        (
            arguments([other], data, *args, "--splits", "1,0,0"),
            f"{tmp_path / 'vocab' / 'mine_precomp_vocab.json'}: holds another vocabulary",
        ),
        (arguments([annotations], data, *args, "--regions", "rows.tsv"), "give one source of region features"),
        (arguments([annotations], data, "--vocab_path", str(tmp_path)), "give one source of region features"),
        (arguments([annotations], data, *args, "--splits", "0.8,0.2"), "--splits 0.8,0.2: expected three shares"),
        (arguments([f"holdout={annotations}"], data, *args), f"--annotations holdout={annotations}: split 'holdout'"),
        (
            arguments([annotations], data, *args, "--data_name", "mine"),
            "--data_name mine: VSRN reads NAME_precomp folders",
        ),
        (
            arguments([annotations], data, *args, "--columns", "a,b"),
            f"{annotations}:1: no column 'a' among filepath, title",
        ),
    ]
    for argv, message in cases:
        code, out, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith(f"error: {message}"), err
        assert folder_bytes(data / "mine_precomp") == before
        assert (tmp_path / "vocab" / "mine_precomp_vocab.json").read_bytes() == vocab
    # A folder holding another dataset is not written over.
    (tmp_path / "theirs" / "f30k_precomp").mkdir(parents=True)
    np.save(tmp_path / "theirs" / "f30k_precomp" / "train_ims.npy", np.zeros((1, 36, 4), dtype=np.float32))
    code, out, err = run([*arguments([annotations], tmp_path / "theirs", *args), "--data_name", "f30k_precomp"], capsys)
    assert code == 2 and "holds a dataset make_dataset.py did not write (train_ims.npy)" in err


def test_a_caption_map_an_earlier_run_needed_goes_when_the_counts_become_uniform(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", ["a", "b"])
    data = tmp_path / "data"
    varying = write_csv(tmp_path / "v.csv", [["pics/a.png", "one"], ["pics/a.png", "two"], ["pics/b.png", "three"]])
    uniform = write_csv(tmp_path / "u.csv", [["pics/a.png", "one"], ["pics/b.png", "three"]])
    for annotations, has_map in ((varying, True), (uniform, False)):
        code, out, err = run(
            arguments(
                [f"test={annotations}"], data, "--regions", rows, "--vocab_path", str(tmp_path), "--overwrite_vocab"
            ),
            capsys,
        )
        assert code == 0, err
        assert (data / "mine_precomp" / "test_caption_images.npy").exists() == has_map


@pytest.mark.slow
def test_the_demo_fine_tunes_the_demo_checkpoint_on_its_new_dataset(demo_run, tmp_path, monkeypatch, capsys):
    """make_dataset.py --demo from the demo's trained checkpoint (the session's run of train.py --demo), smaller:
    40 pictures, one epoch."""
    from dataset_maker import demo

    for folder in ("runs/demo", "vocab"):
        shutil.copytree(demo_run[0] / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "COUNT", 40)
    monkeypatch.setattr(
        demo, "FINE_TUNING", ["--batch_size", "32", "--num_epochs", "1", "--workers", "0", "--seed", "0"]
    )
    words = torch.load("runs/demo/model_best.pth.tar", weights_only=False)["vocab_words"]
    assert make_dataset.main(["--demo"]) == 0
    out = capsys.readouterr().out
    assert "40 pictures and" in out and "Before fine-tuning: rsum" in out and "After fine-tuning:  rsum" in out
    rows = list(csv.reader(open("data/toy_demo_pictures/captions.csv")))
    assert rows[0] == ["filepath", "title"] and len({r[0] for r in rows[1:]}) == 40
    counts = np.bincount(np.load("data/toy_demo_precomp/train_caption_images.npy"))
    assert counts.min() >= 1 and counts.max() <= 5 and counts.min() < counts.max()
    tuned = torch.load("runs/demo_finetune/model_best.pth.tar", weights_only=False)
    assert tuned["vocab_words"][: len(words)] == words and "drawing" in tuned["vocab_words"][len(words) :]
    assert make_dataset.main(["--demo"]) == 0  # again: the same dataset, a second fine-tuning run beside the first
    assert os.path.isfile("runs/demo_finetune_2/model_best.pth.tar")
