"""What VSRN's final image representation attends to (paper, Sec. 4.5), and what it retrieves.

    python3 visualize.py --checkpoint M --data_path DATA --split test --image_dir IMAGES --index N --out map.png
    python3 visualize.py --checkpoint M --data_path DATA --split test --image_dir IMAGES --query "a dog on a bench" --out gallery.png
    python3 visualize.py --checkpoint M --data_path DATA --split test --index N --captions

The attention map: the inner product of each GCN region feature V*_i with the final image
embedding I ranks the k regions (rank 1 = highest); region i gets s_i = lam * (k - r_i)^2
(lam = 50) and a pixel the sum of s_i over the boxes that contain it. Maps need the region
boxes, image sizes and image ids that utils/tsv_to_precomp.py writes, and the pictures
(--image_dir: <id>.jpg / <id>.png, or --image_pattern such as COCO_val2014_{:012d}.jpg).
"""
import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys

import numpy as np
import torch

from data import get_test_loader, open_features, read_captions, read_image_ids, read_region_boxes
from evaluation import _load_models, encode_data
from model import cosine_sim, order_sim
from utils.atomic import atomic_write
from utils.errors import DataError, OptionError, VSRNError, report
from utils.options import ScriptHelpFormatter
from vocab import END, START, tokenize

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
COLOUR_MAP = "jet"
HEAT_OPACITY = 0.5
OUTLINE = (255, 255, 255)
TILE_HEIGHT = 200
ENCODE_BATCH = 128


def region_ranks(scores):
    """Rank of each region by descending score, 1 for the highest; ties rank in region order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def region_attention_map(scores, boxes, height, width, lam=50.0):
    """(height, width) map: the sum of lam * (k - r_i)^2 over the boxes (x1 y1 x2 y2, pixels) that
    contain each pixel; pixel (row y, column x) lies in a box when x1 <= x + 0.5 < x2 and y1 <= y + 0.5 < y2."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(scores) != len(boxes):
        raise ValueError(f"{len(scores)} scores for {len(boxes)} boxes")
    weights = lam * (len(scores) - region_ranks(scores)) ** 2
    columns, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    attention = np.zeros((height, width), dtype=np.float64)
    for weight, (x1, y1, x2, y2) in zip(weights, boxes):
        # Pixel centres are exact halves, so these bounds are exactly the containment rule.
        left, right = np.searchsorted(columns, [x1, x2], side="left")
        top, bottom = np.searchsorted(rows, [y1, y2], side="left")
        attention[top:bottom, left:right] += weight
    return attention


@torch.no_grad()
def region_scores(model, features):
    """(image embeddings (B, D), inner products of the GCN region features with them (B, regions))."""
    model.val_start()
    images = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=model.device)
    embeddings, regions = model.img_enc(images)
    return embeddings.float(), torch.einsum("brd,bd->br", regions.float(), embeddings.float())


