"""What the benchmarks print about the machine, and how they print tables."""

import datetime
import os
import platform
import statistics
import time

# The side of the square float32 matrices whose product measures a machine's GEMM rate.
GEMM_SIZE = 2048


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(torch, device="cpu"):
    lines = [
        ("platform", platform.platform()),
        ("cpu", f"{cpu_model()}, {os.cpu_count()} cores"),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} threads"),
        # Other processes on a shared machine slow every figure: this shows how busy it was.
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"),
        ("date", datetime.datetime.now().isoformat(timespec="seconds")),
    ]
    if str(device).startswith("cuda"):
        lines.insert(2, ("gpu", torch.cuda.get_device_name(device)))
    return lines


def print_table(rows, title=None):
    """rows: (label, value) pairs, printed as two aligned columns."""
    if title:
        print(title)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def gemm_product(torch, device, rows=GEMM_SIZE, wait=True, convolution=False):
    """A float32 (rows x 2048) @ (2048 x 2048) product as a function, and its floating-point
    operations: the benchmarks' measure of the machine, timed in turn with what they time, so that
    a shared machine's changing load slows both alike. wait: the function waits for the device
    (False: the caller synchronises around it). convolution: the same product as a 1 x 1
    convolution, which torch runs with its convolution library (oneDNN on a CPU, cuDNN on a GPU)
    rather than its BLAS (torch.mm): the ceiling of convolutional work, higher where MKL's
    sgemm takes a slower path (AMD CPUs)."""
    device = torch.device(device)
    a = torch.rand(rows, GEMM_SIZE, device=device)
    b = torch.rand(GEMM_SIZE, GEMM_SIZE, device=device)
    if convolution:
        a = a.t().contiguous().view(1, GEMM_SIZE, rows, 1)
        b = b.t().contiguous().view(GEMM_SIZE, GEMM_SIZE, 1, 1)

    def product():
        torch.nn.functional.conv2d(a, b) if convolution else torch.mm(a, b)
        if wait and device.type == "cuda":
            torch.cuda.synchronize(device)

    return product, 2 * rows * GEMM_SIZE * GEMM_SIZE


def gemm_rate(torch, device, repeats=5, convolution=False):
    """FLOP/s of float32 GEMM on `device` (gemm_product's): `repeats` 2048 x 2048 products after
    one warm-up, the median."""
    product, flops = gemm_product(torch, device, convolution=convolution)
    product()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        seconds.append(time.perf_counter() - start)
    return flops / statistics.median(seconds)
