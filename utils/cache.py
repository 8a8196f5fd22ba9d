"""Where the project keeps what it can recompute: token ids of caption files, regions of pictures."""

import os


def cache_dir():
    """$VSRN_CACHE, by default ~/.cache/vsrn."""
    return os.environ.get("VSRN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vsrn")
