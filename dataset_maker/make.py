"""make_dataset.py's work: pictures and caption annotations in, a VSRN dataset out (DATA/NAME_precomp in the
precomputed layout, its vocabulary by vocab.py's rules), then the commands that train and evaluate on it.

The steps: the annotations read (dataset_maker.annotations), the pictures gathered, read and each kept once
by content, split (dataset_maker.pictures), their regions found or extracted (dataset_maker.regions), the
splits written (dataset_maker.layout). Nothing of the dataset is written before the annotations, pictures,
regions and vocabulary are known to be usable; the layout's files appear only whole; the regions the
detector extracts are kept as they come (the resume point).
"""

import contextlib
import fcntl
import json
import os
import shlex
import sys
from dataclasses import dataclass, field

from dataset_maker.annotations import Reading, read_annotation
from dataset_maker.layout import LAYOUT_FILES, layout_paths, remove_split, write_split
from dataset_maker.pictures import (
    SPLITS,
    Problems,
    assign_splits,
    gather_pictures,
    merge_duplicates,
    parse_ratios,
    usable_pictures,
)
from dataset_maker.regions import REGIONS_TSV, dataset_regions
from detection.settings import RegionSettings
from utils.atomic import atomic_write, remove_leftovers
from utils.distributed import SINGLE_PROCESS
from utils.errors import DataError, OptionError, VocabularyError
from utils.text import plural
from utils.tsv_to_precomp import split_folder
from vocab import build_vocab, load_vocab, save_vocab, vocab_digest

RECORD = "make_dataset.json"  # what made the folder: a folder without it is not make_dataset.py's to write


@dataclass
class DatasetRequest:
    """What make_dataset.py was asked (its flags)."""

    data_path: str
    data_name: str
    annotations: list = field(default_factory=list)  # (split or None, path) of each annotation file or folder
    images: str = None  # the folder the annotations' picture names are relative to
    format: str = "auto"
    columns: str = None
    use_restval: bool = False
    splits: str = "0.8,0.1,0.1"
    seed: int = 0
    vocab_path: str = "vocab"
    threshold: int = 4
    overwrite_vocab: bool = False
    detector: str = None
    detector_config: str = None
    min_size: int = None
    max_size: int = None
    proposals: int = None
    device: str = None
    batch_size: int = 1
    workers: int = 4
    regions: list = None  # published rows
    library: str = None


@dataclass
class Summary:
    folder: str
    vocab_file: str
    feature_dim: int
    splits: dict  # split -> (pictures, captions)
    malformed: int = 0
    left_out: dict = field(default_factory=dict)  # why -> count
    merged: int = 0

    def lines(self):
        written = ", ".join(f"{split} {p} / {c}" for split, (p, c) in self.splits.items() if p)
        pictures = sum(p for p, _ in self.splits.values())
        captions = sum(c for _, c in self.splits.values())
        lines = [
            f"{plural(pictures, 'picture')} and {plural(captions, 'caption')} (pictures / captions: {written}) "
            f"written to {self.folder}"
        ]
        skipped = ([plural(self.malformed, "malformed record")] if self.malformed else []) + [
            f"{count} {why}" for why, count in self.left_out.items() if count
        ]
        if skipped:
            lines.append(f"left out, each named above: {', '.join(skipped)}")
        if self.merged:
            lines.append(f"{plural(self.merged, 'file')} held a picture already named: each picture kept once")
        return lines


def annotation_sources(request):
    """(split, path) of each annotation, a folder of pictures and .txt files when none is given."""
    if request.annotations:
        return list(request.annotations)
    if request.images and not os.path.isdir(request.images):
        raise OptionError(f"--images {request.images}: no such folder")
    if request.images:
        return [(None, request.images)]
    raise OptionError("--annotations: give the caption file(s), or --images a folder of pictures with .txt captions")


