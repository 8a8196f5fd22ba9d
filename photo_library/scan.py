"""What changed in a library's folders since it was last indexed.

Pictures are found recursively (jpg, jpeg, png, webp, bmp, tif, tiff; any case; hidden folders
skipped). A file whose size and modification time are those recorded is unchanged and is not
read. Any other file is read once for its content digest: content the library holds already (a
moved, renamed or copied photo) only gains a path; content that failed before fails again
without being retried; the rest is new work. Recorded files under the scanned folders that are
gone are dropped. `apply_changes` records all but the new work, whose files are recorded with their
photos when those are committed.
"""

import hashlib
import os
from dataclasses import dataclass, field

from utils.errors import first_line

PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CHUNK = 1 << 20


def find_pictures(roots):
    """(path, size, mtime_ns) of the picture files under `roots` (absolute paths), by path."""
    found = {}
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in names:
                if name.lower().endswith(PICTURE_EXTENSIONS) and not name.startswith("."):
                    path = os.path.join(folder, name)
                    try:
                        status = os.stat(path)
                    except OSError:
                        continue  # gone between the listing and now
                    found[path] = (status.st_size, status.st_mtime_ns)
    return [(path, *found[path]) for path in sorted(found)]


def content_digest(path):
    """SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Changes:
    """What indexing the folders has to do."""

    unchanged: int = 0
    relinked: list = field(default_factory=list)  # (path, size, mtime_ns, digest, photo): content the library has
    new: list = field(default_factory=list)  # (path, size, mtime_ns, digest): content to extract and embed
    failed: list = field(default_factory=list)  # (path, size, mtime_ns, digest or None, reason)
    gone: list = field(default_factory=list)  # recorded paths under the scanned folders that no longer exist
    changed: dict = field(
        default_factory=dict
    )  # recorded paths whose file changed: {path: the photo it showed or None}


def scan(library, roots):
    """The Changes of the pictures under `roots` against the library's records."""
    recorded = library.files()
    changes = Changes()
    seen = set()
    for path, size, mtime_ns in find_pictures(roots):
        seen.add(path)
        known = recorded.get(path)
        if known is not None and known[0] == size and known[1] == mtime_ns:
            changes.unchanged += 1
            continue
        if known is not None:
            changes.changed[path] = known[3]
        try:
            digest = content_digest(path)
        except OSError as e:
            changes.failed.append((path, size, mtime_ns, None, f"cannot be read ({first_line(e)})"))
            continue
        photo = library.photo_of_digest(digest)
        reason = None if photo is not None else library.failed_digest(digest)
        if photo is not None:
            changes.relinked.append((path, size, mtime_ns, digest, photo))
        elif reason is not None:
            changes.failed.append((path, size, mtime_ns, digest, reason))
        else:
            changes.new.append((path, size, mtime_ns, digest))
    prefixes = tuple(os.path.join(root, "") for root in roots)
    changes.gone = sorted(path for path in recorded if path.startswith(prefixes) and path not in seen)
    return changes


def apply_changes(library, changes, note):
    """Record moved, copied, failed, changed and gone files (in the caller's transaction): photos no file shows
    any more go. Failures are said with `note`. The number of photos removed."""
    generation = library.meta("generation") + 1
    for path, size, mtime_ns, digest, photo in changes.relinked:
        library.set_file(path, size, mtime_ns, digest, photo)
    for path, size, mtime_ns, digest, reason in changes.failed:
        note(f"{path}: {reason}")
        library.set_file(path, size, mtime_ns, digest, reason=reason)
    # A changed file with new content has no row until that content is committed: a stopped run redoes it.
    for path, *_ in changes.new:
        if path in changes.changed:
            library.forget_file(path)
    removed = library.forget_files(changes.gone, generation)
    removed += library.drop_unshown({photo for photo in changes.changed.values() if photo is not None}, generation)
    if removed:
        library.set_meta(generation=generation)
    return removed
