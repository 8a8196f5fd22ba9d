"""The photo library's speed and size: queries, index builds, serving, reruns and indexing.

    python3 bench/search.py --part vectors [--sizes 10000,100000,1000000] [--kinds flat,hnsw,ivfpq] [--queries 200]
    python3 bench/search.py --part library [--photos 10000] [--clients 16] [--seconds 20]
    python3 bench/search.py --part text [--checkpoint M] [--agreement-queries 1000]
    python3 bench/search.py --part disk
    python3 bench/search.py --part extract [--device cuda] [--extract-photos 3]
    python3 bench/search.py --smoke      # every part at toy sizes, in seconds

vectors: synthetic 2048-d unit vectors around 2,000 random centres (photo embeddings cluster by
  content; uniform random vectors, which have no neighbours worth the name, would be the worst case
  of every approximate index), queries drawn the same way, made a chunk at a time into a file (a
  million are 8 GB) that the indexes are built from. Per size and index kind: build time,
  bytes per photo, the search's latency p50/p99, the end-to-end latency p50 of a query (a distinct
  12-word sentence through a VSRN text encoder of the released models' size, random weights, in
  float32 and on search.py's int8 path, then the search, timed together), and recall@10 against
  exact search. The memory bandwidth measured here explains exact search's cost: it reads every
  vector per query.
library: a library of toy pictures with 2048-d embeddings (a 128-d toy feature checkpoint of
  embedding size 2048 and 300-d words, random weights) made by index.py; a rerun of index.py over it
  unchanged (wall time, a fresh process); search.py --serve under N concurrent clients for a while,
  each asking distinct sentences, with each --text_encoder: queries/s, p50/p99, errors, the server's
  CPU a query, and its memory before and after; a sentence asked again (its vector kept); the same
  searcher in this process under as many threads (what serving costs without HTTP); and the time to
  read the embeddings an ivfpq query re-scores from the records.
text: the ways to encode a sentence faster than float32 and their top-10 agreement with it
  (bench/fast_text.py: with --checkpoint, a released-size model's photos and sentences).
disk: the bytes per photo of a library of 2048-d regions (the detector's), float32 and float16
  region features, and the largest score difference float16's rounding makes.
extract: photos/s of index.py's detector path with the published detector's architecture (random
  weights from ../shared/frcnn_reference/weights_recipe.py), the caffe policy, 480x640 photos.
"""

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import utils.threads  # noqa: E402,F401  (before torch, as the scripts)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import describe, gemm_rate, print_table  # noqa: E402
from photo_library.vectors import REFINE  # noqa: E402

DIM = 2048
CENTRES = 2000
QUERY_WORDS = "a dog running on the beach next to a red umbrella".split()


def percentile(values, share):
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(share * len(values))) - 1)]


def memory_bandwidth(gigabytes=1.0):
    """GB/s of reading a float32 array (a sum), best of three: what an exact search's scan is bound by."""
    array = np.ones(int(gigabytes * 2**30 / 4), dtype=np.float32)
    best = min(timed(lambda: array.sum()) for _ in range(3))
    return array.nbytes / best / 1e9


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def clustered(count, seed, centres, chunk=50_000, out=None):
    """`count` unit vectors near random centres (noise of a third of a centre's norm), float32, made a
    chunk at a time (a million of them are 8 GB) into `out` (an array or a memory-mapped file) or a new array."""
    rng = np.random.default_rng(seed)
    vectors = np.empty((count, DIM), dtype=np.float32) if out is None else out
    for start in range(0, count, chunk):
        part = vectors[start : start + chunk]
        part[:] = centres[rng.integers(0, len(centres), len(part))]
        part += rng.standard_normal((len(part), DIM), dtype=np.float32) * np.float32(0.35 / math.sqrt(DIM))
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return vectors


def index_bytes(index, folder):
    """The bytes of an index as index.py writes it (FAISS's own file; written to disk, not copied in memory)."""
    import faiss

    path = os.path.join(folder, "index.bench")
    faiss.write_index(index, path)
    size = os.path.getsize(path)
    os.remove(path)
    return size


