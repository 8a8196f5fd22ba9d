"""Pictures as the detector reads them: RGB uint8 arrays, upright, whatever the file's format.

- EXIF orientation is applied (as OpenCV's imread, the bottom-up-attention reader, has done for
  JPEGs since OpenCV 3.1; 2.4 ignored it, and which other formats get it varies across OpenCV 4).
- Grayscale, bilevel, palette and CMYK pictures are converted to RGB (CMYK with Pillow's
  conversion; ICC profiles are not applied, as by OpenCV).
- 16-bit pictures keep their 8 high bits (OpenCV's imread does the same).
- Transparent pictures (RGBA, LA, palette with transparency) are composited on white, as
  viewers show them: the colour stored under transparent pixels is arbitrary (often black).
  `like_opencv=True` reads them as OpenCV's `cv2.imread` (bottom-up-attention's reader) does
  instead: the stored colours, the alpha dropped; and CMYK JPEGs with its conversion.
- Animated and multi-page files give their first frame.
- Tiny pictures (down to 1 x 1) are read as they are; the detector resizes them to its input size.
- Pictures of more than Pillow's `Image.MAX_IMAGE_PIXELS` (about 89 megapixels; its
  decompression-bomb guard) are refused, as are unreadable, truncated and non-image files:
  each with an ImageError, one line naming the file.
"""

import os
import struct
import warnings

import numpy as np

from utils.errors import DataError, OptionError, first_line

# Picture files, by extension (any case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

BACKGROUND = (255, 255, 255)
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(DataError):
    """A picture cannot be read: missing, not an image, truncated, too large, or of an unusual format."""


def pillow():
    """Pillow's PIL package with the modules the project uses loaded (Image, ImageDraw, ImageFont,
    ImageOps, PngImagePlugin), or a one-line OptionError when Pillow is not installed."""
    try:
        import PIL.Image
        import PIL.ImageDraw
        import PIL.ImageFont
        import PIL.ImageOps
        import PIL.PngImagePlugin  # noqa: F401  (loaded for the callers)
    except ImportError:
        raise OptionError("pictures are read and drawn with Pillow: pip install pillow") from None
    return PIL


def _to_rgb(picture, like_opencv):
    """An RGB picture of any Pillow mode; transparent ones over white, or as OpenCV reads them."""
    Image = pillow().Image
    if like_opencv and picture.mode == "CMYK":
        return _opencv_cmyk(picture)
    if not like_opencv and picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")
    if not like_opencv and picture.mode in _TRANSPARENT_MODES:
        picture = picture.convert("RGBA")
        canvas = Image.new("RGBA", picture.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, picture).convert("RGB")
    if picture.mode in _WIDE_GRAY_MODES:
        # Pillow's own conversion of 16-bit gray clips at 255, turning most pictures white.
        gray = (np.clip(np.asarray(picture, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    # Pillow drops the alpha of RGBA and LA, and gives a palette's colours whatever their transparency.
    return picture.convert("RGB")


def _opencv_cmyk(picture):
    """RGB as OpenCV's JPEG decoder makes it of CMYK: from the stored, inverted values (Adobe's
    convention, which Pillow undoes), each channel k - ((255 - c) * k >> 8) (Pillow divides by 255)."""
    stored = 255 - np.asarray(picture, dtype=np.int32)
    k = stored[..., 3:]
    rgb = k - (((255 - stored[..., :3]) * k) >> 8)
    return pillow().Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def read_image(path, like_opencv=False, reduce_to=None):
    """The picture at `path` (or an open binary file) as an upright (H, W, 3) uint8 RGB array; ImageError when
    it cannot be read.

    like_opencv: the pixels `cv2.imread(path)` gives (in RGB order): transparent pictures keep their
    stored colours, CMYK JPEGs get OpenCV's conversion; grayscale, palette and 16-bit pictures and
    EXIF orientation are read the same either way.
    reduce_to: a picture for display, about `reduce_to` pixels or more on its longer side: a JPEG is
    decoded at 1/2, 1/4 or 1/8 of its size, other formats are reduced as soon as they are decoded."""
    PIL = pillow()
    Image, ImageOps = PIL.Image, PIL.ImageOps
    name = path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", path)  # an open file's path
    # Pillow only warns of pictures between its limit and twice it (above, it refuses them): the limit
    # is checked here instead, alike in every thread (warning filters are the process's, and
    # catch_warnings around a read races with another thread's), and its warning kept quiet.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(path) as picture:
            if Image.MAX_IMAGE_PIXELS and picture.width * picture.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{picture.width * picture.height} pixels")
            if reduce_to:
                picture.draft(picture.mode, _reduced_size(picture.size, reduce_to))
            picture.load()
            reduced = _reduce(picture, reduce_to) if reduce_to else picture
            upright = ImageOps.exif_transpose(reduced)
            array = np.asarray(_to_rgb(upright, like_opencv), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: a folder, not a picture") from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name}: more than {Image.MAX_IMAGE_PIXELS} pixels, Pillow's decompression-bomb limit "
            "(PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a picture file Pillow can read") from None
    # Besides OSError, what Pillow can raise on damaged files.
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        KeyError,
        TypeError,
        struct.error,
        MemoryError,
    ) as e:
        raise ImageError(f"{name}: unreadable or truncated picture ({first_line(e)})") from None
    return np.ascontiguousarray(array)


def _reduced_size(size, side):
    """The size (width, height) of a picture of `size` whose longer side is `side`."""
    scale = side / max(size)
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def _reduce(picture, side):
    """The decoded picture reduced by a whole factor to no less than `side` pixels on its longer side (modes
    Pillow cannot reduce are kept as they are)."""
    factor = max(picture.size) // side
    if factor < 2:
        return picture
    try:
        return picture.reduce(factor)
    except ValueError:
        return picture


def list_images(sources, flag="--images"):
    """(image id, path) of the pictures of `sources` (files, and folders' picture files by name, not
    their subfolders), in that order; the image id is the file name without its extension.
    OptionErrors name `flag`: a source that does not exist, no pictures, two pictures with one id."""
    items = []
    for source in sources:
        if os.path.isdir(source):
            names = sorted(
                e.name for e in os.scandir(source) if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
            )
            items.extend((os.path.splitext(name)[0], os.path.join(source, name)) for name in names)
        elif os.path.exists(source):
            items.append((os.path.splitext(os.path.basename(source))[0], source))
        else:
            raise OptionError(f"{flag} {source}: no such file or folder")
    if not items:
        raise OptionError(f"{flag} {' '.join(sources)}: no pictures ({', '.join(IMAGE_EXTENSIONS)})")
    check_ids(items, flag)
    return items


def check_ids(items, flag="--images"):
    """Each image id once, and each one a TSV field can hold."""
    seen = {}
    for image_id, path in items:
        if any(c in image_id for c in "\t\r\n") or image_id.encode("utf-8", "replace").decode("utf-8") != image_id:
            raise OptionError(
                f"{flag}: {path!r}: a file name with a tab, a newline or bytes that are not UTF-8 "
                "cannot be a TSV image id; rename it"
            )
        if image_id in seen:
            raise OptionError(
                f"{flag}: {seen[image_id]} and {path} have the same image id {image_id!r} "
                "(the file name without its extension)"
            )
        seen[image_id] = path
