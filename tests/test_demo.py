"""The README's demos as shipped: `python3 train.py --demo` learns to retrieve and to caption, and
`python3 search.py --demo` searches the toy world's pictures with what it learnt."""

import json
import re


import pytest

import caption
import captioning
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


@pytest.mark.slow
def test_the_demo_learns_to_retrieve_and_to_caption(demo_run, monkeypatch, no_java):
    tmp_path, printed = demo_run
    monkeypatch.chdir(tmp_path)
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


@pytest.mark.slow
def test_the_search_demo_answers_queries_about_the_toy_objects(demo_run, monkeypatch, capsys):
    """`python3 search.py --demo` on the demo's trained checkpoint: the toy world's 1,200 pictures indexed
    from their rows, and the example queries' best photos show the objects they name."""
    import search
    from photo_library import server

    monkeypatch.chdir(demo_run[0])
    served = []
    monkeypatch.setattr(
        server, "serve", lambda searcher, host, port, allowed: served.append((searcher.library.count(), host, port))
    )
    assert search.main(["--demo"]) == 0
    assert served == [(1200, "127.0.0.1", 8000)]
    out = capsys.readouterr().out
    assert "runs/demo_library: 1200 photos added; it holds 1200 photos (flat index)" in out
    shown = {}
    for split in ("train", "dev", "test"):
        with open(f"data/toy_images/{split}_captions.txt") as f:
            for line in f:
                image_id, text = line.rstrip("\n").split("\t")
                shown.setdefault(image_id, set()).update(concepts_named(text))
    from photo_library.demo import QUERIES

    for query in QUERIES:
        line = next(line for line in out.splitlines() if line.startswith(f"  {query!r}: "))
        names = re.findall(r"(toy_\w+)\.png", line)
        assert len(names) == 3
        wanted = concepts_named(query)
        # The best photo shows every object the query names, the next ones at least one (chance: about 3 in 24).
        assert wanted <= shown[names[0]] and all(wanted & shown[name] for name in names), (
            query,
            [shown[n] for n in names],
        )
