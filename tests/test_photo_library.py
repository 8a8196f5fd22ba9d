"""The photo library: index.py makes it and keeps it current, search.py answers from it.

Scores are checked against the model's own similarity, rankings against brute force, ensembles
against evaluation's average; changes of the folders, kills, bad photos and other models are
each exercised on small generated collections (toy pictures with their rows, a tiny detector)."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import index
import search
from conftest import ROOT
from detection import pipeline, policies
from evaluation import average_similarity
from inference import encode_images, encode_text, load_models
from photo_library import indexer as indexer_module
from photo_library import scan as scan_module
from photo_library import store as store_module
from photo_library.lock import LibraryLock
from photo_library.searcher import Searcher
from photo_library.store import Library
from photo_library.vectors import VectorIndex
from photo_world import DETECTOR_DIM, TOY_DIM, checkpoint, make_world, photo_folder, random_photo
from utils.errors import DataError, OptionError
from utils.obj36 import format_obj36_line, read_rows

QUERY = "a dog next to a bench and a kite"
FAST = ["--min_size", "128", "--max_size", "200", "--boxes", "10"]  # the tiny detector on small inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def library(world, tmp_path_factory):
    """The toy pictures indexed from their rows with the first checkpoint."""
    lib = str(tmp_path_factory.mktemp("libraries") / "toy")
    assert (
        index.main(
            ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
        )
        == 0
    )
    return lib


def rows_by_name(world):
    return {row["img_id"] + ".png": row for row in (row for row, _ in read_rows(world.rows))}


def own_scores(world, checkpoint, text, names):
    """The checkpoint's similarity of the query with each named toy picture's row, as the model computes it."""
    _, vocab, (model,) = load_models([checkpoint], need_data=False)
    rows = rows_by_name(world)
    images = encode_images(model, [rows[name]["features"] for name in names])
    return (images @ encode_text(model, vocab, text).T)[:, 0].numpy(), images, encode_text(model, vocab, text)


def out_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Searching


def test_scores_are_the_models_similarity_and_the_ranking_is_brute_force(world, library):
    hits, query = Searcher(library).text(QUERY, k=18)
    names = sorted(os.listdir(world.images))
    expected, _, _ = own_scores(world, world.checkpoints[0], QUERY, names)
    by_name = dict(zip(names, expected))
    assert len(hits) == 18 and query.unknown == []
    for hit in hits:
        assert abs(hit["score"] - by_name[hit["name"]]) < 1e-6
    brute = sorted(names, key=lambda name: -by_name[name])
    assert [hit["name"] for hit in hits] == brute
    top5 = Searcher(library).text(QUERY, k=5)[0]
    assert [hit["name"] for hit in top5] == brute[:5] and [hit["rank"] for hit in top5] == [1, 2, 3, 4, 5]


def test_the_records_of_a_searchs_hits_are_read_together(library, monkeypatch):
    records = Library.open(library)
    ids, vectors = records.embeddings()
    asked = [*ids.tolist(), int(ids.max()) + 1, int(ids[0])]  # one gone, one twice
    for chunk, reads in ((store_module.ID_CHUNK, 1), (4, 5)):  # 19 distinct ids in parameter lists of 4: 5 reads
        monkeypatch.setattr(store_module, "ID_CHUNK", chunk)
        statements = []
        records.db.set_trace_callback(statements.append)
        found = records.photos(asked)
        records.db.set_trace_callback(None)
        assert len(statements) == 1 + 2 * reads  # the number of models, then rows and files: not three a photo
        assert sorted(found.records) == ids.tolist() and found.damaged == {}
        for photo, vector in zip(ids.tolist(), vectors):
            record = found.records[photo]
            np.testing.assert_array_equal(record["embedding"], vector)
            assert record["path"] == records.files_of(photo)[0][0] and record["id"] == photo
        assert sorted(records.embedding_of(asked)) == ids.tolist()


def test_an_ensemble_scores_as_evaluation_averages_its_models(world, tmp_path):
    lib = str(tmp_path / "ensemble")
    assert (
        index.main(
            ["--images", world.images, "--checkpoint", *world.checkpoints, "--regions", *world.rows, "--library", lib]
        )
        == 0
    )
    hits, _ = Searcher(lib).text(QUERY, k=18)
    names = [hit["name"] for hit in hits]
    embeddings = []
    for model in world.checkpoints:
        _, images, caption = own_scores(world, model, QUERY, names)
        # evaluation's layout: one image row per caption, five captions per image.
        embeddings.append((np.repeat(images.numpy(), 5, axis=0), np.repeat(caption.numpy(), 5 * len(names), axis=0)))
    averaged = average_similarity(embeddings)[:, 0].numpy()
    np.testing.assert_allclose([hit["score"] for hit in hits], averaged, atol=1e-6)
    assert all(np.diff([hit["score"] for hit in hits]) <= 0)


def test_unknown_words_are_named_and_a_query_of_only_unknown_words_is_refused(library, capsys):
    assert search.main(["--library", library, "a dog and a kayak", "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "warning: 'kayak' is not in the vocabulary: read as <unk>\n"
    assert captured.out.startswith("The top 2 of 18 photos for 'a dog and a kayak':\n    1. ")
    assert search.main(["--library", library, "kayak paddle"]) == 2
    assert capsys.readouterr().err == (
        "error: the query 'kayak paddle': none of its words is in the model's vocabulary ('kayak', 'paddle'); "
        "rephrase it\n"
    )


def test_json_and_maps(world, library, tmp_path, capsys):
    assert search.main(["--library", library, QUERY, "-k", "3", "--json", "--maps", str(tmp_path / "maps")]) == 0
    out, err = capsys.readouterr()
    answer = json.loads(out)  # stdout holds the JSON alone; the maps written are said on stderr
    assert answer["query"] == QUERY and answer["photos"] == 18 and answer["unknown_words"] == []
    assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3]
    assert all(os.path.isfile(hit["path"]) and hit["path"].startswith(world.images) for hit in answer["results"])
    drawn = sorted(os.listdir(tmp_path / "maps"))
    expected = [f"{hit['rank']:02d}_{os.path.splitext(hit['name'])[0]}.png" for hit in answer["results"]]
    assert drawn == expected
    assert err.splitlines() == [f"written: {tmp_path / 'maps' / name}" for name in expected]
    from PIL import Image

    with Image.open(tmp_path / "maps" / drawn[0]) as png:
        assert png.text["Title"].startswith(f"1. {answer['results'][0]['name']}, score ")
        assert png.size[0] > 900


def test_like_a_photo_in_and_outside_the_library(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder, 6)
    lib = str(tmp_path / "lib")
    base = ["--checkpoint", world.detector_checkpoint, "--detector", world.detector, *FAST, "--library", lib]
    assert index.main(["--images", str(folder), *base]) == 0
    searcher = Searcher(lib)
    hits = searcher.like(paths[0], k=3)
    assert [hit["rank"] for hit in hits] == [1, 2, 3] and os.path.basename(paths[0]) not in [
        hit["name"] for hit in hits
    ]
    outside = tmp_path / "elsewhere.png"
    shutil.copy(paths[2], outside)  # the same content: found as the library's photo, itself left out
    assert os.path.basename(paths[2]) not in [hit["name"] for hit in searcher.like(str(outside), k=5)]
    new = str(tmp_path / "new.png")  # not in the library: extracted with its detector and settings first
    shutil.copy(paths[4], new)
    records = Library.open(lib)
    held = records.embedding_of([records.photo_of_path(paths[4])])[records.photo_of_path(paths[4])]
    random_photo(paths[4], seed=3)
    os.utime(paths[4], ns=(time.time_ns(), time.time_ns() + 10**9))
    assert records.photo_of_path(paths[4]) is None  # the file is no longer the photo recorded for its path
    assert index.main(["--library", lib, *FAST]) == 0  # the library's own copy of that content is gone
    searcher = Searcher(lib)
    hits = searcher.like(new, k=6)
    assert len(hits) == 6 and hits[0]["score"] >= hits[-1]["score"]
    vector, photo = searcher.photo_vector(searcher.current(), new)  # extracted as the library extracted that content
    assert photo is None
    np.testing.assert_allclose(vector, held, atol=1e-6)
    capsys.readouterr()
    assert search.main(["--library", lib, "--like", new, "-k", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"The 2 photos of 6 most like {new}:\n")


def test_lxmert_reranks_the_candidates_with_its_matching_head(world, library, tmp_path):
    pytest.importorskip("transformers")
    from test_lxmert_match import save_model
    from transformers import LxmertForPreTraining

    from lxmert.loading import load_tokenizer
    from lxmert.scoring import caption_tokens

    model_dir = save_model(tmp_path / "lxmert", feat_dim=32)
    searcher = Searcher(library)
    searcher.enable_rerank(model_dir, candidates=8)
    first, _ = searcher.text(QUERY, k=8)
    reranked, _ = searcher.text(QUERY, k=8, rerank=True)
    assert {hit["id"] for hit in reranked} == {hit["id"] for hit in first}
    assert [hit["score"] for hit in reranked] == sorted((hit["lxmert"] for hit in reranked), reverse=True)
    model = LxmertForPreTraining.from_pretrained(model_dir).eval()
    ids, mask = caption_tokens(load_tokenizer(model_dir, model.config.vocab_size), [QUERY])
    rows = rows_by_name(world)
    for hit in reranked:
        row = rows[hit["name"]]
        position = torch.from_numpy(row["boxes"] / np.array([row["img_w"], row["img_h"]] * 2, dtype=np.float32))
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=torch.zeros_like(ids),
                visual_feats=torch.from_numpy(row["features"])[None],
                visual_pos=position[None],
            ).cross_relationship_score
        assert abs(torch.softmax(logits.double(), -1)[0, 1].item() - hit["lxmert"]) < 1e-5
    searcher.enable_rerank(model_dir, candidates=8, alpha=0.0)  # VSRN alone: the first stage's order back
    assert [hit["id"] for hit in searcher.text(QUERY, k=8, rerank=True)[0]] == [hit["id"] for hit in first]


# ---------------------------------------------------------------------------------------------
# Keeping current


def test_an_unchanged_rerun_reads_no_file_and_loads_no_model(library, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("read or loaded on an unchanged rerun")

    monkeypatch.setattr(scan_module, "file_digest", never)
    monkeypatch.setattr("photo_library.recipe.file_digest", never)
    monkeypatch.setattr("inference.load_models", never)
    assert index.main(["--library", library]) == 0
    assert out_line(capsys) == f"{library}: 0 photos added, 18 unchanged (not read); it holds 18 photos (flat index)"


def test_new_changed_moved_copied_and_removed_photos(world, tmp_path, monkeypatch, capsys):
    seen = []
    batch = pipeline.extract_regions_batch
    monkeypatch.setattr(
        pipeline,
        "extract_regions_batch",
        lambda det, images, settings: (seen.extend(images), batch(det, images, settings))[1],
    )
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder, 5)
    lib = str(tmp_path / "lib")
    args = ["--checkpoint", world.detector_checkpoint, "--detector", world.detector, *FAST, "--library", lib]
    assert index.main(["--images", str(folder), *args]) == 0
    assert out_line(capsys) == f"{lib}: 5 photos added; it holds 5 photos (flat index)" and len(seen) == 5
    records = Library.open(lib)
    moved_photo = records.photo_of_path(paths[0])
    changed_photo, removed_photo = records.photo_of_path(paths[3]), records.photo_of_path(paths[2])

    (folder / "sub").mkdir()
    os.rename(paths[0], folder / "sub" / "renamed.png")  # moved: a new path, the same photo
    shutil.copy(paths[1], folder / "copy.png")  # copied: a second path of one photo
    os.remove(paths[2])  # removed
    random_photo(paths[3], seed=11)  # changed: new content at the same path
    random_photo(str(folder / "new.png"), seed=12)  # new
    shutil.copy(folder / "new.png", folder / "new copy.png")  # and a copy of it: one photo more, not two
    assert index.main(["--library", lib, *FAST]) == 0
    assert out_line(capsys) == (
        f"{lib}: 2 photos added, 3 moved, renamed or copied (their path updated), 2 removed, 2 unchanged (not read); "
        "it holds 5 photos (flat index)"
    )
    assert len(seen) == 7  # only the two new contents went through the detector
    records = Library.open(lib)
    assert records.photo_of_path(str(folder / "sub" / "renamed.png")) == moved_photo
    assert records.photo_of_path(str(folder / "copy.png")) == records.photo_of_path(paths[1])
    assert records.photo(removed_photo) is None and records.photo(changed_photo) is None
    assert records.photo_of_path(paths[3]) not in (None, changed_photo)
    assert records.count() == 5 and len(records.files()) == 7
    assert records.photo_of_path(str(folder / "new copy.png")) == records.photo_of_path(str(folder / "new.png"))
    index_file = VectorIndex.load(os.path.join(lib, "index.faiss"))
    assert index_file.index.ntotal == 5 and index_file.generation == records.meta("generation")
    found = {hit["id"] for hit in Searcher(lib).text(QUERY, k=10)[0]}
    assert found == {row[0] for row in records.db.execute("SELECT id FROM photos")}


SLOW = (
    "import sys, time; sys.path.insert(0, sys.argv.pop(1)); from photo_library import indexer, photos; "
    "indexer.COMMIT_EVERY = 2; "
    "vectors = photos.image_vectors; photos.image_vectors = lambda *a: (time.sleep(0.2), vectors(*a))[1]; "
    "import index; sys.exit(index.main(sys.argv[1:]))"
)


def generation(lib):
    try:
        with sqlite3.connect(f"file:{os.path.join(lib, 'library.sqlite3')}?mode=ro", uri=True) as db:
            return json.loads(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
    except (sqlite3.Error, TypeError):
        return -1


def test_killed_at_any_point_the_rerun_ends_with_every_photo_once(world, library, tmp_path):
    lib = str(tmp_path / "killed")
    args = ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for committed in (-1, 1, 4):  # killed before anything is committed, after one batch, after four
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW, ROOT, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while generation(lib) < committed and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        assert generation(lib) >= committed
        if committed > 0:  # the library opens and answers with what was committed (its index file may lag)
            held = Library.open(lib).count()
            assert held >= 2 * committed and len(Searcher(lib).text(QUERY, k=18)[0]) == held
    assert index.main(args) == 0
    killed, clean = Library.open(lib), Library.open(library)
    rows = "SELECT digest, boxes, objects FROM photos ORDER BY digest"
    assert killed.db.execute(rows).fetchall() == clean.db.execute(rows).fetchall()
    # Batches of another size round the embeddings' last bits differently.
    vectors = "SELECT embedding FROM photos ORDER BY digest"
    for (a,), (b,) in zip(killed.db.execute(vectors).fetchall(), clean.db.execute(vectors).fetchall()):
        np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), atol=1e-6)
    files = "SELECT path, size, digest, reason FROM files ORDER BY path"
    assert killed.db.execute(files).fetchall() == clean.db.execute(files).fetchall()
    assert killed.count() == 18 and VectorIndex.load(os.path.join(lib, "index.faiss")).index.ntotal == 18
    assert [hit["name"] for hit in Searcher(lib).text(QUERY, k=18)[0]] == [
        hit["name"] for hit in Searcher(library).text(QUERY, k=18)[0]
    ]


def test_a_second_index_run_is_refused_while_one_runs(library, capsys):
    lock = LibraryLock(library)
    try:
        assert index.main(["--library", library]) == 2
        assert capsys.readouterr().err == (
            f"error: {library}: another index.py (pid {os.getpid()}) is updating this library; wait for it to finish\n"
        )
    finally:
        lock.release()
    assert index.main(["--library", library]) == 0


def test_a_damaged_index_file_is_rebuilt_from_the_records(world, tmp_path, capsys):
    lib = str(tmp_path / "lib")
    args = ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
    assert index.main(args) == 0
    expected = [hit["id"] for hit in Searcher(lib).text(QUERY, k=5)[0]]
    path = os.path.join(lib, "index.faiss")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    assert [hit["id"] for hit in Searcher(lib).text(QUERY, k=5)[0]] == expected
    assert "damaged vector index" in capsys.readouterr().err
    assert index.main(["--library", lib]) == 0
    assert f"{path}: missing or damaged vector index" in capsys.readouterr().err
    assert VectorIndex.load(path).index.ntotal == 18


def test_other_models_are_refused_and_rebuild_re_embeds_the_kept_regions(world, tmp_path, monkeypatch, capsys):
    lib = str(tmp_path / "lib")
    first, second = world.checkpoints
    assert (
        index.main(["--images", world.images, "--checkpoint", first, "--regions", *world.rows, "--library", lib]) == 0
    )
    capsys.readouterr()
    records = Library.open(lib)
    made = records.meta("checkpoints")[0]
    assert index.main(["--library", lib, "--checkpoint", second]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {lib} was made with {made['path']} (sha256 {made['digest'][:12]}); {os.path.abspath(second)} (sha256 "
    )
    assert err.endswith(
        "would embed other vectors: give the library's checkpoints, "
        "or --rebuild to re-embed its kept regions with these\n"
    )
    with pytest.raises(OptionError, match="would embed other vectors"):
        Searcher(lib, checkpoints=[second])
    assert search.main(["--library", lib, "--checkpoint", second, QUERY]) == 2
    assert index.main(["--library", lib, "--detector", world.detector, "--policy", "hf"]) == 2
    assert "was made with the region settings" in capsys.readouterr().err
    other_regions = checkpoint(os.path.join(world.root, "run_other_regions"), world.vocab, DETECTOR_DIM, 3)
    assert index.main(["--library", lib, "--checkpoint", other_regions, "--rebuild"]) == 2
    assert capsys.readouterr().err == (
        f"error: --checkpoint {os.path.abspath(other_regions)}: its image encoder takes {DETECTOR_DIM}-d regions; "
        f"{lib} keeps {TOY_DIM}-d ones: these checkpoints need a new library\n"
    )
    before = {hit["name"]: hit["score"] for hit in Searcher(lib).text(QUERY, k=18)[0]}

    def stopped(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexer_module, "image_vectors", stopped)  # Ctrl-C in the middle of a rebuild
    assert index.main(["--library", lib, "--checkpoint", second, "--rebuild"]) == 130
    monkeypatch.undo()
    assert Library.open(lib).meta("checkpoints")[0]["digest"] == made["digest"]  # still the first model's library
    assert {hit["name"]: hit["score"] for hit in Searcher(lib).text(QUERY, k=18)[0]} == before
    capsys.readouterr()
    assert index.main(["--library", lib, "--checkpoint", second, "--rebuild"]) == 0
    assert "18 re-embedded" in out_line(capsys)
    hits, _ = Searcher(lib).text(QUERY, k=18)
    expected, _, _ = own_scores(world, second, QUERY, [hit["name"] for hit in hits])
    np.testing.assert_allclose([hit["score"] for hit in hits], expected, atol=1e-6)
    with pytest.raises(OptionError, match="would embed other vectors"):
        Searcher(lib, checkpoints=[first])


def test_bad_photos_are_named_recorded_and_not_retried_until_they_change(world, tmp_path, monkeypatch, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    photo_folder(world, folder, 3)
    (folder / "notes.txt").write_text("not a photo at all")  # not a picture's name: ignored
    (folder / "text.jpg").write_text("not a picture")
    good = (folder / "toy_dev_00000.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (400, 400)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    lib = str(tmp_path / "lib")
    args = [
        "--images",
        str(folder),
        "--checkpoint",
        world.detector_checkpoint,
        "--detector",
        world.detector,
        *FAST,
        "--library",
        lib,
    ]
    assert index.main(args) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"skipped: {folder}/") for line in lines)
    assert any("text.jpg: not a picture file Pillow can read" in line for line in lines)
    assert any("cut.png: unreadable or truncated picture" in line for line in lines)
    assert any("huge.png: more than 100000 pixels" in line for line in lines)
    assert (
        out.strip().splitlines()[-1]
        == f"{lib}: 3 photos added, 3 failed (each named above); it holds 3 photos (flat index)"
    )
    reasons = {os.path.basename(path): row[4] for path, row in Library.open(lib).files().items() if row[3] is None}
    assert sorted(reasons) == ["cut.png", "huge.png", "text.jpg"]

    monkeypatch.setattr(policies, "read_image", lambda path, **how: pytest.fail(f"{path} was read again"))
    assert index.main(["--library", lib, *FAST]) == 0
    assert out_line(capsys) == f"{lib}: 0 photos added, 6 unchanged (not read); it holds 3 photos (flat index)"
    monkeypatch.undo()
    random_photo(str(folder / "cut.png"), seed=5)  # mended: read again, and indexed
    moved = str(tmp_path / "elsewhere" / "detector.bin")  # the same weights at another path are the same detector
    os.makedirs(os.path.dirname(moved))
    shutil.copy(world.detector, moved)
    assert index.main(["--library", lib, "--detector", moved, *FAST]) == 0
    assert out_line(capsys) == f"{lib}: 1 photo added, 5 unchanged (not read); it holds 4 photos (flat index)"
    assert Library.open(lib).meta("detector")["path"] == moved


def test_float16_regions_halve_the_disk_and_re_embed_alike(world, library, tmp_path, capsys):
    lib = str(tmp_path / "half")
    args = ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
    assert index.main([*args, "--features_dtype", "float16"]) == 0
    size = "SELECT SUM(LENGTH(data)) FROM features"
    assert Library.open(lib).db.execute(size).fetchone()[0] * 2 == Library.open(library).db.execute(size).fetchone()[0]
    half, full = (
        Searcher(lib).text(QUERY, k=18)[0],
        {hit["name"]: hit["score"] for hit in Searcher(library).text(QUERY, k=18)[0]},
    )
    assert max(abs(hit["score"] - full[hit["name"]]) for hit in half) < 1e-3
    assert index.main(["--library", lib, "--rebuild"]) == 0
    assert [hit["score"] for hit in Searcher(lib).text(QUERY, k=18)[0]] == [hit["score"] for hit in half]
    assert index.main(["--library", lib, "--features_dtype", "float32"]) == 2
    assert "keeps its region features as float16; it is chosen when a library is made" in capsys.readouterr().err


def test_an_hnsw_index_hides_removed_photos_and_is_rebuilt_when_worn(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder)
    lib = str(tmp_path / "lib")
    args = ["--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
    assert index.main(["--images", str(folder), *args, "--index", "hnsw"]) == 0
    assert "hnsw index of 18 photos built" in capsys.readouterr().out
    os.remove(paths[0])
    assert index.main(["--library", lib]) == 0
    assert out_line(capsys).endswith("it holds 17 photos (hnsw index)")
    kept = VectorIndex.load(os.path.join(lib, "index.faiss"))
    assert len(kept.hidden) == 1 and kept.index.ntotal == 18  # caught up, not rebuilt
    assert os.path.basename(paths[0]) not in [hit["name"] for hit in Searcher(lib).text(QUERY, k=18)[0]]
    for path in paths[1:3]:
        os.remove(path)
    assert index.main(["--library", lib]) == 0
    assert VectorIndex.load(os.path.join(lib, "index.faiss")).index.ntotal == 15  # 3 of 18 hidden: rebuilt


def test_approximate_indexes_find_what_exact_search_finds(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 48)).astype(np.float32)
    vectors = centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 48)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, 4001, dtype=np.int64) * 3
    rows = {int(i): v for i, v in zip(ids, vectors)}
    exact = lambda wanted: {i: rows[i] for i in wanted}  # noqa: E731
    for kind, least in (("hnsw", 0.95), ("ivfpq", 0.9)):
        built = VectorIndex.build(kind, ids, vectors, 1, 0, memory_bytes=4000 * 16)
        assert built.recall_at_10(ids, vectors) >= least, kind
        scores, found = built.search(vectors[:3], 10, exact)
        np.testing.assert_allclose(
            scores, [[float(rows[int(i)] @ q) for i in row] for row, q in zip(found, vectors[:3])], atol=1e-6
        )
        built.remove(ids[:1])
        assert int(ids[0]) not in built.search(vectors[:1], 10, exact)[1][0]
        built.save(str(tmp_path / f"{kind}.faiss"))
        loaded = VectorIndex.load(str(tmp_path / f"{kind}.faiss"))
        np.testing.assert_array_equal(
            loaded.search(vectors[5:8], 10, exact)[1], built.search(vectors[5:8], 10, exact)[1]
        )
    (tmp_path / "bad.faiss").write_bytes(b"VSRN-LIBRARY-INDEX-1\n" + b"\x00" * 40)
    with pytest.raises(DataError, match="damaged vector index"):
        VectorIndex.load(str(tmp_path / "bad.faiss"))


def test_photos_without_regions_wait_for_a_detector(world, tmp_path, capsys):
    lib = str(tmp_path / "lib")
    test_rows = [row for row in world.rows if row.endswith("test_obj36.tsv")]
    assert (
        index.main(
            ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *test_rows, "--library", lib]
        )
        == 0
    )
    assert out_line(capsys) == (
        f"{lib}: 12 photos added, 6 without regions: no row in --regions that fits and no --detector "
        "(left for a later run); "
        "it holds 12 photos (flat index)"
    )
    unfit = str(tmp_path / "unfit_obj36.tsv")  # rows of other picture sizes: said, and the photos still wait
    with open(unfit, "w") as out:
        for row, _ in read_rows([path for path in world.rows if path.endswith("dev_obj36.tsv")]):
            out.write(format_obj36_line(row["img_id"], {**row, "img_w": row["img_w"] + 1}))
    assert index.main(["--library", lib, "--regions", unfit]) == 0
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 6 and all(line.endswith("; left to the detector") for line in err.splitlines())
    assert "picture, the file is" in err
    assert out.strip().splitlines()[-1].startswith(f"{lib}: 0 photos added, 6 without regions:")
    assert index.main(["--library", lib, "--regions", *world.rows]) == 0
    assert out_line(capsys) == f"{lib}: 6 photos added, 12 unchanged (not read); it holds 18 photos (flat index)"


def test_a_library_that_is_not_one_and_bad_flags_are_one_line(world, tmp_path, capsys):
    lib = str(tmp_path / "lib")
    cases = {
        ("--library", lib): f"error: --library {lib}: not a library yet; make it with --images DIR and --checkpoint M",
        (
            "--library",
            lib,
            "--images",
            world.images,
            "--checkpoint",
            str(tmp_path / "absent.pth"),
        ): f"error: --checkpoint {tmp_path / 'absent.pth'}: checkpoint not found",
        (
            "--library",
            lib,
            "--images",
            str(tmp_path / "none"),
            "--checkpoint",
            world.checkpoints[0],
        ): f"error: --images {tmp_path / 'none'}: no such folder",
        ("--library", lib, "--batch_size", "0"): "error: --batch_size and --workers: expected at least 1",
        ("--library", lib, "--device", "gpu"): "error: --device gpu: expected cpu or cuda (cuda:N)",
    }
    for args, message in cases.items():
        assert index.main(list(args)) == 2, args
        assert capsys.readouterr().err == message + "\n"
    assert search.main(["--library", lib, QUERY]) == 2
    assert (
        capsys.readouterr().err
        == f"error: --library {lib}: not a photo library (no library.sqlite3); make one with index.py\n"
    )


def test_a_failing_database_is_one_line_naming_it(library, monkeypatch, capsys):
    def full(*_):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Library, "add_roots", full)
    assert index.main(["--library", library]) == 2
    assert capsys.readouterr().err == f"error: {library}/library.sqlite3: database or disk is full\n"
    monkeypatch.setattr(Library, "photos", full)  # the records of the hits
    assert search.main(["--library", library, QUERY]) == 2
    assert capsys.readouterr().err == f"error: {library}/library.sqlite3: database or disk is full\n"


def test_torchrun_shards_the_detector_and_writes_the_single_process_library(world, tmp_path):
    folder = tmp_path / "photos"
    photo_folder(world, folder, 5)
    args = ["--images", str(folder), "--checkpoint", world.detector_checkpoint, "--detector", world.detector, *FAST]
    assert index.main([*args, "--library", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "index.py",
            *args,
            "--library",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = Library.open(str(tmp_path / "one")), Library.open(str(tmp_path / "two"))
    query = "SELECT digest, boxes, objects FROM photos ORDER BY digest"
    assert one.db.execute(query).fetchall() == two.db.execute(query).fetchall()
    for (a,), (b,) in zip(
        *(lib.db.execute("SELECT embedding FROM photos ORDER BY digest").fetchall() for lib in (one, two))
    ):
        np.testing.assert_allclose(np.frombuffer(a, np.float32), np.frombuffer(b, np.float32), atol=1e-5)
    assert DETECTOR_DIM == one.meta("feature_dim")
