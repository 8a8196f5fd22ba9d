"""What VSRN's final image representation attends to (paper, Sec. 4.5), and what it retrieves.

    python3 visualize.py --checkpoint M --data_path DATA --split test --image_dir IMAGES --index N --out map.png
    python3 visualize.py --checkpoint M --data_path DATA --split test --image_dir IMAGES --query "a dog on a bench" --out gallery.png
    python3 visualize.py --checkpoint M --data_path DATA --split test --index N --captions
    python3 visualize.py --checkpoint M --images PHOTOS --detector pytorch_model.bin --query "a dog on a bench" --out gallery.png

The attention map: the inner product of each GCN region feature V*_i with the final image
embedding I ranks the k regions (rank 1 = highest); region i gets s_i = lam * (k - r_i)^2
(lam = 50) and a pixel the sum of s_i over the boxes that contain it. Maps need the region
boxes, image sizes and image ids that utils/tsv_to_precomp.py writes, and the pictures
(--image_dir: <id>.jpg / <id>.png, or --image_pattern such as COCO_val2014_{:012d}.jpg); with
--images, your own pictures' regions are extracted by the detector (extract_regions.py, cached).
The picture is drawn at a readable size under a title (image id, caption or query, score), the
map shown by dimming the photo where the map is low, with a brightness scale, the top-ranked
boxes outlined and numbered (utils/figures.py).
"""
import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from data import get_test_loader, open_features, read_image_ids, read_region_boxes
from evaluation import _load_models, encode_data
from model import cosine_sim, order_sim
from utils.captions import read_captions
from utils.errors import DataError, OptionError, VSRNError, report
from utils.figures import DIM, compose, dim_outside, outline_boxes, pillow, resize_longer_side, save_png
from utils.images import read_image
from utils.options import ScriptHelpFormatter
from vocab import END, START, tokenize

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
ENCODE_BATCH = 128
MAP_SIDE = 640  # pixels of the longer side of an --index picture
TILE_SIDE = 400  # and of each picture of a --query gallery
GALLERY_COLUMNS = 3
SCALE_NOTE = (f"Brightness shows each picture's attention map (the image's own, whatever the query): the photo as it "
              f"is where the map peaks, dimmed to {DIM:.0%} where it is 0. The map sums lambda (k - r)^2 over the boxes "
              "that hold a pixel (r: a region's rank by the inner product of its GCN feature with the image embedding). "
              "Numbered: the boxes of the top-ranked regions.")


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
def encode_images(model, feature_file, batch_size=ENCODE_BATCH):
    """Embeddings of every image of a split (or a list of region arrays), in batches."""
    chunks = []
    for start in range(0, len(feature_file), batch_size):
        batch = np.stack([feature_file[i] for i in range(start, min(start + batch_size, len(feature_file)))])
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


@dataclass
class Tile:
    """A picture with its attention map: the image, the map at its pixels, its rank labels' rectangles."""

    image: object
    attention: np.ndarray
    labels: list


def render_attention(picture, scores, boxes, size, lam=50.0, top_boxes=3, side=MAP_SIDE):
    """The picture scaled to a longer side of `side` pixels and dimmed where its attention map is low
    (utils.figures.dim_outside), the boxes of its `top_boxes` highest-ranked regions outlined and
    numbered by rank (a Tile).

    `boxes` are in the pixels of `size` (height, width), the image the features were extracted
    from; they are scaled to the drawn picture, and the map is computed at its pixels.
    """
    Image = pillow()[0]
    picture = resize_longer_side(picture, side)
    width, height = picture.size
    scale = np.array([width / size[1], height / size[0]] * 2)
    boxes = np.asarray(boxes, dtype=np.float64) * scale
    attention = region_attention_map(scores, boxes, height, width, lam)
    image = Image.fromarray(dim_outside(np.asarray(picture), attention), "RGB")
    ranks = region_ranks(scores)
    top = np.argsort(ranks, kind="stable")[:top_boxes]
    labels = outline_boxes(image, boxes[top], [str(ranks[region]) for region in top])
    return Tile(image, attention, labels)


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
    """The picture as the detector saw it (upright, RGB): utils.images.read_image."""
    return pillow()[0].fromarray(read_image(path), "RGB")


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

    def picture(self, index):
        return open_picture(find_picture(self.image_dir, self.ids[index], self.pattern))


