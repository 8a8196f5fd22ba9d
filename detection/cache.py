"""The one-step jobs' region cache: each picture's regions extracted once, then read back.

`$VSRN_CACHE/regions/POLICY_BOXES_KEY.tsv` (VSRN_CACHE defaults to ~/.cache/vsrn) holds one obj36
row per picture file for one detector file (path, size, modification time) and one RegionSettings
(by its record); a row is found again by the picture's path, size and modification time, so an edited
picture is extracted again. Used by visualize.py --images, lxmert_match.py --images and
search.py --like; delete the folder to clear it.
"""

import contextlib
import fcntl
import hashlib
import json
import os

from detection.pipeline import Counts, extract_to_tsv
from detection.settings import RegionSettings
from detection.weights import load_detector
from utils.cache import cache_dir as default_cache_dir
from utils.errors import DataError, Interrupted, OptionError
from utils.images import check_ids, list_images
from utils.obj36 import parse_row, read_written
from utils.text import plural


def _file_identity(path):
    status = os.stat(path)
    return f"{os.path.realpath(path)}|{status.st_size}|{status.st_mtime_ns}"


def _digest(text, length=20):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def regions_cache_path(weights, config=None, settings=RegionSettings(), cache_dir=None):
    """The cache TSV of one detector file (by path, size and modification time) and one RegionSettings."""
    key = {
        "weights": _file_identity(weights),
        "config": _file_identity(config) if isinstance(config, str) else config,
        "settings": settings.record(),
    }
    name = f"{settings.policy}_{settings.boxes}_{_digest(json.dumps(key, sort_keys=True))}.tsv"
    return os.path.join(cache_dir or default_cache_dir(), "regions", name)


@contextlib.contextmanager
def _locked(folder):
    """Hold an exclusive lock of the cache folder itself: two processes never extend the cache at once,
    and no lock file is left behind."""
    os.makedirs(folder, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def cached_regions(
    image_paths, weights, config=None, settings=RegionSettings(), device="cpu", cache_dir=None, batch_size=1
):
    """{image id: regions dict (detection.extract's)} of the pictures, extracting only those not
    yet in the cache, then saying where they are. Pictures that cannot be used are reported on
    stderr, one line each, and are absent from the result. Ctrl-C stops with an Interrupted that
    says what the cache kept."""
    if not os.path.isfile(weights):
        raise OptionError(f"{weights}: detector weights not found")
    items = [(_digest(_file_identity(path) if os.path.exists(path) else path), path) for path in image_paths]
    names = [(os.path.splitext(os.path.basename(path))[0], path) for path in image_paths]
    check_ids(names)
    cache = regions_cache_path(weights, config, settings, cache_dir)
    with _locked(os.path.dirname(cache)):
        done, _ = read_written(cache)
        todo = [item for item in items if item[0] not in done]
        if todo:
            counts = Counts(len(items) - len(todo))
            detector = load_detector(weights, config, device)
            try:
                extract_to_tsv(
                    detector, todo, cache, settings, counts, batch_size=batch_size, workers=min(4, os.cpu_count() or 1)
                )
            except KeyboardInterrupt:
                raise Interrupted(
                    f"the regions of the {plural(counts.written, 'picture')} extracted before the stop "
                    f"are kept in {cache}; rerun the same command to continue"
                ) from None
            del detector  # the pictures' scoring that follows needs its memory
            print(
                f"Regions of {plural(counts.written, 'picture')} extracted ({settings.policy} policy, "
                f"{settings.boxes} boxes) and cached in {cache}"
                + (f"; {counts.already} were cached already" if counts.already else "")
            )
    wanted = {key: name for (key, _), (name, _) in zip(items, names)}
    found = {}
    with contextlib.suppress(FileNotFoundError), open(cache, "rb") as f:
        for number, line in enumerate(f, start=1):
            key = line[: line.find(b"\t")].decode("utf-8")
            if key in wanted:
                found[key] = parse_row(line.rstrip(b"\n"), f"{cache}:{number}")
    return {wanted[key]: found[key] for key, _ in items if key in found}


def photo_regions(
    sources, weights, config=None, settings=RegionSettings(), device="cpu", batch_size=1, flag="--images"
):
    """(image ids, paths, regions dicts) of the usable pictures of `sources` (files and folders, as
    utils.images.list_images takes them, `flag` naming them), through the cache. None usable is a
    DataError; the others are named on stderr by cached_regions and left out, which is said here."""
    items = list_images(sources, flag)
    regions = cached_regions([path for _, path in items], weights, config, settings, device, batch_size=batch_size)
    kept = [(image_id, path) for image_id, path in items if image_id in regions]
    if not kept:
        raise DataError(
            f"{flag} {' '.join(sources)}: none of the {plural(len(items), 'picture')} could be used "
            "(see the lines above)"
        )
    if len(kept) < len(items):
        print(
            f"{len(items) - len(kept)} of the {plural(len(items), 'picture')} could not be used (see the lines above); "
            "going on with the others"
        )
    return [i for i, _ in kept], [p for _, p in kept], [regions[i] for i, _ in kept]
