"""index.py's work: a library made or brought up to date with its folders.

New photos get their regions from published TSV rows (`--regions`, rows.py) or from the detector
(extraction.py), their vectors from VSRN's image encoder, a thumbnail (photos.py), and are committed a
batch at a time with their files; moved, copied and removed files only change records (scan.py). What
made the library is checked by recipe.py, and index.faiss is brought up to date by vectors.py.
Killed at any moment, the library keeps every committed batch, and the rerun does the rest: a photo
is one row, by its content digest, however often a run was stopped. Under torchrun every process
extracts and embeds its share of the photos that need the detector; the first process writes.
"""

import os
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from photo_library.embedding import image_vectors, load_library_models
from photo_library.extraction import detector_photos
from photo_library.lock import LibraryLock
from photo_library.photos import EmbeddedPhoto, NewPhoto
from photo_library.recipe import check_recipe
from photo_library.rows import matching_rows, row_photos
from photo_library.scan import apply_changes, scan
from photo_library.store import DATABASE, Library
from photo_library.vectors import KINDS, update_index
from utils.distributed import SINGLE_PROCESS
from utils.errors import OptionError
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

    def line(self, library, photos, kind):
        parts = [f"{plural(self.added, 'photo')} added"]
        for count, text in (
            (self.reembedded, "re-embedded"),
            (self.relinked, "moved, renamed or copied (their path updated)"),
            (self.removed, "removed"),
            (self.failed, "failed (each named above)"),
            (self.waiting, "without regions: no row in --regions that fits and no --detector (left for a later run)"),
            (self.unchanged, "unchanged (not read)"),
        ):
            if count:
                parts.append(f"{count} {text}")
        return f"{library}: " + ", ".join(parts) + f"; it holds {plural(photos, 'photo')} ({kind} index)"


def note(message):
    tqdm.write(f"skipped: {message}", file=sys.stderr)


def progress_bar(total, desc="photos", shown=True):
    return tqdm(total=total, desc=desc, unit="photo", dynamic_ncols=True, disable=None if shown else True)


