"""Fine-tuning (train.py --init_from) against training from scratch, the same steps, on pairs of toy datasets.

    python3 bench/finetune.py [--out runs/bench_finetune] [--epochs 1 3] [--wording_epochs 10 30]
                              [--source_epochs 6]

Every dataset is drawn from the same toy world (utils.make_toy_data's prototypes: the same objects look
the same everywhere). Two pairs:
- other objects: domain A shows the first 12 of the world's 24 objects, domain B the other 12 (B's object
  names are new words to A's vocabulary, A's to B's); 1000 train, 100 dev and 100 test images each, five
  captions an image; both directions, for each of --epochs;
- other wording, few pictures: the demo's data (toy_precomp: all objects, its five sentence templates)
  as the source; the target shows the same objects described as make_dataset.py --demo describes them
  (other templates and words, 1 to 5 captions a picture), with only 100 train pictures; for each of
  --wording_epochs.
A checkpoint of each source (the demo's settings, --source_epochs epochs) is fine-tuned on the target,
and a model of the target is trained from scratch for as many epochs with the same settings and seed;
each run's best model (by dev, as train.py keeps it) is evaluated on the target's test split. Prints the
machine, then a line a run: its steps, rsum (the six recalls' sum, of 600), R@1 both ways, seconds.
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

DOMAINS = {"toya_precomp": range(0, 12), "toyb_precomp": range(12, 24)}
SIZES = {"train": 1000, "dev": 100, "test": 100}
WORDING = "toywords_precomp"
WORDING_SIZES = {"train": 100, "dev": 100, "test": 100}
SETTINGS = (
    "img_dim", "embed_size", "dim_vid", "word_dim", "dim_hidden", "dim_word", "max_len", "batch_size",
    "learning_rate", "lr_update", "grad_clip", "workers", "log_step", "val_step", "seed",
)  # fmt: skip
MODEL_SETTINGS = ("img_dim", "embed_size", "dim_vid", "word_dim", "dim_hidden", "dim_word")  # the checkpoint's


def write_split(folder, split, features, captions_per_image):
    from utils.atomic import atomic_write

    with atomic_write(os.path.join(folder, f"{split}_ims.npy"), "wb") as f:
        np.save(f, features)
    with atomic_write(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
        f.write("".join(c + "\n" for captions in captions_per_image for c in captions))
    counts = [len(captions) for captions in captions_per_image]
    if set(counts) != {5}:
        with atomic_write(os.path.join(folder, f"{split}_caption_images.npy"), "wb") as f:
            np.save(f, np.repeat(np.arange(len(counts)), counts))


def write_datasets(data_path, vocab_path):
    """The two domains, the demo's data and the other wording's, each with its vocabulary."""
    from dataset_maker.demo import demo_captions
    from utils.options import DEMO_PRESET
    from utils.make_toy_data import make_prototypes, make_split, make_toy_data
    from vocab import build_dataset_vocab, save_vocab

    prototypes = make_prototypes(np.random.RandomState(0), DEMO_PRESET["img_dim"])
    for seed, (name, concepts) in enumerate(DOMAINS.items(), start=1):
        rng = np.random.RandomState(seed)
        for split, count in SIZES.items():
            features, captions, _ = make_split(rng, prototypes, count, concepts)
            write_split(
                os.path.join(data_path, name),
                split,
                features,
                [captions[i : i + 5] for i in range(0, len(captions), 5)],
            )
    make_toy_data(data_path, "toy_precomp", DEMO_PRESET["img_dim"])
    rng = np.random.RandomState(3)
    for split, count in WORDING_SIZES.items():
        features, _, owners = make_split(rng, prototypes, count)
        captions = [demo_captions(rng, np.unique(row[row >= 0])) for row in owners]
        write_split(os.path.join(data_path, WORDING), split, features, captions)
    for name in (*DOMAINS, "toy_precomp", WORDING):
        save_vocab(build_dataset_vocab(data_path, name), os.path.join(vocab_path, f"{name}_vocab.json"))


def train(out, data_path, vocab_path, data_name, epochs, init_from=None):
    """A train.py run (in a process of its own, as a user runs it); its best checkpoint and seconds."""
    from utils.options import DEMO_PRESET

    start_name = f"from_{os.path.basename(os.path.dirname(init_from))}" if init_from else "scratch"
    logger = os.path.join(out, f"{data_name}_{start_name}_{epochs}")
    best, finished = os.path.join(logger, "model_best.pth.tar"), os.path.join(logger, "finished")
    if os.path.isfile(finished):  # a run of an earlier call of the bench
        return best, None
    settings = [s for s in SETTINGS if not (init_from and s in MODEL_SETTINGS)]
    flags = [item for name in settings for item in (f"--{name}", str(DEMO_PRESET[name]))]
    flags += ["--data_path", data_path, "--data_name", data_name, "--vocab_path", vocab_path]
    flags += ["--num_epochs", str(epochs), "--logger_name", logger] + (["--init_from", init_from] if init_from else [])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"train.py {' '.join(flags)} failed:\n{done.stderr[-2000:]}")
    open(finished, "w").close()
    return best, time.perf_counter() - start


def test_recall(best, data_path):
    from evaluation import evalrank

    with contextlib.redirect_stdout(io.StringIO()):
        ranks = os.path.join(os.path.dirname(best), "ranks.pth.tar")
        return evalrank(best, data_path=data_path, split="test", ranks_path=ranks)


def compare(args, data_path, vocab_path, target, source, checkpoint, epochs, steps_per_epoch):
    for label, init in (("from scratch", None), (f"fine-tuned from {source}", checkpoint)):
        best, seconds = train(args.out, data_path, vocab_path, target, epochs, init)
        metrics = test_recall(best, data_path)
        took = f", {seconds:.0f} s" if seconds else ""
        print(
            f"  {target}, {epochs * steps_per_epoch:3d} steps, {label:<31} rsum {metrics['rsum']:5.1f}  "
            f"R@1 i2t {metrics['r1']:5.1f} t2i {metrics['r1i']:5.1f}{took}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_finetune", help="folder for the data, vocabularies and runs")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3], help="the other objects' runs' epochs")
    parser.add_argument("--wording_epochs", type=int, nargs="+", default=[10, 30], help="the other wording's")
    parser.add_argument("--source_epochs", type=int, default=6, help="epochs of each source's checkpoint")
    args = parser.parse_args()

    import torch

    from machine import describe, gemm_rate, print_table

    data_path, vocab_path = os.path.join(args.out, "data"), os.path.join(args.out, "vocab")
    if not os.path.isfile(os.path.join(vocab_path, f"{WORDING}_vocab.json")):
        write_datasets(data_path, vocab_path)
    print_table(describe(torch) + [("float32 GEMM", f"{gemm_rate(torch, 'cpu') / 1e9:.0f} GFLOP/s")], "Machine")
    sources = {
        name: train(args.out, data_path, vocab_path, name, args.source_epochs)[0] for name in (*DOMAINS, "toy_precomp")
    }
    print(f"\nEach source's checkpoint ({args.source_epochs} epochs of 1000 images, the demo's settings):")
    for name, best in sources.items():
        print(f"  {name}: test rsum {test_recall(best, data_path)['rsum']:.1f}")
    print(
        "\nOther objects (1000 train images of five captions: 40 steps of batch 128 an epoch), the target's test split:"
    )
    for target, source in (("toyb_precomp", "toya_precomp"), ("toya_precomp", "toyb_precomp")):
        for epochs in args.epochs:
            compare(args, data_path, vocab_path, target, source, sources[source], epochs, 40)
    captions = sum(1 for _ in open(os.path.join(data_path, WORDING, "train_caps.txt")))
    steps = -(-captions // 128)
    print(
        f"\nOther wording, 100 train pictures ({captions} captions: {steps} steps an epoch), the target's test split:"
    )
    for epochs in args.wording_epochs:
        compare(args, data_path, vocab_path, WORDING, "toy_precomp", sources["toy_precomp"], epochs, steps)
    print(f"  float32 GEMM at the end: {gemm_rate(torch, 'cpu') / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
