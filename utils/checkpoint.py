"""Safe checkpoint I/O: ours and the original release's legacy files, never a blind unpickle."""
import argparse
import os
import pickle
import re
import sys

import torch

from utils.atomic import atomic_copy, atomic_write
from utils.errors import CheckpointError
from utils.options import option_defaults
from vocab import load_vocab_by_name, load_vocab_with_digest

# The only non-tensor class a VSRN checkpoint holds: `opt`, an argparse.Namespace.
SAFE_GLOBALS = [argparse.Namespace]

_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|Unsupported class) ([\w.]+)")


def _refused_global(message):
    match = _UNSUPPORTED_GLOBAL.search(message)
    return match.group(1) if match else None


def safe_torch_load(path, map_location="cpu", kind="VSRN checkpoint", safe_globals=()):
    """`torch.load` with `weights_only=True`; any failure becomes a one-line CheckpointError.

    `kind` names what the file should be, `safe_globals` the classes it may hold besides tensors.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused:
            raise CheckpointError(f"{path}: refusing to load: it needs the global {refused}, which a {kind} never holds") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a complete torch checkpoint (truncated or another format: {first})") from None


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


def load_checkpoint_vocab(checkpoint, path, vocab_dir, data_name, data_path=None):
    """The vocabulary the checkpoint at `path` was trained with, from DIR/NAME_vocab.{json,pkl}.

    Ours record its digest (refused when neither file matches); without one, the original
    release's are taken to use the .pkl (the only vocabularies it shipped), ours the .json,
    and the file used is printed.
    """
    digest = checkpoint.get("vocab_digest")
    if digest is not None:
        return load_vocab_with_digest(vocab_dir, data_name, digest, path, data_path)
    vocab = load_vocab_by_name(vocab_dir, data_name, data_path, prefer="pkl" if is_original_release(checkpoint) else "json")
    print(f"{path} records no vocabulary digest: using the vocabulary {vocab.path}", file=sys.stderr)
    return vocab


def save_checkpoint(state, is_best, folder, filename=CHECKPOINT_NAME, best_filename=BEST_NAME):
    """Write `folder/filename` atomically; copy it to `best_filename` (also atomically) when best."""
    path = os.path.join(folder, filename)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    if is_best:
        atomic_copy(path, os.path.join(folder, best_filename))
    return path
