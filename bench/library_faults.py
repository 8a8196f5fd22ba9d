"""Fault injection on the photo library: SIGKILL at random moments of index.py, random bytes at random offsets
of its two files, and the tally of what survived, what was detected and what answered as a clean build does.

    python3 bench/library_faults.py [--photos 400] [--kills 30] [--damages 40] [--seed 0]
    python3 bench/library_faults.py --smoke      # a few of each (what tests/test_library_damage.py runs)

The toy world's pictures (utils.make_toy_images, with their obj36 rows) and two tiny random VSRN checkpoints.
Three phases, each run once uninterrupted for its clean library and its time:
  first    index.py --images F --checkpoint A --regions ROWS --library L     (F: two thirds of the pictures)
  update   index.py --library L, F changed: pictures added, removed, moved, renamed, rewritten, copied
  rebuild  index.py --library L --checkpoint B --rebuild
Kills: a phase chosen at random, its starting library and folder set up, index.py started and killed with
SIGKILL after a delay drawn uniformly between the time Python takes to import index.py (before which
nothing happens; at most half the phase's clean time) and 95% of the phase's clean time. Survived: the
library opens, answers every photo it holds, and `index.py --check` finds no damage. Then the same command
is run again to its end, and compared with the phase's clean library: the files recorded (the folder's
pictures), and each query's answers (every photo, its score to 1e-6: batches of other sizes round the last
bits differently).
Damages: the final clean library copied, `1-4096` random bytes written at a random offset of index.faiss or
library.sqlite3; then a search, `index.py --check` and `index.py --library L` (which rebuilds what it can).
Detected: a one-line error, a line saying what was damaged, or a check that exits non-zero. Harmless: nothing
said and every answer as the clean library's. Silent: answers that differ with nothing said. Crashed: any
other exception (a traceback in a script).
"""

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import utils.threads  # noqa: E402,F401  (before torch, as the scripts)
import numpy as np  # noqa: E402

QUERIES = ("a dog next to a bench and a kite", "a red umbrella near a tree", "a cat on a boat")
PHASES = ("first", "update", "rebuild")
TOLERANCE = 1e-6


