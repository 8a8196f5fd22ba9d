import base64
import json
import os
import re

import numpy as np
import pytest

from data import FeatureFile, PrecompDataset, read_image_ids, read_region_boxes
from utils import tsv_to_precomp
from utils.tsv_to_precomp import convert, main
from vocab import vocabulary_from_words

BOXES, DIM = 3, 4


def b64(array, dtype):
    return base64.b64encode(np.asarray(array, dtype=dtype).tobytes()).decode()


def image_arrays(seed):
    rng = np.random.default_rng(seed)
    boxes = np.sort(rng.uniform(0, 300, size=(BOXES, 4)).astype(np.float32), axis=1)[:, [0, 2, 1, 3]]
    return boxes, rng.standard_normal((BOXES, DIM)).astype(np.float32)


def lxmert_line(image_id, height, width, boxes, features, num_boxes=BOXES):
    ids, conf = np.arange(num_boxes), np.linspace(0, 1, num_boxes)
    return "\t".join(
        [
            str(image_id),
            str(height),
            str(width),
            b64(ids, np.int64),
            b64(conf, np.float32),
            b64(ids, np.int64),
            b64(conf, np.float32),
            str(num_boxes),
            b64(boxes, np.float32),
            b64(features, np.float32),
        ]
    )


def bottom_up_line(image_id, height, width, boxes, features, num_boxes=BOXES):
    return "\t".join(
        [str(image_id), str(width), str(height), str(num_boxes), b64(boxes, np.float32), b64(features, np.float32)]
    )


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def caption_lines(ids, per_image=5):
    return [f"{i}\t{i} caption {k}" for k in range(per_image) for i in ids]  # images interleaved


@pytest.fixture
def images():
    """id -> (height, width, boxes, features)"""
    return {
        image_id: (100 + n, 200 + n, *image_arrays(n))
        for n, image_id in enumerate(["7", "42", "COCO_val2014_000000000003"])
    }


def run(tmp_path, tsv_paths, captions, **kwargs):
    folder = str(tmp_path / "out_precomp")
    kwargs.setdefault("feature_dim", DIM)
    kwargs.setdefault("num_boxes", BOXES)
    written = convert(tsv_paths, captions, folder, "test", **kwargs)
    return folder, written


