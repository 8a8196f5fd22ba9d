"""What VSRN's final image representation attends to (paper, Sec. 4.5), and what it retrieves.

    python3 visualize.py --checkpoint M --data_path DATA --split test --image_dir IMAGES --index N --out map.png
    python3 visualize.py --checkpoint M --data_path DATA --split test --image_dir IMAGES \\
        --query "a dog on a bench" --out gallery.png
    python3 visualize.py --checkpoint M --data_path DATA --split test --index N --captions
    python3 visualize.py --checkpoint M --images PHOTOS --detector pytorch_model.bin \\
        --query "a dog on a bench" --out gallery.png

The attention map: the inner product of each GCN region feature V*_i with the final image
embedding I ranks the k regions (rank 1 = highest); region i gets s_i = lam * (k - r_i)^2
(lam = 50) and a pixel the sum of s_i over the boxes that contain it. Maps need the region
boxes, image sizes and image ids that utils.tsv_to_precomp writes, and the pictures
(--image_dir: <id>.jpg / <id>.png, or --image_pattern such as COCO_val2014_{:012d}.jpg); with
--images, your own pictures' regions are extracted by the detector (detection.cache: once, then
cached). The picture is drawn at a readable size under a title (image id, caption or query,
score), the map shown by dimming the photo where the map is low, with a brightness scale, the
top-ranked boxes outlined and numbered (attention.py, utils/figures.py).
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import os
import sys

import torch

from attention import MAP_SIDE, SCALE_NOTE, OwnPhotos, SplitPictures, attention_tile, first_caption, gallery_figure
from data import open_features, read_image_ids
from inference import encode_images, encode_query, encode_text, load_models, scores_against, split_loader
from utils.captions import read_captions
from utils.device import check_device
from utils.errors import OptionError, run_job
from utils.figures import compose, save_png
from utils.options import ScriptHelpFormatter


def show_map(args, opt, vocab, model, folder, features):
    pictures = SplitPictures(folder, args.split, args.image_dir, args.image_pattern)
    tile, embedding = attention_tile(model, features, pictures, args.index, args.lam, args.top_boxes, MAP_SIDE)
    title = f"{pictures.ids[args.index]} ({args.split} image {args.index})"
    caption = first_caption(folder, args.split, args.index, len(features))
    if caption is not None:
        score = scores_against(embedding, encode_text(model, vocab, caption), opt.measure)[0, 0]
        title += f'\nits first caption, score {score:.3f}: "{caption}"'
    print(title)
    figure = compose(title, [tile.image], [""], 1, SCALE_NOTE)
    save_png(figure, args.out or "attention_map.png")
    return figure


def rank_for_query(args, opt, vocab, model, features):
    """(scores of all images for --query, the --top images' indices, best first); unknown words are named."""
    query, (embedding,) = encode_query([model], vocab, args.query)
    if query.notice():
        print(f"warning: {query.notice()}", file=sys.stderr)
    scores = scores_against(encode_images(model, features), embedding, opt.measure)[:, 0]
    return scores, torch.argsort(scores, descending=True, stable=True)[: args.top].tolist()


def draw_gallery(args, model, features, pictures, scores, top, which):
    title = f'The top {len(top)} {which} for "{args.query}"'
    figure = gallery_figure(title, model, features, pictures, scores, top, args.lam, args.top_boxes)
    save_png(figure, args.out or "gallery.png")
    return figure


def show_query(args, opt, vocab, model, folder, features):
    scores, top = rank_for_query(args, opt, vocab, model, features)
    ids = read_image_ids(folder, args.split)
    print(f"top-{len(top)} images for {args.query!r} ({args.split} split):")
    for place, index in enumerate(top, start=1):
        print(f"  {place}. image {index}" + (f" ({ids[index]})" if ids else "") + f"  score {scores[index]:.4f}")
    pictures = SplitPictures(folder, args.split, args.image_dir, args.image_pattern)
    return draw_gallery(args, model, features, pictures, scores, top, f"{args.split} images")


def show_photos(args, photos, opt, vocab, model):
    width = photos.features[0].shape[1]
    if width != opt.img_dim:
        raise OptionError(
            f"--detector {args.detector}: gives {width}-d region features, but the checkpoint's image encoder takes "
            f"{opt.img_dim}-d (img_dim)"
        )
    scores, top = rank_for_query(args, opt, vocab, model, photos.features)
    print(f"top-{len(top)} of {len(photos.ids)} pictures for {args.query!r}:")
    for place, index in enumerate(top, start=1):
        print(f"  {place}. {photos.paths[index]}  score {scores[index]:.4f}")
    return draw_gallery(args, model, photos.features, photos, scores, top, f"of {len(photos.ids)} pictures")


def show_captions(args, opt, vocab, model, folder):
    from evaluation import encode_data

    loader = split_loader(opt, vocab, args.split)
    dataset = loader.dataset
    image_embs, caption_embs = encode_data(model, loader)
    own = dataset.captions_of(args.index)
    if not own or own[-1] >= len(dataset):
        raise OptionError(
            f"--index {args.index}: the first {len(dataset)} captions of the {args.split} split cover only "
            f"{int(dataset.image_of[len(dataset) - 1]) + 1} images"
        )
    row = own[0]
    scores = scores_against(torch.from_numpy(image_embs[row : row + 1]), torch.from_numpy(caption_embs), opt.measure)[0]
    top = torch.argsort(scores, descending=True, stable=True)[: args.top].tolist()
    captions = read_captions(os.path.join(folder, f"{args.split}_caps.txt"))
    ids = read_image_ids(folder, args.split)
    name = f"image {args.index}" + (f" ({ids[args.index]})" if ids else "")
    print(f"top-{len(top)} captions for {name}, {args.split} split (* = a ground-truth caption of this image):")
    for place, index in enumerate(top, start=1):
        mark = "*" if index in own else " "
        print(f"  {place}. {mark} {scores[index]:.4f}  {captions[index]}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a VSRN checkpoint (model_best.pth.tar)")
    p.add_argument(
        "--data_path", default=None, help="folder holding the checkpoint's NAME_precomp (default: the checkpoint's)"
    )
    p.add_argument("--vocab_path", default=None, help="folder of the vocabulary (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="the split to show (dev, test, testall)")
    p.add_argument("--index", type=int, help="an image of the split, by position")
    p.add_argument("--query", help="a caption: show the top images for it")
    p.add_argument(
        "--captions", action="store_true", help="with --index: list the image's top captions, ground truth marked"
    )
    p.add_argument("--image_dir", help="folder of the split's pictures, found by image id")
    p.add_argument(
        "--image_pattern",
        help="picture file name for an id, e.g. COCO_val2014_{:012d}.jpg (default <id>.jpg / <id>.png)",
    )
    p.add_argument(
        "--images",
        nargs="+",
        metavar="DIR_OR_FILE",
        help="your own pictures (folders, files) to rank for --query: "
        "their regions are extracted with --detector, cached",
    )
    p.add_argument(
        "--detector",
        help="with --images: the detector's weights, pytorch_model.bin (unc-nlp/frcnn-vg-finetuned) or "
        "faster_rcnn_from_caffe_attr.pkl",
    )
    p.add_argument(
        "--detector_config", help="with --images: the detector's config.yaml (default: the published values)"
    )
    p.add_argument(
        "--policy",
        default="caffe",
        choices=("caffe", "hf"),
        help="with --images: the regions' selection; caffe is how SCAN's features, and so VSRN's, were made",
    )
    p.add_argument("--out", help="PNG to write (default attention_map.png, or gallery.png for --query)")
    p.add_argument("--top", type=int, default=5, help="images or captions to show")
    p.add_argument("--top_boxes", type=int, default=3, help="outline the boxes of this many top-ranked regions")
    p.add_argument("--lam", type=float, default=50.0, help="lambda of s_i = lambda (k - r_i)^2")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
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
        raise OptionError(
            f"--top {args.top} --top_boxes {args.top_boxes}: expected at least 1 image or caption, and 0 or more boxes"
        )
    device = check_device(args.device)
    if args.images:
        if args.query is None:
            raise OptionError(
                "--images ranks your pictures for --query TEXT (--index and --captions are for a converted split)"
            )
        if not args.detector:
            raise OptionError(
                "--images needs --detector, the bottom-up-attention detector's weights (pytorch_model.bin)"
            )
        if args.image_dir or args.image_pattern:
            raise OptionError(
                "--image_dir and --image_pattern find the pictures of a converted split; --images names yours"
            )
        if not os.path.isfile(args.checkpoint):
            raise OptionError(f"--checkpoint {args.checkpoint}: checkpoint not found")
        from detection.cache import photo_regions  # the detector needs torchvision
        from detection.settings import RegionSettings

        # The detector is done with (and its memory free) before the model is loaded.
        settings = RegionSettings(policy=args.policy)
        photos = OwnPhotos(*photo_regions(args.images, args.detector, args.detector_config, settings, device=device))
        opt, vocab, (model,) = load_models(
            [args.checkpoint], args.data_path, args.vocab_path, need_data=False, device=device
        )
        return show_photos(args, photos, opt, vocab, model)
    if args.detector or args.detector_config:
        raise OptionError("--detector extracts the regions of the pictures given by --images")
    opt, vocab, (model,) = load_models([args.checkpoint], args.data_path, args.vocab_path, device=device)
    folder = os.path.join(opt.data_path, opt.data_name)
    if args.captions:
        return show_captions(args, opt, vocab, model, folder)
    features = open_features(os.path.join(folder, f"{args.split}_ims.npy"), opt.img_dim)
    if args.query is not None:
        return show_query(args, opt, vocab, model, folder, features)
    if args.index >= len(features):
        raise OptionError(
            f"--index {args.index}: the {args.split} split has {len(features)} images (0 to {len(features) - 1})"
        )
    return show_map(args, opt, vocab, model, folder, features)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_job(
        lambda: run(args),
        "nothing was drawn; the regions of your pictures extracted so far stay in the region cache, so the "
        "same command goes on from there",
    )


if __name__ == "__main__":
    sys.exit(main())
