import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import attention
import visualize
from conftest import make_opt
from utils.captions import read_captions
from model import VSRN
from utils import figures
from utils.checkpoint import save_checkpoint
from utils.make_toy_images import HEIGHT, WIDTH, make_toy_images
from utils.tsv_to_precomp import convert
from attention import region_attention_map, region_ranks, render_attention
from visualize import main
from vocab import build_vocab, save_vocab, vocab_digest
from utils.errors import OptionError
from inference import encode_query
from inference import load_models


def test_ranks_are_descending_with_ties_in_region_order():
    assert region_ranks([0.2, 0.9, 0.2, -1.0]).tolist() == [2, 1, 3, 4]


def test_map_against_a_hand_computed_example():
    scores = [0.2, 0.9, 0.2, -1.0]  # ranks 2 1 3 4 -> s = 50 (4 - r)^2 = 200 450 50 0
    boxes = [
        [0, 0, 2, 2],  # columns 0-1, rows 0-1
        [1.5, 0.5, 4, 3],  # x1 on a pixel centre: columns 1-3 (4.5 is not < 4), rows 0-2
        [0.4, 2.4, 1.5, 5],  # column 0 only (1.5 is not < 1.5), rows 2-3
        [0, 0, 5, 4],
    ]  # everything, with weight 0
    expected = np.array(
        [[200, 650, 450, 450, 0], [200, 650, 450, 450, 0], [50, 450, 450, 450, 0], [50, 0, 0, 0, 0]], dtype=np.float64
    )
    assert np.array_equal(region_attention_map(scores, boxes, 4, 5), expected)
    assert np.array_equal(region_attention_map(np.float32(scores), np.float32(boxes), 4, 5, lam=1.0), expected / 50)


def test_dimming_keeps_the_photo_at_the_peak_and_dims_it_where_the_map_is_zero():
    photo = np.array([[[200, 100, 50], [10, 250, 90], [255, 255, 255]]], dtype=np.uint8)
    attention = np.array([[0.0, 30.0, 60.0]])
    shown = figures.dim_outside(photo, attention, dim=0.4)
    assert shown.dtype == np.uint8
    assert shown[0, 0].tolist() == [80, 40, 20]  # 0.4 of each channel: the hue stays the photo's
    assert shown[0, 1].tolist() == [7, 175, 63]  # 0.7 = 0.4 + 0.6 * 30 / 60
    assert shown[0, 2].tolist() == [255, 255, 255]
    assert np.array_equal(figures.dim_outside(photo, np.zeros((1, 3)), dim=0.4), np.round(photo * 0.4).astype(np.uint8))


def disjoint(rectangles):
    return all(
        a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        for i, a in enumerate(rectangles)
        for b in rectangles[i + 1 :]
    )


def test_labels_of_boxes_sharing_a_corner_stay_inside_and_clear_of_each_other():
    boxes = [(30, 40, 90, 100)] * 4 + [(0, 0, 50, 20)]
    labels = figures.place_labels(boxes, [(14, 18)] * 5, 120, 110)
    assert labels[0] == (30, 22, 44, 40)  # above its box's top-left corner
    assert labels[1] == (30, 92, 44, 110)  # inside would touch it: below the box, moved up into the picture
    assert disjoint(labels) and all(0 <= x1 and 0 <= y1 and x2 <= 120 and y2 <= 110 for x1, y1, x2, y2 in labels)
    crowded = figures.place_labels(
        [(0, 0, 10, 10)] * 6, [(10, 10)] * 6, 32, 21
    )  # six 10 x 10 labels fit in 32 x 21 only in a grid
    assert disjoint(crowded) and all(x2 <= 32 and y2 <= 21 for _, _, x2, y2 in crowded)
    many = figures.place_labels(
        [(100, 100, 150, 150)] * 36, [(20, 20)] * 36, 400, 267
    )  # --top_boxes 36, all boxes alike
    assert disjoint(many) and all(x2 <= 400 and y2 <= 267 for _, _, x2, y2 in many)
    assert (
        figures.place_labels([(0, 0, 5, 5)] * 2, [(10, 10)] * 2, 10, 10) == [(0, 0, 10, 10)] * 2
    )  # no room: the first spot


