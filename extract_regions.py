"""Bottom-up-attention region features of your own pictures, as LXMERT's obj36 TSV or a VSRN split.

    python3 extract_regions.py --images DIR_OR_FILES [...] --weights pytorch_model.bin [--config config.yaml] \\
        --out regions.tsv [--policy caffe|hf] [--boxes 36 | --min_boxes 10 --max_boxes 100] \\
        [--min_size N --max_size N --proposals N] [--device cuda] [--batch_size N]
    # straight into a VSRN data folder (the TSV stays as the resume point):
    python3 extract_regions.py --images DIR --weights W --out regions.tsv \\
        --precomp --captions CAPS --data_path DATA --data_name NAME_precomp --split SPLIT
    # several GPUs, one TSV:
    torchrun --standalone --nproc_per_node=N extract_regions.py --images DIR --weights W --out regions.tsv --device cuda

Pictures: the files given, and in each folder given its files with a picture extension, by
name; the image id is the file name without its extension. One TSV line per picture, in that
order: img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features
(arrays base64 of raw int64 / float32), as utils/tsv_to_precomp.py and LXMERT's loader read.

A rerun with the same --out extracts only the pictures not yet in it (a torn last line, left by
a crash, is dropped and redone). A picture that cannot be read is one line on stderr, skipped
and counted in the summary.
"""
import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import sys

import torch
from tqdm import tqdm

from utils import tsv_to_precomp
from utils.distributed import SINGLE_PROCESS, join_world
from utils.errors import DataError, OptionError, VSRNError, report
from utils.images import ImageError, read_image
from utils.options import ScriptHelpFormatter

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FIXED_BOXES = 36
DEFAULT_MIN_BOXES, DEFAULT_MAX_BOXES = 10, 100
# Bump when what a cached row holds for the same settings changes (cached_regions).
CACHE_VERSION = 1
TSV_FIELDS = len(tsv_to_precomp.LXMERT_FIELDS)