@pytest.mark.parametrize("layout", [lxmert_line, bottom_up_line])
def test_both_layouts_round_trip_exactly(tmp_path, images, layout):
    ids = list(images)
    first = write(tmp_path / "a.tsv", [layout(i, *images[i]) for i in ids[:2]])
    second = write(tmp_path / "b.tsv", [layout(ids[2], *images[ids[2]])])
    captions = write(tmp_path / "caps.txt", caption_lines(ids))
    folder, (written, skipped) = run(tmp_path, [first, second], captions)
    assert (written, skipped) == (3, 0)
    features = np.load(os.path.join(folder, "test_ims.npy"))
    assert features.dtype == np.float32 and features.shape == (3, BOXES, DIM)
    boxes, sizes = read_region_boxes(folder, "test", "this test")
    for row, image_id in enumerate(ids):
        height, width, expected_boxes, expected_features = images[image_id]
        assert np.array_equal(features[row], expected_features)
        assert np.array_equal(boxes[row], expected_boxes)
        assert sizes[row].tolist() == [height, width]
    assert read_image_ids(folder, "test") == ids
    with open(os.path.join(folder, "test_caps.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == [f"{i} caption {k}" for i in ids for k in range(5)]
    assert FeatureFile(os.path.join(folder, "test_ims.npy"))[2].tolist() == features[2].tolist()


def test_precomp_dataset_reads_the_converted_folder(tmp_path, images):
    ids = list(images)
    tsv = write(tmp_path / "a.tsv", [lxmert_line(i, *images[i]) for i in ids])
    folder, _ = run(tmp_path, [tsv], write(tmp_path / "caps.txt", caption_lines(ids)))
    vocab = vocabulary_from_words(["<pad>", "<start>", "<end>", "<unk>", "caption"])
    dataset = PrecompDataset(folder, "test", vocab, max_len=20, img_dim=DIM)
    assert len(dataset) == 15 and dataset.im_div == 5
    assert np.array_equal(dataset[7][0].numpy(), images["42"][3])


def test_first_five_captions_in_file_order_and_flickr_ids(tmp_path, images):
    ids = list(images)[:2]
    lines = [f"{ids[0]}.jpg#{k}\tfirst {k}" for k in range(7)] + [f"{ids[1]}\tsecond {k}" for k in range(5)]
    tsv = write(tmp_path / "a.tsv", [bottom_up_line(i, *images[i]) for i in ids])
    folder, _ = run(tmp_path, [tsv], write(tmp_path / "caps.txt", lines))
    with open(os.path.join(folder, "test_caps.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == [f"first {k}" for k in range(5)] + [f"second {k}" for k in range(5)]


def karpathy_document():
    def image(filename, split, cocoid, count=5):
        return {
            "filename": filename,
            "split": split,
            "cocoid": cocoid,
            "sentences": [{"raw": f"{cocoid} says\n {k}", "tokens": []} for k in range(count)],
        }

    return {
        "images": [
            image("COCO_val2014_000000000007.jpg", "test", 7, 6),
            image("COCO_val2014_000000000042.jpg", "val", 42),
            image("COCO_val2014_000000000003.jpg", "restval", 3),
        ],
        "dataset": "coco",
    }


def test_karpathy_split_selects_images_and_skips_other_splits(tmp_path, images):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy_document()))
    ids = list(images)  # "7", "42" (numeric ids) and COCO_val2014_000000000003 (LXMERT id)
    tsv = write(tmp_path / "a.tsv", [lxmert_line(i, *images[i]) for i in ids])
    folder, (written, skipped) = run(tmp_path, [tsv], str(path), karpathy_splits=["test", "restval"])
    assert (written, skipped) == (2, 1)
    assert read_image_ids(folder, "test") == ["7", "COCO_val2014_000000000003"]
    with open(os.path.join(folder, "test_caps.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == [f"7 says {k}" for k in range(5)] + [f"3 says {k}" for k in range(5)]


def test_coco_caption_annotations(tmp_path, images):
    ids = list(images)[:2]
    document = {
        "images": [{"id": int(i), "file_name": f"COCO_val2014_{int(i):012d}.jpg"} for i in ids],
        "annotations": [{"id": n, "image_id": int(ids[n % 2]), "caption": f"cap {n}"} for n in range(12)],
    }
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(document))
    tsv = write(tmp_path / "a.tsv", [lxmert_line(f"COCO_val2014_{int(i):012d}", *images[i]) for i in reversed(ids)])
    folder, _ = run(tmp_path, [tsv], str(path))
    with open(os.path.join(folder, "test_caps.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == [f"cap {n}" for n in (1, 3, 5, 7, 9, 0, 2, 4, 6, 8)]


def errors_of(tmp_path, capsys, tsv_lines, caption_lines_, extra=()):
    tsv = write(tmp_path / "a.tsv", tsv_lines)
    captions = write(tmp_path / "caps.txt", caption_lines_)
    data_path = tmp_path / "data"
    code = main(
        [
            "--tsv",
            tsv,
            "--captions",
            captions,
            "--data_path",
            str(data_path),
            "--data_name",
            "x_precomp",
            "--split",
            "test",
            "--num_boxes",
            str(BOXES),
            "--feature_dim",
            str(DIM),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not [p for p in data_path.rglob("*") if p.is_file()]  # nothing half-written
    return err


def replace_field(line, index, value):
    fields = line.split("\t")
    fields[index] = value
    return "\t".join(fields)


def good_lines(images, layout=lxmert_line):
    return [layout(i, *images[i]) for i in images]


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda line: line.replace("\t", "\t\t", 1),
            r"a.tsv:2: 11 tab-separated fields; expected 10 \(LXMERT obj36\) or 6",
        ),
        (lambda line: line[:-8] + "!!!!" + line[-4:], r"a.tsv:2: field features is not valid base64"),
        (
            lambda line: line.rsplit("\t", 1)[0] + "\t" + b64(np.zeros((BOXES, DIM + 1)), np.float32),
            r"a.tsv:2: image 42 has 5-dimensional region features, not 4 \(--feature_dim\): pass --feature_dim 5$",
        ),
        (
            lambda line: line.rsplit("\t", 1)[0] + "\t" + b64(np.zeros(BOXES * DIM + 1), np.float32),
            r"a.tsv:2: field features holds 52 bytes; expected 3 x 4 float32 \(48 bytes\) "
            r"\(--num_boxes x --feature_dim\)",
        ),
        (
            lambda line: replace_field(line, 3, b64([1, 2], np.int64)),
            r"a.tsv:2: field objects_id holds 16 bytes; expected 3 int64",
        ),
        (lambda line: replace_field(line, 1, "abc"), r"a.tsv:2: field image height is not an integer"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, capsys, images, damage, message):
    lines = good_lines(images)
    lines[1] = damage(lines[1])
    assert re.search(message, errors_of(tmp_path, capsys, lines, caption_lines(images)))


def test_variable_box_counts_are_refused(tmp_path, capsys, images):
    lines = good_lines(images) + [lxmert_line("99", 10, 10, np.zeros((5, 4)), np.zeros((5, DIM)), num_boxes=5)]
    err = errors_of(tmp_path, capsys, lines, caption_lines(list(images) + ["99"]))
    assert "a.tsv:4: image 99 has 5 boxes; VSRN needs a fixed count of 3 per image (--num_boxes)" in err
    assert "variable-box (10-100) features do not fit" in err


def test_caption_errors_name_the_ids(tmp_path, capsys, images):
    ids = list(images)
    err = errors_of(tmp_path, capsys, good_lines(images), caption_lines(ids[:2]))
    assert f"a.tsv:3: image {ids[2]} has no captions in" in err
    err = errors_of(tmp_path, capsys, good_lines(images), caption_lines(ids + ["8", "9"]))
    assert "caps.txt: captions of 2 image(s) that have no features in the TSV files: 8, 9" in err
    err = errors_of(tmp_path, capsys, good_lines(images), caption_lines(ids) + ["8\tonly one"])
    assert "caps.txt: 1 image(s) with fewer than 5 captions: 8" in err
    err = errors_of(tmp_path, capsys, good_lines(images) + good_lines(images)[:1], caption_lines(ids))
    assert "a.tsv:4: image 7 appears again (first at" in err


def test_empty_caption_files_are_named_as_such(tmp_path, capsys, images):
    assert errors_of(tmp_path, capsys, good_lines(images), []).endswith(
        "caps.txt: the caption file holds no captions (it is empty)"
    )
    assert errors_of(tmp_path, capsys, good_lines(images), ["", "  "]).endswith(
        "caps.txt: the caption file holds no captions"
    )


def test_a_tsv_file_given_twice_is_named(tmp_path, capsys, images):
    tsv = str(tmp_path / "a.tsv")
    err = errors_of(tmp_path, capsys, good_lines(images), caption_lines(images), extra=["--tsv", tsv, tsv])
    assert err == f"error: --tsv: {tsv} is given twice; each TSV file is read once"
    os.symlink(tsv, tmp_path / "link.tsv")
    err = errors_of(
        tmp_path, capsys, good_lines(images), caption_lines(images), extra=["--tsv", tsv, str(tmp_path / "link.tsv")]
    )
    assert err == f"error: --tsv: {tmp_path / 'link.tsv'} is given twice (first as {tsv}); each TSV file is read once"


def test_the_data_feature_size_is_named_on_a_feature_dim_mismatch(tmp_path, capsys, images):
    err = errors_of(tmp_path, capsys, good_lines(images), caption_lines(images), extra=["--feature_dim", "2048"])
    assert (
        err
        == "error: "
        + str(tmp_path / "a.tsv")
        + ":1: image 7 has 4-dimensional region features, not 2048 (--feature_dim): pass --feature_dim 4"
    )


def test_missing_files_are_named(tmp_path, capsys, images):
    err = errors_of(
        tmp_path, capsys, good_lines(images), caption_lines(images), extra=["--tsv", str(tmp_path / "none.tsv")]
    )
    assert "none.tsv: TSV file not found" in err


def test_karpathy_file_needs_a_split(tmp_path, capsys, images):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy_document()))
    tsv = write(tmp_path / "a.tsv", good_lines(images))
    code = main(
        [
            "--tsv",
            tsv,
            "--captions",
            str(path),
            "--data_path",
            str(tmp_path),
            "--data_name",
            "x_precomp",
            "--split",
            "test",
        ]
    )
    assert (
        code == 2
        and "dataset_coco.json is a Karpathy split file: choose its images with --karpathy_split"
        in capsys.readouterr().err
    )


def test_a_failure_leaves_earlier_files_untouched(tmp_path, capsys, images):
    ids = list(images)
    folder = tmp_path / "data" / "x_precomp"
    folder.mkdir(parents=True)
    (folder / "test_caps.txt").write_text("old\n")
    lines = good_lines(images)
    lines[2] = lines[2][:-3]
    tsv = write(tmp_path / "a.tsv", lines)
    captions = write(tmp_path / "caps.txt", caption_lines(ids))
    code = main(
        [
            "--tsv",
            tsv,
            "--captions",
            captions,
            "--data_path",
            str(tmp_path / "data"),
            "--data_name",
            "x_precomp",
            "--split",
            "test",
            "--num_boxes",
            str(BOXES),
            "--feature_dim",
            str(DIM),
        ]
    )
    assert code == 2 and "a.tsv:3:" in capsys.readouterr().err
    assert os.listdir(folder) == ["test_caps.txt"] and (folder / "test_caps.txt").read_text() == "old\n"


def test_npy_header_keeps_its_size(tmp_path):
    small, large = (
        tsv_to_precomp.npy_header(np.float32, (0, 36, 2048)),
        tsv_to_precomp.npy_header(np.float32, (10**12, 36, 2048)),
    )
    assert len(small) == len(large) == tsv_to_precomp.NPY_HEADER_BYTES
