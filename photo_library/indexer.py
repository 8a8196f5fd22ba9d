"""index.py's work: a library made or brought up to date with its folders.

New photos get their regions from published TSV rows (`--regions`, rows.py) or from the detector
(extraction.py), their vectors from VSRN's image encoder, a thumbnail (photos.py), and are committed a
batch at a time with their files; moved, copied and removed files only change records (scan.py). What
made the library (checkpoints, detector, settings), with the folders and row files of the run, is
recorded by the run's first commit (a run refused before it leaves a new library free to be made with
other ones); index.faiss is brought up to date by vectors.py. Killed at any moment, the library keeps
every committed batch, and the rerun does the rest: a photo is one row, by its content digest, however
often a run was stopped. Under torchrun every process extracts and embeds its share of the photos that
need the detector; the first process writes.
"""

import os
import sqlite3
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from photo_library.embedding import image_vectors, load_library_models
from photo_library.extraction import detector_photos
from photo_library.lock import LibraryLock
from photo_library.photos import EmbeddedPhoto, NewPhoto
from photo_library.recipe import check_recipe
from photo_library.rows import matching_rows, row_photos
from photo_library.scan import NOT_THERE, apply_changes, forget, held_errors, scan
from photo_library.store import DATABASE, Library
from photo_library.vectors import KINDS, update_index
from utils.distributed import SINGLE_PROCESS
from utils.errors import Interrupted, OptionError
from utils.text import plural

COMMIT_EVERY = 64  # photos per transaction on the fast (--regions) path; the detector's path commits every batch
INDEX_CHOICES = ("auto", *KINDS)


@dataclass
class IndexRequest:
    """What index.py was asked to do (its flags), checked when it is made. None: the library's own choice (for a
    new library, the default); the region settings are checked as a RegionSettings when the run begins."""

    library: str
    images: list = None
    checkpoints: list = None
    detector: str = None
    detector_config: str = None
    policy: str = None  # caffe
    boxes: int = None  # 36
    min_size: int = None
    max_size: int = None
    proposals: int = None
    regions: list = field(default_factory=list)
    forget: list = field(default_factory=list)  # paths whose records are dropped before the folders are scanned
    index: str = None  # auto
    index_memory_gb: float = 4.0
    features_dtype: str = None  # float32
    rebuild: bool = False
    device: str = None
    batch_size: int = 1
    workers: int = 4
    vocab_path: str = None

    def __post_init__(self):
        if self.batch_size < 1 or self.workers < 1:
            raise OptionError.naming("{batch_size} and {workers}: expected at least 1")
        if self.index_memory_gb <= 0:
            raise OptionError.naming("{index_memory} {gb}: expected a positive number of GB", gb=self.index_memory_gb)
        if self.index not in (None, *INDEX_CHOICES):
            raise OptionError.naming(
                "{index} {kind}: expected one of {kinds}", kind=self.index, kinds=", ".join(INDEX_CHOICES)
            )


@dataclass
class Summary:
    added: int = 0
    relinked: int = 0
    removed: int = 0
    failed: int = 0
    unchanged: int = 0
    waiting: int = 0  # new photos with no row that fits and no detector: left for a later run
    reembedded: int = 0
    held: dict = field(default_factory=dict)  # Changes.held: folders that could not be looked at, their records kept

    @property
    def kept(self):
        """The photos kept as they were because their folders could not be looked at."""
        return len(set().union(*(photos for _, _, photos in self.held.values())))

    def unchecked(self):
        """The errors (one line each) of the folders that could not be looked at: the run exits non-zero."""
        return held_errors(self.held)

    def line(self, library, photos, kind):
        parts = [f"{plural(self.added, 'photo')} added"]
        for count, text in (
            (self.reembedded, "re-embedded"),
            (self.relinked, "moved, renamed or copied (their path updated)"),
            (self.removed, "removed"),
            (self.failed, "failed (each named above)"),
            (self.waiting, "without regions: no row in --regions that fits and no --detector (left for a later run)"),
            (self.kept, "kept as they were (their folders could not be looked at: named below)"),
            (self.unchanged, "unchanged (not read)"),
        ):
            if count:
                parts.append(f"{count} {text}")
        return f"{library}: " + ", ".join(parts) + f"; it holds {plural(photos, 'photo')} ({kind} index)"


