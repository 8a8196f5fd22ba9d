"""index.py's work: a library made or brought up to date with its folders.

New photos get their regions from published TSV rows (`--regions`, matched by file stem) or from the
detector, their vectors from VSRN's image encoder (photo_library.embedding), a thumbnail, and are
committed a batch at a time with their files; moved, copied and removed files only change records.
Killed at any moment, the library keeps every committed batch, and the rerun does the rest: a photo
is one row, by its content digest, however often a run was stopped. Under torchrun every process
extracts and embeds its share of the photos that need the detector; the first process writes.
"""

import fcntl
import io
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from detection.extract import REGIONS_VERSION
from detection.pipeline import detect, read_ahead, region_count_problem, shares
from detection.policies import policy_class
from photo_library import recipe
from photo_library.embedding import check_models, image_vectors
from photo_library.scan import scan
from photo_library.store import DATABASE, Library
from photo_library.vectors import INDEX_FILE, VectorIndex, choose_kind
from utils.distributed import SINGLE_PROCESS
from utils.errors import DataError, OptionError, first_line, without_path
from utils.images import ImageError, pillow, read_image
from utils.obj36 import parse_row
from utils.text import plural
from utils.tsv_to_precomp import canonical_id
from vocab import vocab_digest, vocabulary_from_words

LOCK_FILE = "index.lock"
THUMBNAIL_SIDE = 256
COMMIT_EVERY = 64  # photos per transaction on the fast (--regions) path; the detector's path commits every batch
HNSW_REBUILD_SHARE = 0.1  # rebuild an HNSW index once this share of its nodes are deleted photos


@dataclass
class IndexRequest:
    """What index.py was asked to do (its flags). None: the library's own choice (for a new library, the default)."""

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


# A new library's region settings: VSRN's input, as SCAN's and LXMERT's features were made.
DEFAULT_SETTINGS = {"policy": "caffe", "boxes": 36, "min_size": None, "max_size": None, "proposals": None}


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