def sentence_encoders(count):
    """{text path: encode(n), which encodes the n-th of `count` distinct 12-word sentences} for a VSRN text
    encoder of the released models' size (300-d words, 2048-d GRU, 8,481 words), random weights: float32
    and search.py's int8 path (inference.text_encoder)."""
    from inference import text_encoder
    from model import EncoderText

    torch.manual_seed(0)
    model = argparse.Namespace(txt_enc=EncoderText(8481, 300, DIM, 1).eval(), device=torch.device("cpu"))
    sentences = torch.randint(4, 8481, (count, len(QUERY_WORDS) + 2), generator=torch.Generator().manual_seed(1))
    encoders = {path: text_encoder(model, path) for path in ("float32", "int8")}

    def encoding(encoder):
        def encode(n):
            with torch.no_grad():
                return encoder(sentences[n % count : n % count + 1], [sentences.shape[1]])

        return encode

    return {path: encoding(encoder) for path, encoder in encoders.items()}


def exact_top10(vectors, probes, chunk=50_000):
    """Each probe's 10 best ids (1-based) by exact inner products, reading the vectors a chunk at a time."""
    best = torch.full((len(probes), 10), -math.inf)
    best_ids = torch.zeros((len(probes), 10), dtype=torch.int64)
    for start in range(0, len(vectors), chunk):
        top = torch.from_numpy(probes @ np.asarray(vectors[start : start + chunk]).T).topk(10, dim=1)
        scores, ids = torch.cat([best, top.values], 1), torch.cat([best_ids, top.indices + start + 1], 1)
        order = scores.topk(10, dim=1).indices
        best, best_ids = scores.gather(1, order), ids.gather(1, order)
    return [set(row.tolist()) for row in best_ids]


