"""The photo library under damage and on odd file systems, each case as a reliability review reproduced it:
folders made unreadable, emptied or unplugged, a file unreadable once, random bytes in index.faiss, an index
ahead of its records, a damaged record, a read-only library; and the smaller points a newcomer met (a refused
first run, row files, Ctrl-C, a busy port, --like misuse, an empty library, a checkpoint moved after a rebuild).

Permissions bind root only without its capability to ignore them: as root, the runs that must meet a
permission error are index.py or search.py processes started through setpriv without it."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import index
import search
from conftest import ROOT
from photo_library import indexer as indexer_module
from photo_library.searcher import Searcher
from photo_library.store import Library
from photo_library.vectors import VectorIndex
from photo_world import make_world, photo_folder, random_photo

QUERY = "a dog next to a bench and a kite"
FAST = ["--min_size", "128", "--max_size", "200", "--boxes", "10"]  # the tiny detector on small inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), seeds=(0, 1))


def made(world, folder, lib, *more):
    """`folder` indexed from the toy rows with the first checkpoint into `lib`."""
    args = ["--images", str(folder), "--checkpoint", world.checkpoints[0], "--regions", *world.rows]
    assert index.main([*args, "--library", str(lib), *more]) == 0
    return str(lib)


def answers(lib, k=18):
    """{photo file name: score} of the query's top k."""
    return {hit["name"]: hit["score"] for hit in Searcher(str(lib)).text(QUERY, k=k)[0]}


def assert_same(found, expected):
    assert sorted(found) == sorted(expected)
    np.testing.assert_allclose([found[name] for name in expected], list(expected.values()), atol=1e-6)


def bound_by_permissions(command):
    """`command` run so that permission bits bind it: as root, without the capability to ignore them."""
    if os.geteuid() != 0:
        return command
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permission bits cannot be made to bind")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


