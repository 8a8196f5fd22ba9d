"""What changed in a library's folders since it was last indexed.

Pictures are found recursively (jpg, jpeg, png, webp, bmp, tif, tiff; any case; hidden files and
folders skipped; symbolic links, to files or folders, are not followed: a photo is indexed where it
lies). A file whose size and modification time are those recorded is unchanged and is not read. Any
other file is read once for its content digest: content the library holds already (a moved, renamed
or copied photo) only gains a path; content that failed before fails again without being retried; the
rest is new work. A file that cannot be read at all (its permissions) is recorded with the reason and
read again by the next run.

Recorded files under the scanned folders that are gone are dropped, except where the folder they lay
in could not be looked at: a folder that cannot be listed (its permissions, an I/O error), a recorded
folder that is not there, or a folder that is empty where the records hold photos under it (an
unmounted disk leaves its mount point empty) keeps its files' records as they are: they are `held`,
for the caller to say. Photos that were moved out of an emptied folder (found elsewhere by this scan)
are not held. `apply_changes` records all but the new work, whose files are recorded with their photos
when those are committed.
"""

import os
from dataclasses import dataclass, field

from utils.digest import file_digest
from utils.errors import DataError, OptionError, first_line
from utils.text import plural

PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
NOT_THERE, EMPTY = "not there", "empty"


@dataclass
class Listing:
    """What a walk of the folders found: picture files (path, size, mtime_ns), the folders it could not list
    ({folder: why}) and the folders it found empty."""

    files: list = field(default_factory=list)
    unlisted: dict = field(default_factory=dict)
    empty: set = field(default_factory=set)


def why(error):
    """An OSError's reason without the path it names."""
    if isinstance(error, FileNotFoundError):
        return NOT_THERE
    return error.strerror or first_line(error)


def list_folder(folder, listing):
    """The subfolders of `folder`, its picture files added to `listing`; an unlistable folder is noted there."""
    try:
        with os.scandir(folder) as found:
            entries = sorted(found, key=lambda entry: entry.name)
    except OSError as e:
        listing.unlisted[folder] = why(e)
        return []
    if not entries:
        listing.empty.add(folder)
    subfolders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.name.lower().endswith(PICTURE_EXTENSIONS) and entry.is_file():
                status = entry.stat()
                listing.files.append((entry.path, status.st_size, status.st_mtime_ns))
        except FileNotFoundError:
            continue  # gone between the listing and now
        except OSError as e:  # a folder that can be listed but not looked into
            listing.unlisted[folder] = why(e)
    return subfolders


def find_pictures(roots):
    """The Listing of the picture files under `roots` (absolute paths), by path."""
    listing = Listing()
    for root in roots:
        waiting = [root]
        while waiting:
            waiting.extend(reversed(list_folder(waiting.pop(), listing)))
    listing.files.sort()
    return listing


@dataclass
class Changes:
    """What indexing the folders has to do."""

    unchanged: int = 0
    relinked: list = field(default_factory=list)  # (path, size, mtime_ns, digest, photo): content the library has
    new: list = field(default_factory=list)  # (path, size, mtime_ns, digest): content to extract and embed
    failed: list = field(default_factory=list)  # (path, size, mtime_ns, digest or None, reason)
    gone: list = field(default_factory=list)  # recorded paths under the scanned folders that no longer exist
    changed: dict = field(default_factory=dict)  # recorded paths whose file changed: {path: the photo it showed}
    held: dict = field(default_factory=dict)  # {folder: (why, [recorded paths kept under it], {their photos})}
    unlisted: dict = field(default_factory=dict)  # {folder: why} of the folders that could not be listed