def bench_vectors(sizes, queries, memory_gb, kinds=("flat", "hnsw", "ivfpq")):
    from photo_library.vectors import VectorIndex

    encoders = sentence_encoders(queries)
    encode_ms = {
        path: statistics.median(timed(lambda: encode(n)) for n in range(50)) * 1e3 for path, encode in encoders.items()
    }
    bandwidth = memory_bandwidth()
    print_table(
        [
            (
                "text encoding",
                ", ".join(f"{path} {ms:.2f} ms" for path, ms in encode_ms.items()) + " per sentence (median of 50)",
            ),
            ("memory bandwidth", f"{bandwidth:.1f} GB/s (reading a 1 GB float32 array)"),
        ],
        "per query, before any search",
    )
    centres = np.random.default_rng(0).normal(0, 1, (CENTRES, DIM)).astype(np.float32) / math.sqrt(DIM)
    scratch = tempfile.mkdtemp(prefix="vsrn-vectors-bench-")
    rows = []
    for count in sizes:
        vectors = np.lib.format.open_memmap(os.path.join(scratch, "vectors.npy"), "w+", np.float32, (count, DIM))
        clustered(count, 1, centres, out=vectors)
        probes = clustered(queries, 2, centres)
        exact = exact_top10(vectors, probes)
        for kind in kinds:
            start = time.perf_counter()
            # From the file: FAISS reads its pages as it adds them (the page cache, which the system can reclaim).
            index = VectorIndex.build(kind, np.arange(1, count + 1), vectors, 1, 0, memory_bytes=int(memory_gb * 2**30))
            built = time.perf_counter() - start

            def lookup(wanted, vectors=vectors):  # the records' exact vectors
                return {i: np.asarray(vectors[i - 1]) for i in wanted}

            index.search(probes[:2], 10, lookup)
            asked = queries if kind != "flat" or count <= 100_000 else max(20, queries // 10)
            searches, found = [], []
            for probe in probes[:asked]:
                start = time.perf_counter()
                _, result = index.search(probe, 10, lookup)
                searches.append(time.perf_counter() - start)
                found.append(result[0])
            end_to_end = {}
            for path, encode in encoders.items():
                end_to_end[path] = []
                for n, probe in enumerate(probes[:asked]):
                    start = time.perf_counter()
                    encode(n)
                    index.search(probe, 10, lookup)
                    end_to_end[path].append(time.perf_counter() - start)
            recall = np.mean([len(exact[n] & set(r.tolist())) / 10 for n, r in enumerate(found)])
            size = index_bytes(index.index, scratch)
            rows.append(
                (
                    f"{count:>9,} {kind:<5}",
                    f"build {built:7.1f} s, {size / count:8.0f} B/photo, search p50 "
                    f"{percentile(searches, 0.5) * 1e3:7.2f} ms, p99 {percentile(searches, 0.99) * 1e3:7.2f} ms; "
                    "with the sentence p50 "
                    + ", ".join(f"{path} {percentile(times, 0.5) * 1e3:7.2f} ms" for path, times in end_to_end.items())
                    + f"; recall@10 {recall:.3f} ({len(searches)} queries)",
                )
            )
            print(rows[-1][0], rows[-1][1], flush=True)
            del index
        del vectors
        os.remove(os.path.join(scratch, "vectors.npy"))
    shutil.rmtree(scratch, ignore_errors=True)
    print_table(
        rows,
        "build time, index bytes per photo, the search's latency, a query's end to end (the sentence's encoding "
        "and the search, timed together), recall@10 vs exact",
    )
    print(
        f"exact search reads {DIM * 4} bytes per photo per query: at {bandwidth:.1f} GB/s, "
        + ", ".join(f"{count:,} photos take at least {count * DIM * 4 / bandwidth / 1e6:.1f} ms" for count in sizes)
    )


def toy_checkpoint(folder, captions, img_dim, **options):
    """A VSRN checkpoint with random weights reading `img_dim`-d regions, and the vocabulary of the
    `image_id<TAB>caption` file `captions` (None: a few words) saved next to it; its path."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from photo_world import checkpoint
    from utils.captions import read_captions
    from vocab import build_vocab, save_vocab, vocabulary_from_words

    if captions:
        vocab = build_vocab([line.split("\t", 1)[1] for line in read_captions(captions)], 1)
    else:
        vocab = vocabulary_from_words(["<pad>", "<start>", "<end>", "<unk>", "a", "dog"])
    save_vocab(vocab, os.path.join(folder, "vocab", "toyimg_precomp_vocab.json"))
    return checkpoint(os.path.join(folder, "run"), vocab, img_dim, 0, **options)


def run_index(*args):
    """Seconds index.py takes, in a fresh process, on these arguments."""
    command = [sys.executable, os.path.join(ROOT, "index.py"), *args]
    return timed(lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL))


def make_toy_library(folder, photos):
    """A library of `photos` toy pictures, 128-d regions, a checkpoint of embedding size 2048 and 300-d words
    (random weights)."""
    from utils.make_toy_images import make_toy_images

    toy = make_toy_images(os.path.join(folder, "toy"), img_dim=128, sizes={"train": photos})
    captions = os.path.join(toy, "train_captions.txt")
    model = toy_checkpoint(folder, captions, 128, embed_size=DIM, dim_vid=DIM, word_dim=300)
    library = os.path.join(folder, "library")
    regions = os.path.join(toy, "train_obj36.tsv")
    made = run_index(
        "--images", os.path.join(toy, "images"), "--checkpoint", model, "--regions", regions, "--library", library
    )
    return library, made


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def record_reads(library, repeats=50):
    """Median seconds to read the embeddings an ivfpq query re-scores (k = 10) from the library's records."""
    from photo_library.store import Library

    rng = np.random.default_rng(0)
    records = Library.open(library)
    try:
        ids = records.photo_ids()
        wanted = min(REFINE * 10, len(ids))
        return statistics.median(
            timed(lambda: records.embedding_of(rng.choice(ids, wanted, replace=False).tolist())) for _ in range(repeats)
        )
    finally:
        records.close()


def toy_sentences(count, seed=0):
    """Distinct sentences of the toy world's words (bench/fast_text.py's)."""
    from fast_text import toy_sentences as sentences

    return sentences(count, seed)


def serve(library, text_path, port):
    """search.py --serve on `library` with `text_path`, answering: (the process, the URL of a search for q)."""
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "search.py"), "--library", library, "--serve", "--port", str(port)]
        + ["--text_encoder", text_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def url(q):
        return f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": q, "k": 20})

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url(" ".join(QUERY_WORDS)), timeout=5).read()
            break
        except OSError:
            time.sleep(0.5)
    return server, url