def quietly(work, *args):
    """work(*args) with its stdout and stderr captured: (its result, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        return work(*args), printed.getvalue()


# ---- the world, its folder trees and the phases' commands


def make_trees(work, photos, seed):
    """The toy world and the folder's two states (before and after the update), under `work`."""
    from photo_world import make_world

    world = make_world(os.path.join(work, "world"), sizes={"test": photos, "dev": max(2, photos // 2)}, seeds=(0, 1))
    names = sorted(os.listdir(world.images))
    dev, test = [n for n in names if "_dev_" in n], [n for n in names if "_test_" in n]
    rng = random.Random(seed)
    before = os.path.join(work, "trees", "before")
    os.makedirs(os.path.join(before, "albums"))
    for name in test:
        shutil.copy2(os.path.join(world.images, name), os.path.join(before, name))
    for name in dev[: len(dev) // 2]:
        shutil.copy2(os.path.join(world.images, name), os.path.join(before, "albums", name))
    after = os.path.join(work, "trees", "after")
    shutil.copytree(before, after)
    update_tree(after, world.images, dev[len(dev) // 2 :], rng)
    return world, before, after


def update_tree(folder, images, unused, rng):
    """Pictures added, removed, moved, renamed, rewritten with other content and copied, about a tenth each."""
    top = sorted(name for name in os.listdir(folder) if name.endswith(".png"))
    rng.shuffle(top)
    tenth = max(1, len(top) // 10)
    removed, moved, renamed, rewritten, copied = (top[i * tenth : (i + 1) * tenth] for i in range(5))
    for sub in ("new", "moved", "copies"):
        os.makedirs(os.path.join(folder, sub))
    for name in unused[1:]:
        shutil.copy2(os.path.join(images, name), os.path.join(folder, "new", name))
    for name in removed:
        os.remove(os.path.join(folder, name))
    for name in moved:
        os.rename(os.path.join(folder, name), os.path.join(folder, "moved", name))
    for name in renamed:
        os.rename(os.path.join(folder, name), os.path.join(folder, f"renamed_{name}"))
    for name in rewritten:  # the same name, other content (its row still matches the picture's size)
        shutil.copyfile(os.path.join(images, unused[0]), os.path.join(folder, name))
    for name in copied:
        shutil.copy2(os.path.join(folder, name), os.path.join(folder, "copies", f"copy_{name}"))


def set_folder(folder, tree):
    """The folder made a copy of `tree` (files with their modification times)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tree, folder)


def commands(world, folder, lib):
    """{phase: index.py's arguments}."""
    first = ["--images", folder, "--checkpoint", world.checkpoints[0], "--regions", *world.rows, "--library", lib]
    return {
        "first": first,
        "update": ["--library", lib],
        "rebuild": ["--library", lib, "--checkpoint", world.checkpoints[1], "--rebuild"],
    }


def request_of(args):
    """The IndexRequest of index.py's arguments as `commands` writes them (a rerun in this process)."""
    from photo_library.indexer import IndexRequest

    named, key = {}, None
    for arg in args:
        if arg.startswith("--"):
            key = arg[2:]
            named.setdefault(key, [])
        else:
            named[key].append(arg)
    return IndexRequest(
        library=named["library"][0],
        images=named.get("images"),
        checkpoints=named.get("checkpoint"),
        regions=named.get("regions", []),
        rebuild="rebuild" in named,
    )


def index_here(args):
    """index.py's work in this process, as the script reports it: (exit code 0, 2 or 3, what it said)."""
    from photo_library.indexer import Indexer
    from photo_library.store import database_errors
    from utils.errors import VSRNError

    try:
        with database_errors(request_of(args).library):
            indexer = Indexer(request_of(args))
            line, said = quietly(indexer.run)
    except VSRNError as e:
        return 2, str(e)
    return (3 if indexer.summary.held else 0), said + line


def check_here(lib):
    """index.py --check in this process: (exit code 0, 2 or 3, its lines)."""
    from photo_library.check import check_library
    from utils.errors import VSRNError

    try:
        report = check_library(lib)
    except VSRNError as e:
        return 2, str(e)
    return (3 if report.problems else 0), "\n".join(report.lines)


def python_start():
    """Seconds a process takes to import index.py (Python, torch, FAISS), the median of 3: before that, nothing
    happens to a library."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import index"], cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def run_index(args):
    """index.py in a process of its own (as a user runs it): (exit code, seconds)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "index.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    return done.returncode, time.perf_counter() - start


# ---- what a library answers


def answers(lib):
    """{query: {first path of a photo: score}} of every photo, for each query; {} for a library without photos."""
    from photo_library.searcher import Searcher
    from photo_library.store import Library

    records = Library.open(lib)
    count = records.count() if records.meta("checkpoints") else 0
    records.close()
    if not count:
        return {}
    searcher = Searcher(lib)
    return {query: {hit["path"]: hit["score"] for hit in searcher.text(query, k=count)[0]} for query in QUERIES}


def same_answers(found, expected):
    if found is None or found.keys() != expected.keys():
        return False
    for query, scores in expected.items():
        if scores.keys() != found[query].keys():
            return False
        if any(abs(found[query][path] - score) > TOLERANCE for path, score in scores.items()):
            return False
    return True


def recorded_files(lib):
    from photo_library.store import Library

    records = Library.open(lib)
    files = {path: (row[0], row[2], row[3] is not None) for path, row in records.files().items()}
    records.close()
    return files


def folder_pictures(folder):
    return {os.path.join(top, name) for top, _, names in os.walk(folder) for name in names if name.endswith(".png")}


# ---- kills


def clean_runs(world, folder, before, after, work):
    """{phase: (the clean library after it, its answers, seconds)}, each phase run once uninterrupted."""
    lib = os.path.join(work, "clean")
    args, clean = commands(world, folder, lib), {}
    for phase in PHASES:
        set_folder(folder, before if phase == "first" else after)
        code, seconds = run_index(args[phase])
        if code != 0:
            raise RuntimeError(f"the clean {phase} run failed (exit code {code})")
        kept = os.path.join(work, f"clean_{phase}")
        shutil.copytree(lib, kept)
        clean[phase] = (kept, answers(kept), seconds)
    shutil.rmtree(lib)
    return clean


def kill_trial(world, folder, trees, clean, phase, delay, work):
    """One kill: {phase, delay, killed, survived (None or why not), finished (None or why not)}."""
    lib = os.path.join(work, "killed")
    shutil.rmtree(lib, ignore_errors=True)
    if phase != "first":
        shutil.copytree(clean["update" if phase == "rebuild" else "first"][0], lib)
    set_folder(folder, trees["before"] if phase == "first" else trees["after"])
    args = commands(world, folder, lib)[phase]
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "index.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    time.sleep(delay)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()
    started = None if phase == "first" else generation(clean["update" if phase == "rebuild" else "first"][0])
    return {
        "phase": phase,
        "delay": round(delay, 2),
        "killed": killed,
        "committed": generation(lib) != started,
        "survived": survives(lib),
        "finished": finishes(lib, args, folder, clean[phase][1]),
    }


def generation(lib):
    """The records' generation (None without records): whether a killed run changed them (made them, or
    committed)."""
    from photo_library.store import Library

    if not os.path.exists(os.path.join(lib, "library.sqlite3")):
        return None
    with contextlib.closing(Library.open(lib)) as records:
        return records.meta("generation")


def survives(lib):
    """None when a killed library opens, answers every photo it holds, and its check finds nothing; else why."""
    if not os.path.exists(os.path.join(lib, "library.sqlite3")):
        return None  # killed before the library was made: the rerun makes it
    try:
        quietly(answers, lib)
        code, printed = check_here(lib)
    except Exception as e:  # noqa: BLE001  (whatever it is, it is the finding)
        return f"{type(e).__name__}: {e}"
    return None if code == 0 else f"--check: {printed.strip()}"


def finishes(lib, args, folder, expected):
    """None when the same command, run again, ends with the clean library's files and answers; else why."""
    try:
        code, printed = index_here(args)
        if code != 0:
            return f"the rerun exited with {code}: {printed.strip()[-300:]}"
        files = recorded_files(lib)
        if set(files) != folder_pictures(folder) or not all(shown for _, _, shown in files.values()):
            return "the files recorded are not the folder's pictures"
        if not same_answers(quietly(answers, lib)[0], expected):
            return "answers differ from the clean library's"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


# ---- damages


def damage_trial(clean_lib, expected, target, rng, work):
    """One damage of `target` in a copy of the clean library: {file, offset, bytes, outcome, said, repaired}."""
    lib = os.path.join(work, "damaged")
    shutil.rmtree(lib, ignore_errors=True)
    shutil.copytree(clean_lib, lib)
    path = os.path.join(lib, target)
    offset, length = int(rng.integers(0, os.path.getsize(path))), int(rng.integers(1, 4097))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
    trial = {"file": target, "offset": offset, "bytes": length}
    try:
        found, said, refused = attempt(answers, lib)
        checked, report = check_here(lib)
        repaired, _ = index_here(["--library", lib])
        after = attempt(answers, lib)[0] if repaired == 0 else None
    except Exception as e:  # noqa: BLE001
        return {**trial, "outcome": "crashed", "said": f"{type(e).__name__}: {e}"}
    if refused is not None or said.strip() or checked != 0:
        outcome = "detected"
    elif same_answers(found, expected):
        outcome = "harmless"
    else:
        outcome = "silent"
    said = (refused or said or (report if checked else "")).strip().splitlines()
    return {**trial, "outcome": outcome, "said": said[0] if said else "", "repaired": same_answers(after, expected)}


def attempt(work, *args):
    """(result, what it printed, the one-line error a script would print or None) of work(*args): a script says
    the records' SQLite errors in one line (database_errors), as it says VSRNErrors."""
    from utils.errors import VSRNError

    try:
        result, said = quietly(work, *args)
    except (VSRNError, sqlite3.DatabaseError) as e:
        return None, "", str(e)
    return result, said, None


# ---- the campaign


def run_campaign(work, photos=400, kills=30, damages=40, seed=0):
    """{"kills": [...], "damages": [...], "clean_seconds": {...}} of a campaign in the folder `work`."""
    world, before, after = make_trees(work, photos, seed)
    folder = os.path.join(work, "photos")
    clean = clean_runs(world, folder, before, after, work)
    trees = {"before": before, "after": after}
    rng = random.Random(seed)
    found = {"clean_seconds": {phase: round(clean[phase][2], 1) for phase in PHASES}, "kills": [], "damages": []}
    start_up = python_start()
    found["start_up_seconds"] = round(start_up, 1)
    for number in range(kills):
        phase = PHASES[number % 3] if kills <= 3 else rng.choice(PHASES)
        delay = rng.uniform(min(start_up, 0.5 * clean[phase][2]), 0.95 * clean[phase][2])
        found["kills"].append(kill_trial(world, folder, trees, clean, phase, delay, work))
    damage_rng = np.random.default_rng(seed)
    final, expected = clean["rebuild"][0], clean["rebuild"][1]
    set_folder(folder, after)  # the folder as the final library recorded it
    for number in range(damages):
        target = ("index.faiss", "library.sqlite3")[number % 2]
        found["damages"].append(damage_trial(final, expected, target, damage_rng, work))
    return found


def tally(found):
    """The campaign's summary lines."""
    kills = found["kills"]
    lines = [
        f"clean runs (s): {found['clean_seconds']}; importing index.py: {found['start_up_seconds']} s",
        f"kills: {len(kills)} ({sum(k['killed'] for k in kills)} before the run ended, "
        f"{sum(k['committed'] for k in kills)} after the records changed); "
        f"survived {sum(k['survived'] is None for k in kills)}; finished as the clean library "
        f"{sum(k['finished'] is None for k in kills)}",
    ]
    for phase in PHASES:
        ours = [k for k in kills if k["phase"] == phase]
        lines.append(
            f"  {phase}: {len(ours)} kills, survived {sum(k['survived'] is None for k in ours)}, "
            f"finished as clean {sum(k['finished'] is None for k in ours)}"
        )
    for target in ("index.faiss", "library.sqlite3"):
        ours = [d for d in found["damages"] if d["file"] == target]
        counts = {outcome: sum(d["outcome"] == outcome for d in ours) for outcome in ("detected", "harmless")}
        bad = {outcome: sum(d["outcome"] == outcome for d in ours) for outcome in ("silent", "crashed")}
        lines.append(
            f"damages of {target}: {len(ours)}; detected {counts['detected']}, harmless {counts['harmless']}, "
            f"silent {bad['silent']}, crashed {bad['crashed']}; answers as clean after index.py "
            f"{sum(d.get('repaired', False) for d in ours)}"
        )
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=400, help="test pictures (half as many dev pictures besides)")
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--damages", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="12 pictures, 3 kills, 4 damages")
    p.add_argument("--json", metavar="FILE", help="also write every trial to FILE")
    args = p.parse_args()
    if args.smoke:
        args.photos, args.kills, args.damages = 12, 3, 4
    import torch

    from machine import describe, print_table

    print_table(describe(torch), "machine")
    with tempfile.TemporaryDirectory() as work:
        found = run_campaign(work, args.photos, args.kills, args.damages, args.seed)
    for trial in found["kills"] + found["damages"]:
        if trial.get("survived") or trial.get("finished") or trial.get("outcome") in ("silent", "crashed"):
            print(json.dumps(trial))
        elif "outcome" in trial and trial["file"] == "library.sqlite3":
            print(f"library.sqlite3 at {trial['offset']}: {trial['outcome']}: {trial['said'][:150]}")
    print("\n".join(tally(found)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(found, f, indent=1)


if __name__ == "__main__":
    main()
