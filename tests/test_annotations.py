"""make_dataset.py's annotation formats: the same pictures and captions in each format give byte-identical
*_ims.npy and *_caps.txt; the format is detected from the file; malformed records are one line each, counted."""

import csv
import json

import numpy as np
import pytest

import make_dataset
from own_data import DIM, make_pictures

# The pictures and their captions (1 to 5 a picture), in the annotations' order.
CAPTIONS = {
    "p0": ["a dog on a bench", "a brown dog sits\non a   wooden bench"],
    "p1": ["two cats"],
    "p2": ["a red bus", "a bus in the street", "the bus is red ."],
    "p3": [f"a kite, number {k}" for k in range(5)],
}


def write_annotation(fmt, root, captions=CAPTIONS):
    """The captions in format `fmt`, picture names relative to `root`; the annotation's path."""
    if fmt == "karpathy":
        images = [
            {"filename": f"{n}.png", "split": "test", "sentences": [{"raw": c} for c in caps]}
            for n, caps in captions.items()
        ]
        path = root / "dataset_mine.json"
        path.write_text(json.dumps({"images": images, "dataset": "mine"}))
    elif fmt == "coco":
        images = [{"id": 10 + i, "file_name": f"{n}.png"} for i, n in enumerate(captions)]
        annotations = [
            {"id": 100 * i + k, "image_id": 10 + i, "caption": c}
            for i, caps in enumerate(captions.values())
            for k, c in enumerate(caps)
        ]
        path = root / "captions_mine.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations}))
    elif fmt == "lavis":
        items = []
        for n, caps in captions.items():  # one entry a caption for some pictures, a list for the others
            items += (
                [{"image": f"{n}.png", "caption": c, "image_id": n} for c in caps]
                if n in ("p0", "p2")
                else [{"image": f"{n}.png", "caption": caps, "image_id": n}]
            )
        path = root / "mine_train.json"
        path.write_text(json.dumps(items))
    elif fmt == "imagefolder":
        lines = [json.dumps({"file_name": f"{n}.png", "text": caps}) for n, caps in captions.items() if n != "p2"]
        lines.insert(2, "\n".join(json.dumps({"file_name": "p2.png", "caption": c}) for c in captions["p2"]))
        path = root / "metadata.jsonl"
        path.write_text("\n".join(lines) + "\n")
    elif fmt in ("csv", "tsv"):
        path = root / f"mine.{fmt}"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            writer.writerow(["filepath", "title"])
            writer.writerows([f"{n}.png", c] for n, caps in captions.items() for c in caps)
    elif fmt == "folder":
        for n, caps in captions.items():
            (root / f"{n}.txt").write_text("\n".join(" ".join(c.split()) for c in caps) + "\n")
        path = root
    else:  # flickr30k
        path = root / "results_20130124.token"
        path.write_text(
            "".join(
                f"{n}.png#{k}\t{c.replace(chr(10), ' ')}\n" for n, caps in captions.items() for k, c in enumerate(caps)
            )
        )
    return str(path)


FORMATS = ("karpathy", "coco", "lavis", "imagefolder", "csv", "tsv", "folder", "flickr30k")


def run(argv, capsys):
    code = make_dataset.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_each_format_gives_the_same_split_files(tmp_path, capsys):
    reference = None
    for fmt in FORMATS:
        rows = make_pictures(tmp_path / fmt / "pics", CAPTIONS)
        annotation = write_annotation(fmt, tmp_path / fmt / "pics")
        given = annotation if fmt == "karpathy" else f"test={annotation}"  # Karpathy's file gives each its split
        folder = tmp_path / fmt / "data" / "mine_precomp"
        argv = ["--images", str(tmp_path / fmt / "pics"), "--annotations", given, "--regions", rows]
        argv += ["--data_path", str(folder.parent), "--data_name", "mine_precomp", "--vocab_path", str(tmp_path / fmt)]
        code, out, err = run(argv, capsys)
        assert code == 0, (fmt, err)
        assert "4 pictures and 11 captions (pictures / captions: test 4 / 11)" in out, fmt
        expected_caps = "".join(" ".join(c.split()) + "\n" for caps in CAPTIONS.values() for c in caps)
        assert (folder / "test_caps.txt").read_text() == expected_caps, fmt
        assert (folder / "test_image_ids.txt").read_text() == "p0.png\np1.png\np2.png\np3.png\n", fmt
        caption_images = np.load(folder / "test_caption_images.npy")
        np.testing.assert_array_equal(caption_images, [0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 3])
        assert np.load(folder / "test_ims.npy").shape == (4, 36, DIM)
        written = {name: (folder / f"test_{name}").read_bytes() for name in ("ims.npy", "caps.txt", "boxes.npy")}
        reference = reference or written
        assert written == reference, fmt  # byte for byte the first format's


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ("tsv",)])
def test_the_format_is_detected_and_can_be_named(fmt, tmp_path):
    from dataset_maker.annotations import detect_format

    make_pictures(tmp_path / "pics", CAPTIONS)
    path = write_annotation(fmt, tmp_path / "pics")
    assert detect_format(path)[0] == ("csv" if fmt == "tsv" else fmt)


