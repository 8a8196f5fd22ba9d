"""index.py --check: the records, the vector index and the photo files looked at, nothing changed.

- The records: SQLite's quick_check of library.sqlite3 (its pages and b-trees), every photo's row,
  region features and thumbnail, every file's row and every value of what made the library against
  their checksums, and each photo with its features and thumbnail, each file with its photo.
- The vector index: its checksum, whether it belongs to these records (its commit's token), and, when
  it is up to date with them, that it holds exactly their photos.
- The files: each recorded file is there with the size and modification time recorded.

It reads all of the records and the index once: at a million photos, about 160 GB of records with
float16 features and 8 GB of index (see docs/reliability.md for the measured rates).
"""

import os
import sqlite3
from dataclasses import dataclass, field

from photo_library.store import Library
from photo_library.vectors import INDEX_FILE, VectorIndex
from utils.errors import DataError
from utils.text import plural

SHOWN = 3  # problems named one by one, per kind


@dataclass
class Report:
    """The lines of a check, and whether any names a problem (records or index damaged, or not matching)."""

    lines: list = field(default_factory=list)
    problems: int = 0

    def say(self, line, problem=False):
        self.lines.append(line)
        self.problems += problem


def check_library(folder):
    """The Report of the library in `folder`."""
    library = Library.open(folder)
    report = Report()
    try:
        with library.snapshot():
            check_records(library, report)
            check_index(library, report)
            check_files(library, report)
    except sqlite3.DatabaseError as e:
        report.say(f"{library.path}: cannot be read through ({e}): restore it from a backup", problem=True)
    finally:
        library.close()
    return report


def check_records(library, report):
    path = library.path
    problems = library.quick_check()
    if problems != ["ok"]:
        lines = [line for row in problems for line in row.splitlines() if line and not line.startswith("*** ")]
        for problem in lines[:SHOWN]:
            report.say(f"{path}: {problem}")
        report.say(f"{path}: SQLite finds it damaged: restore it from a backup, or make the library again", True)
        return
    damaged = {}
    for photo, what in library.damaged_photos():
        damaged.setdefault(photo, []).append(what)
    for photo in sorted(damaged)[:SHOWN]:
        files = [row[0] for row in library.files_of(photo)]
        shown = " ".join(files) if files else "no file"
        report.say(
            f"{path}: photo {photo}: its {' and '.join(damaged[photo])} damaged (checksums do not match); shown by "
            f"{shown}: index.py --forget with its files indexes it again",
            problem=True,
        )
    if len(damaged) > SHOWN:
        report.say(f"{path}: {len(damaged) - SHOWN} more photos damaged", problem=True)
    keys, files = library.damaged_settings()
    if keys:
        report.say(
            f"{path}: its record of {', '.join(keys)} damaged (checksums do not match): restore library.sqlite3 "
            "from a backup, or make the library again",
            problem=True,
        )
    if files:
        report.say(f"{path}: {plural(files, 'file record')} damaged: the next index.py run reads those files again")
    incomplete, dangling = library.unmatched()
    if incomplete or dangling:
        report.say(
            f"{path}: {plural(incomplete, 'photo')} without their features or thumbnail, "
            f"{plural(dangling, 'file')} naming a photo it lacks",
            problem=True,
        )
    if not damaged and not incomplete and not dangling and not keys and not files:
        report.say(
            f"{path}: ok (quick_check; {plural(library.count(), 'photo')}, their rows, features and thumbnails "
            "as their checksums say)"
        )


def check_index(library, report):
    path = os.path.join(library.folder, INDEX_FILE)
    if library.meta("embedding_dim") is None:
        report.say(f"{path}: none yet (the library holds no photos)")
        return
    if not os.path.exists(path):
        report.say(f"{path}: not written yet (index.py writes it; a search builds it in memory from the records)")
        return
    try:
        index = VectorIndex.load(path)
    except DataError as e:
        report.say(f"{e}: index.py --library {library.folder} rebuilds it from the records", problem=True)
        return
    generation = library.meta("generation")
    if library.meta("epoch") != index.header["epoch"] or index.generation < library.meta("history_since", 0):
        report.say(f"{path}: of an earlier state of the records: index.py rebuilds it")
        return
    if library.token(index.generation) != index.header.get("token"):
        report.say(
            f"{path}: written from other records (restored from a backup, or rolled back?): "
            "index.py rebuilds it (a search rebuilds it in memory)",
            problem=True,
        )
        return
    described = f"{index.kind} index of {plural(index.size, 'photo')}, checksum ok"
    if index.generation < generation:
        report.say(f"{path}: {described}, {generation - index.generation} commits behind: index.py catches it up")
        return
    held = index.ids() - index.hidden
    records = set(library.photo_ids())
    if held != records:
        report.say(
            f"{path}: holds {plural(len(held - records), 'photo')} the records lack and lacks "
            f"{len(records - held)} of theirs: index.py --library {library.folder} rebuilds it",
            problem=True,
        )
    else:
        report.say(f"{path}: {described}, of these records")


def check_files(library, report):
    missing, changed, total = [], [], 0
    for path, (size, mtime_ns, _, photo, _) in sorted(library.files().items()):
        if photo is None:
            continue
        total += 1
        try:
            status = os.stat(path)
        except OSError:
            missing.append(path)
            continue
        if (status.st_size, status.st_mtime_ns) != (size, mtime_ns):
            changed.append(path)
    line = f"files: {total - len(missing) - len(changed)} of the {plural(total, 'photo file')} as recorded"
    for paths, what in ((missing, "not there"), (changed, "changed since they were indexed")):
        if paths:
            line += f"; {len(paths)} {what} (first: {paths[0]})"
    if missing or changed:
        line += "; index.py brings the library up to date with them"
    report.say(line)