class Indexer:
    """One run of index.py on one library (its records and lock held by the first process)."""

    def __init__(self, request, world=SINGLE_PROCESS):
        self.request, self.world = request, world
        self.folder = request.library
        self.summary = Summary()
        self.recipe = self.models = None
        self.lock = self.library = None

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
        """The folders to scan: the command's (added to the library's), else the library's; a recorded
        folder that is not there (an unplugged disk) is said and left as it was."""
        if self.request.images:
            roots = [os.path.abspath(path) for path in self.request.images]
            missing = [path for path in roots if not os.path.isdir(path)]
            if missing:
                raise OptionError.naming("{images} {path}: no such folder", path=missing[0])
            return roots
        roots = self.library.roots()
        present = [root for root in roots if os.path.isdir(root)]
        for root in sorted(set(roots) - set(present)):
            print(
                f"{root}: not there (an unplugged disk?); its photos stay in the library as they were", file=sys.stderr
            )
        return present

    def load_models(self, words=None):
        """The checkpoints' models and their vocabulary: the library's own copy once it has one (`words` on the
        processes without the records), else the checkpoints' file."""
        if self.library is not None and not self.request.rebuild:
            words = self.library.meta("vocab_words")
        paths = [record["path"] for record in self.recipe.checkpoints]
        self.models = load_library_models(paths, words, self.folder, self.request.vocab_path, self.request.device)

    def record_recipe(self):
        models = self.models
        self.recipe.record(self.library, models.vocab, models.feature_dim, models.embedding_dim)

    # ---- the run

    def run(self):
        """Index; the summary line. Only the first process opens the records; the others extract and embed."""
        if not self.world.is_main:
            return self.serve_main()
        try:
            self.open()
            roots = self.roots()
            changes = scan(self.library, roots)
            self.summary.unchanged = changes.unchanged
            with self.library.transaction():
                self.library.add_roots(roots)
                self.summary.removed = apply_changes(self.library, changes, note)
            self.summary.relinked, self.summary.failed = len(changes.relinked), len(changes.failed)
            new = new_photos(changes.new)
            if self.request.rebuild:
                self.load_models()
                self.reembed()
            elif self.has_work(new) or not self.library.meta("checkpoints"):  # a new library records its recipe
                self.load_models()
                with self.library.transaction():
                    self.record_recipe()
            left = self.add_from_rows(new) if new else []
            if self.world.size > 1:
                self.world.broadcast((left, self.recipe, self.library.meta("vocab_words")))
            if left:
                self.add_from_detector(left)
            self.world.close()  # the other processes are done: they need not wait while the index is built
            asked = self.library.meta("index_kind", "auto") if self.request.index is None else self.request.index
            kind = update_index(self.library, self.folder, asked, int(self.request.index_memory_gb * 2**30))
            return self.summary.line(self.folder, self.library.count(), kind)
        finally:
            if self.library is not None:
                self.library.close()
            if self.lock is not None:
                self.lock.release()

    def has_work(self, new):
        """Whether new photos need the models: the detector can extract them, or some may have rows
        (without either they only wait, and the models are not loaded)."""
        return bool(new) and (self.recipe.detector is not None or bool(self.request.regions))

    def serve_main(self):
        """A process other than the first: extract and embed its shares of the detector's photos."""
        left, self.recipe, words = self.world.broadcast(None)
        if left:
            self.load_models(words)
            self.add_from_detector(left)
        return None

    def add_from_rows(self, new):
        """Commit the NewPhotos with rows in --regions; the others, for the detector (none without one)."""
        rows = matching_rows(new, self.request.regions) if self.request.regions else {}
        progress = progress_bar(len(new))
        with_rows = [(photo, rows[photo.digest]) for photo in new if photo.digest in rows]
        left = [photo for photo in new if photo.digest not in rows]
        shape = (self.recipe.settings.boxes, self.models.feature_dim) if with_rows else None
        for start in range(0, len(with_rows), COMMIT_EVERY):
            batch = with_rows[start : start + COMMIT_EVERY]
            ready, failed, unfit = row_photos(batch, self.models.models, shape, self.recipe.features_dtype, note)
            self.commit(failed + ready, progress)
            progress.update(len(unfit))
            left += unfit
        progress.close()
        if left and self.recipe.detector is None:
            self.summary.waiting = sum(len(photo.files) for photo in left)
            return []
        return left

    def add_from_detector(self, photos):
        """Extract, embed and (on the first process) commit the NewPhotos, a batch at a time."""
        from utils.device import check_device

        request, world = self.request, self.world
        device = world.device if world.size > 1 else check_device(request.device)
        progress = progress_bar(len(photos), shown=world.is_main)
        steps = detector_photos(photos, self.recipe, self.models, world, device, request.batch_size, request.workers)
        for step in steps:
            self.commit(step, progress)
        progress.close()

    def commit(self, results, progress):
        """Record FailedPhotos (each said) and commit EmbeddedPhotos with their files, in one transaction each."""
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
        generation = library.meta("generation") + 1
        with library.transaction():
            for photo in ready:
                digest, dtype = photo.photo.digest, self.recipe.features_dtype
                added = library.add_photo(
                    digest, photo.regions, photo.vector, photo.region_scores, photo.thumbnail, generation, dtype
                )
                for path, size, mtime_ns in photo.photo.files:
                    library.set_file(path, size, mtime_ns, digest, added)
            library.set_meta(generation=generation)
        self.summary.added += len(ready)
        self.summary.relinked += sum(len(photo.photo.files) - 1 for photo in ready)  # copies of a new photo
        progress.update(len(ready))

    def reembed(self):
        """Every photo's vector and attention scores again, from its kept regions, with this run's checkpoints,
        recorded with them in one transaction: stopped, the library stays as it was, made by the old ones."""
        library, models = self.library, self.models
        kept = library.meta("feature_dim")
        if kept is not None and kept != models.feature_dim:
            raise OptionError.naming(
                "{checkpoint} {paths}: its image encoder takes {dim}-d regions; {folder} keeps {kept}-d ones: "
                "these checkpoints need a new library",
                paths=" ".join(record["path"] for record in self.recipe.checkpoints),
                dim=models.feature_dim,
                folder=self.folder,
                kept=kept,
            )
        ids = library.photo_ids()
        generation, epoch = library.meta("generation") + 1, library.meta("epoch") + 1
        progress = progress_bar(len(ids), "re-embedding")
        with library.transaction():
            self.record_recipe()
            for start in range(0, len(ids), COMMIT_EVERY):
                chunk = ids[start : start + COMMIT_EVERY]
                vectors, scores = image_vectors(models.models, [library.features(photo) for photo in chunk])
                for photo, vector, score in zip(chunk, vectors, scores):
                    library.set_embedding(photo, vector, score, generation)
                progress.update(len(chunk))
            library.set_meta(generation=generation, epoch=epoch)
        progress.close()
        self.summary.reembedded = len(ids)


def new_photos(new):
    """The NewPhotos of a scan's new files ((path, size, mtime_ns, digest)): copies share one photo."""
    by_digest = {}
    for path, size, mtime_ns, digest in new:
        by_digest.setdefault(digest, []).append((path, size, mtime_ns))
    return [NewPhoto(digest, files) for digest, files in by_digest.items()]
