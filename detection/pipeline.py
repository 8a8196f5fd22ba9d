"""The front door for the regions of many pictures: `detect_pictures` runs a list of pictures through
the detector, decoded ahead by threads, in batches, each process of a torchrun job extracting its
shares, and yields each picture's regions, or why it has none, in the list's order.

    for step in detect_pictures(detector, paths, RegionSettings(), world, batch_size=4):
        for found in step:          # on the main process; the others extract their shares and yield nothing
            found.index, found.regions, found.problem

Every job that extracts many pictures goes through it: extract_regions.py (`extract_to_tsv`), the
one-step jobs' region cache (detection.cache), the photo library's indexer, make_dataset.py.
"""

import concurrent.futures
import contextlib
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from detection.extract import extract_regions_batch
from detection.policies import POLICIES
from utils.distributed import SINGLE_PROCESS
from utils.errors import VSRNError, first_line, without_path
from utils.images import ImageError
from utils.obj36 import append_rows, format_obj36_line


@dataclass
class Detected:
    """One picture's outcome: `index` in the list given, its regions dict (detection.extract's), or the
    `problem` that left it without (said without its path)."""

    index: int
    regions: dict | None = None
    problem: str | None = None


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
    [s * B * N, (s + 1) * B * N), rank r the r-th batch of it, so the results of a step
    gathered in rank order are in position order."""
    step_size = batch_size * world.size
    for start in range(0, count, step_size):
        first = start + world.rank * batch_size
        yield range(first, min(first + batch_size, count))


def region_count_problem(regions, boxes):
    """Why a picture's regions are not what the settings ask (none, or not the exact count), or None."""
    found = len(regions["boxes"])
    if found and (boxes is None or found == boxes):
        return None
    wanted = f"{boxes} needed" if boxes else "at least 1 needed"
    return (
        f"the detector kept {found} regions, {wanted} (a {regions['img_w']} x {regions['img_h']} picture; "
        "under the caffe policy, pictures of a few pixels leave no proposal)"
    )


def detect(detector, arrays, settings):
    """The regions of each picture, or the error of a picture the detector cannot take (a sliver
    a few pixels thin): a batch that fails is tried one picture at a time."""
    try:
        with torch.inference_mode():
            return extract_regions_batch(detector, arrays, settings)
    except torch.cuda.OutOfMemoryError:
        raise
    except (VSRNError, RuntimeError, ValueError) as error:
        if len(arrays) == 1:
            return [error]
    return [detect(detector, [array], settings)[0] for array in arrays]


def detect_share(detector, share, paths, pictures, settings):
    """The Detected of each picture of a share (positions `share` of `paths`, with their arrays or ImageErrors)."""
    results = [
        Detected(index, problem=without_path(str(picture), paths[index])) if isinstance(picture, ImageError) else None
        for index, picture in zip(share, pictures)
    ]
    good = [position for position, result in enumerate(results) if result is None]
    found = detect(detector, [pictures[p] for p in good], settings) if good else []
    for position, regions in zip(good, found):
        index = share[position]
        if isinstance(regions, Exception):
            height, width = pictures[position].shape[:2]
            reason = first_line(regions, 120)
            results[position] = Detected(
                index, problem=f"the detector cannot take this {width} x {height} picture ({reason})"
            )
        else:
            problem = region_count_problem(regions, settings.boxes)
            results[position] = Detected(index, None if problem else regions, problem)
    return results


def keep_detected(found, pictures):
    """`detect_pictures`' default `finish`: the Detected as they are (the pictures stay where they were read)."""
    return found


def detect_pictures(detector, paths, settings, world=SINGLE_PROCESS, batch_size=1, workers=4, finish=keep_detected):
    """Run the pictures at `paths` through the detector with `settings` (a RegionSettings); yield, on the main
    process, a list per step: for each picture of the step, in the order of `paths`, a Detected (its regions,
    or the problem that left it without: unreadable, too thin for the network, fewer regions than asked).

    Under torchrun (`world`) every process reads and extracts its shares (`batch_size` pictures each per
    step) and the main process gathers them; the other processes yield nothing, and must iterate to the end
    too. `workers` threads decode pictures ahead, as the policy reads them. `finish(found, pictures)`, run on
    the process that extracted them, makes what is gathered of a share's Detected and picture arrays (the
    photo library embeds them there); the default keeps the Detected.
    """
    read_picture = POLICIES[settings.policy].read_picture
    mine = [position for share in shares(len(paths), batch_size, world) for position in share]
    pictures = read_ahead([paths[p] for p in mine], workers, read_picture)
    for share in shares(len(paths), batch_size, world):
        arrays = [next(pictures) for _ in share]
        gathered = world.gather_to_main(finish(detect_share(detector, share, paths, arrays, settings), arrays))
        if world.is_main:
            yield [result for results in gathered for result in results]


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
    """Append the obj36 rows of `todo` ((id, path) not yet in `out`) to `out`, in `todo` order;
    every process extracts its shares, the main process writes. Updates `counts` on the main process.

    Each step's rows are written whole and made durable before the next step starts, so a
    process stopped at any moment leaves whole rows (and at most a torn last line, which
    utils.obj36.read_written cuts off)."""
    paths = [path for _, path in todo]
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(out, "ab")) if world.is_main else None
        progress = stack.enter_context(
            tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True, disable=None if world.is_main else True)
        )
        for step in detect_pictures(detector, paths, settings, world, batch_size, workers):
            rows = [
                format_obj36_line(todo[d.index][0], d.regions).encode("utf-8") for d in step if d.regions is not None
            ]
            problems = [f"{paths[d.index]}: {d.problem}" for d in step if d.problem]
            append_rows(f, rows)
            for problem in problems:
                progress.write(f"skipped: {problem}", file=sys.stderr)
            counts.written += len(rows)
            counts.skipped += len(problems)
            progress.update(len(rows) + len(problems))
            if counts.skipped:
                progress.set_postfix(skipped=counts.skipped, refresh=False)
