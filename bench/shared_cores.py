"""Training-step time of a small VSRN alone and beside other training runs on the same cores,
with torch's OpenMP threads spinning while idle (libgomp's default), spinning briefly (what every
entry script sets, utils/threads.py) and waiting passively.

    python3 bench/shared_cores.py [--batch-size 64] [--runs 3] [--steps 10] [--warmup 2]
                                  [--also GOMP_SPINCOUNT=1000 ...]

The model is the demo's (train.py --demo) on a synthetic batch. Each figure is a median over
separate processes started for it: one run alone, then --runs identical runs that start timing
together once all have warmed up, and each keeps training until all have timed their steps, so
every timed step has the others beside it. A run's fair share of the machine beside N-1 others
is N times its time alone; the ratio printed is the runs' median step time over that. Thread
count: torch's default (one per core) unless OMP_NUM_THREADS is given, the same for every
setting. With libgomp's default spinning a shared step can take tens of seconds on a busy
machine. --also adds settings to compare, each a comma-separated list of VAR=VALUE.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.threads import WAIT_SETTINGS  # noqa: E402

TOY_VOCAB_SIZE = 64  # about the toy dataset's vocabulary
# What each compared setting adds to an environment without any wait setting.
SETTINGS = {
    "spinning (libgomp's default, GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
    "short spin (this project's default: GOMP_SPINCOUNT=1000)": {},
    "passive (OMP_WAIT_POLICY=PASSIVE alone)": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def train_steps(batch_size, steps, warmup, signals):
    """After `warmup` steps, says "ready" and waits for the file `signals`/go; then times `steps`
    training steps, prints them as one JSON line, and keeps training untimed until the file
    `signals`/stop exists."""
    import utils.threads  # noqa: F401  (before torch, as the entry scripts do)
    import torch

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from model import VSRN
    from train_step import synthetic_batch
    from utils.options import DEMO_PRESET, build_parser

    parser = build_parser()
    parser.set_defaults(**DEMO_PRESET)
    opt = parser.parse_args([])
    opt.vocab_size, opt.batch_size = TOY_VOCAB_SIZE, batch_size
    torch.manual_seed(opt.seed)
    model = VSRN(opt)
    model.train_start()
    batch = synthetic_batch(batch_size, opt.max_len, img_dim=opt.img_dim, vocab_size=opt.vocab_size)
    for _ in range(warmup):
        model.train_emb(*batch)
    print("ready", flush=True)
    while not os.path.exists(os.path.join(signals, "go")):
        if os.path.exists(os.path.join(signals, "stop")):  # another run failed
            return
        time.sleep(0.01)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_emb(*batch)
        seconds.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "threads": torch.get_num_threads(),
                "wait": {k: os.environ[k] for k in WAIT_SETTINGS if k in os.environ},
            }
        ),
        flush=True,
    )
    while not os.path.exists(os.path.join(signals, "stop")):
        model.train_emb(*batch)


def step_times(runs, setting, args):
    """`runs` processes that time their steps at the same time: each one's seconds and settings."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    env.update(setting)
    signals = tempfile.mkdtemp(prefix="shared_cores_")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--worker-signals",
        signals,
    ]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(runs)]
    try:
        if all(p.stdout.readline() == "ready\n" for p in processes):  # all warmed up
            open(os.path.join(signals, "go"), "w").close()
            results = [p.stdout.readline() for p in processes]
    finally:
        open(os.path.join(signals, "stop"), "w").close()
        for p in processes:
            p.wait()
        shutil.rmtree(signals)
    if any(p.returncode for p in processes):
        sys.exit(f"error: a training process failed (exit codes {[p.returncode for p in processes]})")
    return [json.loads(line) for line in results]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="runs sharing the cores, the measured one included")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--also",
        nargs="+",
        default=[],
        metavar="VAR=VALUE[,VAR=VALUE]",
        help="more wait settings to compare, e.g. GOMP_SPINCOUNT=1000",
    )
    p.add_argument("--worker-signals", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_signals:
        return train_steps(args.batch_size, args.steps, args.warmup, args.worker_signals)

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from machine import cpu_model, print_table

    print(
        f"VSRN demo model, batch {args.batch_size}, synthetic data; {cpu_model()}, {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )
    rows = []
    settings = dict(SETTINGS)
    for text in args.also:
        pairs = [item.partition("=") for item in text.split(",")]
        if any(not name or not sep for name, sep, _ in pairs):
            p.error(f"--also {text}: expected VAR=VALUE[,VAR=VALUE]")
        settings[text] = {name: value for name, _, value in pairs}
    for name, setting in settings.items():
        alone = step_times(1, setting, args)[0]
        shared = step_times(args.runs, setting, args)
        alone_s = median(alone["seconds"])
        each = [median(r["seconds"]) for r in shared]
        fair = args.runs * alone_s
        others = f"{args.runs - 1} other run{'s' if args.runs != 2 else ''}"
        rows += [
            (name, f"{alone['threads']} threads per run; " + " ".join(f"{k}={v}" for k, v in alone["wait"].items())),
            ("  alone", f"{alone_s:.3f} s per step"),
            (
                f"  beside {others}",
                f"{median(each):.3f} s per step (each run's median: {', '.join(f'{s:.3f}' for s in each)})",
            ),
            ("  fair share", f"{fair:.3f} s ({args.runs} x alone); measured / fair share: {median(each) / fair:.2f}"),
        ]
    rows.append(("load average at the end", f"{os.getloadavg()[0]:.2f}"))
    print_table(rows, f"Median step time over {args.steps} steps after {args.warmup} warm-up")


if __name__ == "__main__":
    main()
