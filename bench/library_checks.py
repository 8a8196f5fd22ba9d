"""What the photo library's integrity checks cost: the vector index's checksum when a library opens (a search,
a server, index.py), and `index.py --check`'s reading of every record.

    python3 bench/library_checks.py [--photos 100000] [--dim 2048] [--records 2000]

index: a flat index of `--photos` random `--dim`-d vectors written as index.faiss; then, each the median of 3,
the time to load it (checksum, then FAISS reading the file), to compute its CRC-32 alone, and to read and
deserialize it without a checksum (as index files were read before). The cost at a million photos is the
CRC's rate applied to a million photos' file size.
records: a library of `--records` photos of 36 regions of 2048-d float16 features (generated rows, a tiny
checkpoint, as the published detector's regions take disk), then `index.py --check` on it: seconds per GB
of records and per photo.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import utils.threads  # noqa: E402,F401  (before torch, as the scripts)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from machine import describe, gemm_rate, print_table  # noqa: E402


def median_seconds(work, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def index_costs(folder, photos, dim):
    """[(what, value)] of loading a flat index of `photos` vectors with and without its checksum."""
    import faiss

    from photo_library.vectors import MAGIC, PREFIX, VectorIndex

    vectors = np.random.default_rng(0).standard_normal((photos, dim), dtype=np.float32)
    ids = np.arange(1, photos + 1, dtype=np.int64)
    path = os.path.join(folder, "index.faiss")
    VectorIndex.build("flat", ids, vectors, 1, 0, 0, token="t").save(path)
    del vectors
    size = os.path.getsize(path)

    def crc_alone():
        crc = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)

    def unchecked():
        with open(path, "rb") as f:
            data = f.read()
        (length, _) = PREFIX.unpack(data[len(MAGIC) : len(MAGIC) + PREFIX.size])
        faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=len(MAGIC) + PREFIX.size + length))

    checked = median_seconds(lambda: VectorIndex.load(path))
    before = median_seconds(unchecked)
    crc = median_seconds(crc_alone)
    million = size / photos * 1_000_000
    return [
        ("index file", f"{size / 1e9:.2f} GB ({photos} photos of {dim} dims)"),
        ("load, checksum checked", f"{checked:.2f} s"),
        ("read and deserialized unchecked", f"{before:.2f} s (as before the checksum)"),
        ("its CRC-32 alone", f"{crc:.2f} s ({size / crc / 1e9:.2f} GB/s)"),
        ("at a million photos", f"{million / 1e9:.1f} GB: CRC-32 {million / (size / crc):.1f} s more per load"),
    ]


def records_costs(folder, count):
    """[(what, value)] of index.py --check over a library of `count` photos with 2048-d float16 features."""
    from library_views import rows_of
    from PIL import Image
    from photo_world import checkpoint, make_world

    world = make_world(os.path.join(folder, "world"), sizes={"test": 2}, seeds=(0,))
    images = os.path.join(folder, "photos")
    os.makedirs(images)
    paths = []
    for number in range(count):
        path = os.path.join(images, f"photo_{number:06d}.png")
        pixels = np.zeros((48, 48, 3), dtype=np.uint8)
        pixels.reshape(-1)[:4] = np.frombuffer(number.to_bytes(4, "little"), dtype=np.uint8)  # each one its own
        Image.fromarray(pixels).save(path)
        paths.append(path)
    tsv = rows_of(paths, 48, 2048, os.path.join(folder, "rows.tsv"))
    model = checkpoint(os.path.join(world.root, "run2048"), world.vocab, 2048, 0)
    lib = os.path.join(folder, "lib")
    args = ["--images", images, "--checkpoint", model, "--regions", tsv, "--features_dtype", "float16"]
    subprocess.run([sys.executable, os.path.join(ROOT, "index.py"), *args, "--library", lib], check=True)
    size = os.path.getsize(os.path.join(lib, "library.sqlite3"))
    check = [sys.executable, os.path.join(ROOT, "index.py"), "--library", lib, "--check"]
    start_up = median_seconds(lambda: subprocess.run([sys.executable, "-c", "import index"], cwd=ROOT, check=True))
    seconds = median_seconds(lambda: subprocess.run(check, check=True, stdout=subprocess.DEVNULL)) - start_up
    return [
        ("records", f"{size / 1e9:.2f} GB ({count} photos, {size / count / 1e3:.0f} KB each)"),
        ("index.py --check", f"{seconds:.2f} s beyond the process's start ({size / seconds / 1e9:.2f} GB/s)"),
        ("per photo", f"{seconds / count * 1e3:.2f} ms"),
        ("at a million photos", f"{size / count / 1e3:.0f} GB: {seconds / count * 1e6 / 60:.0f} min at this rate"),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--records", type=int, default=2000)
    args = p.parse_args()
    print_table([*describe(torch), ("GEMM", f"{gemm_rate(torch, 'cpu') / 1e9:.0f} GFLOP/s")], "machine")
    with tempfile.TemporaryDirectory() as folder:
        print_table(index_costs(folder, args.photos, args.dim), "the index file's checksum")
    with tempfile.TemporaryDirectory() as folder:
        print_table(records_costs(folder, args.records), "index.py --check")


if __name__ == "__main__":
    main()
