"""Writes that never leave a half-written file behind: temp file in the same folder, then rename."""

import contextlib
import os
import tempfile


def _umask():
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; on success it replaces `path` in one rename.

    The file gets the mode a plain open() would give it (0666 less the umask): mkstemp's
    private 0600 would make shared datasets and checkpoints unreadable to other users.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.filename in (None, tmp):  # the temporary file is no name a user knows: the file being written is
            raise OSError(e.errno, e.strerror, path) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_copy(src, dst):
    """Copy `src` to `dst` so that `dst` is always either the old or the new complete file."""
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)


def remove_leftovers(path):
    """Remove the temporary files that atomic_write(path) left behind when its process was killed mid-write
    (call it only where no other process is writing `path`); their count."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(prefix) and name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed
