"""index.lock: one index.py at a time on a library."""

import fcntl
import os

from utils.errors import OptionError

LOCK_FILE = "index.lock"


class LibraryLock:
    """index.lock held for the run: a second index.py on the same library is refused, not queued."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, LOCK_FILE)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise OptionError(
                f"{folder}: another index.py ({holder}) is updating this library; wait for it to finish"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()}")
        self.handle.flush()

    def release(self):
        self.handle.close()
