"""The toy training runs the tests share: small options, the arguments of a run, its final checkpoint, probes of
its steps, and waiting for a line in its log."""

import os
import signal
import time

import pytest
import torch
from torch import nn

import train
from model import VSRN
from utils.checkpoint import load_checkpoint
from utils.optim import CaptionRepeatingAdam


# The model of the toy runs: small enough that a step takes milliseconds.
TINY_MODEL = [
    "--img_dim",
    "32",
    "--embed_size",
    "32",
    "--dim_vid",
    "32",
    "--word_dim",
    "16",
    "--dim_hidden",
    "16",
    "--dim_word",
    "16",
    "--max_len",
    "20",
]
SMALL = [
    "--data_name",
    "toy_precomp",
    *TINY_MODEL,
    "--batch_size",
    "16",
    "--workers",
    "0",
    "--learning_rate",
    "0.002",
    "--log_step",
    "5",
    "--seed",
    "1",
]


def final_state(folder):
    return load_checkpoint(os.path.join(folder, "checkpoint.pth.tar"))


def assert_same_weights(a, b):
    for part_a, part_b in zip(a["model"], b["model"]):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert torch.equal(part_a[key], part_b[key]), key


def train_args(data_path, vocab_path, run, *extra):
    return ["--data_path", data_path, "--vocab_path", vocab_path, "--logger_name", str(run), *SMALL, *extra]


def wait_for(log_path, text, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log_path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"exited early:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"'{text}' not logged in {timeout}s:\n{log_path.read_text()}")


def install_probes(setattr, records, frozen_bn, stop_at=None):
    """Record each step's logged losses, the first step's gradients before clipping and the
    checkpoint writes; freeze BatchNorm; send this process SIGTERM after step `stop_at`."""
    records.update(losses=[], grads=None, saves=0)
    train_emb, train_start, clip = VSRN.train_emb, VSRN.train_start, CaptionRepeatingAdam.clip_grad_norm_
    save_checkpoint = train.save_checkpoint

    def probed_train_emb(self, *batch):
        result = train_emb(self, *batch)
        records["losses"].append(result)
        if self.Eiters == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def probed_train_start(self):
        train_start(self)
        if frozen_bn:
            # Eval-mode BatchNorm normalises with its running statistics, which then stay at
            # their initial values in every process; trained, it cancels the GCN convolutions'
            # biases, whose Adam steps on rounding noise would not compare to 1e-5.
            for module in self.modules():
                for layer in module.modules():
                    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                        layer.eval()

    def probed_clip(optimizer, max_norm):
        if records["grads"] is None:
            records["grads"] = [p.grad.detach().clone() for p in optimizer.retrieval_params + optimizer.caption_params]
        return clip(optimizer, max_norm)

    def probed_save(*args, **kwargs):
        records["saves"] += 1
        return save_checkpoint(*args, **kwargs)

    setattr(VSRN, "train_emb", probed_train_emb)
    setattr(VSRN, "train_start", probed_train_start)
    setattr(CaptionRepeatingAdam, "clip_grad_norm_", probed_clip)
    setattr(train, "save_checkpoint", probed_save)