def thumbnail(picture):
    """A JPEG of the picture (RGB array) at most THUMBNAIL_SIDE pixels on its longer side."""
    image = pillow().Image.fromarray(picture, "RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), pillow().Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def note(message):
    tqdm.write(f"skipped: {message}", file=sys.stderr)


class Indexer:
    """One run of index.py on one library (its records and lock held by the first process)."""

    def __init__(self, request, world=SINGLE_PROCESS):
        self.request, self.world = request, world
        self.folder = request.library
        self.summary = Summary()
        self.models = self.vocab = self.detector = None
        self.lock = self.library = None

    # ---- the records and what made them

    def open(self):
        """The library's records, under its lock; a new library is made only once this run's checkpoints,
        detector and folders are known to be there."""
        request = self.request
        if not os.path.isfile(os.path.join(self.folder, DATABASE)):
            if not (request.images and request.checkpoints):
                raise OptionError(
                    f"--library {self.folder}: not a library yet; make it with --images DIR and --checkpoint M"
                )
            self.check_recipe(exists=False)
            self.roots()
        self.lock = LibraryLock(self.folder)
        # Looked at again under the lock: another index.py may have made the library meanwhile.
        if os.path.isfile(os.path.join(self.folder, DATABASE)):
            self.library = Library.open(self.folder, writable=True)
            self.check_recipe(exists=True)
        else:
            self.library = Library.create(self.folder)

    def recorded(self, key, default=None):
        return self.library.meta(key, default) if self.library is not None else default

    def check_recipe(self, exists):
        """This run's checkpoints, detector and region settings: the command's, checked against those the
        library records, or the recorded ones."""
        request, recorded = self.request, self.recorded
        self.checkpoints = recipe.checkpoint_records(
            request.checkpoints, recorded("checkpoints"), self.folder, request.rebuild
        )
        recorded_detector = recorded("detector")
        if request.detector:
            self.detector = recipe.file_record(request.detector, [recorded_detector] if recorded_detector else [])
            if self.detector is None:
                raise OptionError(f"--detector {request.detector}: detector weights not found")
        else:
            self.detector = recorded_detector
        config = None
        if request.detector_config:
            config = recipe.file_record(request.detector_config)
            if config is None:
                raise OptionError(f"--detector_config {request.detector_config}: file not found")
        made = recorded("settings") or {**DEFAULT_SETTINGS, "config": None}
        given = {key: getattr(request, key) for key in DEFAULT_SETTINGS}
        settings = {key: made[key] if value is None else value for key, value in given.items()}
        settings["config"] = config["digest"] if config else made["config"]
        settings["regions_version"] = REGIONS_VERSION  # the detector's implementation of these settings
        self.config_path = request.detector_config or recorded("detector_config")
        self.features_dtype = request.features_dtype or recorded("features_dtype") or "float32"
        if exists:
            hint = "regions of other settings cannot share this library; make a new one"
            if request.detector and recorded_detector:  # the same weights elsewhere are the same detector
                recipe.check_same(self.folder, "the detector", recorded_detector, self.detector, hint)
            recipe.check_same(self.folder, "the region settings", recorded("settings"), settings, hint)
            if recorded("features_dtype") not in (None, self.features_dtype):
                raise OptionError(
                    f"--features_dtype {self.features_dtype}: {self.folder} keeps its region features as "
                    f"{recorded('features_dtype')}; it is chosen when a library is made"
                )
        self.settings = settings

    def load_models(self, words=None):
        """The checkpoints' models and their vocabulary: the library's own copy once it has one (`words`
        on the processes without the records), else the checkpoints' file."""
        from inference import load_models

        if self.library is not None and not self.request.rebuild:
            words = self.library.meta("vocab_words")
        vocab = None
        if words is not None:
            vocab = vocabulary_from_words(words)
            vocab.path = f"the vocabulary kept in {self.folder}"
        paths = [record["path"] for record in self.checkpoints]
        opt, self.vocab, self.models = load_models(
            paths, vocab_path=self.request.vocab_path, need_data=False, device=self.request.device, vocab=vocab
        )
        check_models(self.models, paths)
        self.feature_dim = opt.img_dim
        self.embedding_dim = sum(model.img_enc.embed_size for model in self.models)

    def record_recipe(self):
        """What made the library, written before its first photos (and again by --rebuild): from then on
        other models are refused."""
        library = self.library
        library.set_meta(
            checkpoints=self.checkpoints,
            vocab_words=[self.vocab.idx2word[i] for i in range(len(self.vocab))],
            vocab_digest=vocab_digest(self.vocab),
            models=[os.path.basename(record["path"]) for record in self.checkpoints],
            embedding_dim=self.embedding_dim,
            feature_dim=self.feature_dim,
            settings=self.settings,
            features_dtype=self.features_dtype,
            detector=self.detector,
            detector_config=self.config_path and os.path.abspath(self.config_path),
        )

    def roots(self):
        """The folders to scan: the command's (added to the library's), else the library's; a recorded
        folder that is not there (an unplugged disk) is said and left as it was."""
        if self.request.images:
            roots = [os.path.abspath(path) for path in self.request.images]
            missing = [path for path in roots if not os.path.isdir(path)]
            if missing:
                raise OptionError(f"--images {missing[0]}: no such folder")
            return roots
        roots = self.library.roots()
        present = [root for root in roots if os.path.isdir(root)]
        for root in sorted(set(roots) - set(present)):
            print(
                f"{root}: not there (an unplugged disk?); its photos stay in the library as they were", file=sys.stderr
            )
        return present

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
                self.apply_file_changes(changes)
            if self.request.rebuild:
                self.load_models()
                self.reembed()
            elif self.has_work(changes.new) or not self.library.meta("checkpoints"):  # a new library records its recipe
                self.load_models()
                with self.library.transaction():
                    self.record_recipe()
            left = self.add_photos(changes.new) if changes.new else []
            if self.world.size > 1:
                shared = (
                    self.checkpoints,
                    self.library.meta("vocab_words"),
                    self.features_dtype,
                    self.detector,
                    self.config_path,
                    self.settings,
                )
                self.world.broadcast((left, shared))
            if left:
                self.extract_with_detector(left)
            self.world.close()  # the other processes are done: they need not wait while the index is built
            kind = self.update_vector_index()
            return self.summary.line(self.folder, self.library.count(), kind)
        finally:
            if self.library is not None:
                self.library.close()
            if self.lock is not None:
                self.lock.release()

    def has_work(self, new):
        """Whether new photos need the models: the detector can extract them, or some may have rows
        (without either they only wait, and the models are not loaded)."""
        return bool(new) and (self.detector is not None or bool(self.request.regions))

    def serve_main(self):
        """A process other than the first: extract and embed its shares of the detector's photos."""
        items, shared = self.world.broadcast(None)
        if items:
            self.checkpoints, words, self.features_dtype, self.detector, self.config_path, self.settings = shared
            self.load_models(words)
            self.extract_with_detector(items)
        return None

    def generation(self):
        return self.library.meta("generation") + 1

    def apply_file_changes(self, changes):
        """Moved, copied, failed, changed and gone files, in one transaction (photos no file shows any more go)."""
        library, generation = self.library, self.generation()
        for path, size, mtime_ns, digest, photo in changes.relinked:
            library.set_file(path, size, mtime_ns, digest, photo)
        for path, size, mtime_ns, digest, reason in changes.failed:
            note(f"{path}: {reason}")
            library.set_file(path, size, mtime_ns, digest, reason=reason)
        # A changed file with new content has no row until that content is committed: a stopped run redoes it.
        for path, *_ in changes.new:
            if path in changes.changed:
                library.db.execute("DELETE FROM files WHERE path = ?", (path,))
        removed = library.forget_files(changes.gone, generation)
        removed += library.drop_unshown({photo for photo in changes.changed.values() if photo is not None}, generation)
        if removed:
            library.set_meta(generation=generation)
        self.summary.relinked, self.summary.removed, self.summary.failed = (
            len(changes.relinked),
            removed,
            len(changes.failed),
        )

    def add_photos(self, new):
        """Photos with rows in --regions, embedded and committed here; the others, (digest, paths), for the detector."""
        by_digest = {}
        for path, size, mtime_ns, digest in new:
            by_digest.setdefault(digest, []).append((path, size, mtime_ns))
        rows = self.matching_rows(by_digest) if self.request.regions else {}
        progress = tqdm(total=len(by_digest), desc="photos", unit="photo", dynamic_ncols=True, disable=None)
        batch, left = [], []
        for digest, files in by_digest.items():
            if digest in rows:
                batch.append((digest, files, rows[digest]))
                if len(batch) >= COMMIT_EVERY:
                    left += self.commit_rows(batch, progress)
                    batch = []
            else:
                left.append((digest, files))
        if batch:
            left += self.commit_rows(batch, progress)
        progress.close()
        if left and self.detector is None:
            self.summary.waiting = sum(len(files) for _, files in left)
            return []
        return left

    def matching_rows(self, by_digest):
        """{digest: regions} of the new photos that have a row in the --regions files, matched by file
        stem (without leading zeros or extension, as utils.tsv_to_precomp matches ids)."""
        wanted = {}
        for digest, files in by_digest.items():
            for path, _, _ in files:
                wanted.setdefault(canonical_id(os.path.splitext(os.path.basename(path))[0]), []).append(digest)
        found = {}
        for tsv in self.request.regions:
            if not os.path.isfile(tsv):
                raise OptionError(f"--regions {tsv}: file not found")
            with open(tsv, "rb") as f:
                for number, line in enumerate(f, start=1):
                    stem = canonical_id(line[: line.find(b"\t")].decode("utf-8", "replace"))
                    for digest in wanted.get(stem, ()):
                        found.setdefault(digest, (line.rstrip(b"\r\n"), f"{tsv}:{number}"))
        return found

    def regions_problem(self, regions, where):
        """Why a photo's regions cannot go into this library (box count, feature size), or None."""
        count, width = regions["features"].shape
        if count != self.settings["boxes"]:
            return f"{where} has {count} regions; this library takes {self.settings['boxes']} (--boxes)"
        if width != self.feature_dim:
            raise DataError(
                f"{where}: regions of {width} dims; the checkpoint's image encoder takes {self.feature_dim} (img_dim)"
            )
        return None

    def commit_rows(self, batch, progress):
        """Read, check and embed photos whose regions come from TSV rows, then commit them. A row that does
        not fit its photo (another box count or picture size) is said, and the photo is left to the
        detector, as one without a row (a fault of the rows, not of the photo: not recorded as failed)."""
        done, unfit = [], []
        for digest, files, (line, where) in batch:
            path = files[0][0]
            try:
                picture = read_image(path)
            except ImageError as e:
                self.fail(files, digest, without_path(str(e), path), progress)
                continue
            regions = parse_row(line, where)
            problem = self.regions_problem(regions, where)
            if problem is None and (regions["img_h"], regions["img_w"]) != picture.shape[:2]:
                problem = (
                    f"its row {where} is of a {regions['img_w']} x {regions['img_h']} picture, the file is "
                    f"{picture.shape[1]} x {picture.shape[0]}"
                )
            if problem:
                note(f"{path}: {problem}; left to the detector")
                unfit.append((digest, files))
                progress.update(1)
                continue
            done.append((digest, files, regions, thumbnail(picture)))
        self.commit(self.embedded(done), progress)
        return unfit

    def embedded(self, photos):
        """(digest, files, regions, thumbnail, vector, region scores) of photos, embedded in one batch
        (features rounded to the library's storage type first, so that kept regions re-embed alike)."""
        if not photos:
            return []
        dtype = np.dtype(self.features_dtype)
        for _, _, regions, _ in photos:
            regions["features"] = regions["features"].astype(dtype).astype(np.float32)
        vectors, scores = image_vectors(self.models, np.stack([regions["features"] for _, _, regions, _ in photos]))
        return [(*photo, vector, score) for photo, vector, score in zip(photos, vectors, scores)]

    def commit(self, photos, progress):
        if not photos:
            return
        library, generation = self.library, self.generation()
        with library.transaction():
            for digest, files, regions, jpeg, vector, scores in photos:
                photo = library.add_photo(digest, regions, vector, scores, jpeg, generation, self.features_dtype)
                for path, size, mtime_ns in files:
                    library.set_file(path, size, mtime_ns, digest, photo)
            library.set_meta(generation=generation)
        self.summary.added += len(photos)
        self.summary.relinked += sum(len(files) - 1 for _, files, *_ in photos)  # copies of a new photo
        progress.update(len(photos))

    def fail(self, files, digest, reason, progress):
        with self.library.transaction():
            for path, size, mtime_ns in files:
                note(f"{path}: {reason}")
                self.library.set_file(path, size, mtime_ns, digest, reason=reason)
        self.summary.failed += len(files)
        progress.update(1)

    # ---- the detector's photos, over the processes

    def extract_with_detector(self, items):
        """Extract, embed and (on the first process) commit the photos of `items` ((digest, files) pairs),
        a batch at a time."""
        from detection.weights import load_detector
        from utils.device import check_device

        request, world = self.request, self.world
        device = world.device if world.size > 1 else check_device(request.device)
        if not os.path.isfile(self.detector["path"]):
            raise OptionError(
                f"{self.detector['path']}: the library's detector weights are not there; give them with --detector"
            )
        detector = load_detector(self.detector["path"], self.config_path, device)
        settings = {key: self.settings[key] for key in ("policy", "min_size", "max_size", "proposals")}
        settings["num_boxes"] = self.settings["boxes"]
        mine = [position for share in shares(len(items), request.batch_size, world) for position in share]
        # Read as the policy's original read them (caffe: as cv2.imread), for the detector and the thumbnails alike.
        read_picture = policy_class(settings["policy"]).read_picture
        pictures = read_ahead([items[p][1][0][0] for p in mine], request.workers, read_picture)
        progress = tqdm(
            total=len(items), desc="photos", unit="photo", dynamic_ncols=True, disable=None if world.is_main else True
        )
        for share in shares(len(items), request.batch_size, world):
            batch = [items[p] for p in share]
            arrays = [next(pictures) for _ in batch]
            results = self.detected(batch, arrays, detector, settings)
            gathered = world.gather_to_main(results)
            if not world.is_main:
                continue
            for results in gathered:
                good = [result for result in results if isinstance(result, tuple) and len(result) == 6]
                for digest, files, reason in (result for result in results if len(result) == 3):
                    self.fail(files, digest, reason, progress)
                self.commit(good, progress)
        progress.close()

    def detected(self, batch, arrays, detector, settings):
        """For each (digest, files) with its picture (array or ImageError): the embedded photo, or
        (digest, files, reason) when it cannot be one."""
        results, good = [None] * len(batch), []
        for position, ((digest, files), array) in enumerate(zip(batch, arrays)):
            if isinstance(array, ImageError):
                results[position] = (digest, files, without_path(str(array), files[0][0]))
            else:
                good.append(position)
        found = detect(detector, [arrays[p] for p in good], settings) if good else []
        photos = []
        for position, regions in zip(good, found):
            digest, files = batch[position]
            path = files[0][0]
            if isinstance(regions, Exception):
                results[position] = (
                    digest,
                    files,
                    f"the detector cannot take this picture ({first_line(regions, 120)})",
                )
                continue
            problem = region_count_problem(path, regions, settings["num_boxes"]) or self.regions_problem(regions, path)
            if problem:
                results[position] = (digest, files, without_path(problem, path))
                continue
            photos.append((position, (digest, files, regions, thumbnail(arrays[position]))))
        for (position, _), embedded in zip(photos, self.embedded([photo for _, photo in photos])):
            results[position] = embedded
        return results

    # ---- --rebuild and the vector index

    def reembed(self):
        """Every photo's vector and attention scores again, from its kept regions, with this run's checkpoints,
        recorded with them in one transaction: stopped, the library stays as it was, made by the old ones."""
        library = self.library
        kept = library.meta("feature_dim")
        if kept is not None and kept != self.feature_dim:
            paths = " ".join(record["path"] for record in self.checkpoints)
            raise OptionError(
                f"--checkpoint {paths}: its image encoder takes {self.feature_dim}-d regions; {self.folder} keeps "
                f"{kept}-d ones: these checkpoints need a new library"
            )
        ids = [row[0] for row in library.db.execute("SELECT id FROM photos ORDER BY id")]
        generation, epoch = self.generation(), library.meta("epoch") + 1
        progress = tqdm(total=len(ids), desc="re-embedding", unit="photo", dynamic_ncols=True, disable=None)
        with library.transaction():
            self.record_recipe()
            for start in range(0, len(ids), COMMIT_EVERY):
                chunk = ids[start : start + COMMIT_EVERY]
                vectors, scores = image_vectors(self.models, np.stack([library.features(photo) for photo in chunk]))
                for photo, vector, score in zip(chunk, vectors, scores):
                    library.db.execute(
                        "UPDATE photos SET embedding = ?, region_scores = ?, generation = ? WHERE id = ?",
                        (vector.astype(np.float32).tobytes(), score.astype(np.float32).tobytes(), generation, photo),
                    )
                progress.update(len(chunk))
            library.set_meta(generation=generation, epoch=epoch)
        progress.close()
        self.summary.reembedded = len(ids)

    def update_vector_index(self):
        """Bring index.faiss to the records: caught up when it can be, rebuilt when it cannot (another
        kind asked for, a new epoch, pruned history, a damaged file, an HNSW graph a tenth of whose
        nodes are deleted photos); the recall of an approximate index is printed when it is built."""
        library, request = self.library, self.request
        path = os.path.join(self.folder, INDEX_FILE)
        count, dim = library.count(), library.meta("embedding_dim")
        if dim is None:
            return "no"
        memory = int(request.index_memory_gb * 2**30)
        asked = library.meta("index_kind", "auto") if request.index is None else request.index
        kind = choose_kind(count, dim, memory) if asked == "auto" else asked
        index = None
        try:
            index = VectorIndex.load(path)
        except DataError as e:
            if os.path.exists(path):
                print(f"{e}: rebuilt from the records", file=sys.stderr)
        if index is not None and index.kind == kind:
            before = index.generation
            caught_up = index.catch_up(library)
            worn = kind == "hnsw" and len(index.hidden) > HNSW_REBUILD_SHARE * max(1, index.index.ntotal)
            if caught_up and not worn:
                if index.generation != before:
                    index.save(path)
                self.index_written(index.generation, asked)
                return kind
        start = time.perf_counter()
        ids, vectors = library.embeddings(dim=dim)
        generation = library.meta("generation")
        index = VectorIndex.build(kind, ids, vectors, generation, library.meta("epoch"), memory)
        if kind != "flat":
            recall = index.recall_at_10(ids, vectors)
            print(
                f"{kind} index of {plural(count, 'photo')} built in {time.perf_counter() - start:.1f} s; recall@10 "
                f"against exact search {recall:.3f} (over the library's own vectors as queries)"
            )
        index.save(path)
        self.index_written(generation, asked)
        return kind

    def index_written(self, generation, asked):
        with self.library.transaction():
            self.library.forget_removals(generation)
            self.library.set_meta(index_kind=asked)