def ask_together(url, sentences, clients, seconds, ask=None):
    """`clients` closed-loop clients, each asking the next of `sentences` (none asked twice) until `seconds`
    pass, over HTTP, or through `ask(sentence)` -> whether it found photos: (latencies of the answers with
    results, errors, elapsed seconds)."""
    latencies, errors, stop = [], [], time.time() + seconds
    following = iter(sentences)
    lock = threading.Lock()

    def over_http(sentence):
        with urllib.request.urlopen(url(sentence), timeout=30) as answer:
            return answer.status == 200 and bool(json.loads(answer.read())["results"])

    def client():
        while time.time() < stop:
            with lock:
                sentence = next(following)
            start = time.perf_counter()
            try:
                ok = (ask or over_http)(sentence)
            except OSError as e:
                errors.append(e)
                continue
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append("an answer without results")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - began


def bench_serving(library, clients, seconds, port=8765):
    """Rows of search.py --serve's figures under `clients` clients, for each text path."""
    pool = int(clients * seconds * 50) + 100  # more than the clients can ask: none is asked twice
    sentences, rows = toy_sentences(2 * pool), []
    for text_path, mine in (("float32", sentences[:pool]), ("int8", sentences[pool:])):
        server, url = serve(library, text_path, port)
        for sentence in mine[:20]:  # warm
            urllib.request.urlopen(url(sentence)).read()
        before, cpu_before = rss_mb(server.pid), cpu_seconds(server.pid)
        latencies, errors, elapsed = ask_together(url, mine[20:], clients, seconds)
        after, cpu = rss_mb(server.pid), cpu_seconds(server.pid) - cpu_before
        again = [timed(lambda: urllib.request.urlopen(url(mine[0])).read()) for _ in range(50)]
        server.terminate()
        server.wait()
        rows += [
            (
                f"serving, {text_path}",
                f"{clients} clients for {elapsed:.0f} s, distinct sentences: {len(latencies) / elapsed:.1f} queries/s, "
                f"p50 {percentile(latencies, 0.5) * 1e3:.1f} ms, p99 {percentile(latencies, 0.99) * 1e3:.1f} ms, "
                f"{len(errors)} errors; a sentence asked again, alone: p50 {statistics.median(again) * 1e3:.1f} ms; "
                f"the server's CPU {cpu / max(1, len(latencies)) * 1e3:.1f} ms a query",
            ),
            (f"server memory, {text_path}", f"{before:.0f} MB before, {after:.0f} MB after"),
        ]
        print(*rows[-2], flush=True)
    rows.append(search_in_process(library, sentences[pool:], clients, seconds))
    print(*rows[-1], flush=True)
    return rows


