"""The library's vector index (FAISS, faiss-cpu, imported only by the photo library).

Three kinds (`index.py --index`):
- flat:  exact inner products against every vector. Memory 4 x dim bytes per photo; a query reads
         them all, so its time grows with the library (memory bandwidth, not arithmetic, is the limit).
- hnsw:  a graph over the full vectors (HNSW, 32 neighbours): a query visits a few thousand of them.
         Memory: the vectors plus the graph (about 256 bytes per photo).
- ivfpq: vectors in inverted lists by their nearest of about 4 sqrt(n) centroids, compressed to m
         bytes each by product quantisation, for libraries whose vectors do not fit in memory. A
         query scans the 32 lists nearest to it, and its 50 x k best candidates are re-scored from
         the vectors the records keep.
`auto` takes flat up to 50,000 photos, then hnsw while it fits `--index_memory`, then ivfpq.

The index file (index.faiss) carries a header: the generation, its commit's token and the embedding
epoch of the records it holds, its photo count, and the photos it hides (HNSW cannot delete); and a
CRC-32 of the header and FAISS's bytes, checked before FAISS reads them (0.6 to 1 s per GB measured on a
busy 2-core machine: 5 to 8 s for the 8.2 GB of a million photos' flat index). An index belongs to the
records whose commit at its generation has its token: records restored from a backup, or rolled back by
a lost -wal file, do not have it (whatever their generation), and the index is rebuilt from them. An
index that belongs catches up from the photos written and removed after its generation; one that cannot
(another epoch, pruned history), whose photo count is not the records', or whose file is damaged is
rebuilt from the records.
"""

import json
import logging
import math
import os
import struct
import sys
import time
import zlib

import numpy as np

from utils.atomic import atomic_write, remove_leftovers
from utils.errors import DataError, OptionError, first_line
from utils.text import plural

INDEX_FILE = "index.faiss"  # in the library's folder
KINDS = ("flat", "hnsw", "ivfpq")
FLAT_UP_TO = 50_000
HNSW_NEIGHBOURS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 64, 128
IVF_PROBES = 32
MAX_CODE_BYTES = 256  # 8 dimensions per sub-quantiser for 2048-d vectors: the exact re-scoring does the rest
TRAINING_POINTS = 160_000  # ivfpq's k-means trains on at most this many vectors, drawn at random
REFINE = 50  # ivfpq: candidates re-scored exactly per result wanted (500 record reads, ~2.5 ms, for k = 10)
MAGIC = b"VSRN-LIBRARY-INDEX-2\n"
EARLIER_MAGIC = b"VSRN-LIBRARY-INDEX-"
PREFIX = struct.Struct("<QI")  # after MAGIC: the header's length, the CRC-32 of the header and FAISS's bytes
MAX_HEADER = 1 << 30
CHUNK = 1 << 24
RECALL_QUERIES = 200
HNSW_REBUILD_SHARE = 0.1  # rebuild an HNSW index once this share of its nodes are deleted photos


def import_faiss():
    # FAISS says at INFO level which of its builds it loads; the jobs' logs need not.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise OptionError("the photo library's vector index needs FAISS: python3 -m pip install faiss-cpu") from None
    return faiss


def choose_kind(count, dim, memory_bytes):
    """auto's choice for `count` vectors of `dim` floats within `memory_bytes`."""
    flat = count * dim * 4
    if count <= FLAT_UP_TO and flat <= memory_bytes:
        return "flat"
    if flat + count * HNSW_NEIGHBOURS * 8 <= memory_bytes:
        return "hnsw"
    return "ivfpq"