def picture_root(request, sources):
    """The folder the annotations' picture names are relative to: --images, else the first annotation's folder."""
    if request.images:
        if not os.path.isdir(request.images):
            raise OptionError(f"--images {request.images}: no such folder")
        return request.images
    path = sources[0][1]
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def region_source(request):
    """The one source of regions: the detector's settings, published rows or a photo library."""
    flags = (("--detector", request.detector), ("--regions", request.regions), ("--library", request.library))
    given = [flag for flag, value in flags if value]
    if len(given) != 1:
        raise OptionError(
            "give one source of region features: --detector WEIGHTS (extract them), --regions ROWS.tsv (published "
            "obj36 or generate_tsv.py rows) or --library LIB (a photo library's)"
            + (f", not {' and '.join(given)}" if given else "")
        )
    if request.detector:
        for flag, path in (("--detector", request.detector), ("--detector_config", request.detector_config)):
            if path and not os.path.isfile(path):
                raise OptionError(f"{flag} {path}: file not found")
        if request.batch_size < 1 or request.workers < 1:
            raise OptionError("--batch_size and --workers: expected at least 1")
        # VSRN's input, the caffe policy's 36 regions, at the sizes given.
        settings = RegionSettings(min_size=request.min_size, max_size=request.max_size, proposals=request.proposals)
        detector = dict(weights=request.detector, config=request.detector_config, device=request.device)
        return dict(detector={**detector, "settings": settings}, batch_size=request.batch_size, workers=request.workers)
    for path in request.regions or ():
        if not os.path.isfile(path):
            raise OptionError(f"--regions {path}: file not found")
    return dict(rows=list(request.regions)) if request.regions else dict(library=request.library)


