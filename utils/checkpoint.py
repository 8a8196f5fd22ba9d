"""Safe checkpoint I/O: ours and the original release's legacy files, never a blind unpickle."""

import argparse
import os
import pickle
import re
import zipfile

import torch

from utils.atomic import atomic_copy, atomic_write
from utils.errors import CheckpointError, first_line
from utils.options import option_defaults

# The only non-tensor class a VSRN checkpoint holds: `opt`, an argparse.Namespace.
SAFE_GLOBALS = [argparse.Namespace]

_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|Unsupported class) ([\w.]+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_LEGACY_MAGIC = pickle.dumps(
    torch.serialization.MAGIC_NUMBER, protocol=2
)  # how the legacy format (the original release's) begins


def _refused_global(message):
    match = _UNSUPPORTED_GLOBAL.search(message)
    return match.group(1) if match else None


def _begins_like(head, magic):
    """Whether the first bytes of a file agree with `magic` as far as both go."""
    common = min(len(head), len(magic))
    return common > 0 and head[:common] == magic[:common]


def _file_problem(path, error):
    """What the bytes of `path` say about why torch.load failed on it; None when it looks whole."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes), not a PyTorch checkpoint"
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    truncated = f"truncated PyTorch checkpoint (its end is missing: {size} bytes are left); copy it again"
    if _begins_like(head, _ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:  # a zip archive's directory is at its end
            return truncated
        if not any(name.endswith("/data.pkl") for name in names):
            return "a zip archive without data.pkl, not a PyTorch checkpoint"
        return None
    if _begins_like(head, _LEGACY_MAGIC):
        if len(head) < len(_LEGACY_MAGIC) or isinstance(error, EOFError) or "unexpected EOF" in str(error):
            return truncated
        return None
    return "not a PyTorch checkpoint (torch.save writes a zip archive or, before PyTorch 1.6, its legacy pickle format)"


def _reason(error):
    """The informative part of torch.load's message: its advice to load unsafely is never passed on."""
    text = str(error)
    match = _UNPICKLER_REASON.search(text)
    if match:
        return match.group(1).strip()
    return first_line(error).split(". ")[0]


def safe_torch_load(path, map_location="cpu", kind="VSRN checkpoint", safe_globals=()):
    """`torch.load` with `weights_only=True`; any failure becomes a one-line CheckpointError.

    `kind` names what the file should be, `safe_globals` the classes it may hold besides tensors.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
    ) as e:
        problem = _file_problem(path, e)
        if problem:
            raise CheckpointError(f"{path}: {problem}") from None
        refused = _refused_global(str(e))
        if refused:
            raise CheckpointError(
                f"{path}: refusing to load: it needs the global {refused}, which a {kind} never holds"
            ) from None
        if isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path}: refusing to load: it holds what a {kind} never does ({_reason(e)})"
            ) from None
        raise CheckpointError(f"{path}: damaged PyTorch checkpoint ({_reason(e)})") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with `weights_only=True` and only argparse.Namespace allowed.

    `opt` comes back as a Namespace in which options older files lack take today's defaults.
    """
    checkpoint = safe_torch_load(path, map_location, safe_globals=SAFE_GLOBALS)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "opt" not in checkpoint:
        raise CheckpointError(f"{path}: not a VSRN checkpoint (expected a dict with 'model' and 'opt')")
    opt = checkpoint["opt"]
    if isinstance(opt, dict):
        opt = argparse.Namespace(**opt)
    if not isinstance(opt, argparse.Namespace):
        raise CheckpointError(f"{path}: 'opt' must be an argparse.Namespace, found {type(opt).__name__}")
    saved = vars(opt)
    if not is_original_release(checkpoint) and "caption_updates" not in saved:
        # Ours from before --caption_updates: every parameter was updated once.
        saved = {**saved, "caption_updates": 1}
    checkpoint["opt"] = argparse.Namespace(**{**option_defaults(), **saved})
    return checkpoint


CHECKPOINT_NAME, BEST_NAME = "checkpoint.pth.tar", "model_best.pth.tar"


def is_original_release(checkpoint):
    """The original release's checkpoints hold no optimizer state; ours always do."""
    return "optimizer" not in checkpoint


def save_checkpoint(state, is_best, folder, filename=CHECKPOINT_NAME, best_filename=BEST_NAME):
    """Write `folder/filename` atomically; copy it to `best_filename` (also atomically) when best."""
    path = os.path.join(folder, filename)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    if is_best:
        atomic_copy(path, os.path.join(folder, best_filename))
    return path