def run_script(script, *args):
    done = subprocess.run(
        bound_by_permissions([sys.executable, os.path.join(ROOT, script), *args]),
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def last_line(text):
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# No silent loss


def test_an_unreadable_folder_keeps_its_photos_says_so_and_exits_non_zero(world, tmp_path):
    folder = tmp_path / "photos"
    photo_folder(world, folder)
    lib = made(world, folder, tmp_path / "lib")
    folder.chmod(0o000)  # another owner's chmod 700
    try:
        code, out, err = run_script("index.py", "--library", lib)
    finally:
        folder.chmod(0o755)
    assert code == 3, err
    assert err == (
        f"error: {folder}: cannot be listed (Permission denied); its 18 photos stay in the library as they were: "
        f"--forget {folder} removes them\n"
    )
    assert last_line(out) == (
        f"{lib}: 0 photos added, 18 kept as they were (their folders could not be looked at: named below); "
        "it holds 18 photos (flat index)"
    )
    assert Library.open(lib).count() == 18 and len(Library.open(lib).files()) == 18
    assert index.main(["--library", lib]) == 0  # readable again: nothing was lost, nothing is redone
    folder.chmod(0o000)
    try:
        code, out, err = run_script("index.py", "--library", lib, "--forget", str(folder))
    finally:
        folder.chmod(0o755)
    assert code == 0, err
    assert last_line(out) == f"{lib}: 0 photos added, 18 removed; it holds 0 photos (flat index)"
    assert Library.open(lib).roots() == []  # a forgotten folder that cannot be listed is no longer scanned


def test_an_emptied_or_unplugged_folder_keeps_its_photos_and_moved_ones_are_moved(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    disk = folder / "disk"
    photo_folder(world, disk, 6)  # the 6 dev pictures on a disk, the 12 test ones at home
    for path in photo_folder(world, folder / "home")[:6]:
        os.remove(path)
    lib = made(world, folder, tmp_path / "lib")
    unplugged = tmp_path / "unplugged"
    shutil.move(str(disk), unplugged)
    disk.mkdir()  # an unmounted disk leaves its mount point empty
    capsys.readouterr()
    assert index.main(["--library", lib]) == 3
    out, err = capsys.readouterr()
    assert err == (
        f"error: {disk}: empty, where the library holds 6 photos (an unmounted disk?); they stay in the library "
        f"as they were: --forget {disk} removes them\n"
    )
    assert "it holds 18 photos" in last_line(out) and Library.open(lib).count() == 18
    disk.rmdir()
    shutil.move(str(unplugged), disk)  # plugged in again: unchanged, nothing redone
    assert index.main(["--library", lib]) == 0
    assert (
        last_line(capsys.readouterr().out)
        == f"{lib}: 0 photos added, 18 unchanged (not read); it holds 18 photos (flat index)"
    )

    shutil.move(str(folder), tmp_path / "elsewhere")  # the recorded folder itself is not there
    assert index.main(["--library", lib]) == 3
    assert capsys.readouterr().err.startswith(f"error: {folder}: not there (an unplugged disk, an unmounted share?);")
    shutil.move(str(tmp_path / "elsewhere"), folder)

    sorted_into = folder / "sorted"  # every photo moved out of a folder into another: moved, not held
    os.rename(disk, sorted_into)
    disk.mkdir()
    assert index.main(["--library", lib]) == 0
    assert last_line(capsys.readouterr().out) == (
        f"{lib}: 0 photos added, 6 moved, renamed or copied (their path updated), 12 unchanged (not read); "
        "it holds 18 photos (flat index)"
    )
    assert all(path.startswith(str(sorted_into)) or "/home/" in path for path in Library.open(lib).files())


def test_a_file_unreadable_once_is_read_again_by_the_next_run(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder)
    os.chmod(paths[3], 0o000)
    code, out, err = run_script(
        "index.py",
        "--images",
        str(folder),
        "--checkpoint",
        world.checkpoints[0],
        "--regions",
        *world.rows,
        "--library",
        str(tmp_path / "lib"),
    )
    assert code == 0, err
    assert err == f"skipped: {paths[3]}: cannot be read (Permission denied); tried again next run\n"
    assert "17 photos added, 1 failed (each named above)" in last_line(out)
    os.chmod(paths[3], 0o644)  # the permission mended, the file itself untouched
    assert index.main(["--library", str(tmp_path / "lib")]) == 0
    assert last_line(capsys.readouterr().out).startswith(f"{tmp_path / 'lib'}: 1 photo added, 17 unchanged")


# ---------------------------------------------------------------------------------------------
# The index and the records belong together


@pytest.mark.parametrize("offset, size", [("middle", 4000), (300, 64)])
def test_random_bytes_in_the_index_file_are_detected_and_rebuilt_from_the_records(
    world, tmp_path, capsys, offset, size
):
    lib = made(world, world.images, tmp_path / "lib")
    clean = answers(lib)
    path = os.path.join(lib, "index.faiss")
    position = os.path.getsize(path) // 2 if offset == "middle" else offset
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    capsys.readouterr()
    assert_same(answers(lib), clean)
    assert capsys.readouterr().err == (
        f"{path}: missing or damaged vector index (its checksum does not match its content): rebuilt from the "
        "records for this search (index.py writes it again)\n"
    )
    assert index.main(["--library", lib]) == 0
    assert capsys.readouterr().err.endswith("(its checksum does not match its content): rebuilt from the records\n")
    assert VectorIndex.load(path).index.ntotal == 18
    assert_same(answers(lib), clean)
    assert capsys.readouterr().err == ""


def test_an_index_ahead_of_its_records_is_rebuilt_and_never_scores_wrongly(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder)
    dev = [path for path in paths if "_dev_" in path]
    moved = tmp_path / "later"
    moved.mkdir()
    for path in dev:
        shutil.move(path, moved)
    lib = made(world, folder, tmp_path / "lib")  # the 12 test pictures
    shutil.copy(os.path.join(lib, "library.sqlite3"), tmp_path / "backup.sqlite3")
    for name in os.listdir(moved):
        shutil.move(str(moved / name), folder)
    assert index.main(["--library", lib]) == 0  # 18 photos, the index one generation ahead of the backup
    shutil.copy(tmp_path / "backup.sqlite3", os.path.join(lib, "library.sqlite3"))  # the records restored
    for path in dev[:3]:
        os.remove(path)
    capsys.readouterr()
    searched = answers(lib)  # a search before index.py runs: the index belongs to other records
    assert "written from other records" in capsys.readouterr().err
    assert len(searched) == 12
    # The restored records take the next generation and the next ids again, now for other photos.
    assert index.main(["--library", lib]) == 0
    assert "index.faiss: written from other records (restored from a backup, or rolled back?): rebuilt" in (
        capsys.readouterr().err
    )
    clean = made(world, folder, tmp_path / "clean")
    assert_same(answers(lib), answers(clean))
    assert len(answers(lib)) == 15


def test_a_damaged_record_is_left_out_named_by_check_and_indexed_again_by_forget(world, tmp_path, capsys):
    lib = made(world, world.images, tmp_path / "lib")
    clean = answers(lib)
    records = Library.open(lib)
    photo = records.photo_ids()[4]
    name = os.path.basename(records.photo(photo)["path"])
    with sqlite3.connect(os.path.join(lib, "library.sqlite3")) as db:  # a damaged page: other bytes, same size
        vector = np.frombuffer(db.execute("SELECT embedding FROM photos WHERE id = ?", (photo,)).fetchone()[0], "f4")
        db.execute("UPDATE photos SET embedding = ? WHERE id = ?", ((vector * 1e30).tobytes(), photo))
    capsys.readouterr()
    found = answers(lib)
    assert name not in found and len(found) == 17
    assert_same(found, {key: value for key, value in clean.items() if key != name})
    assert f"photo {photo} is damaged (it does not match its checksum)" in capsys.readouterr().err
    assert index.main(["--library", lib, "--check"]) == 3
    out = capsys.readouterr().out
    assert f"photo {photo}: its record damaged (checksums do not match); shown by {world.images}/{name}" in out
    assert index.main(["--library", lib, "--forget", os.path.join(world.images, name)]) == 0
    assert last_line(capsys.readouterr().out).startswith(f"{lib}: 1 photo added, 1 removed")
    assert index.main(["--library", lib, "--check"]) == 0
    assert_same(answers(lib), clean)


def test_check_reports_records_index_and_files(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder)
    lib = made(world, folder, tmp_path / "lib")
    capsys.readouterr()
    assert index.main(["--library", lib, "--check"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{lib}/library.sqlite3: ok (quick_check; 18 photos, their rows, features and thumbnails as their "
        "checksums say)",
        f"{lib}/index.faiss: flat index of 18 photos, checksum ok, of these records",
        "files: 18 of the 18 photo files as recorded",
    ]
    os.remove(paths[0])
    with open(os.path.join(lib, "index.faiss"), "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 8)
    assert index.main(["--library", lib, "--check"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"{lib}/index.faiss: missing or damaged vector index (its checksum does not match")
    assert lines[2] == f"files: 17 of the 18 photo files as recorded; 1 not there (first: {paths[0]}); " + (
        "index.py brings the library up to date with them"
    )
    assert index.main(["--library", lib, "--check", "--rebuild"]) == 2
    assert capsys.readouterr().err == "error: --check looks at the library as it is; it takes no --rebuild\n"
    os.remove(os.path.join(lib, "index.faiss"))  # killed before its first index was written: no damage
    assert index.main(["--library", lib, "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        f"{lib}/index.faiss: not written yet (index.py writes it; a search builds it in memory from the records)"
    )


# ---------------------------------------------------------------------------------------------
# A read-only library


def test_a_read_only_library_answers_searches_and_says_it_cannot_be_updated(world, tmp_path):
    lib = made(world, world.images, tmp_path / "lib")
    expected = Searcher(lib).text(QUERY, k=5)[0]
    for path in (os.path.join(lib, name) for name in os.listdir(lib)):
        os.chmod(path, 0o444)
    os.chmod(lib, 0o555)  # a read-only mount, or another user's library
    try:
        code, out, err = run_script(
            "search.py", "--library", lib, QUERY, "-k", "5", "--json", "--text_encoder", "float32"
        )
        assert code == 0, err
        assert [(hit["id"], hit["score"]) for hit in json.loads(out)["results"]] == [
            (hit["id"], hit["score"]) for hit in expected
        ]
        probe = (
            "import sys, json; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests');"
            "from fastapi.testclient import TestClient; from photo_library.server import create_app;"
            "from photo_library.searcher import Searcher;"
            "api = TestClient(create_app(Searcher(sys.argv[2])), base_url='http://127.0.0.1:8000');"
            "print(json.dumps(api.get('/api/library').json()))"
        )
        done = subprocess.run(
            bound_by_permissions([sys.executable, "-c", probe, ROOT, lib]), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["read_only"] is True and json.loads(done.stdout)["photos"] == 18
    finally:
        os.chmod(lib, 0o755)


# ---------------------------------------------------------------------------------------------
# What a newcomer met


def test_a_refused_first_run_leaves_a_library_the_right_command_makes(world, tmp_path, capsys):
    lib = str(tmp_path / "lib")
    rows = ["--images", world.images, "--regions", *world.rows, "--library", lib]
    assert index.main([*rows, "--checkpoint", world.detector_checkpoint]) == 2  # another region size than the rows'
    assert "regions of 32 dims; the checkpoint's image encoder takes" in capsys.readouterr().err
    assert Library.open(lib).meta("checkpoints") is None and Library.open(lib).roots() == []
    assert index.main([*rows, "--checkpoint", world.checkpoints[0]]) == 0
    assert last_line(capsys.readouterr().out) == f"{lib}: 18 photos added; it holds 18 photos (flat index)"
    assert Library.open(lib).meta("checkpoints")[0]["path"] == os.path.abspath(world.checkpoints[0])


def test_row_files_are_recorded_a_photo_moved_out_and_back_takes_its_row_again(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder)
    rows = [str(tmp_path / os.path.basename(path)) for path in world.rows]
    for source, copy in zip(world.rows, rows):
        shutil.copy(source, copy)
    args = ["--images", str(folder), "--checkpoint", world.checkpoints[0], "--regions", *rows]
    lib = str(tmp_path / "lib")
    assert index.main([*args, "--library", lib]) == 0
    boxes = Library.open(lib).photo(Library.open(lib).photo_of_path(paths[0]))["boxes"]
    shutil.move(paths[0], tmp_path / "out.png")
    assert index.main(["--library", lib]) == 0
    shutil.move(tmp_path / "out.png", paths[0])
    capsys.readouterr()
    assert index.main(["--library", lib]) == 0  # its row, from the recorded row files
    assert last_line(capsys.readouterr().out).startswith(f"{lib}: 1 photo added, 17 unchanged")
    records = Library.open(lib)
    np.testing.assert_array_equal(records.photo(records.photo_of_path(paths[0]))["boxes"], boxes)
    assert records.meta("regions") == sorted(rows)

    os.remove(rows[0])  # a recorded row file that is gone: refused while photos would need it
    random_photo(str(folder / "new.png"), seed=4)
    assert index.main(["--library", lib]) == 2
    assert capsys.readouterr().err == (
        f"error: --library {lib}: its row file {rows[0]} is not there any more; give it with --regions where it "
        f"lies now, with --forget {rows[0]}; or --forget {rows[0]} alone (its photos then wait for the detector)\n"
    )
    assert index.main(["--library", lib, "--forget", rows[0]]) == 0
    assert "1 without regions" in last_line(capsys.readouterr().out)
    assert Library.open(lib).meta("regions") == sorted(rows[1:])


def test_ctrl_c_says_what_was_committed_after_the_progress_bar(world, tmp_path, monkeypatch, capsys):
    from tqdm import tqdm

    batches = []

    def stopped_at_the_third(*args):
        batches.append(1)
        if len(batches) == 3:
            raise KeyboardInterrupt
        return vectors(*args)

    from photo_library import photos

    vectors = photos.image_vectors
    monkeypatch.setattr(photos, "image_vectors", stopped_at_the_third)
    monkeypatch.setattr(indexer_module, "COMMIT_EVERY", 4)
    monkeypatch.setattr(  # a bar drawn as on a terminal
        indexer_module, "progress_bar", lambda total, desc="photos", shown=True: tqdm(total=total, file=sys.stderr)
    )
    lib = str(tmp_path / "lib")
    args = ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows]
    assert index.main([*args, "--library", lib]) == 130
    err = capsys.readouterr().err
    line = (
        f"error: interrupted; {lib} keeps the photos committed so far (8 photos added by this run; it holds "
        "8 photos): rerun the same command to finish\n"
    )
    bar, said = err[: -len(line)], err[-len(line) :]
    assert said == line and err.count("error:") == 1 and "8/18" in bar and bar.endswith("\n")


def test_a_busy_port_is_one_line_and_exit_2_before_any_serving_line(world, tmp_path, capsys):
    lib = made(world, world.images, tmp_path / "lib")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        capsys.readouterr()
        assert search.main(["--library", lib, "--serve", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "Serving" not in out
    assert err == (
        f"error: --port {port}: already in use on 127.0.0.1 (another server? search.py --demo serves on 8000); "
        "choose another --port\n"
    )


def test_like_misuses_and_an_empty_library_are_one_line(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder, 3)
    lib = str(tmp_path / "lib")
    base = ["--checkpoint", world.detector_checkpoint, "--detector", world.detector, *FAST, "--library", lib]
    assert index.main(["--images", str(folder), *base]) == 0
    notes = tmp_path / "notes.jpg"
    notes.write_text("my notes, not a picture")
    capsys.readouterr()
    for args, message in (
        (["--like", str(folder)], f"--like {folder}: a folder; give one photo"),
        (["--like", str(notes)], f"--like {notes}: not a picture file Pillow can read"),
        (["a dog", "--like", paths[0]], f"a sentence ('a dog') and --like {paths[0]}: search by one of them at a time"),
    ):
        assert search.main(["--library", lib, *args]) == 2, args
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"error: {message}\n"), args
    for path in paths:
        os.remove(path)
    assert index.main(["--library", lib]) == 3  # an emptied folder keeps its photos, unless told
    assert index.main(["--library", lib, "--forget", str(folder)]) == 0
    capsys.readouterr()
    assert search.main(["--library", lib, QUERY]) == 2
    assert capsys.readouterr() == ("", f"error: --library {lib}: holds no photos yet; index some with index.py\n")


def test_disk_full_while_writing_the_index_names_the_index_and_a_kill_leaves_no_temporary_file(
    world, tmp_path, monkeypatch, capsys
):
    import errno

    lib = str(tmp_path / "lib")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    made_args = ["--images", world.images, "--checkpoint", world.checkpoints[0], "--regions", *world.rows]
    assert index.main([*made_args, "--library", lib]) == 1
    assert capsys.readouterr().err == f"error: {lib}/index.faiss: No space left on device\n"
    assert not [name for name in os.listdir(lib) if name.endswith(".tmp")]
    monkeypatch.undo()
    killed_mid_write = os.path.join(lib, ".index.faiss.k1ll3d.tmp")  # what a kill during the save leaves
    open(killed_mid_write, "wb").close()
    assert index.main(["--library", lib]) == 0 and Library.open(lib).count() == 18  # the photos were committed
    assert not os.path.exists(killed_mid_write)


@pytest.mark.slow
def test_the_fault_injection_bench_in_short(tmp_path):
    """bench/library_faults.py at toy size: a kill in each phase survives and finishes as the clean library does;
    damage of either file is detected or harmless, never silent, never a traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("library_faults", os.path.join(ROOT, "bench", "library_faults.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    found = bench.run_campaign(str(tmp_path), photos=12, kills=3, damages=6, seed=0)
    assert [kill["phase"] for kill in found["kills"]] == ["first", "update", "rebuild"]
    assert all(kill["survived"] is None and kill["finished"] is None for kill in found["kills"]), found["kills"]
    outcomes = [damage["outcome"] for damage in found["damages"]]
    assert set(outcomes) <= {"detected", "harmless"}, found["damages"]
    index_damages = [damage for damage in found["damages"] if damage["file"] == "index.faiss"]
    assert all(damage["outcome"] == "detected" and damage["repaired"] for damage in index_damages)


def test_check_reports_a_damaged_page_of_the_records(world, tmp_path, capsys):
    lib = made(world, world.images, tmp_path / "lib")
    path = os.path.join(lib, "library.sqlite3")
    db = sqlite3.connect(path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'files_digest'").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:  # an index's page of the records, its cells overwritten
        f.seek((root - 1) * page_size + 8)
        f.write(b"\xff" * 64)
    capsys.readouterr()
    assert index.main(["--library", lib, "--check"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert f"{path}: SQLite finds it damaged: restore it from a backup, or make the library again" in lines
    assert lines[0].startswith(f"{path}: ") and "SQLite" not in lines[0]  # what quick_check found, first


def test_a_damaged_file_row_is_read_again_and_a_damaged_setting_is_named(world, tmp_path, capsys):
    folder = tmp_path / "photos"
    paths = photo_folder(world, folder)
    lib = made(world, folder, tmp_path / "lib")
    records = Library.open(lib)
    first, second = records.photo_of_path(paths[0]), records.photo_of_path(paths[1])
    db_path = os.path.join(lib, "library.sqlite3")
    with sqlite3.connect(db_path) as db:  # the first file's row now names the second photo, its checksum unchanged
        db.execute("UPDATE files SET photo = ? WHERE path = ?", (second, paths[0]))
    assert Library.open(lib).photo(second)["path"] == paths[1]  # the damaged row is not taken as the photo's file
    assert Library.open(lib).files_of(first) == []
    capsys.readouterr()
    assert index.main(["--library", lib, "--check"]) == 0
    assert f"{db_path}: 1 file record damaged: the next index.py run reads those files again" in capsys.readouterr().out
    assert index.main(["--library", lib]) == 0
    assert last_line(capsys.readouterr().out).startswith(f"{lib}: 0 photos added, 1 moved, renamed or copied")
    assert Library.open(lib).photo_of_path(paths[0]) == first
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value = '33' WHERE key = 'feature_dim'")
    assert index.main(["--library", lib, "--check"]) == 3
    assert f"{db_path}: its record of feature_dim damaged (checksums do not match)" in capsys.readouterr().out
    assert index.main(["--library", lib, "--rebuild"]) == 2
    assert capsys.readouterr().err == (
        f"error: {db_path}: its record of feature_dim is damaged (it does not match its checksum)\n"
    )
