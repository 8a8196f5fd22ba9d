"""Many pictures through the detector: decoded ahead by threads, in batches, each process of a
torchrun job extracting its shares and the main process writing obj36 rows in the single-process order.

Used by extract_regions.py (a folder into a TSV) and by the one-step jobs' region cache (detection.cache).
"""

import concurrent.futures
import contextlib
import sys

import torch
from tqdm import tqdm

from detection.extract import extract_regions_batch
from detection.policies import policy_class
from utils.distributed import SINGLE_PROCESS
from utils.errors import VSRNError, first_line
from utils.images import ImageError
from utils.obj36 import append_rows, format_obj36_line


def read_ahead(paths, workers, read_picture):
    """(array or ImageError) of each path in order, read with `read_picture` (a policy's) by
    `workers` threads a few pictures ahead."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for path in paths:
            pending.append(pool.submit(_read_or_error, read_picture, path))
            if len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _read_or_error(read_picture, path):
    try:
        return read_picture(path)
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
    return (
        f"{path}: the detector kept {found} regions, {wanted} (a {regions['img_w']} x {regions['img_h']} picture; "
        "under the caffe policy, pictures of a few pixels leave no proposal)"
    )


def detect(detector, arrays, settings):
    """The regions of each picture, or the error of a picture the detector cannot take (a sliver
    a few pixels thin): a batch that fails is tried one picture at a time."""
    try:
        with torch.inference_mode():
            return extract_regions_batch(detector, arrays, **settings)
    except torch.cuda.OutOfMemoryError:
        raise
    except (VSRNError, RuntimeError, ValueError) as error:
        if len(arrays) == 1:
            return [error]
    return [detect(detector, [array], settings)[0] for array in arrays]


def extract_rows(detector, items, pictures, settings):
    """(line or None, problem or None) for each (id, path) with its picture array or ImageError."""
    results = [None] * len(items)
    good = []
    for position, picture in enumerate(pictures):
        if isinstance(picture, ImageError):
            results[position] = (None, str(picture))
        else:
            good.append(position)
    if good:
        regions = detect(detector, [pictures[p] for p in good], settings)
        for position, region in zip(good, regions):
            image_id, path = items[position]
            if isinstance(region, Exception):
                height, width = pictures[position].shape[:2]
                reason = first_line(region, 120)
                results[position] = (
                    None,
                    f"{path}: the detector cannot take this {width} x {height} picture ({reason})",
                )
                continue
            problem = region_count_problem(path, region, settings["num_boxes"])
            results[position] = (
                (None, problem) if problem else (format_obj36_line(image_id, region).encode("utf-8"), None)
            )
    return results


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


def extract_to_tsv(
    detector, todo, out, settings, counts, world=SINGLE_PROCESS, batch_size=1, workers=4, desc="regions"
):
    """Append the rows of `todo` ((id, path) not yet in `out`) to `out`, in `todo` order;
    every process extracts its shares, the main process writes. Updates `counts` on the main process.

    Each step's rows are written whole and made durable before the next step starts, so a
    process stopped at any moment leaves whole rows (and at most a torn last line, which
    utils.obj36.read_written cuts off)."""
    mine = [position for share in shares(len(todo), batch_size, world) for position in share]
    pictures = read_ahead([todo[p][1] for p in mine], workers, policy_class(settings["policy"]).read_picture)
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(out, "ab")) if world.is_main else None
        progress = stack.enter_context(
            tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, disable=None if world.is_main else True)
        )
        for share in shares(len(todo), batch_size, world):
            batch = [todo[p] for p in share]
            results = extract_rows(detector, batch, [next(pictures) for _ in batch], settings)
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
