"""A photo's original file, opened only as the records hold it: the server reads nothing else.

A file qualifies when it lies under one of the library's folders with no symbolic link between the folder
and it (a link swapped in for a photo after indexing, or for a folder on its path, is refused), is a regular
file, and has the size and modification time recorded when it was indexed. The checks are made on the
opened file itself (its descriptor), so the file read is the file checked.
"""

import os
import stat

OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no link, no FIFO wait


def open_original(library, photo):
    """(an open binary file, its path) of the first of the photo's recorded files, by path, that is as recorded;
    (None, None) when none is."""
    roots = library.roots()
    for path, size, mtime_ns in library.files_of(photo):
        opened = open_as_recorded(path, size, mtime_ns, roots)
        if opened is not None:
            return opened, path
    return None, None


def open_as_recorded(path, size, mtime_ns, roots):
    """The file at `path` opened, when it is the regular file recorded (size, modification time) under one of
    `roots` with no link on its way; else None."""
    root = next((root for root in roots if path.startswith(os.path.join(root, ""))), None)
    if root is None:
        return None
    try:
        f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | OPEN_FLAGS))
    except OSError:
        return None
    status = os.fstat(f.fileno())
    if not (
        stat.S_ISREG(status.st_mode)
        and (status.st_size, status.st_mtime_ns) == (size, mtime_ns)
        and opened_at(f, os.path.join(os.path.realpath(root), os.path.relpath(path, root)))
    ):
        f.close()
        return None
    return f


def opened_at(f, expected):
    """Whether the open file is the one at `expected` (a path without links): no link lay on the way to it."""
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}") == expected
    except OSError:  # no /proc: the path's links as they are now
        return os.path.realpath(f.name) == expected