def list_images(sources):
    """(image id, path) of the pictures of `sources` (files, and folders' picture files by name), in that order."""
    items = []
    for source in sources:
        if os.path.isdir(source):
            names = sorted(e.name for e in os.scandir(source) if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
            items.extend((os.path.splitext(name)[0], os.path.join(source, name)) for name in names)
        elif os.path.exists(source):
            items.append((os.path.splitext(os.path.basename(source))[0], source))
        else:
            raise OptionError(f"--images {source}: no such file or folder")
    if not items:
        raise OptionError(f"--images {' '.join(sources)}: no pictures ({', '.join(IMAGE_EXTENSIONS)})")
    check_ids(items)
    return items


def check_ids(items):
    """Each image id once, and each one a TSV field can hold."""
    seen = {}
    for image_id, path in items:
        if any(c in image_id for c in "\t\r\n") or image_id.encode("utf-8", "replace").decode("utf-8") != image_id:
            raise OptionError(f"--images: {path!r}: a file name with a tab, a newline or bytes that are not UTF-8 cannot be a TSV image id; rename it")
        if image_id in seen:
            raise OptionError(f"--images: {seen[image_id]} and {path} have the same image id {image_id!r} (the file name without its extension)")
        seen[image_id] = path


def read_written(path):
    """The ids of the whole rows of an obj36 TSV (a missing file has none) and its last whole row.

    A row is whole when its newline was written: a crash mid-write leaves a last line without
    one, which is cut off here so that the next row starts on a line of its own."""
    ids, last, end = set(), None, 0
    if not os.path.exists(path):
        return ids, last
    with open(path, "r+b") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                if not (ids or _row_start(line)):  # another kind of file: leave it as it is
                    raise DataError(f"{path}:{number}: not an obj36 row; choose another --out")
                f.truncate(end)
                break
            fields = line.count(b"\t") + 1
            try:
                if fields != TSV_FIELDS:
                    raise ValueError(f"{fields} tab-separated fields")
                ids.add(line[: line.index(b"\t")].decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError is one
                raise DataError(f"{path}:{number}: not an obj36 row ({str(e)[:60]}); choose another --out") from None
            last, end = line, end + len(line)
    return ids, last


_ROW_FIELD = re.compile(rb"[0-9A-Za-z+/=]*")


def _row_start(fragment):
    """Whether `fragment` can be the beginning of an obj36 row: an id, then digits and base64."""
    fields = fragment.split(b"\t")
    return 2 <= len(fields) <= TSV_FIELDS and all(_ROW_FIELD.fullmatch(field) for field in fields[1:])


def check_resumable(path, last_row, num_boxes):
    """That the rows already in `path` have this run's fixed box count (other runs' rows would mix in)."""
    if last_row is None or num_boxes is None:
        return
    fields = last_row.split(b"\t")
    held = int(fields[tsv_to_precomp.LXMERT_FIELDS.index("num_boxes")])
    if held != num_boxes:
        raise OptionError(f"--out {path} holds rows of {held} boxes; this run extracts {num_boxes}: choose another --out")


def read_ahead(paths, workers):
    """(array or ImageError) of each path in order, decoded by `workers` threads a few pictures ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for path in paths:
            pending.append(pool.submit(_read_or_error, path))
            if len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _read_or_error(path):
    try:
        return read_image(path)
    except ImageError as e:
        return e


def shares(count, batch_size, world):
    """Per step, the positions of this process's batch: step s covers positions
    [s * B * N, (s + 1) * B * N), rank r the r-th batch of it, so the rows of a step
    gathered in rank order are in position order."""
    step_size = batch_size * world.size
    for start in range(0, count, step_size):
        first = start + world.rank * batch_size
        yield range(first, min(first + batch_size, count))


def region_count_problem(path, regions, num_boxes):
    """Why a picture's regions cannot be a row (none, or not the fixed count), or None."""
    found = len(regions["boxes"])
    if found and (num_boxes is None or found == num_boxes):
        return None
    wanted = f"{num_boxes} needed" if num_boxes else "at least 1 needed"
    return (f"{path}: the detector kept {found} regions, {wanted} (a {regions['img_w']} x {regions['img_h']} picture; "
            "under the caffe policy, pictures of a few pixels leave no proposal)")


def detect(detector_module, detector, arrays, settings):
    """The regions of each picture, or the error of a picture the detector cannot take (a sliver
    a few pixels thin): a batch that fails is tried one picture at a time."""
    try:
        with torch.inference_mode():
            return detector_module.extract_regions_batch(detector, arrays, **settings)
    except torch.cuda.OutOfMemoryError:
        raise
    except (VSRNError, RuntimeError, ValueError) as error:
        if len(arrays) == 1:
            return [error]
    return [detect(detector_module, detector, [array], settings)[0] for array in arrays]


def extract_rows(detector_module, detector, items, pictures, settings):
    """(line or None, problem or None) for each (id, path) with its picture array or ImageError."""
    results = [None] * len(items)
    good = []
    for position, picture in enumerate(pictures):
        if isinstance(picture, ImageError):
            results[position] = (None, str(picture))
        else:
            good.append(position)
    if good:
        regions = detect(detector_module, detector, [pictures[p] for p in good], settings)
        for position, region in zip(good, regions):
            (image_id, path) = items[position]
            if isinstance(region, Exception):
                height, width = pictures[position].shape[:2]
                reason = str(region).strip().splitlines()[0][:120] if str(region).strip() else type(region).__name__
                results[position] = (None, f"{path}: the detector cannot take this {width} x {height} picture ({reason})")
                continue
            problem = region_count_problem(path, region, settings["num_boxes"])
            results[position] = (None, problem) if problem else (tsv_to_precomp.format_obj36_line(image_id, region).encode("utf-8"), None)
    return results


def append_rows(f, rows):
    """Write whole rows and make them durable before the next step starts."""
    f.write(b"".join(rows))
    f.flush()
    os.fsync(f.fileno())


class Counts:
    """Pictures of a run: already in the TSV, written, skipped."""

    def __init__(self, already):
        self.already, self.written, self.skipped = already, 0, 0

    def summary(self, out):
        parts = [f"{self.written} images written to {out}"]
        if self.already:
            parts.append(f"{self.already} were already there")
        if self.skipped:
            parts.append(f"{self.skipped} skipped, each named above")
        return "; ".join(parts)


def extract_to_tsv(detector, todo, out, settings, counts, world=SINGLE_PROCESS, batch_size=1, workers=4, desc="regions"):
    """Append the rows of `todo` ((id, path) not yet in `out`) to `out`, in `todo` order;
    every process extracts its shares, the main process writes. Updates `counts` on the main process."""
    import detector as detector_module

    mine = [position for share in shares(len(todo), batch_size, world) for position in share]
    pictures = read_ahead([todo[p][1] for p in mine], workers)
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(out, "ab")) if world.is_main else None
        progress = stack.enter_context(tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, disable=None if world.is_main else True))
        for share in shares(len(todo), batch_size, world):
            batch = [todo[p] for p in share]
            results = extract_rows(detector_module, detector, batch, [next(pictures) for _ in batch], settings)
            gathered = world.gather_to_main(results)
            if not world.is_main:
                continue
            rows = [line for results in gathered for line, _ in results if line is not None]
            problems = [problem for results in gathered for _, problem in results if problem is not None]
            append_rows(f, rows)
            for problem in problems:
                progress.write(f"skipped: {problem}", file=sys.stderr)
            counts.written += len(rows)
            counts.skipped += len(problems)
            progress.update(len(rows) + len(problems))
            if counts.skipped:
                progress.set_postfix(skipped=counts.skipped, refresh=False)


