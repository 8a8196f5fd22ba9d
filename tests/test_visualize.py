import os
import shutil

import matplotlib
import numpy as np
import pytest
from PIL import Image

import visualize
from conftest import make_opt
from utils.captions import read_captions
from model import VSRN
from utils.checkpoint import save_checkpoint
from utils.make_toy_images import HEIGHT, WIDTH, make_toy_images
from utils.tsv_to_precomp import convert
from visualize import main, region_attention_map, region_ranks, render_attention
from vocab import build_vocab, save_vocab, vocab_digest


def test_ranks_are_descending_with_ties_in_region_order():
    assert region_ranks([0.2, 0.9, 0.2, -1.0]).tolist() == [2, 1, 3, 4]


def test_map_against_a_hand_computed_example():
    scores = [0.2, 0.9, 0.2, -1.0]  # ranks 2 1 3 4 -> s = 50 (4 - r)^2 = 200 450 50 0
    boxes = [[0, 0, 2, 2],  # columns 0-1, rows 0-1
             [1.5, 0.5, 4, 3],  # x1 on a pixel centre: columns 1-3 (4.5 is not < 4), rows 0-2
             [0.4, 2.4, 1.5, 5],  # column 0 only (1.5 is not < 1.5), rows 2-3
             [0, 0, 5, 4]]  # everything, with weight 0
    expected = np.array([[200, 650, 450, 450, 0],
                         [200, 650, 450, 450, 0],
                         [50, 450, 450, 450, 0],
                         [50, 0, 0, 0, 0]], dtype=np.float64)
    assert np.array_equal(region_attention_map(scores, boxes, 4, 5), expected)
    assert np.array_equal(region_attention_map(np.float32(scores), np.float32(boxes), 4, 5, lam=1.0), expected / 50)


def hottest_pixels(png, grey):
    """Pixels whose colour is the overlay's maximum: the colour map's top over the grey picture."""
    hot = np.round(255 * ((1 - visualize.HEAT_OPACITY) * grey / 255 + visualize.HEAT_OPACITY * np.array(matplotlib.colormaps[visualize.COLOUR_MAP](1.0)[:3])))
    distance = np.abs(np.asarray(png, dtype=np.float64) - hot).sum(axis=2)
    return np.argwhere(distance <= 2)  # (row, column) pairs


@pytest.mark.parametrize("scale", [1, 2])
def test_rendered_png_has_the_picture_size_and_its_hottest_pixels_in_the_top_box(tmp_path, scale):
    grey = 128
    picture = Image.new("RGB", (80 * scale, 60 * scale), (grey, grey, grey))
    boxes = np.array([[50, 10, 70, 40], [0, 0, 40, 60], [30, 20, 60, 50]], dtype=np.float32)  # in a 60 x 80 image
    rendered = render_attention(picture, [0.9, 0.5, 0.1], boxes, (60, 80), top_boxes=1)
    visualize.save_png(rendered, str(tmp_path / "map.png"))
    with Image.open(tmp_path / "map.png") as png:
        assert png.format == "PNG" and png.size == (80 * scale, 60 * scale)
        pixels = np.asarray(png.convert("RGB"))
    hottest = hottest_pixels(pixels, grey)
    x1, y1, x2, y2 = boxes[0] * scale
    assert len(hottest) > 0.5 * (x2 - x1) * (y2 - y1)
    assert ((hottest[:, 1] >= x1) & (hottest[:, 1] < x2) & (hottest[:, 0] >= y1) & (hottest[:, 0] < y2)).all()
    assert tuple(pixels[int(y1), int(x1) + 10]) == visualize.OUTLINE  # the top box is outlined
    assert tuple(pixels[0, 10 * scale]) != visualize.OUTLINE  # the second box is not (top_boxes=1)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Toy pictures converted with tsv_to_precomp, and an untrained checkpoint: (root, checkpoint, data_path)."""
    root = tmp_path_factory.mktemp("visualize")
    out = make_toy_images(str(root / "toy_images"), img_dim=32, sizes={"test": 12})
    data_path = str(root / "data")
    folder = os.path.join(data_path, "toyimg_precomp")
    convert([os.path.join(out, "test_obj36.tsv")], os.path.join(out, "test_captions.txt"), folder, "test", feature_dim=32)
    vocab = build_vocab(read_captions(os.path.join(folder, "test_caps.txt")), threshold=1)
    save_vocab(vocab, str(root / "vocab" / "toyimg_precomp_vocab.json"))
    opt = make_opt(data_name="toyimg_precomp", data_path=data_path, vocab_path=str(root / "vocab"), vocab_size=len(vocab))
    model = VSRN(opt, training=False)
    checkpoint = save_checkpoint({"model": model.state_dict(), "opt": opt, "vocab_digest": vocab_digest(vocab)}, False, str(root))
    return root, checkpoint, data_path


def visualize_cli(toy_run, *args):
    root, checkpoint, data_path = toy_run
    return main(["--checkpoint", checkpoint, "--data_path", data_path, "--split", "test", *args])


def test_index_renders_the_picture_with_its_map(toy_run, tmp_path):
    root = toy_run[0]
    out = tmp_path / "map.png"
    assert visualize_cli(toy_run, "--image_dir", str(root / "toy_images" / "images"), "--index", "2", "--out", str(out)) == 0
    with Image.open(out) as png, Image.open(root / "toy_images" / "images" / "toy_test_00002.png") as picture:
        assert png.size == picture.size == (WIDTH, HEIGHT)
        assert not np.array_equal(np.asarray(png.convert("RGB")), np.asarray(picture.convert("RGB")))


def test_query_gallery_shows_five_images_with_scores(toy_run, tmp_path, capsys):
    root = toy_run[0]
    out = tmp_path / "gallery.png"
    assert visualize_cli(toy_run, "--image_dir", str(root / "toy_images" / "images"), "--query", "a dog near a cat", "--out", str(out)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "top-5 images for 'a dog near a cat' (test split):"
    scores = [float(line.rsplit("score ", 1)[1]) for line in lines[1:6]]
    assert scores == sorted(scores, reverse=True) and all("(toy_test_000" in line for line in lines[1:6])
    with Image.open(out) as png:
        tile_width = round(WIDTH * visualize.TILE_HEIGHT / HEIGHT)
        assert png.size[0] == 5 * tile_width + 6 * 8 and png.size[1] > visualize.TILE_HEIGHT


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
    code = main(["--checkpoint", toy_run[1], "--data_path", str(boxless), "--query", "a dog", "--image_dir", str(tmp_path)])
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
    assert visualize_cli(toy_run, "--captions", "--query", "a dog") == 2
    assert "--captions lists the top captions of the image given by --index" in one_error(capsys)
    pattern = "COCO_val2014_{:012d}.jpg"
    assert visualize_cli(toy_run, "--image_dir", str(tmp_path), "--image_pattern", pattern, "--index", "0") == 2
    assert f"--image_pattern {pattern}: cannot format the image id 'toy_test_00000'" in one_error(capsys)


def test_image_pattern_formats_numeric_ids(tmp_path):
    (tmp_path / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    assert visualize.find_picture(str(tmp_path), "42", "COCO_val2014_{:012d}.jpg") == str(tmp_path / "COCO_val2014_000000000042.jpg")
