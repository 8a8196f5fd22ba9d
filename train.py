"""Train VSRN on precomputed region features.

    python train.py --data_path DATA --data_name f30k_precomp --logger_name runs/f30k --max_violation
    python train.py --demo          # toy dataset, a few minutes on a CPU
    python train.py --resume runs/f30k/checkpoint.pth.tar ...   # continue exactly where it stopped
"""
import logging
import math
import os
import random
import signal
import sys
import time

import torch

import data
from caption import log_generated_captions, print_examples
from evaluation import encode_data, evalrank, i2t, similarity, t2i
from model import VSRN, check_options
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, VSRNError, report
from utils.meters import AverageMeter, LogCollector
from utils.options import build_parser  # noqa: F401  (train.build_parser is the public entry)
from vocab import build_dataset_vocab, load_vocab_by_name, save_vocab, vocab_file

# Small enough to learn the toy dataset in a few minutes on two CPU cores.
DEMO_PRESET = dict(
    data_path="data", data_name="toy_precomp", vocab_path="vocab", logger_name="runs/demo",
    img_dim=128, embed_size=128, dim_vid=128, word_dim=64, dim_hidden=64, dim_word=64, max_len=24,
    batch_size=128, num_epochs=6, learning_rate=0.004, lr_update=10, workers=0, log_step=10, val_step=10**9,
    seed=0,
)


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.signal_name = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt  # a second signal stops at once
        self.signal_name = signal.Signals(signum).name
        logging.info("%s received: stopping after the current step and saving a checkpoint", self.signal_name)

    def __bool__(self):
        return self.signal_name is not None


