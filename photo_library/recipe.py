"""What made a library: its checkpoints, vocabulary, detector and region settings, recorded when it is
made. An update or a query with other ones would mix vectors that cannot be compared: it is refused in
one line naming both, and `index.py --rebuild` re-embeds the kept regions with new checkpoints.

Files are named by the SHA-256 of their content; the digest of a file whose path, size and
modification time are those recorded is not computed again (a rerun reads no checkpoint).
"""

import os

from photo_library.scan import content_digest
from utils.errors import OptionError


def file_record(path, known=None):
    """{path (absolute), size, mtime_ns, digest} of a file; the digest of a record in `known` with the
    same path, size and modification time is taken as it is."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        return None
    status = os.stat(path)
    for record in known or ():
        if (record["path"], record["size"], record["mtime_ns"]) == (path, status.st_size, status.st_mtime_ns):
            return dict(record)
    return {"path": path, "size": status.st_size, "mtime_ns": status.st_mtime_ns, "digest": content_digest(path)}


def short(record):
    return f"{record['path']} (sha256 {record['digest'][:12]})"


def checkpoint_records(paths, recorded, library, rebuild=False):
    """The checkpoints' records for this run: `paths` (the command's, or None for the recorded ones),
    checked against the library's unless `rebuild`."""
    if paths:
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise OptionError(f"--checkpoint {missing[0]}: checkpoint not found")
        records = [file_record(path, recorded) for path in paths]
    elif recorded:
        records = [file_record(record["path"], recorded) for record in recorded]
        gone = [old for old, new in zip(recorded, records) if new is None]
        if gone:
            raise OptionError(
                f"{library}: its checkpoint {gone[0]['path']} is not there any more; give the same file (digest "
                f"{gone[0]['digest'][:12]}) with --checkpoint, or another one with --rebuild"
            )
    else:
        raise OptionError(f"{library}: give the VSRN checkpoint(s) that embed the photos: --checkpoint M [M ...]")
    if recorded and not rebuild:
        ours = [record["digest"] for record in recorded]
        if [record["digest"] for record in records] != ours:
            made = ", ".join(short(record) for record in recorded)
            given = ", ".join(short(record) for record in records)
            raise OptionError(
                f"{library} was made with {made}; {given} would embed other vectors: give the library's checkpoints, "
                "or --rebuild to re-embed its kept regions with these"
            )
    return records


def check_same(library, what, recorded, given, hint):
    """Refuse `given` (settings, or a file record: compared by its digest, wherever the file lies) when the
    library recorded other ones."""
    if recorded is None or given is None:
        return
    if ("digest" in recorded and recorded["digest"] != given["digest"]) or (
        "digest" not in recorded and recorded != given
    ):
        raise OptionError(
            f"{library} was made with {what} {describe(recorded)}; this run's is {describe(given)}: {hint}"
        )


def describe(value):
    if isinstance(value, dict) and "digest" in value:
        return short(value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in sorted(value.items()))
    return str(value)