def test_named_columns_and_a_split_column(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", CAPTIONS)
    path = tmp_path / "pics" / "mine.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["picture", "sentence_text", "split"])
        for n, split in zip(CAPTIONS, ("train", "val", "test", "train")):
            writer.writerows([f"{n}.png", c, split] for c in CAPTIONS[n])
    argv = ["--annotations", str(path), "--columns", "picture,sentence_text", "--regions", rows]
    argv += ["--data_path", str(tmp_path / "data"), "--data_name", "mine_precomp", "--vocab_path", str(tmp_path)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "(pictures / captions: train 2 / 7, dev 1 / 1, test 1 / 3)" in out
    code, out, err = run(argv[:2] + argv[4:], capsys)  # without --columns: no picture column it knows
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}:1: no picture column (filepath, file_name, image")


def test_malformed_records_are_one_line_each_and_counted(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", CAPTIONS)
    path = tmp_path / "pics" / "metadata.jsonl"
    lines = [
        json.dumps({"file_name": "p0.png", "text": "a dog"}),
        "{not json",
        json.dumps({"text": "no file name"}),
        json.dumps({"file_name": "p1.png", "text": "   "}),
        json.dumps({"file_name": "p1.png", "text": ["two cats", 7]}),
        json.dumps({"file_name": "p2.png", "caption": "a bus", "split": "holdout"}),
        json.dumps({"file_name": "p3.png", "text": "a kite"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    argv = ["--annotations", str(path), "--regions", rows, "--splits", "1,0,0"]
    argv += ["--data_path", str(tmp_path / "data"), "--data_name", "mine_precomp", "--vocab_path", str(tmp_path)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    expected = [
        f"{path}:2: not JSON (Expecting property name enclosed in double quotes); skipped",
        f"{path}:3: no file_name; skipped",
        f"{path}:4: text: empty caption; skipped",
        f"{path}:5: text[1]: caption is int, not text; skipped",
        f"{path}:6: split 'holdout' is not train, val (or dev) or test; skipped",
        f"{path}:8: not UTF-8 text (invalid start byte at byte 0); skipped",
    ]
    assert err.splitlines()[: len(expected)] == expected
    assert "3 pictures and 3 captions" in out and "left out, each named above: 6 malformed records" in out


def test_karpathy_keeps_its_splits_and_restval_by_a_flag(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", CAPTIONS)
    images = [
        {"filepath": "pics", "filename": f"{n}.png", "split": s, "cocoid": i, "sentences": [{"raw": "a picture"}] * 5}
        for i, (n, s) in enumerate(zip(CAPTIONS, ("train", "restval", "val", "test")))
    ]
    images.append({"filename": "p9.png", "split": "extra", "sentences": []})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    argv = ["--annotations", str(tmp_path / "dataset_coco.json"), "--regions", rows]
    argv += ["--data_path", str(tmp_path / "data"), "--data_name", "mine_precomp", "--vocab_path", str(tmp_path)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "(pictures / captions: train 1 / 5, dev 1 / 5, test 1 / 5)" in out
    assert "1 Karpathy's restval (--use_restval puts them in train)" in out
    assert f"{tmp_path / 'dataset_coco.json'}: images[4]: split 'extra' is not one of train, val, test, restval" in err
    assert not (tmp_path / "data" / "mine_precomp" / "train_caption_images.npy").exists()  # five a picture
    code, out, err = run([*argv, "--use_restval", "--overwrite_vocab"], capsys)
    assert code == 0 and "(pictures / captions: train 2 / 10, dev 1 / 5, test 1 / 5)" in out


def test_an_unreadable_annotation_file_is_one_line(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", CAPTIONS)
    (tmp_path / "broken.json").write_text('{"images": [')
    (tmp_path / "other.json").write_text('{"info": 1}')
    for path, message in (
        ("broken.json", "not a readable JSON file (Expecting value at line 1, column 13)"),
        ("other.json", "JSON of no known annotation format"),
        ("absent.json", "annotation file not found"),
    ):
        argv = [
            "--annotations",
            str(tmp_path / path),
            "--regions",
            rows,
            "--data_name",
            "mine_precomp",
            "--vocab_path",
            str(tmp_path),
        ]
        code, out, err = run([*argv, "--data_path", str(tmp_path / "data")], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {tmp_path / path}: {message}")
    assert not (tmp_path / "data" / "mine_precomp" / "test_ims.npy").exists()


def test_picture_tab_caption_lines_without_a_number_read_as_flickr30k(tmp_path, capsys):
    rows = make_pictures(tmp_path / "pics", CAPTIONS)
    lines = "".join(f"{n}.png\t{' '.join(c.split())}\n" for n, caps in CAPTIONS.items() for c in caps)
    (tmp_path / "pics" / "captions.txt").write_text(lines)
    argv = [
        "--annotations",
        f"test={tmp_path / 'pics' / 'captions.txt'}",
        "--regions",
        rows,
        "--vocab_path",
        str(tmp_path),
    ]
    code, out, err = run([*argv, "--data_path", str(tmp_path / "data"), "--data_name", "mine_precomp"], capsys)
    assert code == 0, err
    assert "4 pictures and 11 captions" in out
