"""extract_regions.py: the obj36 TSV, its round trip through tsv_to_precomp, resume after a kill,
torchrun sharding, bad pictures, and cached_regions."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import extract_regions
from detection import cache, extract, pipeline
from detection.settings import REGIONS_VERSION, RegionSettings
from detection.weights import load_detector
from conftest import ROOT, make_opt, one_line
from utils import obj36, tsv_to_precomp
from utils.distributed import SINGLE_PROCESS
from tiny_detector import tiny_detector_state_dict
from utils.errors import OptionError, as_flag
from utils.images import read_image
import visualize

# Small network inputs and 10 boxes: a fraction of a second per picture with the tiny detector.
FAST = ["--boxes", "10", "--min_size", "128", "--max_size", "200"]
FAST_SETTINGS = RegionSettings(boxes=10, min_size=128, max_size=200)
SLOWED = (
    "import sys, time; sys.path.insert(0, sys.argv.pop(1)); "
    "from detection import pipeline; batch = pipeline.extract_regions_batch; "
    "pipeline.extract_regions_batch = lambda *a: (time.sleep(0.3), batch(*a))[1]; "
    "import extract_regions; sys.exit(extract_regions.main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """(weights path, environment of a subprocess) of a tiny random detector."""
    folder = tmp_path_factory.mktemp("detector")
    weights = folder / "tiny_detector.bin"
    torch.save(tiny_detector_state_dict(), weights)
    return str(weights), dict(os.environ, OMP_NUM_THREADS="1")


def make_pictures(folder, count=6, seed=0):
    """`count` small pictures of different sizes and contents; their paths in name order."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        height, width = rng.randint(48, 96, size=2)
        path = folder / f"pic{i:02d}.png"
        Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def run_script(args, env, script="extract_regions.py"):
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def rows(path):
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def test_the_tsv_round_trips_through_tsv_to_precomp(detector, tmp_path, capsys):
    weights, _ = detector
    paths = make_pictures(tmp_path / "pics")
    out = tmp_path / "regions.tsv"
    assert (
        extract_regions.main(
            ["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(out), *FAST, "--batch_size", "2"]
        )
        == 0
    )
    assert f"6 images written to {out}" in capsys.readouterr().out

    net = load_detector(weights)
    expected = [extract.extract_regions(net, read_image(p), FAST_SETTINGS) for p in paths]
    ids = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    for line, image_id, regions in zip(rows(out), ids, expected):
        parsed = obj36.parse_row(line.rstrip(b"\n"), "row")
        assert line.split(b"\t")[0].decode() == image_id and len(line.split(b"\t")) == 10
        for key, value in regions.items():
            np.testing.assert_array_equal(parsed[key], value)
            if isinstance(value, np.ndarray):
                assert parsed[key].dtype == (np.int64 if key.endswith("_id") else np.float32)

    captions = tmp_path / "caps.txt"
    captions.write_text("".join(f"{i}.png\tcaption {k} of {i}\n" for i in ids for k in range(5)))
    folder = tmp_path / "data" / "mine_precomp"
    width = expected[0]["features"].shape[1]
    assert tsv_to_precomp.convert([str(out)], str(captions), str(folder), "test", 10, width) == (6, 0)
    np.testing.assert_array_equal(np.load(folder / "test_ims.npy"), np.stack([r["features"] for r in expected]))
    np.testing.assert_array_equal(np.load(folder / "test_boxes.npy"), np.stack([r["boxes"] for r in expected]))
    assert np.load(folder / "test_image_sizes.npy").tolist() == [[r["img_h"], r["img_w"]] for r in expected]
    assert (folder / "test_image_ids.txt").read_text().split() == ids

    # --precomp writes the same split through the converter.
    assert (
        extract_regions.main(
            [
                "--images",
                *paths,
                "--weights",
                weights,
                "--out",
                str(out),
                *FAST,
                "--precomp",
                "--captions",
                str(captions),
                "--data_path",
                str(tmp_path / "data2"),
                "--data_name",
                "mine_precomp",
                "--split",
                "test",
            ]
        )
        == 0
    )
    assert "0 images written" in capsys.readouterr().out  # all were in the TSV already
    for name in ("ims.npy", "boxes.npy", "image_sizes.npy", "image_ids.txt", "caps.txt"):
        assert (tmp_path / "data2" / "mine_precomp" / f"test_{name}").read_bytes() == (
            folder / f"test_{name}"
        ).read_bytes()


def test_a_torn_last_line_is_dropped_and_redone(detector, tmp_path, capsys):
    weights, _ = detector
    make_pictures(tmp_path / "pics")
    clean, torn = tmp_path / "clean.tsv", tmp_path / "torn.tsv"
    assert (
        extract_regions.main(["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(clean), *FAST])
        == 0
    )
    whole = rows(clean)
    # Three whole rows and half of the fourth, as a crash in the middle of a write leaves them.
    torn.write_bytes(b"".join(whole[:3]) + whole[3][: len(whole[3]) // 2])
    capsys.readouterr()
    assert (
        extract_regions.main(["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(torn), *FAST]) == 0
    )
    assert f"3 images written to {torn}; 3 were already there" in capsys.readouterr().out
    assert torn.read_bytes() == clean.read_bytes()


def test_resume_after_kill_9_equals_a_clean_run(detector, tmp_path, capsys):
    weights, env = detector
    make_pictures(tmp_path / "pics", count=12)
    clean, killed = tmp_path / "clean.tsv", tmp_path / "killed.tsv"
    args = ["--images", str(tmp_path / "pics"), "--weights", weights, *FAST, "--batch_size", "1"]
    assert extract_regions.main([*args, "--out", str(clean)]) == 0
    process = subprocess.Popen(
        [sys.executable, "-c", SLOWED, ROOT, *args, "--out", str(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed.exists() and killed.read_bytes().count(b"\n") >= 3) and time.time() < deadline:
        assert process.poll() is None, "finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survived = killed.read_bytes().count(b"\n")
    assert 3 <= survived < 12
    capsys.readouterr()
    assert extract_regions.main([*args, "--out", str(killed)]) == 0
    assert f"{12 - survived} images written to {killed}; {survived} were already there" in capsys.readouterr().out
    assert killed.read_bytes() == clean.read_bytes()


def test_torchrun_with_two_processes_writes_the_single_process_tsv(detector, tmp_path, capsys):
    weights, env = detector
    make_pictures(tmp_path / "pics", count=7)
    (tmp_path / "pics" / "broken.jpg").write_text("not a picture")
    args = ["--images", str(tmp_path / "pics"), "--weights", weights, *FAST, "--batch_size", "2"]
    assert extract_regions.main([*args, "--out", str(tmp_path / "single.tsv")]) == 0
    single = capsys.readouterr()
    torchrun = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "extract_regions.py",
            *args,
            "--out",
            str(tmp_path / "two.tsv"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stderr
    assert (tmp_path / "two.tsv").read_bytes() == (tmp_path / "single.tsv").read_bytes()
    assert len(rows(tmp_path / "two.tsv")) == 7
    for out, err in ((single.out, single.err), (torchrun.stdout, torchrun.stderr)):
        assert "7 images written" in out and "1 skipped" in out
        assert err.count("broken.jpg: not a picture file") == 1  # one line, from the main process


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_shares_cover_every_position_once_in_order(world_size, batch_size):
    class World:
        size = world_size

    per_rank = []
    for rank in range(world_size):
        World.rank = rank
        per_rank.append(list(pipeline.shares(11, batch_size, World)))
    steps = len(per_rank[0])
    assert all(len(shares) == steps for shares in per_rank)  # every process takes part in every step
    gathered = [p for step in range(steps) for shares in per_rank for p in shares[step]]
    assert gathered == list(range(11))
    assert [list(s) for s in pipeline.shares(5, 2, SINGLE_PROCESS)] == [[0, 1], [2, 3], [4]]


def bad_pictures(folder):
    """One picture of each awkward kind, named after it; returns the names that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    noise = Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("a text file named like a picture\n")
    noise.convert("L").save(folder / "gray.png")
    noise.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.randint(0, 65536, (20, 30))).astype(np.uint16)).save(folder / "sixteen.png")
    noise.convert("RGBA").save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise.crop((0, 0, 40, 20)).save(folder / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "tiny.png")
    Image.new("RGB", (3000, 1), (9, 9, 9)).save(folder / "sliver.png")  # too thin for the network's convolutions
    from test_images import png_header_only

    png_header_only(folder / "huge.png", 40000, 40000)
    return ["huge", "sliver", "text", "truncated"]


def test_each_bad_picture_is_one_line_skipped_and_counted(detector, tmp_path, capsys):
    weights, _ = detector
    skipped = bad_pictures(tmp_path / "pics")
    out = tmp_path / "regions.tsv"
    hf = ["--policy", "hf", "--boxes", "10", "--min_size", "128", "--max_size", "200"]
    assert extract_regions.main(["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(out), *hf]) == 0
    result = capsys.readouterr()
    lines = result.err.splitlines()
    assert len(lines) == len(skipped)
    for name, line in zip(skipped, sorted(lines)):
        assert line.startswith(f"skipped: {tmp_path / 'pics' / name}.")
    written = {line.split(b"\t")[0].decode(): line.split(b"\t")[1:3] for line in rows(out)}
    assert sorted(written) == ["alpha", "cmyk", "gray", "rotated", "sixteen", "tiny", "whole"]
    assert written["rotated"] == [b"40", b"20"]  # height, width once upright
    assert written["tiny"] == [b"1", b"1"]
    assert "sliver.png: the detector cannot take this 3000 x 1 picture (" in result.err
    assert f"7 images written to {out}; 4 skipped, each named above" in result.out

    # The caffe policy drops proposals under 16 pixels of the picture: a 1 x 1 picture has none left.
    # A batch with a picture the detector cannot take is done again one picture at a time.
    tiny = [str(tmp_path / "pics" / name) for name in ("tiny.png", "whole.jpg", "sliver.png", "gray.png")]
    args = ["--images", *tiny, "--weights", weights, "--out", str(tmp_path / "caffe.tsv"), *FAST, "--batch_size", "2"]
    assert extract_regions.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0] == f"skipped: {tiny[0]}: the detector kept 0 regions, 10 needed (a 1 x 1 picture; "
        "under the caffe policy, pictures of a few pixels leave no proposal)"
    )
    assert err[1].startswith(f"skipped: {tiny[2]}: the detector cannot take this 3000 x 1 picture (") and len(err) == 2
    assert [line.split(b"\t")[0] for line in rows(tmp_path / "caffe.tsv")] == [b"whole", b"gray"]


@pytest.mark.parametrize(
    "case",
    [
        "empty folder",
        "missing folder",
        "missing weights",
        "wrong weights",
        "same ids",
        "other box count",
        "out is another file",
        "out is a text line",
        "precomp flags",
    ],
)
def test_unusable_inputs_are_one_line_and_exit_2(detector, tmp_path, capsys, case):
    weights, env = detector
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.bin").write_text("not a detector")
    make_pictures(tmp_path / "pics", count=2)
    args = {
        "empty folder": ["--images", str(tmp_path / "empty"), "--weights", weights],
        "missing folder": ["--images", str(tmp_path / "absent"), "--weights", weights],
        "missing weights": ["--images", str(tmp_path / "pics"), "--weights", str(tmp_path / "absent.bin")],
        "wrong weights": ["--images", str(tmp_path / "pics"), "--weights", str(tmp_path / "notes.bin")],
        "same ids": ["--images", str(tmp_path / "pics"), str(tmp_path / "pics" / "pic00.png"), "--weights", weights],
        "out is another file": ["--images", str(tmp_path / "pics"), "--weights", weights],
        "out is a text line": ["--images", str(tmp_path / "pics"), "--weights", weights],
        "other box count": ["--images", str(tmp_path / "pics"), "--weights", weights, "--boxes", "12"],
        "precomp flags": ["--images", str(tmp_path / "pics"), "--weights", weights, "--precomp", "--captions", "c.txt"],
    }[case]
    out = tmp_path / "regions.tsv"
    if case == "other box count":
        assert (
            extract_regions.main(["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(out), *FAST])
            == 0
        )
    if case.startswith("out is"):  # a wrong --out is never cut or appended to
        out.write_text("some notes\nof the user's" if case == "out is another file" else "one line without a newline")
    before = out.read_bytes() if out.exists() else None
    capsys.readouterr()
    if case == "missing weights":  # as a user sees it: the script's own process
        result = run_script([*args, "--out", str(out)], env)
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = extract_regions.main([*args, "--out", str(out)]), capsys.readouterr().err
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ")
    expected = {
        "empty folder": f"--images {tmp_path / 'empty'}: no pictures",
        "missing folder": f"--images {tmp_path / 'absent'}: no such file or folder",
        "missing weights": f"--weights {tmp_path / 'absent.bin'}: file not found",
        "wrong weights": f"error: {tmp_path / 'notes.bin'}: ",
        "same ids": "have the same image id 'pic00'",
        "out is another file": f"{out}:1: not an obj36 row (1 tab-separated fields); choose another --out",
        "out is a text line": f"{out}:1: not an obj36 row; choose another --out",
        "other box count": f"--out {out} holds rows of 10 boxes; this run extracts 12",
        "precomp flags": "--precomp writes a VSRN split: give --data_path, --data_name, --split too",
    }[case]
    assert expected in stderr
    assert (out.read_bytes() if out.exists() else None) == before


def test_cached_regions_extracts_each_picture_once(detector, tmp_path, monkeypatch):
    weights, _ = detector
    paths = make_pictures(tmp_path / "pics", count=4)
    extracted = []
    batch = extract.extract_regions_batch
    monkeypatch.setattr(
        pipeline,
        "extract_regions_batch",
        lambda net, images, settings: (extracted.extend(images), batch(net, images, settings))[1],
    )

    ten = RegionSettings(boxes=10)
    first = cache.cached_regions(paths[:3], weights, settings=ten)
    assert list(first) == ["pic00", "pic01", "pic02"] and len(extracted) == 3
    expected = batch(load_detector(weights), [read_image(p) for p in paths[:3]], ten)
    for regions, reference in zip(first.values(), expected):
        for key in reference:
            np.testing.assert_array_equal(regions[key], reference[key])

    again = cache.cached_regions(paths, weights, settings=ten)
    assert len(extracted) == 4  # only the new picture
    assert list(again) == ["pic00", "pic01", "pic02", "pic03"]
    np.testing.assert_array_equal(again["pic01"]["features"], first["pic01"]["features"])
    assert cache.cached_regions(paths, weights, settings=ten).keys() == again.keys() and len(extracted) == 4

    cache_files = os.listdir(os.path.join(os.environ["VSRN_CACHE"], "regions"))
    assert len([f for f in cache_files if f.endswith(".tsv")]) == 1

    # Other settings, and an edited picture, are extracted again.
    cache.cached_regions(paths[:1], weights, settings=RegionSettings(boxes=12))
    assert len(extracted) == 5
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (60, 90, 3), dtype=np.uint8)).save(paths[2])
    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    edited = cache.cached_regions(paths, weights, settings=ten)
    assert len(extracted) == 6
    assert (edited["pic02"]["img_h"], edited["pic02"]["img_w"]) == (60, 90)


def test_each_policy_reads_the_pictures_as_its_original_did(detector, tmp_path):
    """caffe: as cv2.imread (a transparent picture's stored colours), hf: over white."""
    weights, _ = detector
    rgba = np.random.RandomState(3).randint(0, 256, (60, 80, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rgba[..., 3] > 128, 255, 0)
    (tmp_path / "pics").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "pics" / "alpha.png")
    over_white = np.where(rgba[..., 3:] > 0, rgba[..., :3], 255).astype(np.uint8)
    net = load_detector(weights)
    for policy, seen in (("caffe", rgba[..., :3]), ("hf", over_white)):
        out = tmp_path / f"{policy}.tsv"
        args = ["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(out), "--policy", policy]
        assert extract_regions.main([*args, *FAST]) == 0
        row = obj36.parse_row(rows(out)[0].rstrip(b"\n"), "row")
        expected = extract.extract_regions(net, seen, dataclasses.replace(FAST_SETTINGS, policy=policy))
        np.testing.assert_array_equal(row["features"], expected["features"])


def write_rows(path, regions_by_id):
    path.write_text("".join(obj36.format_obj36_line(image_id, r) for image_id, r in regions_by_id.items()))


def test_check_against_passes_its_own_rows_and_fails_perturbed_ones(detector, tmp_path, capsys):
    weights, _ = detector
    make_pictures(tmp_path / "pics", count=3)
    sizes = ["--min_size", "128", "--max_size", "200"]
    published = tmp_path / "published.tsv"
    assert (
        extract_regions.main(["--images", str(tmp_path / "pics"), "--weights", weights, "--out", str(published), *FAST])
        == 0
    )
    check = ["--check_against", str(published), "--images", str(tmp_path / "pics"), "--weights", weights, *sizes]
    capsys.readouterr()
    assert extract_regions.main(check) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"the caffe policy's regions (300 proposals) against {published}, 3 pictures"
    assert lines[1:4] == [
        f"pic0{i}: 10/10 boxes within 1 px (feature cosine min 1.0000), object ids 10/10 the same; "
        "10/10 at IoU >= 0.9 (cosine mean 1.0000): agrees"
        for i in range(3)
    ]
    assert (
        lines[4]
        == "overall: 30/30 published regions matched within 1 px, 30/30 at IoU >= 0.9 (feature cosine mean 1.0000)"
    )
    assert lines[5].startswith(f"verdict: all 3 pictures agree with {published}: these weights") and len(lines) == 6

    # Boxes 3 pixels off, features of another network, other object ids: each picture differs.
    regions = {r["img_id"]: r for r, _ in obj36.read_rows([published])}
    regions["pic00"]["boxes"] += 3
    features = regions["pic01"]["features"]
    regions["pic01"]["features"] = np.random.RandomState(0).uniform(0, 1, features.shape).astype(np.float32)
    regions["pic02"]["objects_id"] = (regions["pic02"]["objects_id"] + 1) % 1600
    perturbed = tmp_path / "perturbed.tsv"
    write_rows(perturbed, regions)
    assert extract_regions.main([*check[:1], str(perturbed), *check[2:]]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("pic00: 0/10 boxes within 1 px (feature cosine min -)") and lines[1].endswith("DIFFERS")
    assert lines[2].startswith("pic01: 10/10 boxes within 1 px (feature cosine min 0.") and lines[2].endswith("DIFFERS")
    assert "object ids 0/10 the same" in lines[3] and lines[3].endswith("DIFFERS")
    assert lines[5].startswith(f"verdict: 3 of 3 pictures differ from {perturbed}: these weights")

    # Fewer proposals than the rows were made with: what that changes to the regions kept.
    assert extract_regions.main([*check, "--proposals", "5"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"the caffe policy's regions (5 proposals) against {published}, 3 pictures"
    assert all(line.startswith(f"pic0{i}: ") and "/10 boxes within 1 px" in line for i, line in enumerate(lines[1:4]))
    assert lines[5].startswith("verdict: with 5 proposals (the rows were made with 300), 0 of 3 pictures agree; ")


@pytest.mark.parametrize("case", ["hf policy", "out", "boxes", "missing rows", "no row"])
def test_check_against_refusals_are_one_line(detector, tmp_path, capsys, case):
    weights, _ = detector
    make_pictures(tmp_path / "pics", count=2)
    published = tmp_path / "published.tsv"
    if case != "missing rows":  # a row of another picture
        other = make_pictures(tmp_path / "other", count=1)[0]
        regions = extract.extract_regions(load_detector(weights), other, FAST_SETTINGS)
        write_rows(published, {"other": regions})
    args = ["--check_against", str(published), "--images", str(tmp_path / "pics"), "--weights", weights]
    extra, expected = {
        "hf policy": (["--policy", "hf"], "--check_against: drop --policy hf: it compares the caffe policy's regions"),
        "out": (["--out", "x.tsv"], "--check_against: drop --out: it writes nothing"),
        "boxes": (["--boxes", "36"], "--check_against: drop --boxes/--min_boxes/--max_boxes: it takes each row's"),
        "missing rows": ([], f"--check_against {published}: no such file (the published rows to compare with)"),
        "no row": ([], f"--check_against {published}: none of the 2 pictures' ids (file names without extension, "),
    }[case]
    capsys.readouterr()
    assert extract_regions.main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err


# ---------------------------------------------------------------------------------------------
# The front door: RegionSettings and detect_pictures


@pytest.mark.parametrize(
    "values, message, flags",
    [
        ({"boxes": 0}, "boxes 0: expected at least 1", "--boxes 0: expected at least 1"),
        ({"policy": "detectron"}, "policy 'detectron': expected one of caffe, hf", None),
        (
            {"min_boxes": 5},
            "boxes N takes exactly N regions per picture; min_boxes/max_boxes take a variable number",
            "--boxes N takes exactly N regions per picture; --min_boxes/--max_boxes take a variable number",
        ),
        (
            {"boxes": None, "policy": "hf", "max_boxes": 20},
            "min_boxes/max_boxes select with the caffe policy; policy hf takes boxes N",
            "--min_boxes/--max_boxes select with the caffe policy; --policy hf takes --boxes N",
        ),
        (
            {"boxes": None, "min_boxes": 150},
            "min_boxes 150 max_boxes 100: expected 1 <= min <= max",
            "--min_boxes 150 --max_boxes 100: expected 1 <= min <= max",
        ),
        ({"proposals": 2.5}, "proposals 2.5: expected at least 1", None),
    ],
)
def test_region_settings_refuse_what_the_detector_cannot_run_in_the_library_words(values, message, flags):
    with pytest.raises(OptionError) as refused:
        RegionSettings(**values)
    assert str(refused.value).startswith(message)
    if flags:
        assert refused.value.worded(as_flag).startswith(flags)


def test_region_settings_record_what_libraries_and_the_cache_keep():
    fixed = RegionSettings()
    assert fixed.record() == {
        "policy": "caffe",
        "boxes": 36,
        "min_size": None,
        "max_size": None,
        "proposals": None,
        "regions_version": REGIONS_VERSION,
    }
    variable = RegionSettings(boxes=None, max_boxes=50, conf_thresh=0.3, proposals=np.int64(120))
    record = variable.record()
    assert record["max_boxes"] == 50 and record["conf_thresh"] == 0.3 and "min_boxes" not in record
    assert json.loads(json.dumps(record)) == record and RegionSettings.from_record(record) == variable
    # A photo library's record carries its detector config's digest beside the settings.
    assert RegionSettings.from_record({**fixed.record(), "config": "ab12"}) == fixed
    assert variable.box_range(None) == (10, 50) and fixed.box_range(None) == (36, 36)
    assert RegionSettings(policy="hf", boxes=None).box_range((20, 40)) == (20, 40)


def test_detect_pictures_yields_each_pictures_regions_or_problem_in_order(detector, tmp_path):
    weights, _ = detector
    paths = make_pictures(tmp_path / "pics", count=3)
    paths.insert(1, str(tmp_path / "pics" / "missing.png"))
    tiny = tmp_path / "pics" / "tiny.png"  # under 16 pixels: no proposal under the caffe policy
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(tiny)
    paths.append(str(tiny))
    net = load_detector(weights)
    steps = list(pipeline.detect_pictures(net, paths, FAST_SETTINGS, batch_size=2, workers=2))
    assert [len(step) for step in steps] == [2, 2, 1]
    found = [d for step in steps for d in step]
    assert [d.index for d in found] == [0, 1, 2, 3, 4]
    assert found[1].regions is None and found[1].problem == "file not found"
    assert found[4].regions is None and found[4].problem.startswith("the detector kept 0 regions, 10 needed")
    for d in (found[0], found[2], found[3]):
        expected = extract.extract_regions(net, read_image(paths[d.index]), FAST_SETTINGS)
        assert d.problem is None and np.array_equal(d.regions["features"], expected["features"])


def test_detect_pictures_finishes_each_share_with_its_pictures(detector, tmp_path):
    """`finish` sees each share's Detected with the pictures read for them; what it makes is what is yielded
    (under torchrun, what each process sends to the first)."""
    weights, _ = detector
    paths = make_pictures(tmp_path / "pics", count=5)
    finished = []

    def finish(found, pictures):
        finished.append([d.index for d in found])
        return [
            (d.index, picture.shape[:2], d.regions["img_h"], d.regions["img_w"]) for d, picture in zip(found, pictures)
        ]

    net = load_detector(weights)
    steps = list(pipeline.detect_pictures(net, paths, FAST_SETTINGS, batch_size=2, finish=finish))
    assert finished == [[0, 1], [2, 3], [4]]
    made = [item for step in steps for item in step]
    assert [index for index, *_ in made] == [0, 1, 2, 3, 4]
    assert all(shape == (height, width) for _, shape, height, width in made)


def test_ctrl_c_during_the_extraction_says_what_the_cache_kept(own_photos, monkeypatch, capsys):
    photos, weights, checkpoint, _ = own_photos
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


def test_the_region_cache_leaves_no_lock_files_nor_empty_tables(own_photos, tmp_path, capsys):
    photos, weights, _, _ = own_photos
    not_a_detector = tmp_path / "vsrn.bin"
    torch.save({"model": [{}], "opt": make_opt()}, not_a_detector)
    with pytest.raises(Exception, match="not the detector's weights"):
        cache.cached_regions([str(photos / "p0.png")], str(not_a_detector), settings=RegionSettings(boxes=10))
    cache.cached_regions([str(photos / "p0.png")], weights, settings=RegionSettings(boxes=10))
    folder = os.path.join(os.environ["VSRN_CACHE"], "regions")
    expected = os.path.basename(cache.regions_cache_path(weights, settings=RegionSettings(boxes=10)))
    assert [name for name in os.listdir(folder)] == [expected]
