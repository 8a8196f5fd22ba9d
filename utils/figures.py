"""Pictures laid out for a person to read: a map shown by dimming the photo, numbered boxes whose
labels keep clear of each other, tiles with captions under a wrapped title and over a brightness
scale, saved as PNG with the title in the file's text chunks. Drawn with Pillow (imported lazily).
"""

from dataclasses import dataclass

import numpy as np

from utils.atomic import atomic_write
from utils.images import pillow

DIM = 0.4  # share of its brightness the photo keeps where the map is 0
MARGIN = 12
PAPER = (255, 255, 255)
INK = (20, 20, 20)
TITLE_SIZE, TEXT_SIZE, LABEL_SIZE, TICK_SIZE = 22, 18, 16, 14
LABEL_PADDING = 3
BAR_WIDTH, BAR_HEIGHT, TICK_LENGTH = 360, 14, 4
BAR_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
RESAMPLE = "LANCZOS"


def font(size):
    ImageFont = pillow().ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def line_height(face):
    return face.getbbox("Ag")[3] + 4


def wrap(text, face, width):
    """Lines of `text` no wider than `width` pixels, broken at spaces (a longer word keeps a line of
    its own); none for an empty text."""
    if not text:
        return []
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and face.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def resize_longer_side(picture, side):
    """The picture scaled (up or down) so that its longer side is `side` pixels."""
    Image = pillow().Image
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.convert("RGB").resize(size, getattr(Image.Resampling, RESAMPLE))


def dim_outside(photo, attention, dim=DIM):
    """The photo ((H, W, 3) uint8) with each pixel's brightness scaled by dim + (1 - dim) * map / max:
    unchanged where the map peaks, `dim` of its brightness where the map is 0, so hues stay those of
    the photo. An all-zero map dims everything."""
    attention = np.asarray(attention, dtype=np.float64)
    peak = attention.max()
    share = attention / peak if peak > 0 else np.zeros_like(attention)
    return np.round(np.asarray(photo, dtype=np.float64) * (dim + (1 - dim) * share)[..., None]).astype(np.uint8)


def _spots_next_to(box, w, h):
    """Top-left corners for a w x h label at the box's corners: above, inside and below, left then right."""
    x1, y1, x2, y2 = box
    return [(x, y) for x in (x1, x2 - w) for y in (y1 - h, y1, y2, y2 - h)] + [(x1 - w, y1), (x2, y1)]


def place_labels(boxes, label_sizes, width, height, gap=1):
    """(x1, y1, x2, y2) for one label per box (sizes (w, h)), in box order, inside a width x height
    picture and at least `gap` pixels from the labels placed before it: at the first free spot by a
    corner of its box, else at the free spot nearest its box's top-left corner. Only when the picture
    has no free spot left does a label take its first spot over another."""
    placed = []
    for box, (w, h) in zip(boxes, label_sizes):
        free_w, free_h = max(0, width - w), max(0, height - h)
        # blocked[y, x]: a label with its top-left corner at (x, y) would come within `gap` of a placed one.
        blocked = np.zeros((free_h + 1, free_w + 1), dtype=bool)
        for x1, y1, x2, y2 in placed:
            blocked[max(0, y1 - h - gap + 1) : max(0, y2 + gap), max(0, x1 - w - gap + 1) : max(0, x2 + gap)] = True
        by_corner = [
            (min(max(0, round(x)), free_w), min(max(0, round(y)), free_h)) for x, y in _spots_next_to(box, w, h)
        ]
        spot = next((s for s in by_corner if not blocked[s[1], s[0]]), None)
        if spot is None:
            rows, columns = np.nonzero(~blocked)
            if len(rows):
                x, y = by_corner[1]  # inside the top-left corner
                nearest = np.argmin(np.abs(columns - x) + np.abs(rows - y))
                spot = (int(columns[nearest]), int(rows[nearest]))
            else:
                spot = by_corner[0]
        placed.append((spot[0], spot[1], spot[0] + w, spot[1] + h))
    return placed


def label_size(text, face):
    left, top, right, bottom = face.getbbox(text)
    return (right - left + 2 * LABEL_PADDING, bottom - top + 2 * LABEL_PADDING)


def outline_boxes(image, boxes, texts):
    """Outline the boxes (black, white, black, so they show on light and dark; the first on top) and
    label each with its text, white on black, labels clear of each other and over every outline;
    returns the labels' rectangles."""
    ImageDraw = pillow().ImageDraw
    pen, face = ImageDraw.Draw(image), font(LABEL_SIZE)
    for x1, y1, x2, y2 in boxes[::-1]:
        corners = (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))
        pen.rectangle(corners, outline=(0, 0, 0), width=4)
        pen.rectangle(
            (corners[0] + 1, corners[1] + 1, corners[2] - 1, corners[3] - 1), outline=(255, 255, 255), width=2
        )
    labels = place_labels(boxes, [label_size(text, face) for text in texts], image.width, image.height)
    for text, (x1, y1, x2, y2) in zip(texts, labels):
        pen.rectangle((x1, y1, x2 - 1, y2 - 1), fill=(0, 0, 0))
        left, top, _, _ = face.getbbox(text)
        pen.text((x1 + LABEL_PADDING - left, y1 + LABEL_PADDING - top), text, fill=(255, 255, 255), font=face)
    return labels


