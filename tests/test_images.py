"""utils/images.read_image on every kind of picture a photo folder holds, and the ones it refuses."""

import concurrent.futures
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from utils.images import ImageError, read_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def halves(width, height, left, right):
    """A picture whose left half is `left` and right half `right`."""
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[:, : width // 2], array[:, width // 2 :] = left, right
    return Image.fromarray(array)


def png_header_only(path, width, height):
    """A PNG that declares width x height 8-bit gray pixels and holds none (what a bomb's header says)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_exif_orientation_is_applied(tmp_path):
    # Stored 20 wide, 10 high; orientation 6 says "rotate 90 degrees clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(20, 10, RED, BLUE).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    array = read_image(tmp_path / "rotated.jpg")
    assert array.shape == (20, 10, 3) and array.dtype == np.uint8
    # The stored left (red) half is on top once viewed upright.
    assert np.abs(array[2, 5].astype(int) - RED).max() < 20
    assert np.abs(array[17, 5].astype(int) - BLUE).max() < 20


def test_colour_modes_become_rgb(tmp_path):
    Image.fromarray(np.full((4, 6), 77, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    assert (read_image(tmp_path / "gray.png") == 77).all()

    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (4, 6, 3) and np.abs(cmyk.astype(int) - RED).max() < 10

    wide = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "16bit.png")
    assert read_image(tmp_path / "16bit.png")[0, :, 0].tolist() == [0, 0, 1, 156, 255]  # the 8 high bits

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1, 0])
    palette.save(tmp_path / "palette.gif", transparency=0)
    assert read_image(tmp_path / "palette.gif")[0].tolist() == [list(WHITE), list(BLUE), list(WHITE)]

    Image.new("1", (2, 2), 1).save(tmp_path / "bilevel.png")
    assert (read_image(tmp_path / "bilevel.png") == 255).all()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    array = read_image(tmp_path / "alpha.png")
    assert array[0, 0].tolist() == list(WHITE) and array[0, 1].tolist() == list(BLUE)
    assert array[0, 2].tolist() == [127, 127, 127]

    Image.fromarray(np.array([[[10, 0]]], dtype=np.uint8), mode="LA").save(tmp_path / "gray_alpha.png")
    assert read_image(tmp_path / "gray_alpha.png").tolist() == [[list(WHITE)]]


def test_like_opencv_keeps_the_stored_colours_of_transparent_pictures(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [10, 20, 30, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert read_image(tmp_path / "alpha.png", like_opencv=True).tolist() == [[list(RED), list(BLUE), [10, 20, 30]]]

    Image.fromarray(np.array([[[10, 0]]], dtype=np.uint8), mode="LA").save(tmp_path / "gray_alpha.png")
    assert read_image(tmp_path / "gray_alpha.png", like_opencv=True).tolist() == [[[10, 10, 10]]]

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1, 0])
    palette.save(tmp_path / "palette.png", transparency=0)
    assert read_image(tmp_path / "palette.png", like_opencv=True)[0].tolist() == [list(RED), list(BLUE), list(RED)]

    # What does not involve transparency or CMYK reads the same either way.
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(20, 10, RED, BLUE).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    Image.fromarray(np.array([[0, 40000, 65535]], dtype=np.uint16)).save(tmp_path / "16bit.png")
    Image.fromarray(np.full((4, 6), 77, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    for name in ("rotated.jpg", "16bit.png", "gray.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name, like_opencv=True), read_image(tmp_path / name))
    assert read_image(tmp_path / "palette.png")[0].tolist() == [list(WHITE), list(BLUE), list(WHITE)]


def test_like_opencv_converts_cmyk_as_its_jpeg_decoder(tmp_path):
    rng = np.random.RandomState(0)
    cmyk = rng.randint(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as picture:
        c, m, y, k = (255 - np.asarray(picture, dtype=np.int64)).transpose(2, 0, 1)  # as stored: inverted
    # OpenCV's icvCvt_CMYK2BGR_8u_C4C3R on the stored values.
    expected = np.stack([k - ((255 - c) * k >> 8), k - ((255 - m) * k >> 8), k - ((255 - y) * k >> 8)], axis=2)
    ours = read_image(tmp_path / "cmyk.jpg", like_opencv=True)
    np.testing.assert_array_equal(ours, expected)
    assert 0 < np.abs(ours.astype(int) - read_image(tmp_path / "cmyk.jpg")).max() <= 3  # Pillow's differs a little


def test_a_one_pixel_picture_is_read(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    assert read_image(tmp_path / "dot.png").tolist() == [[[1, 2, 3]]]


def noisy_jpeg(path, size=64):
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def refused(path):
    with pytest.raises(ImageError) as caught:
        read_image(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_unreadable_files_are_one_line_naming_the_file(tmp_path):
    whole = noisy_jpeg(tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    assert "truncated" in refused(tmp_path / "truncated.jpg")
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    assert refused(tmp_path / "notes.jpg").endswith("not a picture file Pillow can read")
    (tmp_path / "empty.png").write_bytes(b"")
    assert refused(tmp_path / "empty.png").endswith("not a picture file Pillow can read")
    assert refused(tmp_path / "absent.jpg").endswith("file not found")


def test_pictures_above_the_decompression_bomb_limit_are_refused(tmp_path, monkeypatch):
    # A 40 000 x 40 000 header: refused from its header, before any pixel is decoded.
    message = refused(png_header_only(tmp_path / "bomb.png", 40000, 40000))
    assert f"more than {Image.MAX_IMAGE_PIXELS} pixels" in message and "decompression-bomb" in message
    # The limit is Pillow's, and a real picture just above it is refused too.
    Image.new("RGB", (100, 100)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9999)
    assert "more than 9999 pixels" in refused(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)
    assert read_image(tmp_path / "large.png").shape == (100, 100, 3)


def test_the_pixel_limit_holds_in_every_thread(tmp_path, monkeypatch):
    # Between the limit and twice it Pillow only warns: pictures read at once by a pool of threads
    # (the photo library's read-ahead) are refused all the same.
    Image.new("RGB", (400, 400)).save(tmp_path / "big.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)

    def outcome(name):
        try:
            read_image(tmp_path / name)
        except ImageError:
            return "refused"
        return "read"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(outcome, ["big.png", "small.png"] * 300))
    assert outcomes == ["refused", "read"] * 300
