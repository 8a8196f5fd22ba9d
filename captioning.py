"""Captions from VSRN's caption branch, and their scores by the COCO caption evaluation.

`generate_captions` decodes the caption branch (greedy, sampling or beam search) for region
features; `caption_split` captions a split and scores it with pycocoevalcap's BLEU-1..4,
METEOR, ROUGE-L and CIDEr-D against the split's references. METEOR and the Stanford PTB
tokenizer need Java: without `java` on PATH, METEOR is skipped and the captions are tokenized
with this port's tokenizer instead. SPICE is not run.
"""

import json
import os
import shutil

import numpy as np
import torch

from data import caption_images_of, open_features, read_image_ids
from inference import load_models
from model import END_ID, PAD_ID
from utils.captions import read_captions
from utils.atomic import atomic_write
from utils.errors import DataError, OptionError
from vocab import tokenize

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def caption_text(vocab, word_ids):
    """The words of a generated id sequence, up to its <end> (or first <pad>)."""
    words = []
    for word_id in word_ids:
        word_id = int(word_id)
        if word_id in (END_ID, PAD_ID):
            break
        words.append(vocab.idx2word[word_id])
    return " ".join(words)


def generate_captions(model, images, beam_size=1, batch_size=128):
    """Generated word ids (num_images, max_len - 2) of `images` (indexable by image, each
    (regions, img_dim)), decoded in batches on the model's device."""
    model.val_start()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = np.stack([images[i] for i in range(start, min(start + batch_size, len(images)))])
            if not np.isfinite(batch).all():
                source = getattr(images, "path", "features")
                raise DataError(f"{source}: NaN or Inf in the features of images {start}..{start + len(batch) - 1}")
            _, regions = model.img_enc(torch.from_numpy(batch).to(model.device))
            _, preds = model.caption_model(regions, mode="inference", opt={"beam_size": beam_size})
            outputs.append(preds.cpu())
    return torch.cat(outputs)


def _import_pycocoevalcap():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise OptionError("caption scores need pycocoevalcap: pip install pycocoevalcap") from None


def tokenize_for_scoring(captions):
    """{key: [caption, ...]} -> {key: [tokenized caption, ...]} as the COCO caption evaluation does.

    With Java: Stanford's PTBTokenizer (lower-cased, punctuation removed). Without it: this
    port's tokenizer (lower case, NLTK's Treebank-style word_tokenize) with the same
    punctuation removed; scores can then differ slightly from the official ones.
    """
    _import_pycocoevalcap()
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

    if java_available():
        return PTBTokenizer().tokenize({key: [{"caption": c} for c in values] for key, values in captions.items()})
    return {
        key: [" ".join(w for w in tokenize(c) if w not in PUNCTUATIONS) for c in values]
        for key, values in captions.items()
    }


def java_available():
    return shutil.which("java") is not None


def score_captions(references, hypotheses):
    """pycocoevalcap's corpus scores of tokenized captions, as fractions (CIDEr-D unbounded).

    `references` {key: [caption, ...]}, `hypotheses` {key: [caption]}, the same keys.
    Returns {name: score} for METRIC_NAMES; METEOR is left out without Java.
    """
    _import_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(references, hypotheses, verbose=0)
    scores = dict(zip(METRIC_NAMES[:4], bleu))
    if java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        scores["METEOR"], _ = meteor.compute_score(references, hypotheses)
        del meteor  # ends its Java process
    scores["ROUGE-L"], _ = Rouge().compute_score(references, hypotheses)
    scores["CIDEr-D"], _ = Cider().compute_score(references, hypotheses)
    return {name: float(scores[name]) for name in METRIC_NAMES if name in scores}


def evaluate_captions(references, generated):
    """Scores of raw captions: `references` one list per image, `generated` one caption per image."""
    references = tokenize_for_scoring(dict(enumerate(references)))
    generated = tokenize_for_scoring({i: [caption] for i, caption in enumerate(generated)})
    return score_captions(references, generated)


def split_references(folder, split, num_images):
    """The split's reference captions grouped per image (5 per image, 1, or as SPLIT_caption_images.npy says)."""
    captions = read_captions(os.path.join(folder, f"{split}_caps.txt"))
    caption_images, _ = caption_images_of(folder, split, len(captions), num_images)
    references = [[] for _ in range(num_images)]
    for caption, image in zip(captions, caption_images.tolist()):
        references[image].append(caption)
    return references