def search_in_process(library, sentences, clients, seconds):
    """The row of the server's searcher (int8) under `clients` threads in this process: what serving costs
    without HTTP."""
    from photo_library.searcher import Searcher

    searcher = Searcher(library, text_path="int8")
    searcher.batch_queries()  # as the server does
    for sentence in sentences[-20:]:  # warm, with sentences the clients do not ask
        searcher.text(sentence, 20)
    cpu_before = time.process_time()
    latencies, errors, elapsed = ask_together(
        None, sentences, clients, seconds, ask=lambda sentence: bool(searcher.text(sentence, 20)[0])
    )
    cpu = time.process_time() - cpu_before
    return (
        "in process, int8",
        f"{clients} threads for {elapsed:.0f} s, no HTTP: {len(latencies) / elapsed:.1f} queries/s, "
        f"p50 {percentile(latencies, 0.5) * 1e3:.1f} ms, p99 {percentile(latencies, 0.99) * 1e3:.1f} ms, "
        f"{len(errors)} errors; CPU {cpu / max(1, len(latencies)) * 1e3:.1f} ms a query",
    )


def cpu_seconds(pid):
    """User and system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_library(photos, clients, seconds):
    folder = tempfile.mkdtemp(prefix="vsrn-library-bench-")
    try:
        library, made = make_toy_library(folder, photos)
        rerun = [run_index("--library", library) for _ in range(3)]
        reads = record_reads(library)
        serving = bench_serving(library, clients, seconds)
        print_table(
            [
                (
                    "library",
                    f"{photos:,} photos made by index.py in {made:.1f} s "
                    f"({photos / made:.0f} photos/s: rows, thumbnails, embedding)",
                ),
                (
                    "unchanged rerun",
                    f"median {statistics.median(rerun):.2f} s of 3 (index.py --library, a fresh process each)",
                ),
                *serving,
                (
                    "record reads",
                    f"{REFINE * 10} embeddings (an ivfpq query's re-scoring at k = 10): p50 {reads * 1e3:.2f} ms",
                ),
            ],
            "library",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_disk(photos):
    """Bytes per photo of 2048-d regions (36 per photo), float32 and float16, and float16's effect on scores."""
    from photo_library.searcher import Searcher
    from utils.make_toy_images import make_toy_images
    from utils.obj36 import format_obj36_line

    folder = tempfile.mkdtemp(prefix="vsrn-disk-bench-")
    try:
        toy = make_toy_images(os.path.join(folder, "toy"), img_dim=8, sizes={"test": photos})
        rng = np.random.default_rng(0)
        with (
            open(os.path.join(folder, "rows.tsv"), "w") as out,
            open(os.path.join(toy, "test_obj36.tsv"), "rb") as rows,
        ):
            for line in rows:  # the toy rows with 2048-d features of a detector's range (ReLU outputs)
                image_id = line.split(b"\t")[0].decode()
                regions = {
                    "img_h": 160,
                    "img_w": 240,
                    "objects_id": np.zeros(36),
                    "objects_conf": np.zeros(36),
                    "attrs_id": np.zeros(36),
                    "attrs_conf": np.zeros(36),
                    "boxes": np.tile([10, 10, 100, 100], (36, 1)),
                    "features": np.maximum(rng.normal(0, 1, (36, DIM)), 0) * 3,
                }
                out.write(format_obj36_line(image_id, regions))
        captions = os.path.join(toy, "test_captions.txt")
        model = toy_checkpoint(folder, captions, DIM, embed_size=DIM, dim_vid=DIM, word_dim=300)
        sizes, scores = {}, {}
        for dtype in ("float32", "float16"):
            library = os.path.join(folder, dtype)
            images, rows = os.path.join(toy, "images"), os.path.join(folder, "rows.tsv")
            run_index(
                "--images",
                images,
                "--checkpoint",
                model,
                "--regions",
                rows,
                "--library",
                library,
                "--features_dtype",
                dtype,
            )
            sizes[dtype] = {name: os.path.getsize(os.path.join(library, name)) for name in os.listdir(library)}
            searcher = Searcher(library)
            scores[dtype] = {
                hit["name"]: hit["score"]
                for text in ("a dog on a bench", "a red kite near a tree")
                for hit in searcher.text(text, k=photos)[0]
            }
        difference = max(abs(scores["float32"][name] - scores["float16"][name]) for name in scores["float32"])
        spread = np.std(list(scores["float32"].values()))
        print_table(
            [
                (
                    dtype,
                    ", ".join(f"{name} {size / photos / 1024:.1f} KB" for name, size in sorted(found.items()))
                    + " per photo",
                )
                for dtype, found in sizes.items()
            ]
            + [("float16's effect", f"largest score change {difference:.2e} (the scores' spread: {spread:.2e})")],
            f"disk per photo: 36 regions of {DIM} dims, {photos} photos "
            "(library.sqlite3 holds regions, vectors, thumbnails)",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_extract(photos, device, recipe_path):
    """photos/s of the detector path: the published architecture with the recipe's random weights."""
    import importlib.util

    from detection.network import PUBLISHED_ARCH, BottomUpDetector
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="vsrn-extract-bench-")
    try:
        spec = importlib.util.spec_from_file_location("weights_recipe", recipe_path)
        recipe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipe)
        template = {k: tuple(v.shape) for k, v in BottomUpDetector(PUBLISHED_ARCH).state_dict().items()}
        weights = os.path.join(folder, "detector.bin")
        torch.save(recipe.make_state_dict(template, seed=0), weights)
        rng = np.random.default_rng(0)
        os.makedirs(os.path.join(folder, "photos"))
        for n in range(photos):
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(
                os.path.join(folder, "photos", f"p{n}.jpg")
            )
        model = toy_checkpoint(folder, None, DIM, embed_size=DIM, dim_vid=DIM, word_dim=300)
        library = os.path.join(folder, "library")
        device_flags = ["--device", device] if device else []
        photo_folder = os.path.join(folder, "photos")
        seconds = run_index(
            "--images", photo_folder, "--checkpoint", model, "--detector", weights, "--library", library, *device_flags
        )
        print_table(
            [
                (
                    "indexing",
                    f"{photos} photos of 480x640 in {seconds:.1f} s: {seconds / photos:.1f} s per photo "
                    f"(process start and model loading included)",
                )
            ],
            f"index.py with the detector ({device or 'default device'})",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("vectors", "library", "disk", "extract", "text"), action="append")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq", help="vectors: the index kinds measured at each size")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--index-memory", type=float, default=4.0, help="GB the approximate indexes may take")
    parser.add_argument("--photos", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--extract-photos", type=int, default=3, help="photos the extract part indexes")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--recipe", default=os.path.join(os.path.dirname(ROOT), "shared", "frcnn_reference", "weights_recipe.py")
    )
    parser.add_argument("--checkpoint", help="text: a VSRN checkpoint of the released size (bench/fast_text.py)")
    parser.add_argument("--agreement-queries", type=int, default=1000, help="text: distinct sentences")
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes")
    args = parser.parse_args()
    parts = args.part or ["vectors", "library", "disk", "extract", "text"]
    # The machine's float32 GEMM rate places it among others (the detector's and encoders' work scales with it).
    gemm = gemm_rate(torch, "cpu")
    print_table(describe(torch) + [("float32 GEMM", f"{gemm / 1e9:.0f} GFLOP/s (torch.mm, 2048^3)")], "machine")
    if args.smoke:
        args.sizes, args.queries, args.photos, args.seconds = "2000", 20, 200, 3.0
        args.agreement_queries = 40
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if "text" in parts:
        from fast_text import compare

        compare(args.checkpoint, args.agreement_queries, 200 if args.smoke else 2000, 5000 if args.smoke else 100_000)
    if "vectors" in parts:
        bench_vectors([int(n) for n in args.sizes.split(",")], args.queries, args.index_memory, args.kinds.split(","))
    if "library" in parts:
        bench_library(args.photos, args.clients, args.seconds)
    if "disk" in parts:
        bench_disk(min(args.photos, 200))
    if "extract" in parts:
        if os.path.isfile(args.recipe):
            bench_extract(args.extract_photos if not args.smoke else 1, args.device, args.recipe)
        else:
            print(f"extract: skipped, {args.recipe} (the detector's weights recipe) is absent")


if __name__ == "__main__":
    main()