@pytest.mark.parametrize("scale", [1, 2])
def test_tile_is_readable_dimmed_where_unattended_with_clear_labels(scale):
    photo = Image.fromarray(np.random.RandomState(0).randint(0, 256, (60 * scale, 80 * scale, 3), dtype=np.uint8))
    boxes = np.array(
        [[10, 10, 40, 40], [10, 10, 36, 30], [10, 10, 30, 44], [60, 40, 75, 55]], dtype=np.float32
    )  # in a 60 x 80 image
    tile = render_attention(photo, [0.9, 0.5, 0.1, -0.3], boxes, (60, 80), top_boxes=3)
    assert tile.image.size == (attention.MAP_SIDE, attention.MAP_SIDE * 3 // 4) == tile.attention.shape[::-1]
    shown = np.asarray(tile.image, dtype=np.int64)
    expected = np.asarray(figures.resize_longer_side(photo, attention.MAP_SIDE), dtype=np.float64)
    drawn = np.zeros(tile.attention.shape, dtype=bool)  # outlines (within 5 pixels of a top box's edge) and labels
    for x1, y1, x2, y2 in (boxes[:3] * attention.MAP_SIDE / 80).astype(int):
        band = np.zeros_like(drawn)
        band[y1 - 5 : y2 + 5, x1 - 5 : x2 + 5] = True
        band[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5] = False
        drawn |= band
    for x1, y1, x2, y2 in tile.labels:
        drawn[y1:y2, x1:x2] = True
    unattended = (tile.attention == 0) & ~drawn
    assert unattended.mean() > 0.5
    assert np.array_equal(shown[unattended], np.round(expected[unattended] * figures.DIM))
    peak = (tile.attention == tile.attention.max()) & ~drawn
    assert peak.sum() > 1000 and np.array_equal(shown[peak], np.round(expected[peak]))
    assert len(tile.labels) == 3 and disjoint(tile.labels)
    middle = int(25 * attention.MAP_SIDE / 80)  # a column through the top box's top edge: black, white, black
    edge = [
        tuple(p) for p in shown[int(10 * attention.MAP_SIDE / 80) - 1 : int(10 * attention.MAP_SIDE / 80) + 5, middle]
    ]
    assert (0, 0, 0) in edge and (255, 255, 255) in edge


def test_figure_has_its_title_tiles_captions_and_a_brightness_scale():
    tiles = [Image.new("RGB", (100, 60), colour) for colour in [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)]]
    figure = figures.compose(
        "a title long enough to need a second line " * 3,
        tiles,
        ["1. one", "2. two", "3. three", ""],
        3,
        "a note",
        dim=0.4,
    )
    pixels = np.asarray(figure.image)
    assert figure.title.startswith("a title") and figure.captions == ["1. one", "2. two", "3. three", ""]
    assert (
        pixels[: figures.MARGIN + 2 * figures.line_height(figures.font(figures.TITLE_SIZE)), :].sum(axis=2) < 150
    ).sum() > 200  # two lines of dark text
    assert [p[1] for p in figure.tiles[:3]] == [figure.tiles[0][1]] * 3 and figure.tiles[3][1] > figure.tiles[0][
        3
    ]  # three a row
    for tile, (x1, y1, x2, y2) in zip(tiles, figure.tiles):
        assert np.array_equal(pixels[y1:y2, x1:x2], np.asarray(tile))
    x1, y1, x2, y2 = figure.colour_bar
    assert y1 > figure.tiles[3][3]
    ramp = pixels[(y1 + y2) // 2, x1:x2, 0].astype(int)
    assert ramp[0] == round(255 * 0.4) and ramp[-1] == 255 and (np.diff(ramp) >= 0).all()
    assert (
        pixels[(y1 + y2) // 2, x1:x2] == pixels[(y1 + y2) // 2, x1:x2, :1]
    ).all()  # grey: white dimmed as the photo is


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Toy pictures converted with tsv_to_precomp, and an untrained checkpoint: (root, checkpoint, data_path)."""
    root = tmp_path_factory.mktemp("visualize")
    out = make_toy_images(str(root / "toy_images"), img_dim=32, sizes={"test": 12})
    data_path = str(root / "data")
    folder = os.path.join(data_path, "toyimg_precomp")
    convert(
        [os.path.join(out, "test_obj36.tsv")], os.path.join(out, "test_captions.txt"), folder, "test", feature_dim=32
    )
    vocab = build_vocab(read_captions(os.path.join(folder, "test_caps.txt")), threshold=1)
    save_vocab(vocab, str(root / "vocab" / "toyimg_precomp_vocab.json"))
    opt = make_opt(
        data_name="toyimg_precomp", data_path=data_path, vocab_path=str(root / "vocab"), vocab_size=len(vocab)
    )
    model = VSRN(opt, training=False)
    checkpoint = save_checkpoint(
        {"model": model.state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab)}, False, str(root)
    )
    return root, checkpoint, data_path


def visualize_cli(toy_run, *args):
    root, checkpoint, data_path = toy_run
    return main(["--checkpoint", checkpoint, "--data_path", data_path, "--split", "test", *args])


def test_index_renders_the_picture_readably_under_a_title_with_its_caption_and_score(toy_run, tmp_path, capsys):
    root = toy_run[0]
    out = tmp_path / "map.png"
    assert (
        visualize_cli(toy_run, "--image_dir", str(root / "toy_images" / "images"), "--index", "2", "--out", str(out))
        == 0
    )
    caption = read_captions(os.path.join(toy_run[2], "toyimg_precomp", "test_caps.txt"))[10]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "toy_test_00002 (test image 2)"
    assert re.fullmatch(rf'its first caption, score -?[01]\.\d{{3}}: "{re.escape(caption)}"', printed[1])
    with Image.open(out) as png:
        assert png.text["Title"] == "\n".join(printed[:2])
        assert png.size[0] >= attention.MAP_SIDE and png.size[1] > attention.MAP_SIDE * HEIGHT // WIDTH


def test_query_gallery_shows_five_images_with_scores(toy_run, tmp_path, capsys):
    root = toy_run[0]
    out = tmp_path / "gallery.png"
    assert (
        visualize_cli(
            toy_run,
            "--image_dir",
            str(root / "toy_images" / "images"),
            "--query",
            "a dog near a cat",
            "--out",
            str(out),
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "top-5 images for 'a dog near a cat' (test split):"
    ranked = [
        re.fullmatch(r"  (\d)\. image \d+ \((toy_test_\d{5})\)  score (-?[\d.]+)", line).groups() for line in lines[1:6]
    ]
    scores = [float(score) for _, _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    with Image.open(out) as png:
        assert png.text["Title"] == 'The top 5 test images for "a dog near a cat"'
        drawn = [
            re.fullmatch(r"(\d)\. (toy_test_\d{5}), score (-?[\d.]+)", line).groups()
            for line in png.text["Description"].splitlines()
        ]
        assert png.size[0] == 3 * attention.TILE_SIDE + 4 * figures.MARGIN
        assert png.size[1] > 2 * attention.TILE_SIDE * HEIGHT // WIDTH  # two rows
    # Printed with four decimals, drawn with three: rounding the printed score again may differ by one unit.
    assert [(place, image) for place, image, _ in drawn] == [(place, image) for place, image, _ in ranked]
    assert all(abs(float(a) - float(b)) <= 0.00051 for (_, _, a), (_, _, b) in zip(drawn, ranked))


def test_captions_lists_the_top_captions_with_ground_truth_marked(toy_run, capsys):
    assert visualize_cli(toy_run, "--index", "1", "--captions", "--top", "60") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("top-60 captions for image 1 (toy_test_00001), test split")
    marked = [line.split("  ", 2)[-1] for line in lines[1:] if line.split(".", 1)[1].startswith(" *")]
    captions = read_captions(os.path.join(toy_run[2], "toyimg_precomp", "test_caps.txt"))
    assert len(lines) == 61 and sorted(marked) == sorted(captions[5:10])


def one_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_without_pictures_or_boxes_it_says_what_is_missing(toy_run, tmp_path, capsys):
    assert visualize_cli(toy_run, "--index", "0") == 2
    assert "an attention map needs the pictures and their region boxes; missing: --image_dir" in one_error(capsys)
    boxless = tmp_path / "scan"
    shutil.copytree(os.path.join(toy_run[2], "toyimg_precomp"), boxless / "toyimg_precomp")
    for name in ("test_boxes.npy", "test_image_sizes.npy", "test_image_ids.txt"):
        os.remove(boxless / "toyimg_precomp" / name)
    code = main(
        ["--checkpoint", toy_run[1], "--data_path", str(boxless), "--query", "a dog", "--image_dir", str(tmp_path)]
    )
    err = one_error(capsys)
    assert code == 2 and "missing: test_boxes.npy, test_image_sizes.npy, test_image_ids.txt in" in err
    assert "SCAN's precomputed features have no boxes" in err
    assert main(["--checkpoint", toy_run[1], "--data_path", str(boxless), "--index", "0", "--captions"]) == 0
    assert capsys.readouterr().out.startswith("top-5 captions for image 0, test split")


def test_missing_picture_and_bad_flags_are_one_line(toy_run, tmp_path, capsys):
    assert visualize_cli(toy_run, "--image_dir", str(tmp_path), "--index", "0") == 2
    assert "no picture of image toy_test_00000 (looked for toy_test_00000.jpg, toy_test_00000.png" in one_error(capsys)
    assert visualize_cli(toy_run, "--image_dir", str(tmp_path), "--index", "12") == 2
    assert "--index 12: the test split has 12 images (0 to 11)" in one_error(capsys)
    assert visualize_cli(toy_run, "--index", "0", "--query", "a dog") == 2
    assert "give either --index N" in one_error(capsys)
    assert visualize_cli(toy_run, "--query", "a dog", "--top", "0") == 2
    assert "--top 0 --top_boxes 3: expected at least 1 image or caption, and 0 or more boxes" in one_error(capsys)
    assert visualize_cli(toy_run, "--captions", "--query", "a dog") == 2
    assert "--captions lists the top captions of the image given by --index" in one_error(capsys)
    pattern = "COCO_val2014_{:012d}.jpg"
    assert visualize_cli(toy_run, "--image_dir", str(tmp_path), "--image_pattern", pattern, "--index", "0") == 2
    assert f"--image_pattern {pattern}: cannot format the image id 'toy_test_00000'" in one_error(capsys)


def test_image_pattern_formats_numeric_ids(tmp_path):
    (tmp_path / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    assert attention.find_picture(str(tmp_path), "42", "COCO_val2014_{:012d}.jpg") == str(
        tmp_path / "COCO_val2014_000000000042.jpg"
    )


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """Pictures of one's own (four toy pictures, one of them EXIF-rotated, and a broken file), the tiny
    random detector and an untrained VSRN whose img_dim is the detector's feature width."""
    from tiny_detector import TINY_ARCH, tiny_detector_state_dict

    root = tmp_path_factory.mktemp("photos")
    toy = make_toy_images(str(root / "toy"), img_dim=32, sizes={"test": 4})
    photos = root / "photos"
    photos.mkdir()
    for n in range(3):
        shutil.copy(os.path.join(toy, "images", f"toy_test_{n:05d}.png"), photos / f"photo{n}.png")
    with Image.open(os.path.join(toy, "images", "toy_test_00003.png")) as picture:
        exif = Image.Exif()
        exif[0x0112] = 6  # shown turned a quarter clockwise: upright it is taller than wide
        picture.convert("RGB").save(photos / "rotated.jpg", exif=exif, quality=95)
    (photos / "broken.jpg").write_bytes(b"not a picture")
    weights = str(root / "detector.bin")
    torch.save(tiny_detector_state_dict(), weights)
    vocab = build_vocab(
        [line.split("\t", 1)[1] for line in read_captions(os.path.join(toy, "test_captions.txt"))], threshold=1
    )
    save_vocab(vocab, str(root / "vocab" / "toyimg_precomp_vocab.json"))
    opt = make_opt(
        data_name="toyimg_precomp",
        data_path=str(root / "no_data"),
        vocab_path=str(root / "vocab"),
        vocab_size=len(vocab),
        img_dim=TINY_ARCH["res5"][-1],
    )
    checkpoint = save_checkpoint(
        {"model": VSRN(opt, training=False).state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab)},
        False,
        str(root),
    )
    return photos, weights, checkpoint


def test_images_extracts_ranks_and_draws_own_pictures_from_the_cache_the_second_time(
    photo_run, tmp_path, capsys, monkeypatch
):
    from detection import cache

    photos, weights, checkpoint = photo_run
    out = tmp_path / "gallery.png"
    args = [
        "--checkpoint",
        checkpoint,
        "--images",
        str(photos),
        "--detector",
        weights,
        "--query",
        "a dog near a cat",
        "--top",
        "4",
        "--out",
        str(out),
    ]
    figure = visualize.run(visualize.build_parser().parse_args(args))
    captured = capsys.readouterr()
    skipped, unknown = captured.err.strip().splitlines()
    assert "broken.jpg" in skipped
    assert (
        unknown == "warning: 'dog', 'cat' are not in the vocabulary: read as <unk>"
    )  # the four test captions never name them
    lines = captured.out.splitlines()
    assert re.fullmatch(
        r"Regions of 4 pictures extracted \(caffe policy, 36 boxes\) and cached in .+\.tsv", lines.pop(0)
    )
    assert lines.pop(0) == "1 of the 5 pictures could not be used (see the lines above); going on with the others"
    assert lines[0] == "top-4 of 4 pictures for 'a dog near a cat':"
    ranked = [re.fullmatch(r"  (\d)\. (.+)  score (-?[\d.]+)", line).groups() for line in lines[1:5]]
    assert sorted(os.path.basename(path) for _, path, _ in ranked) == [
        "photo0.png",
        "photo1.png",
        "photo2.png",
        "rotated.jpg",
    ]
    scores = [float(score) for _, _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    with Image.open(out) as png:
        assert png.text["Title"] == 'The top 4 of 4 pictures for "a dog near a cat"'
        drawn = [
            re.fullmatch(r"(\d)\. (.+), score (-?[\d.]+)", line).groups()
            for line in png.text["Description"].splitlines()
        ]
    # The printed score has four decimals, the drawn one three: rounding the printed one again may differ by one unit.
    assert [(place, name) for place, name, _ in drawn] == [
        (place, os.path.splitext(os.path.basename(path))[0]) for place, path, _ in ranked
    ]
    assert all(abs(float(a) - float(b)) <= 0.00051 for (_, _, a), (_, _, b) in zip(drawn, ranked))
    sizes = {os.path.basename(path): (x2 - x1, y2 - y1) for (_, path, _), (x1, y1, x2, y2) in zip(ranked, figure.tiles)}
    assert sizes["rotated.jpg"] == (
        round(attention.TILE_SIDE * HEIGHT / WIDTH),
        attention.TILE_SIDE,
    )  # upright, as the detector saw it
    assert sizes["photo0.png"] == (attention.TILE_SIDE, round(attention.TILE_SIDE * HEIGHT / WIDTH))
    place = [os.path.basename(path) for _, path, _ in ranked].index("photo0.png")
    x1, y1, x2, y2 = figure.tiles[place]
    shown = np.asarray(figure.image, dtype=np.float64)[y1:y2, x1:x2]
    with Image.open(photos / "photo0.png") as picture:
        photo = np.asarray(figures.resize_longer_side(picture, attention.TILE_SIDE), dtype=np.float64)
    under_the_map = ((shown >= np.floor(photo * figures.DIM) - 1) & (shown <= photo + 1)).all(axis=2)
    assert under_the_map.mean() > 0.9  # the photo, dimmed by the map, wherever no box outline is drawn

    def no_detector(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(cache, "load_detector", no_detector)  # the readable pictures' regions come from the cache
    readable = sorted(str(path) for path in photos.iterdir() if path.name != "broken.jpg")
    again = [
        "--checkpoint",
        checkpoint,
        "--images",
        *readable,
        "--detector",
        weights,
        "--query",
        "a dog near a cat",
        "--top",
        "4",
        "--out",
        str(tmp_path / "again.png"),
    ]
    assert main(again) == 0
    assert capsys.readouterr().out.splitlines()[:5] == lines[:5]


def test_images_flags_and_a_mismatched_detector_are_one_line(photo_run, toy_run, tmp_path, capsys):
    photos, weights, checkpoint = photo_run
    own = ["--checkpoint", checkpoint, "--images", str(photos)]
    assert main([*own, "--index", "0", "--detector", weights]) == 2
    assert "--images ranks your pictures for --query TEXT" in one_error(capsys)
    assert main([*own, "--query", "a dog"]) == 2
    assert "--images needs --detector" in one_error(capsys)
    assert main([*own, "--query", "a dog", "--detector", weights, "--image_dir", str(tmp_path)]) == 2
    assert "--image_dir and --image_pattern find the pictures of a converted split" in one_error(capsys)
    assert main([*own, "--query", "a dog", "--detector", str(tmp_path / "absent.bin")]) == 2
    assert "absent.bin: detector weights not found" in one_error(capsys)
    assert main(["--checkpoint", checkpoint, "--images", str(tmp_path), "--detector", weights, "--query", "a dog"]) == 2
    assert f"--images {tmp_path}: no pictures" in one_error(capsys)
    assert visualize_cli(toy_run, "--query", "a dog", "--detector", weights) == 2
    assert "--detector extracts the regions of the pictures given by --images" in one_error(capsys)
    assert main(["--checkpoint", toy_run[1], "--images", str(photos), "--detector", weights, "--query", "a dog"]) == 2
    skipped, error = capsys.readouterr().err.strip().splitlines()  # the broken picture, then the mismatch
    assert skipped.endswith("broken.jpg: not a picture file Pillow can read")
    assert error.endswith("gives 64-d region features, but the checkpoint's image encoder takes 32-d (img_dim)")


def test_a_query_names_its_unknown_words_and_one_of_only_unknown_words_is_refused(own_photos):
    _, _, checkpoint, _ = own_photos
    _, vocab, models = load_models([checkpoint], vocab_path=str(own_photos[3] / "project" / "vocab"), need_data=False)
    query, _ = encode_query(models, vocab, "a kayak on a bench")
    assert query.unknown == ["kayak"] and query.notice() == "'kayak' is not in the vocabulary: read as <unk>"
    assert encode_query(models, vocab, "a dog . ")[0].notice() is None
    assert "'kayaks', 'paddles' are not" in encode_query(models, vocab, "a dog kayaks paddles")[0].notice()
    with pytest.raises(OptionError, match=r"none of its words is in the model's vocabulary \('kayak', 'paddle'\)"):
        encode_query(models, vocab, "Kayak paddle")
    with pytest.raises(OptionError, match="has no words"):
        encode_query(models, vocab, "   ")