def detector_settings(args):
    """The selection keywords of detector.extract_regions from the flags."""
    variable = args.min_boxes is not None or args.max_boxes is not None
    if variable and args.boxes is not None:
        raise OptionError("--boxes N takes exactly N boxes per image; --min_boxes/--max_boxes take a variable number: give one or the other")
    if variable and args.policy != "caffe":
        raise OptionError(f"--min_boxes/--max_boxes select with the caffe policy; --policy {args.policy} takes --boxes N")
    settings = dict(policy=args.policy, conf_thresh=args.conf_thresh, min_size=args.min_size, max_size=args.max_size, proposals=args.proposals)
    if variable:
        settings.update(num_boxes=None, min_boxes=DEFAULT_MIN_BOXES if args.min_boxes is None else args.min_boxes,
                        max_boxes=DEFAULT_MAX_BOXES if args.max_boxes is None else args.max_boxes)
        if not 1 <= settings["min_boxes"] <= settings["max_boxes"]:
            raise OptionError(f"--min_boxes {settings['min_boxes']} --max_boxes {settings['max_boxes']}: expected 1 <= min <= max")
    else:
        settings.update(num_boxes=FIXED_BOXES if args.boxes is None else args.boxes)
        if settings["num_boxes"] < 1:
            raise OptionError(f"--boxes {settings['num_boxes']}: expected at least 1")
    return settings


def check_arguments(args):
    if not os.path.isfile(args.weights):
        raise OptionError(f"--weights {args.weights}: file not found (the detector's pytorch_model.bin or faster_rcnn_from_caffe_attr.pkl)")
    if args.config and not os.path.isfile(args.config):
        raise OptionError(f"--config {args.config}: file not found")
    if args.batch_size < 1 or args.workers < 1:
        raise OptionError("--batch_size and --workers: expected at least 1")
    if args.precomp:
        missing = [f"--{name}" for name in ("captions", "data_path", "data_name", "split") if getattr(args, name) is None]
        if missing:
            raise OptionError(f"--precomp writes a VSRN split: give {', '.join(missing)} too")
        tsv_to_precomp.split_folder(args)
        if args.min_boxes is not None or args.max_boxes is not None:
            raise OptionError("--precomp: VSRN needs the same number of boxes per image; use --boxes N, not --min_boxes/--max_boxes")
    elif args.captions or args.data_path or args.data_name or args.split or args.karpathy_split:
        raise OptionError("--captions, --data_path, --data_name, --split and --karpathy_split go with --precomp")


