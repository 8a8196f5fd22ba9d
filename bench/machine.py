"""What the benchmarks print about the machine, and how they print tables."""

import datetime
import os
import platform


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