@torch.no_grad()
def encode_images(model, feature_file):
    """Embeddings of every image of a split, in batches."""
    chunks = []
    for start in range(0, len(feature_file), ENCODE_BATCH):
        batch = np.stack([feature_file[i] for i in range(start, min(start + ENCODE_BATCH, len(feature_file)))])
        chunks.append(region_scores(model, batch)[0].cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_text(model, vocab, text):
    words = [vocab(START)] + [vocab(w) for w in tokenize(text)] + [vocab(END)]
    caption = torch.tensor([words], dtype=torch.int64, device=model.device)
    return model.txt_enc(caption, [len(words)]).float().cpu()


def scores_against(images, captions, measure):
    """(n_images, n_captions) scores, as the model ranks them."""
    return (order_sim if measure == "order" else cosine_sim)(images, captions)


def _pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise OptionError("visualize.py draws with Pillow: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def _colour_map():
    try:
        import matplotlib
    except ImportError:
        raise OptionError("visualize.py colours the maps with matplotlib: pip install matplotlib") from None
    return matplotlib.colormaps[COLOUR_MAP]


def _font(size):
    _, _, ImageFont = _pillow()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def render_attention(picture, scores, boxes, size, lam=50.0, top_boxes=3):
    """The picture with the attention map as a heat overlay and its top boxes outlined (RGB PIL image).

    `boxes` are in the pixels of `size` (height, width), the image the features were extracted
    from; a picture stored at another size gets the boxes scaled to it.
    """
    _, ImageDraw, _ = _pillow()
    picture = picture.convert("RGB")
    width, height = picture.size
    scale = np.array([width / size[1], height / size[0]] * 2)
    boxes = np.asarray(boxes, dtype=np.float64) * scale
    attention = region_attention_map(scores, boxes, height, width, lam)
    heat = _colour_map()(attention / attention.max() if attention.max() > 0 else attention)[..., :3]
    blended = (1 - HEAT_OPACITY) * np.asarray(picture, dtype=np.float64) / 255 + HEAT_OPACITY * heat
    image = _from_array(blended)
    pen = ImageDraw.Draw(image)
    ranks = region_ranks(scores)
    for region in np.argsort(ranks)[:top_boxes]:
        x1, y1, x2, y2 = boxes[region]
        pen.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=OUTLINE, width=2)
        pen.text((x1 + 4, y1 + 2), str(ranks[region]), fill=OUTLINE, font=_font(12))
    return image


def _from_array(rgb):
    Image, _, _ = _pillow()
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def gallery(tiles, labels, title):
    """Tiles side by side at one height, each labelled underneath, under a title line."""
    Image, ImageDraw, _ = _pillow()
    tiles = [t.resize((max(1, round(t.width * TILE_HEIGHT / t.height)), TILE_HEIGHT)) for t in tiles]
    margin, text_height = 8, 18
    width = sum(t.width for t in tiles) + margin * (len(tiles) + 1)
    canvas = Image.new("RGB", (width, TILE_HEIGHT + 2 * text_height + 3 * margin), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    pen.text((margin, margin), title, fill=(0, 0, 0), font=_font(14))
    x = margin
    for tile, label in zip(tiles, labels):
        canvas.paste(tile, (x, text_height + 2 * margin))
        pen.text((x, TILE_HEIGHT + text_height + 2 * margin + 2), label, fill=(0, 0, 0), font=_font(12))
        x += tile.width + margin
    return canvas


def find_picture(image_dir, image_id, pattern=None):
    if pattern:
        try:
            names = [pattern.format(int(image_id) if image_id.isdigit() else image_id)]
        except (ValueError, IndexError, KeyError):
            raise OptionError(f"--image_pattern {pattern}: cannot format the image id {image_id!r} with it") from None
    else:
        names = [image_id + suffix for suffix in IMAGE_SUFFIXES]
    for name in names:
        path = os.path.join(image_dir, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{image_dir}: no picture of image {image_id} (looked for {', '.join(names[:3])}; see --image_pattern)")


def open_picture(path):
    Image, _, _ = _pillow()
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


class Pictures:
    """Boxes, sizes, ids and pictures of a split, or a DataError that names everything missing."""

    def __init__(self, folder, split, image_dir, pattern=None):
        missing = []
        if not image_dir:
            missing.append("--image_dir (the folder of the split's pictures)")
        absent = [f"{split}_{name}" for name in ("boxes.npy", "image_sizes.npy", "image_ids.txt")
                  if not os.path.isfile(os.path.join(folder, f"{split}_{name}"))]
        if absent:
            missing.append(f"{', '.join(absent)} in {folder} (written by utils/tsv_to_precomp.py; SCAN's precomputed features have no boxes)")
        if image_dir and not os.path.isdir(image_dir):
            missing.append(f"the folder --image_dir {image_dir}")
        if missing:
            raise DataError(f"an attention map needs the pictures and their region boxes; missing: {'; '.join(missing)}")
        self.boxes, self.sizes = read_region_boxes(folder, split, "an attention map")
        self.ids = read_image_ids(folder, split)
        self.image_dir, self.pattern = image_dir, pattern

    def render(self, model, features, index, lam, top_boxes):
        _, scores = region_scores(model, features[index][None])
        picture = open_picture(find_picture(self.image_dir, self.ids[index], self.pattern))
        return render_attention(picture, scores[0].cpu().numpy(), self.boxes[index], self.sizes[index], lam, top_boxes)


def save_png(image, path):
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG")
    print(f"written: {path}")


def show_map(args, model, folder, features):
    pictures = Pictures(folder, args.split, args.image_dir, args.image_pattern)
    save_png(pictures.render(model, features, args.index, args.lam, args.top_boxes), args.out or "attention_map.png")


def show_query(args, opt, vocab, model, folder, features):
    images = encode_images(model, features)
    scores = scores_against(images, encode_text(model, vocab, args.query), opt.measure)[:, 0]
    top = torch.argsort(scores, descending=True, stable=True)[: args.top].tolist()
    ids = read_image_ids(folder, args.split)
    print(f"top-{len(top)} images for {args.query!r} ({args.split} split):")
    for place, index in enumerate(top, start=1):
        print(f"  {place}. image {index}" + (f" ({ids[index]})" if ids else "") + f"  score {scores[index]:.4f}")
    pictures = Pictures(folder, args.split, args.image_dir, args.image_pattern)
    tiles = [pictures.render(model, features, index, args.lam, args.top_boxes) for index in top]
    labels = [f"{place}. {pictures.ids[index]}  {scores[index]:.3f}" for place, index in enumerate(top, start=1)]
    save_png(gallery(tiles, labels, f"query: {args.query}"), args.out or "gallery.png")


def show_captions(args, opt, vocab, model, folder):
    loader = get_test_loader(args.split, opt.data_name, vocab, opt.crop_size, opt.batch_size, opt.workers, opt)
    dataset = loader.dataset
    image_embs, caption_embs = encode_data(model, loader)
    row = args.index * dataset.im_div
    if row >= len(dataset):
        raise OptionError(f"--index {args.index}: the first {len(dataset)} captions of the {args.split} split cover only {len(dataset) // dataset.im_div} images")
    scores = scores_against(torch.from_numpy(image_embs[row : row + 1]), torch.from_numpy(caption_embs), opt.measure)[0]
    top = torch.argsort(scores, descending=True, stable=True)[: args.top].tolist()
    captions = read_captions(os.path.join(folder, f"{args.split}_caps.txt"))
    ids = read_image_ids(folder, args.split)
    name = f"image {args.index}" + (f" ({ids[args.index]})" if ids else "")
    print(f"top-{len(top)} captions for {name}, {args.split} split (* = a ground-truth caption of this image):")
    for place, index in enumerate(top, start=1):
        mark = "*" if index // dataset.im_div == args.index else " "
        print(f"  {place}. {mark} {scores[index]:.4f}  {captions[index]}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a VSRN checkpoint (model_best.pth.tar)")
    p.add_argument("--data_path", default=None, help="folder holding the checkpoint's NAME_precomp (default: the checkpoint's)")
    p.add_argument("--vocab_path", default=None, help="folder of the vocabulary (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="the split to show (dev, test, testall)")
    p.add_argument("--index", type=int, help="an image of the split, by position")
    p.add_argument("--query", help="a caption: show the top images for it")
    p.add_argument("--captions", action="store_true", help="with --index: list the image's top captions, ground truth marked")
    p.add_argument("--image_dir", help="folder of the split's pictures, found by image id")
    p.add_argument("--image_pattern", help="picture file name for an id, e.g. COCO_val2014_{:012d}.jpg (default <id>.jpg / <id>.png)")
    p.add_argument("--out", help="PNG to write (default attention_map.png, or gallery.png for --query)")
    p.add_argument("--top", type=int, default=5, help="images or captions to show")
    p.add_argument("--top_boxes", type=int, default=3, help="outline the boxes of this many top-ranked regions")
    p.add_argument("--lam", type=float, default=50.0, help="lambda of s_i = lambda (k - r_i)^2")
    return p


def run(args):
    if (args.index is None) == (args.query is None):
        raise OptionError("give either --index N (an image's map, or with --captions its top captions) or --query TEXT")
    if args.captions and args.index is None:
        raise OptionError("--captions lists the top captions of the image given by --index")
    if args.index is not None and args.index < 0:
        raise OptionError(f"--index {args.index}: images are counted from 0")
    opt, vocab, (model,) = _load_models([args.checkpoint], args.data_path, args.vocab_path)
    folder = os.path.join(opt.data_path, opt.data_name)
    if args.captions:
        return show_captions(args, opt, vocab, model, folder)
    features = open_features(os.path.join(folder, f"{args.split}_ims.npy"), opt.img_dim)
    if args.query is not None:
        return show_query(args, opt, vocab, model, folder, features)
    if args.index >= len(features):
        raise OptionError(f"--index {args.index}: the {args.split} split has {len(features)} images (0 to {len(features) - 1})")
    return show_map(args, model, folder, features)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (VSRNError, OSError) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
