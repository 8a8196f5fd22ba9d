"""Queries of a library: a sentence through VSRN's text encoder, or a photo through its image encoder,
against the library's vector index; optionally the top candidates rescored by LXMERT.

A Searcher reads the records read-only (immutable where the library's folder cannot be written) and
stays current: before a query it looks at the records' generation and its token (small reads) and, when
index.py has committed since, catches its index up (or reloads it) under a lock that queries share, so
a query in flight finishes on the index it began on. After `index.py --rebuild` (a new epoch) it loads
the library's new checkpoints with the new index: a query takes the models and the index of one epoch
together; checkpoints it cannot load make every query a LibraryUnavailable, until they can be loaded.

Each hit's score, the index's exact inner product of the query with the photo's vector, is checked
against the vector the records hold (itself checked against its checksum): a photo whose record is
damaged is left out (said once), and an index whose score of a photo is not the record's is rebuilt from
the records (said) before the query goes on.
"""

import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from inference import read_query, text_encoder
from photo_library import recipe
from photo_library.embedding import QueryBatcher, RecentQueries, image_vectors, load_library_models, text_vectors
from photo_library.store import Library
from photo_library.vectors import INDEX_FILE, VectorIndex
from utils.errors import DataError, OptionError, VSRNError, one_line, without_path
from utils.genome import object_name

REFRESH_EVERY_S = 1.0
SCORE_TOLERANCE = 1e-4  # relative: an index's score and the record's differ by rounding alone


class LibraryUnavailable(DataError):
    """The library changed into a state this searcher cannot answer from (checkpoints it cannot load)."""


@dataclass
class Reranking:
    """LXMERT's second stage: its tokenizer and pair scorer, how many candidates it rescores, the fusion weight."""

    tokenizer: object
    scorer: object
    candidates: int = 50
    alpha: float = 1.0


@dataclass(frozen=True)
class Epoch:
    """What a query uses, from one epoch of the library: the VSRN models (their checkpoints' digests) and
    vocabulary that embedded its photos, the vector index of their vectors, and the models' text encoders
    on the searcher's text path (`inference.text_encoder`)."""

    digests: tuple
    vocab: object
    models: list
    index: VectorIndex
    encoders: list


