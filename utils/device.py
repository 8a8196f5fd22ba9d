"""Which device a job runs on, and the float32 settings every CUDA job keeps unless told otherwise."""

import torch

from utils.errors import OptionError


def default_device():
    """CUDA when this torch build and machine have it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device, flag="--device"):
    """`device` (None or empty: `default_device()`) as a torch.device, or a one-line OptionError
    naming `flag` when it is not a device name or names a CUDA device this machine lacks."""
    if not device:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise OptionError(f"{flag} {device}: expected cpu or cuda (cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise OptionError(f"{flag} {device}: expected cpu or cuda (cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{flag} {device}: this torch build or machine has no CUDA device; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise OptionError(
                f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 and up"
            )
    return resolved


def configure_backends(tf32=False):
    """Faithful float32 unless `tf32`: PyTorch lets cuDNN (the GRUs) use TF32 by default on Ampere
    and later GPUs, so both switches are set either way."""
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