@dataclass
class Figure:
    """A composed figure: the image, its text, and where its parts are (pixel rectangles x1 y1 x2 y2)."""

    image: object
    title: str
    captions: list
    tiles: list
    colour_bar: tuple


def compose(title, tiles, captions, columns, scale_note, dim=DIM):
    """Tiles (PIL images) in rows of `columns`, each under its caption, below the wrapped title and
    above a brightness scale from `dim` (map 0) to 1 (the map's peak) explained by `scale_note`."""
    PIL = pillow()
    Image, ImageDraw = PIL.Image, PIL.ImageDraw
    columns = max(1, min(columns, len(tiles)))
    cell = max(t.width for t in tiles)
    width = max(columns * cell + (columns + 1) * MARGIN, BAR_WIDTH + 2 * MARGIN)
    title_face, text_face, tick_face = font(TITLE_SIZE), font(TEXT_SIZE), font(TICK_SIZE)
    title_lines = wrap(title, title_face, width - 2 * MARGIN)
    caption_lines = [wrap(c, text_face, cell) for c in captions]
    rows = [range(r, min(r + columns, len(tiles))) for r in range(0, len(tiles), columns)]
    caption_heights = [max(len(caption_lines[i]) for i in row) * line_height(text_face) for row in rows]
    tile_heights = [max(tiles[i].height for i in row) for row in rows]
    note_lines = wrap(scale_note, tick_face, width - 2 * MARGIN)
    top = MARGIN + len(title_lines) * line_height(title_face) + MARGIN // 2
    bar_top = top + sum(caption_heights) + sum(tile_heights) + len(rows) * MARGIN + MARGIN // 2
    height = bar_top + BAR_HEIGHT + TICK_LENGTH + (1 + len(note_lines)) * line_height(tick_face) + MARGIN
    canvas = Image.new("RGB", (width, height), PAPER)
    pen = ImageDraw.Draw(canvas)
    y = MARGIN
    for line in title_lines:
        pen.text((MARGIN, y), line, fill=INK, font=title_face)
        y += line_height(title_face)
    placed = []
    y = top
    for row, caption_height, tile_height in zip(rows, caption_heights, tile_heights):
        for column, index in enumerate(row):
            x = MARGIN + column * (cell + MARGIN)
            for n, line in enumerate(caption_lines[index]):
                pen.text((x, y + n * line_height(text_face)), line, fill=INK, font=text_face)
            canvas.paste(tiles[index], (x, y + caption_height))
            placed.append((x, y + caption_height, x + tiles[index].width, y + caption_height + tiles[index].height))
        y += caption_height + tile_height + MARGIN
    colour_bar = draw_scale(canvas, pen, (MARGIN, bar_top), dim, tick_face)
    y = colour_bar[3] + TICK_LENGTH + line_height(tick_face)
    for line in note_lines:
        pen.text((MARGIN, y), line, fill=INK, font=tick_face)
        y += line_height(tick_face)
    return Figure(canvas, title, list(captions), placed, colour_bar)


def draw_scale(canvas, pen, corner, dim, face):
    """A horizontal bar, white dimmed as the map dims the photo (left: map 0, right: its peak), with
    ticks at shares of the peak; returns the bar's rectangle."""
    Image = pillow().Image
    x, y = corner
    shares = np.linspace(0.0, 1.0, BAR_WIDTH)
    ramp = np.round(255 * (dim + (1 - dim) * shares)).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(np.repeat(ramp[None, :, None], BAR_HEIGHT, 0), 3, 2), "RGB"), (x, y))
    pen.rectangle((x - 1, y - 1, x + BAR_WIDTH, y + BAR_HEIGHT), outline=INK, width=1)
    for share in BAR_TICKS:
        tick = x + round(share * (BAR_WIDTH - 1))
        pen.line((tick, y + BAR_HEIGHT, tick, y + BAR_HEIGHT + TICK_LENGTH), fill=INK, width=1)
        text = f"{share:g}"
        width = face.getlength(text)
        left = tick - {0.0: 0, 1.0: width}.get(share, width / 2)  # the ends' texts stay under the bar
        pen.text((left, y + BAR_HEIGHT + TICK_LENGTH), text, fill=INK, font=face)
    return (x, y, x + BAR_WIDTH, y + BAR_HEIGHT)


def save_png(figure, path):
    """Write the figure as PNG, its title and captions in the file's Title and Description text."""
    PngImagePlugin = pillow().PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_itxt("Title", figure.title)
    info.add_itxt("Description", "\n".join(figure.captions))
    with atomic_write(path, "wb") as f:
        figure.image.save(f, format="PNG", pnginfo=info)
    print(f"written: {path}")