@contextlib.contextmanager
def writing_to(folder):
    """Hold the dataset folder for this run: no other make_dataset.py writes it meanwhile; a folder holding
    another dataset (one without make_dataset.json) is refused; files a killed run left half-written go."""
    os.makedirs(folder, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OptionError(f"{folder}: another make_dataset.py is writing this dataset; wait for it") from None
        foreign = [n for n in sorted(os.listdir(folder)) if n.endswith("_ims.npy")]
        if foreign and not os.path.isfile(os.path.join(folder, RECORD)):
            raise OptionError(
                f"{folder}: holds a dataset make_dataset.py did not write ({foreign[0]}); choose another --data_name"
            )
        for split in SPLITS:
            for path in layout_paths(folder, split).values():
                remove_leftovers(path)
        remove_leftovers(os.path.join(folder, RECORD))
        yield
    finally:
        os.close(handle)


@dataclass
class Plan:
    """The dataset to write: what reading the annotations gave, the pictures of each split."""

    reading: Reading
    formats: list  # each annotation's format, as read
    splits: dict  # split -> pictures
    splits_given: bool  # by the annotations, else drawn by the seed
    merged: int  # files that held a picture already named


def plan_pictures(request, ratios, folder, problems):
    """The Plan of the request's annotations and pictures (those left out named by `problems`)."""
    sources = annotation_sources(request)
    root = picture_root(request, sources)
    reading = Reading(request.use_restval)
    formats = [
        read_annotation(path, reading, request.format, request.columns, split, exclude=[folder])
        for split, path in sources
    ]
    if not reading.records:
        raise DataError(
            f"{', '.join(path for _, path in sources)}: no picture with a readable record (see the lines above)"
        )
    pictures = usable_pictures(gather_pictures(reading.records, root), problems, request.workers)
    pictures, merged = merge_duplicates(pictures)
    if not pictures:
        raise DataError(f"none of the pictures named in {sources[0][1]} can be used (see the lines above)")
    splits, given = assign_splits(pictures, ratios, request.seed)
    return Plan(reading, formats, splits, given, merged)


def dataset_vocab(request, splits):
    """The vocabulary of the train and dev captions by vocab.py's rules, and its file; refused before
    anything is written when the file holds another one (unless --overwrite_vocab)."""
    path = os.path.join(request.vocab_path, f"{request.data_name}_vocab.json")
    vocab = build_vocab(
        (caption for split in ("train", "dev") for picture in splits[split] for caption in picture.captions),
        request.threshold,
    )
    if os.path.exists(path) and not request.overwrite_vocab:
        old = load_vocab(path)
        if vocab_digest(old) != vocab_digest(vocab):
            raise VocabularyError(
                f"{path}: holds another vocabulary ({len(old)} words; this data's has {len(vocab)}), which models "
                "trained with it need; pass --overwrite_vocab to replace it, or another --vocab_path"
            )
    return vocab, path


def make_dataset(request, world=SINGLE_PROCESS):
    """Make the dataset `request` asks for; its Summary on the main process, None on the others of a torchrun job."""
    ratios = parse_ratios(request.splits)
    folder = split_folder(request.data_path, request.data_name)
    source = region_source(request)
    with contextlib.ExitStack() as stack:
        pictures = None
        if world.is_main:
            stack.enter_context(writing_to(folder))
            problems = Problems()
            plan = plan_pictures(request, ratios, folder, problems)
            splits = plan.splits
            pictures = [picture for split in SPLITS for picture in splits[split]]
        regions = dataset_regions(pictures, folder, world, **source)
        world.close()
        if not world.is_main:
            return None
        for split in SPLITS:
            kept = []
            for picture in splits[split]:
                if regions.has(picture):
                    kept.append(picture)
                else:
                    problems.leave_out("without regions", regions.missing(picture))
            splits[split] = kept
        usable = [picture for split in SPLITS for picture in splits[split]]
        if not usable:
            raise DataError(f"none of the {plural(len(pictures), 'picture')} has regions (see the lines above)")
        vocab, vocab_file = dataset_vocab(request, splits)
        first = regions.regions(usable[0])
        shape = (len(first["boxes"]), first["features"].shape[1])
        for split in SPLITS:
            if splits[split]:
                write_split(folder, split, splits[split], regions, shape)
            else:
                for path in remove_split(folder, split):
                    print(f"{path}: of an earlier run; removed (this run has no {split} pictures)", file=sys.stderr)
        write_record(folder, request, source, plan, shape, ratios)
        save_vocab(vocab, vocab_file)
    return Summary(
        folder,
        vocab_file,
        shape[1],
        {split: (len(splits[split]), sum(len(p.captions) for p in splits[split])) for split in SPLITS},
        plan.reading.malformed,
        {**problems.counts, **plan.reading.left_out},
        plan.merged,
    )


def write_record(folder, request, source, plan, shape, ratios):
    """make_dataset.json: what made the folder (the annotations, how it was split, where the regions came from)."""
    splits = plan.splits
    record = {
        "annotations": [
            {"split": split, "path": os.path.abspath(path), "format": fmt}
            for (split, path), fmt in zip(annotation_sources(request), plan.formats)
        ],
        "splits": "the annotations'" if plan.splits_given else {"shares": ratios, "seed": request.seed},
        "pictures": {split: len(splits[split]) for split in SPLITS},
        "regions": (
            {
                "detector": os.path.abspath(request.detector),
                "file": REGIONS_TSV,
                **source["detector"]["settings"].record(),
            }
            if request.detector
            else {"rows": [os.path.abspath(p) for p in request.regions]}
            if request.regions
            else {"library": os.path.abspath(request.library)}
        ),
        "boxes": shape[0],
        "feature_dim": shape[1],
        "files": [f"{split}_{name}" for split in SPLITS if splits[split] for name in LAYOUT_FILES],
    }
    with atomic_write(os.path.join(folder, RECORD), "w") as f:
        json.dump(record, f, indent=1)


def next_commands(request, summary):
    """The commands that train, fine-tune and evaluate on the dataset, for the user to run next."""
    common = (
        f"--data_path {shlex.quote(request.data_path)} --data_name {shlex.quote(request.data_name)} "
        f"--vocab_path {shlex.quote(request.vocab_path)}"
    )
    run = shlex.quote(os.path.join("runs", request.data_name.removesuffix("_precomp")))
    split = "test" if summary.splits["test"][0] else "dev"
    lines = [
        "Next: train on it, from scratch or from a trained model (--init_from: its vocabulary gets the new words):",
        f"  python3 train.py {common} --img_dim {summary.feature_dim} --logger_name {run} --max_violation",
        f"  python3 train.py {common} --init_from runs/f30k/model_best.pth.tar --logger_name {run}_finetuned",
        "then evaluate (the second line: a trained model on this data, before fine-tuning):",
        f"  python3 evaluate_models.py --data_path {shlex.quote(request.data_path)} --split {split} "
        f"{run}/model_best.pth.tar",
        f"  python3 evaluate_models.py --data_path {shlex.quote(request.data_path)} --data_name "
        f"{shlex.quote(request.data_name)} --split {split} runs/f30k/model_best.pth.tar",
    ]
    if not summary.splits["dev"][0]:
        lines.insert(0, "No dev split: train.py validates on dev; give the splits dev pictures (--splits) first.")
    return lines