class Searcher:
    """Searches of the library in `folder` with the checkpoints that made it (`checkpoints`: the same
    files elsewhere, checked by their digest). `text_path`: how sentences are encoded (inference.TEXT_PATHS:
    float32 here, the models' own; search.py's default is int8)."""

    def __init__(self, folder, checkpoints=None, device=None, text_path="float32"):
        from utils.device import check_device

        self.folder = folder
        self.device = check_device(device)
        self.text_path = text_path
        self.recent = RecentQueries()
        self._local = threading.local()
        recorded = self.library.meta("checkpoints")
        if not recorded:
            raise OptionError.naming("{library} {folder}: holds no photos yet; index some with index.py", folder=folder)
        self.lock = threading.Lock()
        self.reloading = threading.Lock()
        self.checked_at = 0.0
        self.unavailable = None  # a LibraryUnavailable while the library's checkpoints cannot be loaded
        self.damaged = set()  # photos whose damaged records were said
        self.epoch = self.load_epoch(recipe.checkpoint_records(checkpoints, recorded, folder))
        self.reranking = None
        self.encode_tokens = encode_alone
        self.search_index = self.search_alone

    def load_epoch(self, records, previous=None):
        """The Epoch of the records now: the checkpoints of `records` loaded (kept from the `previous` Epoch
        when they are its checkpoints), with the index."""
        digests = tuple(record["digest"] for record in records)
        if previous is None or previous.digests != digests:
            paths = [record["path"] for record in records]
            loaded = load_library_models(paths, self.library.meta("vocab_words"), self.folder, device=self.device)
            vocab, models = loaded.vocab, loaded.models
            encoders = [text_encoder(model, self.text_path) for model in models]
        else:
            vocab, models, encoders = previous.vocab, previous.models, previous.encoders
        return Epoch(digests, vocab, models, self.load_index(), encoders)

    def batch_queries(self):
        """Encode the sentences of concurrent queries together, and search the index for their vectors
        together (a server's many clients): one read of the text encoder's weights, and of a flat index's
        vectors, serves them all."""
        self.encode_tokens = QueryBatcher(
            lambda epoch, token_lists: text_vectors(epoch.models, epoch.vocab, token_lists, epoch.encoders)
        )
        self.search_index = QueryBatcher(self.search_together)

    def search_alone(self, epoch, request):
        """(scores, ids, photos in the index) of the `wanted` best photos for one (vector, wanted) request."""
        vector, wanted = request
        with self.lock:
            scores, ids = epoch.index.search(vector, wanted, self.library.embedding_of)
            return scores[0], ids[0], epoch.index.index.ntotal

    def search_together(self, epoch, requests):
        """search_alone's answers to several requests, each group asking the same number searched at once."""
        answers = [None] * len(requests)
        by_wanted = {}
        for position, (_, wanted) in enumerate(requests):
            by_wanted.setdefault(wanted, []).append(position)
        with self.lock:
            total = epoch.index.index.ntotal
            for wanted, positions in by_wanted.items():
                vectors = np.stack([requests[p][0] for p in positions])
                scores, ids = epoch.index.search(vectors, wanted, self.library.embedding_of)
                for row, p in enumerate(positions):
                    answers[p] = (scores[row], ids[row], total)
        return answers

    @property
    def library(self):
        """This thread's read-only connection to the records (SQLite connections stay in their thread)."""
        if getattr(self._local, "library", None) is None:
            self._local.library = Library.open(self.folder)
        return self._local.library

    def load_index(self):
        """index.faiss caught up with the records, when it belongs to them; else rebuilt in memory from them (said,
        unless the library holds no photos or the file is only of an earlier epoch)."""
        library, path = self.library, os.path.join(self.folder, INDEX_FILE)
        problem = None
        if os.path.exists(path):
            try:
                index = VectorIndex.load(path)
                if index.catch_up(library):
                    return index
                problem = index.problem and f"{path}: {index.problem}"
            except DataError as e:
                problem = str(e)
        elif library.count():
            problem = f"{path}: not there"
        if problem:
            print(f"{problem}: rebuilt from the records for this search (index.py writes it again)", file=sys.stderr)
        return self.index_from_records()

    def index_from_records(self):
        """An exact index of the records' vectors, in memory."""
        library = self.library
        with library.snapshot():
            ids, vectors = library.embeddings()
            state, epoch = library.state(), library.meta("epoch")
        index = VectorIndex.build("flat", ids, vectors, state[0], epoch, memory_bytes=0, token=state[1])
        index.header["from_records"] = True
        return index

    def current(self):
        """The Epoch to query, caught up with what index.py committed since the last look (looked at most
        once a second); after a --rebuild, the new checkpoints and index, loaded while queries go on."""
        now = time.monotonic()
        if now - self.checked_at >= REFRESH_EVERY_S:
            self.checked_at = now
            epoch, library = self.epoch, self.library
            if library.meta("epoch") != epoch.index.header["epoch"] or self.unavailable:
                with self.reloading:
                    if library.meta("epoch") != self.epoch.index.header["epoch"] or self.unavailable:
                        self.reload_epoch()
            elif library.state() != (epoch.index.generation, epoch.index.header.get("token")):
                with self.lock:
                    if not epoch.index.catch_up(library):
                        self.epoch = self.load_epoch(library.meta("checkpoints"), previous=epoch)
        if self.unavailable:
            raise self.unavailable
        return self.epoch

    def reload_epoch(self):
        """The Epoch of the library's new checkpoints; when they cannot be loaded (moved after the --rebuild
        that recorded them), queries are LibraryUnavailable until they can, and the reason is said once."""
        try:
            records = self.library.meta("checkpoints")
            if tuple(record["digest"] for record in records) != self.epoch.digests:
                records = recipe.checkpoint_records(None, records, self.folder)
            self.epoch = self.load_epoch(records, previous=self.epoch)
            self.unavailable = None
        except VSRNError as e:
            line = one_line(e.worded(lambda field: f"--{field}"))
            if self.unavailable is None or self.unavailable.reason != line:
                print(f"error: {line}", file=sys.stderr)
            self.unavailable = LibraryUnavailable(
                "the library was re-embedded with checkpoints this server cannot load (its log says why); "
                "restart it once they can be"
            )
            self.unavailable.reason, self.unavailable.public = line, str(self.unavailable)

    # ---- queries

    def text(self, text, k=10, rerank=False):
        """(hits, the Query: its unknown words) of a sentence. rerank: LXMERT rescores the top candidates."""
        epoch = self.current()
        query = read_query(epoch.vocab, text)
        vector = self.sentence_vector(epoch, query.tokens)
        wanted = max(k, self.reranking.candidates) if rerank and self.reranking else k
        hits = self.nearest(epoch, vector, wanted)
        if rerank:
            if self.reranking is None:
                raise OptionError.naming("{rerank} needs LXMERT: this searcher has no reranker")
            hits = self.rerank(text, hits)
        return hits[:k], query

    def sentence_vector(self, epoch, tokens):
        """The vector of a tokenized sentence by the text encoders of `epoch`: a recent query's is kept, by
        the checkpoints' digests, the text path and the tokens (a --rebuild's new checkpoints are new keys)."""
        key = (epoch.digests, self.text_path, tuple(tokens))
        vector = self.recent.get(key)
        if vector is None:
            vector = self.recent.put(key, self.encode_tokens(epoch, tokens))
        return vector

    def like(self, path, k=10):
        """Hits of the photos most like the photo at `path` (VSRN's image embedding; the photo itself left
        out). A photo outside the library is extracted first, with the library's detector and settings."""
        epoch = self.current()
        vector, own = self.photo_vector(epoch, path)
        hits = [hit for hit in self.nearest(epoch, vector, k + 1) if hit["id"] != own][:k]
        return [{**hit, "rank": rank} for rank, hit in enumerate(hits, start=1)]

    def photo_vector(self, epoch, path):
        """(the library's vector of the photo at `path`, its id or None)."""
        from utils.digest import file_digest

        if os.path.isdir(path):
            raise OptionError.naming("{like} {path}: a folder; give one photo", path=path)
        if not os.path.isfile(path):
            raise OptionError.naming("{like} {path}: file not found", path=path)
        library = self.library
        photo = library.photo_of_path(os.path.abspath(path)) or library.photo_of_digest(file_digest(path))
        if photo is not None:
            return library.photo(photo)["embedding"], photo
        return self.extracted_vector(epoch, path), None

    def extracted_vector(self, epoch, path):
        from detection.cache import cached_regions
        from detection.settings import RegionSettings
        from utils.images import ImageError, read_image

        library = self.library
        detector = library.meta("detector")
        if detector is None or not os.path.isfile(detector["path"]):
            raise OptionError.naming(
                "{like} {path}: not in the library, and the library's detector weights are not there to extract it",
                path=path,
            )
        try:
            read_image(path)  # a file that is no picture is said before the detector is loaded
        except ImageError as e:
            raise OptionError.naming("{like} {path}: {reason}", path=path, reason=without_path(str(e), path)) from None
        settings = RegionSettings.from_record(library.meta("settings"))
        config = library.meta("detector_config")
        regions = cached_regions([path], detector["path"], config, settings, device=str(self.device))
        if not regions:
            raise DataError.naming("{like} {path}: its regions could not be extracted (see the line above)", path=path)
        features = next(iter(regions.values()))["features"]
        return image_vectors(epoch.models, features[None])[0][0]

    def nearest(self, epoch, vector, k):
        """The k photos of highest inner product with `vector` in the index of `epoch`, as hits (dicts) best
        first, each score checked against the photo's record. Photos removed since the index last caught up, or
        whose records are damaged, are skipped, and more are fetched in their place."""
        wanted = k
        while True:
            scores, ids, total = self.search_index(epoch, (vector, wanted))
            records = self.records(ids[ids >= 0])
            hits = []
            for score, photo in zip(scores, ids):
                record = records.get(int(photo))
                if record is None:
                    continue
                exact = float(np.dot(record["embedding"], np.ravel(vector)))
                if abs(exact - score) > SCORE_TOLERANCE * max(1.0, abs(exact)) and not epoch.index.header.get(
                    "from_records"
                ):
                    return self.nearest(self.rebuilt(epoch, int(photo)), vector, k)
                hits.append(hit(record, float(score), len(hits) + 1))
            if len(hits) >= k or wanted >= total:
                return hits[:k]
            wanted *= 2

    def records(self, photos):
        """{id: record} of those of `photos` that are there and whole; a damaged one is said once."""
        found = self.library.photos(photos)
        for photo, error in found.damaged.items():
            if photo not in self.damaged:
                self.damaged.add(photo)
                print(f"warning: {error}; left out of the answers", file=sys.stderr)
        return found.records

    def rebuilt(self, epoch, photo):
        """`epoch` with its index rebuilt from the records, whose vector of `photo` the index did not hold."""
        print(
            f"{os.path.join(self.folder, INDEX_FILE)}: its vector of photo {photo} is not the records': "
            "rebuilt from the records for this search (index.py writes it again)",
            file=sys.stderr,
        )
        with self.lock:
            fixed = dataclasses.replace(epoch, index=self.index_from_records())
            if self.epoch is epoch:
                self.epoch = fixed
        return fixed

    # ---- LXMERT

    def enable_rerank(self, model_path, candidates=50, alpha=1.0, mode="matched", tokenizer_path=None):
        """Load LXMERT's model to rescore the top `candidates` of each text query (alpha: its weight against VSRN's)."""
        from lxmert.loading import load_lxmert
        from lxmert.scoring import PairScorer

        feature_dim = self.library.meta("feature_dim")
        model, tokenizer = load_lxmert(model_path, mode, tokenizer_path)
        if model.config.visual_feat_dim != feature_dim:
            raise OptionError.naming(
                "{model} {path}: LXMERT reads {dim}-d regions; the library keeps {kept}-d ones",
                path=model_path,
                dim=model.config.visual_feat_dim,
                kept=feature_dim,
            )
        scorer = PairScorer(model, mode, self.device)
        self.reranking = Reranking(tokenizer, scorer, candidates, alpha)

    def rerank(self, text, hits):
        """The hits reordered by LXMERT's score of (photo, text), fused with VSRN's by alpha."""
        from lxmert.rerank import rerank
        from lxmert.scoring import caption_tokens, normalised_boxes

        if not hits:
            return hits
        library, reranking = self.library, self.reranking
        found = library.photos([h["id"] for h in hits])  # read together, as nearest reads them
        if found.damaged:
            raise next(iter(found.damaged.values()))
        records = [found.records[h["id"]] for h in hits]
        features = torch.from_numpy(np.stack([library.features(h["id"]) for h in hits]))
        boxes = normalised_boxes(
            np.stack([r["boxes"] for r in records]),
            [(r["height"], r["width"]) for r in records],
            [r["path"] for r in records],
        )
        input_ids, mask = caption_tokens(reranking.tokenizer, [text])
        scorer = reranking.scorer
        with torch.inference_mode():
            language = scorer.encode_captions(input_ids, mask)
            vision = scorer.encode_images(features, torch.from_numpy(boxes))
            lxmert = scorer.score(
                language.expand(len(hits), -1, -1), mask.to(scorer.device).expand(len(hits), -1), vision
            ).cpu()
        vsrn = torch.tensor([[h["score"] for h in hits]], dtype=torch.float64)
        fused = rerank(vsrn, lxmert[None], torch.ones_like(vsrn, dtype=torch.bool), reranking.alpha)[0]
        order = torch.argsort(fused, descending=True, stable=True).tolist()
        reranked = []
        for place, position in enumerate(order, start=1):
            reranked.append(
                {
                    **hits[position],
                    "rank": place,
                    "vsrn": hits[position]["score"],
                    "lxmert": float(lxmert[position]),
                    "score": float(fused[position]),
                }
            )
        return reranked


def encode_alone(epoch, tokens):
    return text_vectors(epoch.models, epoch.vocab, [tokens], epoch.encoders)[0]


def hit(record, score, rank):
    """A search result as the command line and the page show it (no path in any URL: photos go by id)."""
    return {
        "id": record["id"],
        "rank": rank,
        "score": score,
        "path": record["path"],
        "name": os.path.basename(record["path"]) if record["path"] else None,
        "width": record["width"],
        "height": record["height"],
    }


def region_names(record):
    """The Visual Genome name of each of a photo's regions (None where its regions came without object ids)."""
    return [object_name(int(i)) for i in record["objects"]]