class Photos:
    """Pictures of your own (files and folders, as extract_regions.py takes them) and their regions,
    extracted by the detector through extract_regions.cached_regions, so a second run reads them
    from the cache. Unreadable pictures are reported there, one line each, and left out."""

    def __init__(self, sources, weights, config, policy, img_dim, device):
        from extract_regions import FIXED_BOXES, cached_regions, list_images  # the detector needs torchvision

        items = list_images(sources)
        regions = cached_regions([path for _, path in items], weights, config, policy=policy, num_boxes=FIXED_BOXES, device=str(device))
        self.ids = [image_id for image_id, _ in items if image_id in regions]
        if not self.ids:
            raise DataError(f"--images {' '.join(sources)}: none of the {len(items)} pictures could be read")
        self.paths = [path for image_id, path in items if image_id in regions]
        kept = [regions[image_id] for image_id in self.ids]
        width = kept[0]["features"].shape[1]
        if width != img_dim:
            raise OptionError(f"--detector {weights}: gives {width}-d region features, but the checkpoint's image encoder takes {img_dim}-d (img_dim)")
        self.features = [r["features"] for r in kept]
        self.boxes = [r["boxes"] for r in kept]
        self.sizes = [(r["img_h"], r["img_w"]) for r in kept]

    def picture(self, index):
        return open_picture(self.paths[index])


def render_image(model, features, pictures, index, lam, top_boxes, side):
    """(the Tile of image `index` of `pictures` (Pictures or Photos), its embedding (1, D))."""
    embedding, scores = region_scores(model, features[index][None])
    tile = render_attention(pictures.picture(index), scores[0].cpu().numpy(), pictures.boxes[index], pictures.sizes[index], lam, top_boxes, side)
    return tile, embedding.cpu()