def scan(library, roots):
    """The Changes of the pictures under `roots` against the library's records."""
    recorded = library.files()
    listing = find_pictures(roots)
    changes = Changes(unlisted=listing.unlisted)
    seen, shown = set(), set()
    for path, size, mtime_ns in listing.files:
        seen.add(path)
        known = recorded.get(path)
        # A file that could not be read has no digest: it is read again.
        if known is not None and (known[0], known[1]) == (size, mtime_ns) and known[2] is not None:
            changes.unchanged += 1
            shown.add(known[3])
            continue
        if known is not None:
            changes.changed[path] = known[3]
        try:
            digest = file_digest(path)
        except OSError as e:
            changes.failed.append((path, size, mtime_ns, None, f"cannot be read ({why(e)}); tried again next run"))
            continue
        photo = library.photo_of_digest(digest)
        reason = None if photo is not None else library.failed_digest(digest)
        if photo is not None:
            changes.relinked.append((path, size, mtime_ns, digest, photo))
            shown.add(photo)
        elif reason is not None:
            changes.failed.append((path, size, mtime_ns, digest, reason))
        else:
            changes.new.append((path, size, mtime_ns, digest))
    prefixes = tuple(os.path.join(root, "") for root in roots)
    missing = sorted(path for path in recorded if path.startswith(prefixes) and path not in seen)
    changes.gone, changes.held = sort_missing(missing, roots, listing, {p: recorded[p][3] for p in missing}, shown)
    return changes


def sort_missing(missing, roots, listing, photos, shown):
    """(gone paths, held {folder: (why, paths, photos)}) of the recorded paths the walk did not find: held are those
    under a folder it could not look at (the highest such folder names them); under an emptied folder, only
    when some of their photos are not shown by a file this scan found (`shown`)."""
    held = {}
    for path in missing:
        root = next(root for root in roots if path.startswith(os.path.join(root, "")))
        folder = blocking_folder(path, root, listing)
        if folder is not None:
            reason = listing.unlisted.get(folder, EMPTY)
            held.setdefault(folder, (reason, [], set()))[1].append(path)
            held[folder][2].add(photos[path])
    for folder, (reason, paths, shows) in list(held.items()):
        shows.discard(None)
        if reason == EMPTY and shows <= shown:
            del held[folder]  # its photos were moved elsewhere: nothing is lost
    kept = {path for _, paths, _ in held.values() for path in paths}
    return [path for path in missing if path not in kept], held


def blocking_folder(path, root, listing):
    """The highest folder between `root` and the file at `path` that the walk could not list or found empty."""
    folders = []
    folder = os.path.dirname(path)
    while True:
        folders.append(folder)
        if folder == root or len(folder) <= len(root):
            break
        folder = os.path.dirname(folder)
    return next((f for f in reversed(folders) if f in listing.unlisted or f in listing.empty), None)


def apply_changes(library, changes, note):
    """Record moved, copied, failed, changed and gone files (in the caller's transaction): photos no file shows
    any more go. Failures are said with `note`. The number of photos removed."""
    generation = library.next_generation()
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
        library.commit_generation(generation)
    return removed


def held_errors(held):
    """One error per folder whose records were kept because it could not be looked at (Changes.held)."""
    errors = []
    for folder, (reason, _, photos) in sorted(held.items()):
        count = plural(len(photos), "photo")
        if reason == NOT_THERE:
            template = "{path}: not there (an unplugged disk, an unmounted share?); its {count} stay in the library"
        elif reason == EMPTY:
            template = "{path}: empty, where the library holds {count} (an unmounted disk?); they stay in the library"
        else:
            template = "{path}: cannot be listed ({reason}); its {count} stay in the library"
        template += " as they were: {forget} {path} removes them"
        errors.append(DataError.naming(template, path=folder, count=count, reason=reason))
    return errors


def forget(library, paths):
    """Drop the records of the files at or under each path (in the caller's transaction), their photos with
    them when no other file shows them; a recorded folder among the paths that cannot be listed now is no longer
    scanned, and a recorded row file is no longer read. The number of photos removed."""
    roots, regions = library.roots(), library.meta("regions", [])
    generation = library.next_generation()
    removed = 0
    for path in paths:
        files = library.files_under(path)
        if not files and path not in roots and path not in regions:
            raise OptionError.naming("{forget} {path}: the library records nothing there", path=path)
        removed += library.forget_files(files, generation)
    if removed:
        library.commit_generation(generation)
    library.remove_roots([path for path in paths if path in roots and not listable(path)])
    library.set_meta(regions=[path for path in regions if path not in paths])
    return removed


def listable(folder):
    try:
        os.listdir(folder)
    except OSError:
        return False
    return True
