"""A library photo drawn with the paper's attention map (attention.py) from what the records keep: its
boxes, its regions' Visual Genome names and the first checkpoint's region scores. No model runs."""

import io
import os

from attention import SCALE_NOTE, open_picture, render_attention
from photo_library.searcher import region_names
from utils.figures import compose, save_png
from utils.images import pillow, read_image

THUMBNAIL_MAP_BOXES, VIEW_BOXES, VIEW_SIDE = 3, 5, 960


def map_tile(record, picture, side, top_boxes):
    """The Pillow picture of a photo (its file's, or its thumbnail) at `side` pixels, dimmed by its
    attention map, its `top_boxes` best regions outlined with their rank and name."""
    size = (record["height"], record["width"])
    return render_attention(
        picture,
        record["region_scores"][0],
        record["boxes"],
        size,
        top_boxes=top_boxes,
        side=side,
        names=region_names(record),
    ).image


def jpeg(image, quality=90):
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def thumbnail_map(record, thumbnail_jpeg):
    """JPEG: the photo's thumbnail with its map and top 3 boxes."""
    picture = pillow().Image.open(io.BytesIO(thumbnail_jpeg)).convert("RGB")
    return jpeg(map_tile(record, picture, max(picture.size), THUMBNAIL_MAP_BOXES))


def photo_view(record, file):
    """JPEG: the photo itself (read from its open `file`, upright, decoded no larger than needed) at up to 960
    pixels with its map and top 5 boxes."""
    picture = pillow().Image.fromarray(read_image(file, reduce_to=VIEW_SIDE), "RGB")
    return jpeg(map_tile(record, picture, min(VIEW_SIDE, max(picture.size)), VIEW_BOXES))


def write_maps(folder, hits, records, query):
    """One PNG per hit in `folder`: NN_name.png, the photo with its map under its rank, score and query."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for hit, record in zip(hits, records):
        tile = map_tile(record, open_picture(record["path"]), VIEW_SIDE, VIEW_BOXES)
        title = f'{hit["rank"]}. {hit["name"]}, score {hit["score"]:.4f}, for "{query}"'
        path = os.path.join(folder, f"{hit['rank']:02d}_{os.path.splitext(hit['name'])[0]}.png")
        save_png(compose(title, [tile], [""], 1, SCALE_NOTE), path)
        written.append(path)
    return written