def first_caption(folder, split, index, num_images):
    """Image `index`'s first caption (a split has five captions per image, or one), or None without a caption file."""
    path = os.path.join(folder, f"{split}_caps.txt")
    if not os.path.isfile(path):
        return None
    captions = read_captions(path)
    return captions[index * max(1, len(captions) // num_images)]


def show_map(args, opt, vocab, model, folder, features):
    pictures = Pictures(folder, args.split, args.image_dir, args.image_pattern)
    tile, embedding = render_image(model, features, pictures, args.index, args.lam, args.top_boxes, MAP_SIDE)
    title = f"{pictures.ids[args.index]} ({args.split} image {args.index})"
    caption = first_caption(folder, args.split, args.index, len(features))
    if caption is not None:
        score = scores_against(embedding, encode_text(model, vocab, caption), opt.measure)[0, 0]
        title += f'\nits first caption, score {score:.3f}: "{caption}"'
    print(title)
    figure = compose(title, [tile.image], [""], 1, SCALE_NOTE)
    save_png(figure, args.out or "attention_map.png")
    return figure


def rank_for_query(args, opt, vocab, model, features, batch):
    """(scores of all images for --query, the --top images' indices, best first)."""
    images = encode_images(model, features, batch)
    scores = scores_against(images, encode_text(model, vocab, args.query), opt.measure)[:, 0]
    return scores, torch.argsort(scores, descending=True, stable=True)[: args.top].tolist()


def draw_gallery(args, model, features, pictures, scores, top, which):
    tiles = [render_image(model, features, pictures, index, args.lam, args.top_boxes, TILE_SIDE)[0].image for index in top]
    captions = [f"{place}. {pictures.ids[index]}, score {scores[index]:.3f}" for place, index in enumerate(top, start=1)]
    title = f'The top {len(top)} {which} for "{args.query}"'
    figure = compose(title, tiles, captions, GALLERY_COLUMNS, SCALE_NOTE)
    save_png(figure, args.out or "gallery.png")
    return figure


def show_query(args, opt, vocab, model, folder, features):
    scores, top = rank_for_query(args, opt, vocab, model, features, ENCODE_BATCH)
    ids = read_image_ids(folder, args.split)
    print(f"top-{len(top)} images for {args.query!r} ({args.split} split):")
    for place, index in enumerate(top, start=1):
        print(f"  {place}. image {index}" + (f" ({ids[index]})" if ids else "") + f"  score {scores[index]:.4f}")
    pictures = Pictures(folder, args.split, args.image_dir, args.image_pattern)
    return draw_gallery(args, model, features, pictures, scores, top, f"{args.split} images")


def show_photos(args, opt, vocab, model):
    photos = Photos(args.images, args.detector, args.detector_config, args.policy, opt.img_dim, model.device)
    scores, top = rank_for_query(args, opt, vocab, model, photos.features, ENCODE_BATCH)
    print(f"top-{len(top)} of {len(photos.ids)} pictures for {args.query!r}:")
    for place, index in enumerate(top, start=1):
        print(f"  {place}. {photos.paths[index]}  score {scores[index]:.4f}")
    return draw_gallery(args, model, photos.features, photos, scores, top, f"of {len(photos.ids)} pictures")


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
    p.add_argument("--images", nargs="+", metavar="DIR_OR_FILE",
                   help="your own pictures (folders, files) to rank for --query: their regions are extracted with --detector, cached")
    p.add_argument("--detector", help="with --images: the detector's weights, pytorch_model.bin (unc-nlp/frcnn-vg-finetuned) or faster_rcnn_from_caffe_attr.pkl")
    p.add_argument("--detector_config", help="with --images: the detector's config.yaml (default: the published values)")
    p.add_argument("--policy", default="caffe", choices=("caffe", "hf"),
                   help="with --images: the regions' selection; caffe is how SCAN's features, and so VSRN's, were made")
    p.add_argument("--out", help="PNG to write (default attention_map.png, or gallery.png for --query)")
    p.add_argument("--top", type=int, default=5, help="images or captions to show")
    p.add_argument("--top_boxes", type=int, default=3, help="outline the boxes of this many top-ranked regions")
    p.add_argument("--lam", type=float, default=50.0, help="lambda of s_i = lambda (k - r_i)^2")
    return p


def run(args):
    """Do what the arguments ask; the Figure drawn, if any."""
    if (args.index is None) == (args.query is None):
        raise OptionError("give either --index N (an image's map, or with --captions its top captions) or --query TEXT")
    if args.captions and args.index is None:
        raise OptionError("--captions lists the top captions of the image given by --index")
    if args.index is not None and args.index < 0:
        raise OptionError(f"--index {args.index}: images are counted from 0")
    if args.top < 1 or args.top_boxes < 0:
        raise OptionError(f"--top {args.top} --top_boxes {args.top_boxes}: expected at least 1 image or caption, and 0 or more boxes")
    if args.images:
        if args.query is None:
            raise OptionError("--images ranks your pictures for --query TEXT (--index and --captions are for a converted split)")
        if not args.detector:
            raise OptionError("--images needs --detector, the bottom-up-attention detector's weights (pytorch_model.bin)")
        if args.image_dir or args.image_pattern:
            raise OptionError("--image_dir and --image_pattern find the pictures of a converted split; --images names yours")
    elif args.detector or args.detector_config:
        raise OptionError("--detector extracts the regions of the pictures given by --images")
    opt, vocab, (model,) = _load_models([args.checkpoint], args.data_path, args.vocab_path, need_data=not args.images)
    if args.images:
        return show_photos(args, opt, vocab, model)
    folder = os.path.join(opt.data_path, opt.data_name)
    if args.captions:
        return show_captions(args, opt, vocab, model, folder)
    features = open_features(os.path.join(folder, f"{args.split}_ims.npy"), opt.img_dim)
    if args.query is not None:
        return show_query(args, opt, vocab, model, folder, features)
    if args.index >= len(features):
        raise OptionError(f"--index {args.index}: the {args.split} split has {len(features)} images (0 to {len(features) - 1})")
    return show_map(args, opt, vocab, model, folder, features)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (VSRNError, OSError) as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