def default_device(requested):
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def write_split(args, num_boxes):
    """The VSRN split of the TSV and its captions, by utils/tsv_to_precomp.py's conversion."""
    with open(args.out, "rb") as f:
        first = f.readline().rstrip(b"\n")
    if not first:
        raise DataError(f"{args.out}: no rows to write a split from")
    feature_dim = tsv_to_precomp.parse_obj36_line(first, f"{args.out}:1")["features"].shape[1]
    folder = tsv_to_precomp.split_folder(args)
    written, skipped = tsv_to_precomp.convert([args.out], args.captions, folder, args.split, num_boxes, feature_dim, args.karpathy_split)
    print(f"{written} images written to {folder}/{args.split}_*" + (f" ({skipped} of other Karpathy splits skipped)" if skipped else ""))


def run(args, world):
    settings = detector_settings(args)
    check_arguments(args)
    if world.is_main:
        items = list_images(args.images)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        done, last_row = read_written(args.out)
        check_resumable(args.out, last_row, settings["num_boxes"])
        todo = [item for item in items if item[0] not in done]
        counts = Counts(len(items) - len(todo))
    else:
        todo, counts = None, None
    todo = world.broadcast(todo)
    if todo:
        import detector as detector_module

        device = default_device(args.device) if world is SINGLE_PROCESS else world.device
        net = detector_module.load_detector(args.weights, args.config, device)
        extract_to_tsv(net, todo, args.out, settings, counts, world, args.batch_size, args.workers)
    if world.is_main:
        print(counts.summary(args.out))
    world.close()  # before the conversion: the other processes need not wait for it
    if world.is_main and args.precomp:
        write_split(args, settings["num_boxes"])
    return 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ScriptHelpFormatter)
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE", help="folders of pictures and picture files")
    p.add_argument("--weights", required=True, help="the detector: pytorch_model.bin (unc-nlp/frcnn-vg-finetuned) or faster_rcnn_from_caffe_attr.pkl")
    p.add_argument("--config", default=None, help="the detector's config.yaml (None: the published values)")
    p.add_argument("--out", required=True, help="the obj36 TSV to write, or to complete when it exists")
    p.add_argument("--policy", default="caffe", choices=("caffe", "hf"),
                   help="caffe: bottom-up-attention's generate_tsv.py (SCAN's and LXMERT's features); hf: the LXMERT demo's selection")
    p.add_argument("--boxes", type=int, default=None, help=f"exactly this many boxes per image (None: {FIXED_BOXES}, unless --min_boxes/--max_boxes)")
    p.add_argument("--min_boxes", type=int, default=None, help=f"variable count, caffe policy: at least this many boxes (None: {DEFAULT_MIN_BOXES} when --max_boxes is given)")
    p.add_argument("--max_boxes", type=int, default=None, help=f"variable count, caffe policy: at most this many boxes (None: {DEFAULT_MAX_BOXES} when --min_boxes is given)")
    p.add_argument("--conf_thresh", type=float, default=0.2, help="with a variable count: keep regions of at least this confidence")
    p.add_argument("--min_size", type=int, default=None, help="shortest side of the network input (None: the policy's, 600 caffe / 800 hf)")
    p.add_argument("--max_size", type=int, default=None, help="longest side at most (None: the policy's, 1000 caffe / 1333 hf)")
    p.add_argument("--proposals", type=int, default=None, help="RPN proposals kept after NMS (None: the policy's, 300)")
    p.add_argument("--device", default=None, help="cuda or cpu (None: cuda when available; under torchrun each process takes its LOCAL_RANK's GPU)")
    p.add_argument("--batch_size", type=int, default=1, help="pictures per forward pass of each process")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads that decode pictures ahead of the detector")
    p.add_argument("--dist_timeout", type=float, default=10.0, help="minutes a torchrun process waits for the others before failing")
    p.add_argument("--precomp", action="store_true", help="then write a VSRN split from the TSV and --captions (utils/tsv_to_precomp.py's conversion)")
    tsv_to_precomp.add_split_arguments(p, required=False)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    world = SINGLE_PROCESS
    try:
        world = join_world(args)
        code = run(args, world)
    except (VSRNError, OSError) as e:
        code = report(e)
    except KeyboardInterrupt:
        print(f"error: interrupted; the rows in {args.out} are whole: rerun the same command to continue", file=sys.stderr)
        code = 130
    return world.exit(code)


