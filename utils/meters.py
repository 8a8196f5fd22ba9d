"""Running averages of training statistics, printed in the original's log format."""


class AverageMeter:
    """Latest value and running average."""

    def __init__(self):
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val, n=0):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / (0.0001 + self.count)

    def __str__(self):
        # Values recorded with n=0 (iteration number, learning rate) print as they are.
        if self.count == 0:
            return str(self.val)
        return f"{self.val:.4f} ({self.avg:.4f})"


class LogCollector:
    """Named meters in insertion order, for one log line and for TensorBoard."""

    def __init__(self):
        self.meters = {}

    def update(self, key, val, n=0):
        self.meters.setdefault(key, AverageMeter()).update(val, n)

    def __str__(self):
        return "  ".join(f"{key} {meter}" for key, meter in self.meters.items())

    def tb_log(self, writer, step, prefix=""):
        for key, meter in self.meters.items():
            writer.add_scalar(prefix + key, meter.val, step)