def parse_options(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        parser.set_defaults(**DEMO_PRESET)
    opt = parser.parse_args(argv)
    if opt.seed is None:
        opt.seed = random.SystemRandom().randrange(2**31)
    return opt


def prepare_demo(opt):
    """Generate the toy dataset and its vocabulary if they are missing."""
    from utils.make_toy_data import make_toy_data

    folder = os.path.join(opt.data_path, opt.data_name)
    if not os.path.isfile(os.path.join(folder, "test_caps.txt")):
        logging.info("Generating the toy dataset in %s", folder)
        make_toy_data(opt.data_path, opt.data_name, opt.img_dim)
    if vocab_file(opt.vocab_path, opt.data_name) is None:
        vocab = build_dataset_vocab(opt.data_path, opt.data_name)
        save_vocab(vocab, os.path.join(opt.vocab_path, f"{opt.data_name}_vocab.json"))


def adjust_learning_rate(opt, optimizer, epoch):
    """learning_rate / 10 every lr_update epochs, as the original."""
    lr = opt.learning_rate * (0.1 ** (epoch // opt.lr_update))
    for group in optimizer.param_groups:
        group["lr"] = lr


def rng_state(device):
    """The generators that dropout draws from: the CPU's, and the model's GPU's when on CUDA."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    # The checkpoint was mapped to the model's device; generator states live on the CPU.
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Trainer:
    """The original's training loop, resumable at any validation point."""

    def __init__(self, opt, model, train_loader, val_loader, writer):
        self.opt, self.model, self.writer = opt, model, writer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.best_rsum = 0.0
        self.next_epoch, self.next_batch = 0, 0
        self.stop = StopRequest()

    def resume(self, path):
        checkpoint = load_checkpoint(path, map_location=self.model.device)
        self.model.load_state_dict(checkpoint["model"], source=path)
        try:
            self.model.Eiters = int(checkpoint.get("Eiters", 0))
            self.best_rsum = float(checkpoint.get("best_rsum", 0.0))
            if "next_epoch" in checkpoint:
                self._restore_position(checkpoint, path)
            else:
                # An original-release checkpoint: its 'epoch' counts started epochs; no optimizer state.
                self.next_epoch = int(checkpoint.get("epoch", 0))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: incomplete training state ({type(e).__name__}: {e})") from None
        logging.info(
            "=> resumed '%s' at epoch %d, batch %d (Eiters %d, best_rsum %.2f)",
            path, self.next_epoch, self.next_batch, self.model.Eiters, self.best_rsum,
        )

    def _restore_position(self, checkpoint, path):
        saved = checkpoint["opt"]
        self.next_epoch, self.next_batch = int(checkpoint["next_epoch"]), int(checkpoint["next_batch"])
        if self.next_batch and saved.batch_size != self.opt.batch_size:
            raise CheckpointError(
                f"{path}: stopped mid-epoch with --batch_size {saved.batch_size}; resume with the same batch size, not {self.opt.batch_size}"
            )
        # The rest of the epoch must follow the same order, whatever --seed says now.
        self.opt.seed = self.train_loader.sampler.seed = saved.seed
        optimizer = self.model.optimizer
        implementation = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, flags in zip(optimizer.param_groups, implementation):
            group.update(flags)  # this machine's choice, not the saving machine's
        set_rng_state(checkpoint["rng"], self.model.device)

    def checkpoint_state(self, epoch, next_epoch, next_batch):
        return {
            "epoch": epoch + 1,
            "model": self.model.state_dict(),
            "best_rsum": self.best_rsum,
            "opt": self.opt,
            "Eiters": self.model.Eiters,
            "optimizer": self.model.optimizer.state_dict(),
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "rng": rng_state(self.model.device),
        }

    def save(self, epoch, next_epoch, next_batch, is_best=False):
        save_checkpoint(self.checkpoint_state(epoch, next_epoch, next_batch), is_best, self.opt.logger_name)

    def validate_and_save(self, epoch, next_epoch, next_batch):
        rsum = validate(self.opt, self.val_loader, self.model, self.writer)
        is_best = rsum > self.best_rsum
        self.best_rsum = max(rsum, self.best_rsum)
        self.save(epoch, next_epoch, next_batch, is_best)

    def run(self):
        """Train to opt.num_epochs; False when a signal stopped it (its checkpoint saved)."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.stop.install()
        try:
            for epoch in range(self.next_epoch, self.opt.num_epochs):
                adjust_learning_rate(self.opt, self.model.optimizer, epoch)
                start_batch = self.next_batch if epoch == self.next_epoch else 0
                stopped = not self.train_epoch(epoch, start_batch)
                if not stopped:
                    self.validate_and_save(epoch, epoch + 1, 0)
                if (stopped or self.stop) and epoch + 1 < self.opt.num_epochs:
                    logging.info("Stopped by %s; continue with --resume %s", self.stop.signal_name, self.checkpoint_path)
                    return False
            return True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def train_epoch(self, epoch, start_batch):
        """Train one epoch from batch `start_batch`; False when a signal stopped it mid-epoch (state saved)."""
        opt, model = self.opt, self.model
        batch_time, data_time, train_logger = AverageMeter(), AverageMeter(), LogCollector()
        num_batches = math.ceil(len(self.train_loader.dataset) / opt.batch_size)
        self.train_loader.sampler.set_epoch(epoch, start_batch * opt.batch_size)
        model.train_start()
        end = time.time()
        for i, batch in enumerate(self.train_loader, start=start_batch):
            data_time.update(time.time() - end, 1)
            losses = model.train_emb(*batch)
            train_logger.update("Eit", model.Eiters)
            train_logger.update("lr", model.optimizer.param_groups[0]["lr"])
            for key, value in losses.items():
                train_logger.update(key, value, len(batch[2]))
            batch_time.update(time.time() - end, 1)
            if model.Eiters % opt.log_step == 0:
                logging.info(
                    "Epoch: [%d][%d/%d]\t%s\tTime %.3f (%.3f)\tData %.3f (%.3f)\t",
                    epoch, i, num_batches, train_logger, batch_time.val, batch_time.avg, data_time.val, data_time.avg,
                )
            step = model.Eiters
            self.writer.add_scalar("epoch", epoch, step)
            self.writer.add_scalar("step", i, step)
            self.writer.add_scalar("batch_time", batch_time.val, step)
            self.writer.add_scalar("data_time", data_time.val, step)
            train_logger.tb_log(self.writer, step)
            if i + 1 < num_batches:  # the epoch's end validates and saves anyway
                if model.Eiters % opt.val_step == 0:
                    self.validate_and_save(epoch, epoch, i + 1)
                    model.train_start()
                elif self.stop:
                    self.save(epoch, epoch, i + 1)
                if self.stop:
                    return False
            end = time.time()
        return True

    @property
    def checkpoint_path(self):
        return os.path.join(self.opt.logger_name, "checkpoint.pth.tar")


def validate(opt, val_loader, model, writer):
    """Recall in both directions on the dev split; returns r1 + r5 + r1i + r5i (the original's score)."""
    img_embs, cap_embs = encode_data(model, val_loader)
    sims = similarity(img_embs, cap_embs, opt.measure)
    r1, r5, r10, medr, meanr = i2t(img_embs, cap_embs, sims=sims)
    logging.info("Image to text: %.1f, %.1f, %.1f, %.1f, %.1f", r1, r5, r10, medr, meanr)
    r1i, r5i, r10i, medri, meanri = t2i(img_embs, cap_embs, sims=sims)
    logging.info("Text to image: %.1f, %.1f, %.1f, %.1f, %.1f", r1i, r5i, r10i, medri, meanri)
    rsum = r1 + r5 + r1i + r5i
    metrics = dict(r1=r1, r5=r5, r10=r10, medr=medr, meanr=meanr, r1i=r1i, r5i=r5i, r10i=r10i, medri=medri, meanri=meanri, rsum=rsum)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, model.Eiters)
    log_generated_captions(writer, model, val_loader.dataset, model.Eiters)
    return rsum


def configure_backends(opt):
    if opt.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(opt.seed)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, force=True)
    opt = parse_options(argv)
    try:
        return run(opt)
    except (VSRNError, OSError) as e:
        return report(e)
    except FloatingPointError as e:
        print(f"error: training stopped: {e}; the last checkpoint in {opt.logger_name} is untouched", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; the last complete checkpoint in {opt.logger_name} is intact", file=sys.stderr)
        return 130


def run(opt):
    check_options(opt)
    if opt.demo:
        prepare_demo(opt)
    print(opt)
    configure_backends(opt)
    vocab = load_vocab_by_name(opt.vocab_path, opt.data_name, opt.data_path)
    opt.vocab_size = len(vocab)
    model = VSRN(opt)
    if opt.compile:
        for module in (model.img_enc, model.txt_enc):
            module.compile()  # in place: state-dict keys stay the original's
    train_loader, val_loader = data.get_loaders(opt.data_name, vocab, opt.crop_size, opt.batch_size, opt.workers, opt)
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(opt.logger_name, exist_ok=True)
    with SummaryWriter(opt.logger_name, flush_secs=5) as writer:
        trainer = Trainer(opt, model, train_loader, val_loader, writer)
        if opt.resume:
            trainer.resume(opt.resume)
        finished = trainer.run()
    if finished and opt.demo:
        best = os.path.join(opt.logger_name, "model_best.pth.tar")
        print(f"\nDemo: recall of {best} on the toy test split")
        evalrank(best, data_path=opt.data_path, split="test", vocab_path=opt.vocab_path)
        print_examples(best, opt.data_path, "test", opt.vocab_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