# ---- the one-step demos: regions of a few pictures, extracted once ----

def _file_identity(path):
    status = os.stat(path)
    return f"{os.path.realpath(path)}|{status.st_size}|{status.st_mtime_ns}"


def _digest(text, length=20):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def regions_cache_path(weights, config=None, policy="caffe", num_boxes=36, cache_dir=None):
    """The cache TSV of one detector file (by path, size and modification time) and one set of settings."""
    from data import cache_dir as vsrn_cache_dir  # data.py's tokenizer imports take seconds; only the demos need it
    key = json.dumps({
        "weights": _file_identity(weights),
        "config": _file_identity(config) if isinstance(config, str) else config,
        "policy": policy, "num_boxes": num_boxes, "version": CACHE_VERSION,
    }, sort_keys=True)
    return os.path.join(cache_dir or vsrn_cache_dir(), "regions", f"{policy}_{num_boxes}_{_digest(key)}.tsv")


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive lock of `path`'s lock file: two processes never extend one cache at once."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_regions(image_paths, weights, config=None, policy="caffe", num_boxes=36, device="cpu", cache_dir=None, batch_size=1):
    """{image id: regions dict (detector.extract_regions's)} of the pictures, extracting only those
    not yet in the cache ($VSRN_CACHE/regions/, VSRN_CACHE defaulting to ~/.cache/vsrn).

    A cached row belongs to one picture file (path, size, modification time): an edited picture
    is extracted again. Pictures that cannot be read are reported on stderr, one line each, and
    are absent from the result."""
    if not os.path.isfile(weights):
        raise OptionError(f"{weights}: detector weights not found")
    items = [(_digest(_file_identity(path) if os.path.exists(path) else path), path) for path in image_paths]
    names = [(os.path.splitext(os.path.basename(path))[0], path) for path in image_paths]
    check_ids(names)
    cache = regions_cache_path(weights, config, policy, num_boxes, cache_dir)
    settings = dict(policy=policy, num_boxes=num_boxes)
    with _locked(cache):
        done, _ = read_written(cache)
        todo = [item for item in items if item[0] not in done]
        if todo:
            import detector as detector_module

            net = detector_module.load_detector(weights, config, device)
            counts = Counts(len(items) - len(todo))
            extract_to_tsv(net, todo, cache, settings, counts, batch_size=batch_size, workers=min(4, os.cpu_count() or 1))
    wanted = {key: name for (key, _), (name, _) in zip(items, names)}
    found = {}
    with contextlib.suppress(FileNotFoundError), open(cache, "rb") as f:
        for number, line in enumerate(f, start=1):
            key = line[: line.find(b"\t")].decode("utf-8")
            if key in wanted:
                found[key] = tsv_to_precomp.parse_obj36_line(line.rstrip(b"\n"), f"{cache}:{number}")
    return {wanted[key]: found[key] for key, _ in items if key in found}


if __name__ == "__main__":
    sys.exit(main())