def coco_image_ids(folder, split, num_images):
    """Ids from SPLIT_image_ids.txt (as int when they all are), else the image indices."""
    ids = read_image_ids(folder, split)
    if ids is None:
        return list(range(num_images))
    return [int(i) for i in ids] if all(i.isdigit() for i in ids) else ids


def load_captioner(checkpoint, data_path=None, vocab_path=None):
    """(opt, vocab, VSRN) of a checkpoint that has caption-branch weights."""
    opt, vocab, (model,) = load_models([checkpoint], data_path, vocab_path, need_caption_branch=True)
    return opt, vocab, model


def caption_split(checkpoint, data_path=None, split="test", beam_size=1, out=None, vocab_path=None, batch_size=128):
    """Caption every image of a split, write them as JSON, print and return the scores."""
    if beam_size < 1:
        raise OptionError(f"--beam_size {beam_size}: must be at least 1")
    _import_pycocoevalcap()  # before the work, not after it
    opt, vocab, model = load_captioner(checkpoint, data_path, vocab_path)
    folder = os.path.join(opt.data_path, opt.data_name)
    images = open_features(os.path.join(folder, f"{split}_ims.npy"), opt.img_dim)
    references = split_references(folder, split, len(images))
    image_ids = coco_image_ids(folder, split, len(images))
    print(f"Captioning {len(images)} images of {opt.data_name} {split} (beam size {beam_size})")
    generated = [caption_text(vocab, ids) for ids in generate_captions(model, images, beam_size, batch_size)]
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"captions_{split}.json")
    with atomic_write(out, "w") as f:
        json.dump([{"image_id": i, "caption": c} for i, c in zip(image_ids, generated)], f, indent=1)
    print(f"Captions written to {out}")
    for image_id, caption in list(zip(image_ids, generated))[:3]:
        print(f"  {image_id}: {caption}")
    scores = evaluate_captions(references, generated)
    print_scores(scores, sorted({len(r) for r in references}))
    return scores


def print_scores(scores, references_per_image):
    """`references_per_image`: the counts of reference captions the images have (sorted)."""
    if not java_available():
        print(
            "java not found on PATH: METEOR skipped; "
            "tokenized with NLTK's Treebank tokenizer, not Stanford's PTBTokenizer"
        )
    counts = f"{references_per_image[0]}" + (f"-{references_per_image[-1]}" if len(references_per_image) > 1 else "")
    print(f"Caption scores (x100) against {counts} reference(s) per image; SPICE not run:")
    print("  " + "  ".join(f"{name} {100 * value:.1f}" for name, value in scores.items()))


def log_generated_captions(writer, model, dataset, step, count=3):
    """Add the generated and first reference caption of the first `count` images of
    `dataset` (a data.PrecompDataset) to TensorBoard as text. Greedy: draws no random numbers."""
    images = [dataset.images[i] for i in range(min(count, len(dataset.images)))]
    generated = generate_captions(model, images)
    lines = []
    for i, ids in enumerate(generated):
        reference = caption_text(dataset.vocab, dataset.caption(dataset.captions_of(i)[0])[1:])
        lines.append(f"{i}: **{caption_text(dataset.vocab, ids)}** (reference: {reference})")
    writer.add_text("captions", "  \n".join(lines), step)


def print_examples(checkpoint, data_path, split="test", vocab_path=None, count=5):
    """Print the generated and first reference caption of a split's first `count` images."""
    opt, vocab, model = load_captioner(checkpoint, data_path, vocab_path)
    folder = os.path.join(opt.data_path, opt.data_name)
    images = open_features(os.path.join(folder, f"{split}_ims.npy"), opt.img_dim)
    references = split_references(folder, split, len(images))
    print(f"\nGenerated captions of the first {count} {split} images (reference in brackets):")
    for i, ids in enumerate(generate_captions(model, [images[i] for i in range(min(count, len(images)))])):
        print(f"  {i}: {caption_text(vocab, ids)}   [{references[i][0]}]")