def ivfpq_settings(count, dim, memory_bytes):
    """(lists, code bytes per vector, bits per sub-quantiser) for `count` vectors within `memory_bytes`:
    about 4 sqrt(count) lists, the most code bytes (a divisor of dim, at most 256 and dim / 2) that fit, and
    as many bits (8 at most) as the vectors can train (FAISS wants 39 training points per centroid)."""
    lists = max(1, min(int(4 * math.sqrt(count)), min(count, TRAINING_POINTS) // 39))
    per_vector = max(1, memory_bytes // max(count, 1) - 16)  # the id and the list entry
    code_bytes = max(m for m in range(1, min(MAX_CODE_BYTES, dim // 2) + 1) if dim % m == 0 and m <= per_vector)
    bits = max(1, min(8, int(math.log2(max(2, count // 39)))))
    return lists, code_bytes, bits


class VectorIndex:
    """A FAISS index of photo ids, with its header: kind, generation, epoch, hidden ids."""

    def __init__(self, index, header):
        self.index, self.header = index, header
        self.hidden = set(header.get("hidden", ()))
        self.problem = None  # why catch_up found that the index does not belong to the records
        faiss = import_faiss()
        if self.kind == "hnsw":
            # Keep the graph's Python object alive with the index that holds it.
            self.graph = faiss.downcast_index(index.index)
            self.graph.hnsw.efSearch = HNSW_EF_SEARCH
        elif self.kind == "ivfpq":
            index.nprobe = min(IVF_PROBES, index.nlist)

    @property
    def kind(self):
        return self.header["kind"]

    @property
    def generation(self):
        return self.header["generation"]

    @classmethod
    def build(cls, kind, ids, vectors, generation, epoch, memory_bytes, token=None):
        """A new index of `kind` over the vectors (n, dim) float32 with their photo ids, of the records'
        `generation` (made by the commit of `token`) and `epoch`."""
        faiss = import_faiss()
        count, dim = vectors.shape
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            graph = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index = faiss.IndexIDMap2(graph)
            graph.this.disown()
            index.own_fields = True
        elif kind == "ivfpq":
            lists, code_bytes, bits = ivfpq_settings(count, dim, memory_bytes)
            if count < 39 * 2:
                raise OptionError.naming(
                    "{index} ivfpq: {count} photos are too few to train it; use {index} flat or hnsw", count=count
                )
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, lists, code_bytes, bits, faiss.METRIC_INNER_PRODUCT)
            quantizer.this.disown()
            index.own_fields = True
            sample = np.random.default_rng(0).choice(count, min(count, TRAINING_POINTS), replace=False)
            index.train(vectors[np.sort(sample)])
        else:
            raise OptionError.naming(
                "{index} {kind}: expected auto or one of {kinds}", kind=kind, kinds=", ".join(KINDS)
            )
        if count:
            index.add_with_ids(vectors, ids)
        header = {"kind": kind, "generation": generation, "token": token, "epoch": epoch, "dim": dim, "hidden": []}
        return cls(index, header)

    def add(self, ids, vectors):
        """Add photos (ids are never reused: a photo's vector changes only with a new epoch, a new index)."""
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def ids(self):
        """The photo ids the index holds (hidden ones included), as a set."""
        faiss = import_faiss()
        if self.kind != "ivfpq":
            return set(faiss.vector_to_array(self.index.id_map).tolist())
        lists, found = self.index.invlists, set()
        for number in range(self.index.nlist):
            size = lists.list_size(number)
            if size:
                found.update(faiss.rev_swig_ptr(lists.get_ids(number), size).tolist())
        return found

    def remove(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self.kind == "hnsw":  # a graph keeps its nodes: searches skip them (ids it never held need no hiding)
            held = self.ids()
            self.hidden.update(int(i) for i in ids if int(i) in held)
        else:
            self.index.remove_ids(ids)

    @property
    def size(self):
        """The photos the index holds (its vectors less the hidden ones)."""
        return int(self.index.ntotal) - len(self.hidden)

    def catch_up(self, library):
        """Bring the index to the records' generation from the photos written and removed since its own;
        False when it cannot: it is of another epoch or older than the history kept, or (said by `problem`)
        it belongs to other records or its photo count is not theirs. The caller rebuilds it."""
        self.problem = None
        with library.snapshot():  # the generation and the photos of one state of the records
            generation, token = library.state()
            if library.meta("epoch") != self.header["epoch"] or self.generation < library.meta("history_since", 0):
                return False
            if library.token(self.generation) != self.header.get("token"):
                self.problem = "written from other records (restored from a backup, or rolled back?)"
                return False
            if generation > self.generation:
                self.remove(library.removed_since(self.generation))
                self.add(*library.embeddings(since=self.generation))
                self.header.update(generation=generation, token=token)
            if self.size != library.count():
                self.problem = f"it holds {self.size} photos, the records {library.count()}"
                return False
        return True

    def search(self, vectors, k, exact_vectors=None):
        """(scores, ids) (queries, k) of the best photos for each query vector; -1 ids pad short lists.
        `exact_vectors(ids)` -> {id: vector} re-scores an ivfpq index's candidates exactly."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        wanted = k * REFINE if self.kind == "ivfpq" else k + len(self.hidden)
        scores, ids = self.index.search(vectors, max(1, min(wanted, self.index.ntotal)))
        out_scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(vectors), k), -1, dtype=np.int64)
        for row, (query, found, found_scores) in enumerate(zip(vectors, ids, scores)):
            keep = [(float(s), int(i)) for s, i in zip(found_scores, found) if i >= 0 and int(i) not in self.hidden]
            if self.kind == "ivfpq" and keep:
                exact = exact_vectors([i for _, i in keep])
                keep = [(float(exact[i] @ query), i) for _, i in keep if i in exact]
            keep = sorted(keep, key=lambda pair: (-pair[0], pair[1]))[:k]
            for column, (score, photo) in enumerate(keep):
                out_scores[row, column], out_ids[row, column] = score, photo
        return out_scores, out_ids

    def recall_at_10(self, ids, vectors, seed=0):
        """Recall@10 against exact search, over up to RECALL_QUERIES of the library's own vectors as
        queries: the share of each exact top 10 that this index returns in its top 10."""
        if len(vectors) <= 10:
            return 1.0
        queries = vectors[
            np.random.default_rng(seed).choice(len(vectors), min(RECALL_QUERIES, len(vectors)), replace=False)
        ]
        exact = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]]
        rows = {int(photo): row for row, photo in enumerate(ids)}
        _, found = self.search(queries, 10, lambda wanted: {i: vectors[rows[i]] for i in wanted if i in rows})
        return float(np.mean([len(set(e.tolist()) & set(f.tolist())) / 10 for e, f in zip(exact, found)]))

    def save(self, path):
        """index.faiss: MAGIC, the header's length, the CRC-32 of what follows, the header's JSON, then FAISS's
        bytes; written whole or not at all."""
        faiss = import_faiss()
        header = {**self.header, "hidden": sorted(self.hidden), "count": int(self.index.ntotal)}
        text = json.dumps(header).encode("utf-8")
        payload = faiss.serialize_index(self.index)
        crc = zlib.crc32(memoryview(payload), zlib.crc32(text))
        with atomic_write(path, "wb") as f:
            f.write(MAGIC + PREFIX.pack(len(text), crc) + text)
            f.write(memoryview(payload))

    @classmethod
    def load(cls, path):
        """The index of index.faiss; DataError when the file is missing or damaged (the caller rebuilds it).
        Its checksum is checked before FAISS reads it, which then reads it from the file (no second copy)."""
        faiss = import_faiss()
        try:
            with open(path, "rb") as f:
                length = check_index_file(f)
                header = json.loads(f.read(length).decode("utf-8"))
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except (OSError, ValueError, RuntimeError, struct.error, UnicodeDecodeError, MemoryError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e, 120)
            raise DataError(f"{path}: missing or damaged vector index ({reason})") from None
        if not isinstance(header, dict) or index.ntotal != header.get("count") or header.get("kind") not in KINDS:
            raise DataError(f"{path}: damaged vector index (its header does not describe it)")
        return cls(index, header)


def check_index_file(f):
    """Check an open index file's magic and checksum; the header's length, `f` left at the header."""
    begin = f.read(len(MAGIC) + PREFIX.size)
    if not begin.startswith(MAGIC):
        if begin.startswith(EARLIER_MAGIC):
            raise ValueError("written by an earlier version, without a checksum")
        raise ValueError("it does not begin as a library's vector index")
    length, expected = PREFIX.unpack(begin[len(MAGIC) :])
    if length > MAX_HEADER:
        raise ValueError("its header's length is damaged")
    crc = 0
    while chunk := f.read(CHUNK):
        crc = zlib.crc32(chunk, crc)
    if crc != expected:
        raise ValueError("its checksum does not match its content")
    f.seek(len(begin))
    return length


def update_index(library, folder, asked, memory_bytes):
    """Bring the library's index.faiss to its records, of the kind `asked` (auto: choose_kind's choice within
    `memory_bytes`): caught up when it can be, rebuilt when it cannot (another kind asked for, a new epoch,
    pruned history, a damaged file or one of other records, an HNSW graph a tenth of whose nodes are deleted
    photos), each reason but the ordinary ones said; the recall of an approximate index is printed when it is
    built. The kind it is ("no" for a library without vectors yet). Called under the writer's lock, it also
    removes the temporary files of a save that a kill interrupted (at a million photos, gigabytes)."""
    path = os.path.join(folder, INDEX_FILE)
    remove_leftovers(path)
    count, dim = library.count(), library.meta("embedding_dim")
    if dim is None:
        return "no"
    kind = choose_kind(count, dim, memory_bytes) if asked == "auto" else asked
    index = load_if_there(path)
    if index is not None and index.kind == kind:
        before = index.generation
        caught_up = index.catch_up(library)
        worn = kind == "hnsw" and len(index.hidden) > HNSW_REBUILD_SHARE * max(1, index.index.ntotal)
        if caught_up and not worn:
            if index.generation != before:
                index.save(path)
            _written(library, index.generation, asked)
            return kind
        if index.problem:
            print(f"{path}: {index.problem}: rebuilt from the records", file=sys.stderr)
    start = time.perf_counter()
    with library.snapshot():
        ids, vectors = library.embeddings(dim=dim)
        state = library.state()
    index = VectorIndex.build(kind, ids, vectors, state[0], library.meta("epoch"), memory_bytes, token=state[1])
    if kind != "flat":
        recall = index.recall_at_10(ids, vectors)
        print(
            f"{kind} index of {plural(count, 'photo')} built in {time.perf_counter() - start:.1f} s; recall@10 "
            f"against exact search {recall:.3f} (over the library's own vectors as queries)"
        )
    index.save(path)
    _written(library, state[0], asked)
    return kind


def load_if_there(path):
    """The index of the file at `path`; None when there is none, or when it is damaged (said)."""
    if not os.path.exists(path):
        return None
    try:
        return VectorIndex.load(path)
    except DataError as e:
        print(f"{e}: rebuilt from the records", file=sys.stderr)
        return None


def _written(library, generation, asked):
    """The records after index.faiss is written at `generation`: the removals it holds forgotten, the kind kept."""
    with library.transaction():
        library.forget_removals(generation)
        library.set_meta(index_kind=asked)
