"""The README's demo as shipped: `python3 train.py --demo` learns to retrieve and to caption."""

import json
import re

import caption
import captioning
import train
from utils.make_toy_data import CONCEPTS


def concepts_named(text):
    return {word for word in text.split() if word in CONCEPTS}


def concept_precision_recall(generated, references):
    """Of the toy concepts the captions name, the share their image shows; of the concepts
    the images show (as their references name them), the share the captions name."""
    shown = [concepts_named(" ".join(refs)) for refs in references]
    named = [concepts_named(text) for text in generated]
    right = sum(len(n & s) for n, s in zip(named, shown))
    return right / sum(map(len, named)), right / sum(map(len, shown))


def test_the_demo_learns_to_retrieve_and_to_caption(tmp_path, monkeypatch, capsys, no_java):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--demo"]) == 0
    printed = capsys.readouterr().out
    for direction in ("Image to text", "Text to image"):
        r1 = float(re.search(rf"^{direction}: ([\d.]+)", printed, re.M).group(1))
        assert r1 > 90, (direction, r1)  # chance: 1
    examples = printed.split("Generated captions of the first 5 test images")[1].strip().splitlines()
    assert [line.split(":")[0].strip() for line in examples[1:]] == ["0", "1", "2", "3", "4"]

    out = str(tmp_path / "captions.json")
    assert caption.main(["--checkpoint", "runs/demo/model_best.pth.tar", "--out", out]) == 0
    generated = [entry["caption"] for entry in json.load(open(out))]
    references = captioning.split_references("data/toy_precomp", "test", len(generated))
    shuffled = generated[1:] + generated[:1]
    own_cider = captioning.evaluate_captions(references, generated)["CIDEr-D"]
    shuffled_cider = captioning.evaluate_captions(references, shuffled)["CIDEr-D"]
    assert own_cider > 1.5 and own_cider > 4 * shuffled_cider, (own_cider, shuffled_cider)
    precision, recall = concept_precision_recall(generated, references)
    # Measured 0.98 / 0.81 with torch 2.13.0 (CPU build) and 0.94 / 0.64 with 2.14.1: the demo's
    # short training is sensitive to the kernels' float order; another image's caption gets ~0.1.
    assert precision > 0.9 and recall > 0.5, (precision, recall)
    # Three of 24 concepts per image: another image's caption names few of them.
    assert max(concept_precision_recall(shuffled, references)) < 0.3