def note(message):
    tqdm.write(f"skipped: {message}", file=sys.stderr)


def progress_bar(total, desc="photos", shown=True):
    """A bar to use in a `with` block: closed before an error or Ctrl-C is said, never drawn after it."""
    return tqdm(total=total, desc=desc, unit="photo", dynamic_ncols=True, disable=None if shown else True)


class Indexer:
    """One run of index.py on one library (its records and lock held by the first process)."""

    def __init__(self, request, world=SINGLE_PROCESS):
        self.request, self.world = request, world
        self.folder = request.library
        self.summary = Summary()
        self.recipe = self.models = None
        self.lock = self.library = None
        self.scanned = []  # the folders this run scans
        self.changes = None  # what the scan found
        self.recorded = False  # whether what made the library and the run's folders are recorded yet

    def open(self):
        """The library's records, under its lock, and this run's recipe; a new library is made only once this
        run's checkpoints, detector and folders are known to be there."""
        request = self.request
        if not os.path.isfile(os.path.join(self.folder, DATABASE)):
            if not (request.images and request.checkpoints):
                raise OptionError.naming(
                    "{library} {folder}: not a library yet; make it with {images} DIR and {checkpoint} M",
                    folder=self.folder,
                )
            self.recipe = check_recipe(request)
            self.roots()
        self.lock = LibraryLock(self.folder)
        # Looked at again under the lock: another index.py may have made the library meanwhile.
        if os.path.isfile(os.path.join(self.folder, DATABASE)):
            self.library = Library.open(self.folder, writable=True)
            self.recipe = check_recipe(request, self.library)
        else:
            self.library = Library.create(self.folder)

    def roots(self):
        """The folders to scan: the command's (added to the library's when the run commits), else the
        library's (a recorded folder that is not there is looked at, and its records kept, by the scan)."""
        if self.request.images:
            roots = [os.path.abspath(path) for path in self.request.images]
            missing = [path for path in roots if not os.path.isdir(path)]
            if missing:
                raise OptionError.naming("{images} {path}: no such folder", path=missing[0])
            return roots
        return self.library.roots()

    def row_files(self):
        """The TSV files whose rows new photos take: the command's, then the library's (recorded by earlier
        runs); a recorded one that is not there any more is refused (its photos would go to the detector)."""
        given = [os.path.abspath(path) for path in self.request.regions]
        recorded = [path for path in self.library.meta("regions", []) if path not in given]
        gone = [path for path in recorded if not os.path.isfile(path)]
        if gone:
            raise OptionError.naming(
                "{library} {folder}: its row file {path} is not there any more; give it with {regions} where it "
                "lies now, with {forget} {path}; or {forget} {path} alone (its photos then wait for the detector)",
                folder=self.folder,
                path=gone[0],
            )
        return given + recorded

    def load_models(self, words=None):
        """The checkpoints' models and their vocabulary: the library's own copy once it has one (`words` on the
        processes without the records), else the checkpoints' file."""
        if self.library is not None and not self.request.rebuild:
            words = self.library.meta("vocab_words")
        paths = [record["path"] for record in self.recipe.checkpoints]
        self.models = load_library_models(paths, words, self.folder, self.request.vocab_path, self.request.device)

    def record(self):
        """Record (in the caller's transaction) what made the library, when this run loaded its models, and the
        folders and row files of the run: by the run's first commit, or at its end."""
        library, models = self.library, self.models
        if models is not None:
            self.recipe.record(library, models.vocab, models.feature_dim, models.embedding_dim)
        library.add_roots(self.scanned)
        given = [os.path.abspath(path) for path in self.request.regions]
        library.set_meta(regions=sorted(set(library.meta("regions", [])) | set(given)))
        self.recorded = True

    # ---- the run

    def run(self):
        """Index; the summary line. Only the first process opens the records; the others extract and embed."""
        if not self.world.is_main:
            return self.serve_main()
        try:
            self.open()
            self.scan_folders()
            new = new_photos(self.changes.new)
            if self.request.rebuild:
                self.load_models()
                self.reembed()
            elif self.has_work(new) or not self.library.meta("checkpoints"):  # a new library records its recipe
                self.load_models()
            left = self.add_from_rows(new) if new else []
            if self.world.size > 1:
                self.world.broadcast((left, self.recipe, self.library.meta("vocab_words")))
            if left:
                self.add_from_detector(left)
            self.world.close()  # the other processes are done: they need not wait while the index is built
            if not self.recorded:
                with self.library.transaction():
                    self.record()
            asked = self.library.meta("index_kind", "auto") if self.request.index is None else self.request.index
            kind = update_index(self.library, self.folder, asked, int(self.request.index_memory_gb * 2**30))
            return self.summary.line(self.folder, self.library.count(), kind)
        except KeyboardInterrupt:
            raise Interrupted(self.stopped()) from None
        finally:
            if self.library is not None:
                self.library.close()
            if self.lock is not None:
                self.lock.release()

    def scan_folders(self):
        """--forget's paths dropped, the folders scanned and their moved, copied, failed and gone files recorded;
        folders that could not be looked at are said (those without records as skipped)."""
        library = self.library
        if self.request.forget:
            with library.transaction():
                self.summary.removed = forget(library, [os.path.abspath(path) for path in self.request.forget])
        self.scanned = self.roots()
        self.changes = changes = scan(library, self.scanned)
        self.summary.unchanged = changes.unchanged
        with library.transaction():
            self.summary.removed += apply_changes(library, changes, note)
        self.summary.relinked, self.summary.failed = len(changes.relinked), len(changes.failed)
        self.summary.held = changes.held
        for folder, why in sorted(changes.unlisted.items()):
            if folder not in changes.held:
                note(f"{folder}: " + ("not there" if why == NOT_THERE else f"cannot be listed ({why})"))

    def stopped(self):
        """What a Ctrl-C leaves: the photos committed so far, and how to go on."""
        kept = f"{self.folder} keeps the photos committed so far"
        if self.library is None:
            return f"{kept}: rerun the same command to finish"
        if self.request.rebuild and not self.summary.reembedded:
            return f"{self.folder} is as it was (a --rebuild commits every photo at once): rerun the same command"
        try:
            holds = f"; it holds {plural(self.library.count(), 'photo')}"
        except sqlite3.Error:
            holds = ""
        added = plural(self.summary.added, "photo")
        return f"{kept} ({added} added by this run{holds}): rerun the same command to finish"

    def has_work(self, new):
        """Whether new photos need the models: the detector can extract them, or some may have rows
        (without either they only wait, and the models are not loaded)."""
        rows = self.request.regions or self.library.meta("regions")
        return bool(new) and (self.recipe.detector is not None or bool(rows))

    def serve_main(self):
        """A process other than the first: extract and embed its shares of the detector's photos."""
        left, self.recipe, words = self.world.broadcast(None)
        if left:
            self.load_models(words)
            self.add_from_detector(left)
        return None

    def add_from_rows(self, new):
        """Commit the NewPhotos with rows in the row files; the others, for the detector (none without one)."""
        tsvs = self.row_files()
        rows = matching_rows(new, tsvs) if tsvs else {}
        with_rows = [(photo, rows[photo.digest]) for photo in new if photo.digest in rows]
        left = [photo for photo in new if photo.digest not in rows]
        shape = (self.recipe.settings.boxes, self.models.feature_dim) if with_rows else None
        with progress_bar(len(new)) as progress:
            for start in range(0, len(with_rows), COMMIT_EVERY):
                batch = with_rows[start : start + COMMIT_EVERY]
                ready, failed, unfit = row_photos(batch, self.models.models, shape, self.recipe.features_dtype, note)
                self.commit(failed + ready, progress)
                progress.update(len(unfit))
                left += unfit
        if left and self.recipe.detector is None:
            self.summary.waiting = sum(len(photo.files) for photo in left)
            return []
        return left

    def add_from_detector(self, photos):
        """Extract, embed and (on the first process) commit the NewPhotos, a batch at a time."""
        from utils.device import check_device

        request, world = self.request, self.world
        device = world.device if world.size > 1 else check_device(request.device)
        steps = detector_photos(photos, self.recipe, self.models, world, device, request.batch_size, request.workers)
        with progress_bar(len(photos), shown=world.is_main) as progress:
            for step in steps:
                self.commit(step, progress)

    def commit(self, results, progress):
        """Record FailedPhotos (each said) and commit EmbeddedPhotos with their files, in one transaction each
        (the first also records what made the library)."""
        library = self.library
        for failed in (r for r in results if not isinstance(r, EmbeddedPhoto)):
            with library.transaction():
                for path, size, mtime_ns in failed.photo.files:
                    note(f"{path}: {failed.reason}")
                    library.set_file(path, size, mtime_ns, failed.photo.digest, reason=failed.reason)
            self.summary.failed += len(failed.photo.files)
            progress.update(1)
        ready = [r for r in results if isinstance(r, EmbeddedPhoto)]
        if not ready:
            return
        with library.transaction():
            generation = library.new_generation()
            for photo in ready:
                digest, dtype = photo.photo.digest, self.recipe.features_dtype
                added = library.add_photo(
                    digest, photo.regions, photo.vector, photo.region_scores, photo.thumbnail, generation, dtype
                )
                for path, size, mtime_ns in photo.photo.files:
                    library.set_file(path, size, mtime_ns, digest, added)
            if not self.recorded:
                self.record()
        self.summary.added += len(ready)
        self.summary.relinked += sum(len(photo.photo.files) - 1 for photo in ready)  # copies of a new photo
        progress.update(len(ready))

    def reembed(self):
        """Every photo's vector and attention scores again, from its kept regions, with this run's checkpoints,
        recorded with them in one transaction: stopped, the library stays as it was, made by the old ones."""
        library, models = self.library, self.models
        kept = library.meta("feature_dim")
        if kept is not None and kept != models.feature_dim and library.count():
            raise OptionError.naming(
                "{checkpoint} {paths}: its image encoder takes {dim}-d regions; {folder} keeps {kept}-d ones: "
                "these checkpoints need a new library",
                paths=" ".join(record["path"] for record in self.recipe.checkpoints),
                dim=models.feature_dim,
                folder=self.folder,
                kept=kept,
            )
        ids = library.photo_ids()
        with library.transaction(), progress_bar(len(ids), "re-embedding") as progress:
            generation = library.new_generation()
            self.record()
            for start in range(0, len(ids), COMMIT_EVERY):
                chunk = ids[start : start + COMMIT_EVERY]
                vectors, scores = image_vectors(models.models, [library.features(photo) for photo in chunk])
                for photo, vector, score in zip(chunk, vectors, scores):
                    library.set_embedding(photo, vector, score, generation)
                progress.update(len(chunk))
            library.set_meta(epoch=library.meta("epoch") + 1)
        self.summary.reembedded = len(ids)


def new_photos(new):
    """The NewPhotos of a scan's new files ((path, size, mtime_ns, digest)): copies share one photo."""
    by_digest = {}
    for path, size, mtime_ns, digest in new:
        by_digest.setdefault(digest, []).append((path, size, mtime_ns))
    return [NewPhoto(digest, files) for digest, files in by_digest.items()]
