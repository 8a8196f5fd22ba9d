"""What the reorganisation of region extraction (one front door, RegionSettings), of the photo library's indexer
and of LXMERT's requests must not change: extraction TSVs, a library's search scores and LXMERT's scores of the
same inputs, byte for byte, from this checkout and from the commit before it (REFERENCE), run side by side on
this machine by the same Python."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from photo_world import make_world

pytest.importorskip("transformers")
from test_lxmert_match import NAME, save_model, write_split  # noqa: E402

REFERENCE = "8c64f07"  # main before the reorganisation
FAST = ["--min_size", "128", "--max_size", "200"]  # the tiny detector on small inputs
# Runs the jobs of one tree in one process: [script, flags..., file for its stdout or None] each.
DRIVER = """
import contextlib, json, os, runpy, sys
sys.path.insert(0, os.getcwd())
for *argv, out in json.loads(sys.argv[1]):
    sys.argv = argv
    with open(out or os.devnull, "w") as f, contextlib.redirect_stdout(f):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
"""


@pytest.fixture(scope="module")
def reference_tree(tmp_path_factory):
    """The project as it was at REFERENCE, unpacked from this clone's history."""
    root = tmp_path_factory.mktemp("reference")
    archive = subprocess.run(["git", "-C", ROOT, "archive", REFERENCE], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {REFERENCE} is not in this clone's history (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return str(root)


def run_jobs(tree, jobs, out, added=None):
    """Run `jobs` ((script, flags, file for stdout or None)) with the scripts of `tree`, each script with the flags
    `added` gives it (flags the reference had not); their files in `out`."""
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "VSRN_CACHE": os.path.join(out, "cache"), "HF_HUB_OFFLINE": "1"}
    commands = [
        [
            script,
            *[arg.format(out=out) for arg in flags],
            *(added or {}).get(script, ()),
            os.path.join(out, stdout) if stdout else None,
        ]
        for script, flags, stdout in jobs
    ]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=tree, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def read(path, out):
    """The file's bytes, its run's folder, region cache file (named by a digest of its key) and speed masked."""
    with open(path, "rb") as f:
        data = f.read().replace(out.encode(), b"OUT")
    return re.sub(rb"[\d,.]+ pairs/s", b"N pairs/s", re.sub(rb"regions/\w+\.tsv", b"regions/CACHE.tsv", data))


@pytest.mark.slow
def test_tsvs_library_scores_and_lxmert_scores_are_those_of_the_reference(reference_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("unchanged")
    world = make_world(root / "world", sizes={"test": 4, "dev": 2})
    lxmert = save_model(root / "lxmert", feat_dim=64)
    write_split(root / "data" / NAME, feat_dim=64)
    captions = root / "captions.tsv"
    names = sorted(name[:-4] for name in os.listdir(world.images))
    captions.write_text("".join(f"{name}\ta dog on the grass near {i} cars\n" for i, name in enumerate(names)))
    detector = ["--detector", world.detector]

    def extraction(tsv, *settings):
        """extract_regions.py's job writing {out}/`tsv` from the toy pictures with `settings`."""
        return (
            "extract_regions.py",
            ["--images", world.images, "--weights", world.detector, "--out", "{out}/" + tsv, *settings, *FAST],
            None,
        )

    jobs = [
        extraction("36.tsv"),
        extraction("hf.tsv", "--policy", "hf", "--boxes", "8"),
        extraction("var.tsv", "--min_boxes", "2", "--max_boxes", "12", "--conf_thresh", "0.1"),
        (
            "index.py",
            [
                "--images",
                world.images,
                "--checkpoint",
                world.detector_checkpoint,
                *detector,
                "--boxes",
                "10",
                *FAST,
                "--library",
                "{out}/detected",
            ],
            None,
        ),
        ("search.py", ["--library", "{out}/detected", "a dog next to a bench", "-k", "5", "--json"], "detected.json"),
        (
            "index.py",
            [
                "--images",
                world.images,
                "--checkpoint",
                *world.checkpoints,
                "--regions",
                *world.rows,
                "--library",
                "{out}/rows",
            ],
            None,
        ),
        ("search.py", ["--library", "{out}/rows", "a red umbrella near a tree", "-k", "5", "--json"], "rows.json"),
        (
            "lxmert_match.py",
            [
                "--images",
                world.images,
                "--captions",
                str(captions),
                *detector,
                "--model",
                lxmert,
                "--save_scores",
                "{out}/pictures.csv",
                "{out}/pictures.json",
            ],
            "pictures.txt",
        ),
        (
            "lxmert_match.py",
            [
                "--model",
                lxmert,
                "--data_path",
                str(root / "data"),
                "--data_name",
                NAME,
                "--save_scores",
                "{out}/split.npy",
            ],
            "split.txt",
        ),
    ]
    before, after = str(root / "before"), str(root / "after")
    run_jobs(reference_tree, jobs, before)
    # The scores of the model's own text encoder: search.py's default became its int8 copy after REFERENCE.
    run_jobs(ROOT, jobs, after, added={"search.py": ["--text_encoder", "float32"]})
    outputs = [
        "36.tsv",
        "hf.tsv",
        "var.tsv",
        "detected.json",
        "rows.json",
        "pictures.csv",
        "pictures.json",
        "pictures.txt",
        "split.npy",
        "split.txt",
    ]
    for name in outputs:
        assert read(os.path.join(after, name), after) == read(os.path.join(before, name), before), name
    assert json.loads(read(os.path.join(after, "detected.json"), after))["results"]  # photos were found and scored
