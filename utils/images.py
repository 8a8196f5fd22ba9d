"""Pictures as the detector reads them: RGB uint8 arrays, upright, whatever the file's format.

- EXIF orientation is applied (as OpenCV's imread, the bottom-up-attention reader, does).
- Grayscale, bilevel, palette and CMYK pictures are converted to RGB (CMYK with Pillow's
  conversion; ICC profiles are not applied).
- 16-bit pictures keep their 8 high bits (OpenCV's imread does the same).
- Transparent pictures (RGBA, LA, palette with transparency) are composited on white, as
  viewers show them: the colour stored under transparent pixels is arbitrary (often black).
- Animated and multi-page files give their first frame.
- Tiny pictures (down to 1 x 1) are read as they are; the detector resizes them to its input size.
- Pictures of more than Pillow's `Image.MAX_IMAGE_PIXELS` (about 89 megapixels; its
  decompression-bomb guard) are refused, as are unreadable, truncated and non-image files:
  each with an ImageError, one line naming the file.
"""
import struct
import warnings

import numpy as np

from utils.errors import DataError, OptionError

BACKGROUND = (255, 255, 255)
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(DataError):
    """A picture cannot be read: missing, not an image, truncated, too large, or of an unusual format."""


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise OptionError("reading pictures needs Pillow: pip install pillow") from None
    return Image, ImageOps


def _to_rgb(picture):
    """An RGB picture of any Pillow mode; transparent ones over white."""
    Image, _ = _pillow()
    if picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")
    if picture.mode in _TRANSPARENT_MODES:
        picture = picture.convert("RGBA")
        canvas = Image.new("RGBA", picture.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, picture).convert("RGB")
    if picture.mode in _WIDE_GRAY_MODES:
        # Pillow's own conversion of 16-bit gray clips at 255, turning most pictures white.
        gray = (np.clip(np.asarray(picture, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return picture.convert("RGB")


def read_image(path):
    """The picture at `path` as an upright (H, W, 3) uint8 RGB array; ImageError when it cannot be read."""
    Image, ImageOps = _pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                picture.load()
                upright = ImageOps.exif_transpose(picture)
                array = np.asarray(_to_rgb(upright), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: a folder, not a picture") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(
            f"{path}: more than {Image.MAX_IMAGE_PIXELS} pixels, Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not a picture file Pillow can read") from None
    # Besides OSError, what Pillow can raise on damaged files.
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error, MemoryError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{path}: unreadable or truncated picture ({reason})") from None
    return np.ascontiguousarray(array)
