"""Train VSRN on precomputed region features.

python3 train.py --data_path DATA --data_name f30k_precomp --logger_name runs/f30k --max_violation
python3 train.py --demo          # toy dataset: about 80 s on an idle 2-core AVX-512 CPU (docs/performance.md)
python3 train.py --resume runs/f30k/checkpoint.pth.tar   # continue exactly where it stopped
python3 train.py --data_path DATA --data_name mine_precomp --init_from runs/f30k/model_best.pth.tar   # fine-tune
torchrun --standalone --nproc_per_node=4 train.py ...     # data-parallel, same global batch
"""

import utils.threads  # noqa: F401  (first: how torch's CPU threads wait is read when torch loads)
import argparse
import contextlib
import logging
import math
import os
import random
import shlex
import signal
import sys
import time

import torch

import data
from captioning import log_generated_captions, print_examples
from data import check_data_folder, usable_workers
from evaluation import encode_data, evalrank, i2t, similarity, t2i
from inference import load_checkpoint_vocab, starting_vocab
from model import VSRN, check_options, image_encoder_data_name
from utils.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from utils.device import configure_backends
from utils.distributed import SINGLE_PROCESS, holds_sync_batchnorm, init_world
from utils.errors import CheckpointError, OptionError, VSRNError, first_line, report
from utils.meters import AverageMeter, LogCollector
from utils.options import DEMO_PRESET, RESUME_OVERRIDABLE, build_parser, explicit_options
from vocab import (
    build_dataset_vocab,
    extend_vocab,
    load_vocab_by_name,
    save_vocab,
    vocab_digest,
    vocab_file,
    vocab_files,
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


# The options that shape a model's weights or the meaning of its embeddings: a fine-tuned model keeps its checkpoint's.
MODEL_OPTIONS = (
    "img_dim",
    "embed_size",
    "word_dim",
    "num_layers",
    "dim_vid",
    "dim_hidden",
    "dim_word",
    "bidirectional",
    "rnn_type",
    "use_abs",
    "no_imgnorm",
    "measure",
)


def parse_options(argv=None):
    """-> (options, the checkpoint to resume, or with --init_from the one to start from, or None).

    A resumed run takes its options from the checkpoint; explicit flags may change only
    RESUME_OVERRIDABLE ones, and any other flag must agree with the checkpoint. A run started
    from a checkpoint (--init_from) takes its MODEL_OPTIONS from it, the others from the flags.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "--demo" in argv:
        parser.set_defaults(**DEMO_PRESET)
    opt = parser.parse_args(argv)
    given = explicit_options(argv)
    checkpoint = None
    if opt.resume and "init_from" in given:
        raise OptionError(
            "--init_from starts a new run from a checkpoint's weights, --resume continues a run: give one of them"
        )
    if opt.resume:
        checkpoint = load_checkpoint(opt.resume)
        opt = resumed_options(checkpoint["opt"], opt, given, opt.resume)
    elif opt.init_from:
        checkpoint = load_checkpoint(opt.init_from)
        fine_tuning_options(opt, checkpoint["opt"], given, opt.init_from)
    elif opt.demo and "logger_name" not in given:
        opt.logger_name = first_free_folder(opt.logger_name)
    if opt.seed is None:
        opt.seed = random.SystemRandom().randrange(2**31)
    return opt, checkpoint


def resumed_options(saved, command_line, given, path):
    """The checkpoint's options, with the overridable ones the command line gives."""
    opt = argparse.Namespace(**vars(saved))
    for name in sorted(given - {"resume"}):
        value, recorded = getattr(command_line, name), getattr(saved, name, None)
        if name in RESUME_OVERRIDABLE or recorded is None:
            setattr(opt, name, value)
        elif value != recorded:
            raise OptionError(
                f"--{name} {value} contradicts the checkpoint's {recorded} ({path}); resume without it, "
                "or start a new run with another --logger_name"
            )
    opt.resume = path
    return opt


def fine_tuning_options(opt, saved, given, path):
    """Give `opt` the MODEL_OPTIONS of the checkpoint at `path` (its options `saved`); an explicit flag
    that differs is refused. The image encoder keeps the variant of the checkpoint's data_name."""
    for name in MODEL_OPTIONS:
        recorded = getattr(saved, name)
        if name in given and getattr(opt, name) != recorded:
            raise OptionError(
                f"--{name} {getattr(opt, name)} contradicts the {recorded} of {path}, which --init_from starts "
                "from; a fine-tuned model keeps its checkpoint's model options"
            )
        setattr(opt, name, recorded)
    opt.encoder_data_name = image_encoder_data_name(saved)


def fine_tuning_vocab(opt, checkpoint):
    """The vocabulary of a run started from `checkpoint` (--init_from): the checkpoint's, then the words of
    the new data's vocabulary (DIR/NAME_vocab.json or .pkl in --vocab_path, else built from its train and
    dev captions by vocab.py's rules) that it lacks."""
    base = starting_vocab(checkpoint, opt.init_from, opt.vocab_path)
    if vocab_files(opt.vocab_path, opt.data_name):
        new = load_vocab_by_name(opt.vocab_path, opt.data_name, opt.data_path)
    else:
        new = build_dataset_vocab(opt.data_path, opt.data_name)
    vocab = extend_vocab(base, new)
    logging.info(
        "--init_from %s: its vocabulary of %d words (%s), %d words of %s appended",
        opt.init_from,
        len(base),
        base.path,
        len(vocab) - len(base),
        new.path or f"the {opt.data_name} captions",
    )
    return vocab, len(base)


def first_free_folder(folder):
    """`folder`, or `folder_2`, `folder_3`, ... when it already holds a run (the demo never overwrites)."""
    candidate, n = folder, 1
    while holds_run(candidate):
        n += 1
        candidate = f"{folder}_{n}"
    if candidate != folder:
        logging.info("%s already holds a run; this one writes to %s", folder, candidate)
    return candidate


def holds_run(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in (CHECKPOINT_NAME, BEST_NAME))


def check_output_folder(opt):
    """Never overwrite another run's checkpoints: a new run needs an empty --logger_name,
    a resumed one may write only over the checkpoint it continues."""
    existing = os.path.join(opt.logger_name, CHECKPOINT_NAME)
    if opt.resume:
        if os.path.isfile(existing) and not os.path.samefile(existing, opt.resume):
            raise OptionError(
                f"{opt.logger_name} holds another run's {CHECKPOINT_NAME}; resume into a new --logger_name"
            )
    elif holds_run(opt.logger_name):
        raise OptionError(
            f"{opt.logger_name} already holds a run; continue it with `{resume_command(existing)}`, "
            "or start a new one with another --logger_name"
        )


def resume_command(checkpoint_path):
    return f"python3 train.py --resume {shlex.quote(checkpoint_path)}"


def prepare_demo(opt):
    """Generate the toy dataset and its vocabulary if they are missing, saying where."""
    from utils.make_toy_data import make_toy_data

    folder = os.path.join(opt.data_path, opt.data_name)
    if not os.path.isfile(os.path.join(folder, "test_caps.txt")):
        logging.info("Writing the toy dataset to %s", os.path.abspath(folder))
        make_toy_data(opt.data_path, opt.data_name, opt.img_dim)
    if vocab_file(opt.vocab_path, opt.data_name) is None:
        path = os.path.join(opt.vocab_path, f"{opt.data_name}_vocab.json")
        logging.info("Writing its vocabulary to %s", os.path.abspath(path))
        save_vocab(build_dataset_vocab(opt.data_path, opt.data_name), path)


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


class NullWriter:
    """TensorBoard for the processes other than rank 0, which write nothing."""

    def add_scalar(self, *args, **kwargs):
        pass


class Trainer:
    """The original's training loop, resumable at any validation point.

    In data-parallel training every process runs it in step; rank 0 alone validates and
    writes, and the processes agree on when to stop and on the best model: `save`,
    `validate_and_save` and `stop_requested` communicate, so every process calls them at
    the same points."""

    def __init__(self, opt, model, train_loader, val_loader, writer, vocab):
        self.opt, self.model, self.writer = opt, model, writer
        self.vocab_digest = vocab_digest(vocab)
        self.vocab_words = [vocab.idx2word[i] for i in range(len(vocab))]
        self.train_loader, self.val_loader = train_loader, val_loader
        self.world = model.world
        self.best_rsum = 0.0
        self.next_epoch, self.next_batch = 0, 0
        self.stop = StopRequest()

    def resume(self, checkpoint, path):
        """Continue from `checkpoint` (loaded from `path`), whose options and vocabulary
        (run() loaded the one its digest names) this run already has."""
        self.model.load_state_dict(checkpoint["model"], source=path)
        try:
            self.model.Eiters = int(checkpoint.get("Eiters", 0))
            self.best_rsum = float(checkpoint.get("best_rsum", 0.0))
            if "next_epoch" in checkpoint:
                self._restore_position(checkpoint, path)
            else:
                # An original-release checkpoint: no optimizer state, and its 'epoch' counts the
                # epoch it was saved in as finished, even when saved mid-epoch (see docs/training.md, Resuming).
                self.next_epoch = int(checkpoint.get("epoch", 0))
                warn_if_saved_mid_epoch(path, self.next_epoch, self.model.Eiters, len(self.train_loader))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: incomplete training state ({type(e).__name__}: {e})") from None
        logging.info(
            "=> resumed '%s' at epoch %d, batch %d (Eiters %d, best_rsum %.2f)",
            path,
            self.next_epoch,
            self.next_batch,
            self.model.Eiters,
            self.best_rsum,
        )

    def _restore_position(self, checkpoint, path):
        saved = checkpoint["opt"]
        self.next_epoch, self.next_batch = int(checkpoint["next_epoch"]), int(checkpoint["next_batch"])
        if self.next_batch and saved.batch_size != self.opt.batch_size:
            raise CheckpointError(
                f"{path}: stopped mid-epoch with --batch_size {saved.batch_size}; "
                f"resume with the same batch size, not {self.opt.batch_size}"
            )
        optimizer = self.model.optimizer
        implementation = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, flags in zip(optimizer.param_groups, implementation):
            group.update(flags)  # this machine's choice, not the saving machine's
        self._restore_rng(checkpoint)

    def _restore_rng(self, checkpoint):
        """Each process's own generator state when the checkpoint has one per process of this
        world; otherwise rank 0's (the single-process state), the others a fresh stream."""
        own = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
        if len(own) == self.world.size:
            set_rng_state(own[self.world.rank], self.model.device)
        else:
            set_rng_state(checkpoint["rng"], self.model.device)
            self.world.seed_dropout(self.opt.seed + self.model.Eiters)

    def checkpoint_state(self, epoch, next_epoch, next_batch, rng_ranks):
        return {
            "epoch": epoch + 1,
            "model": self.model.state_dict(),
            "best_rsum": self.best_rsum,
            "opt": self.opt,
            "Eiters": self.model.Eiters,
            "optimizer": self.model.optimizer.state_dict(),
            "next_epoch": next_epoch,
            "next_batch": next_batch,
            "rng": rng_ranks[0],
            **({"rng_ranks": rng_ranks} if len(rng_ranks) > 1 else {}),
            "vocab_digest": self.vocab_digest,
            "vocab_words": self.vocab_words,
        }

    def save(self, epoch, next_epoch, next_batch, is_best=False):
        rng_ranks = self.world.gather_objects(rng_state(self.model.device))
        if self.world.is_main:
            save_checkpoint(
                self.checkpoint_state(epoch, next_epoch, next_batch, rng_ranks), is_best, self.opt.logger_name
            )

    def stop_signal(self):
        """The name of the signal that stopped the run, the same on every process."""
        return next(name for name in self.world.gather_objects(self.stop.signal_name) if name)

    def stop_requested(self):
        """Whether a signal reached this process or another: all processes stop after the same step."""
        return self.world.any(self.stop)

    def validate_and_save(self, epoch, next_epoch, next_batch):
        rsum = validate(self.opt, self.val_loader, self.model, self.writer) if self.world.is_main else None
        rsum = self.world.broadcast(rsum)  # so that every process agrees on is_best
        is_best = rsum > self.best_rsum
        self.best_rsum = max(rsum, self.best_rsum)
        self.save(epoch, next_epoch, next_batch, is_best)

    def run(self):
        """Train to opt.num_epochs; False when a signal stopped it first (its checkpoint saved).

        A signal during the very last step still lets that epoch validate and save: then
        nothing is left to do and the run is complete.
        """
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.stop.install()
        try:
            for epoch in range(self.next_epoch, self.opt.num_epochs):
                adjust_learning_rate(self.opt, self.model.optimizer, epoch)
                start_batch = self.next_batch if epoch == self.next_epoch else 0
                if not self.train_epoch(epoch, start_batch):
                    return False
                self.validate_and_save(epoch, epoch + 1, 0)
                if self.stop_requested() and epoch + 1 < self.opt.num_epochs:
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
            global_batch = min(opt.batch_size, len(self.train_loader.dataset) - i * opt.batch_size)
            for key, value in losses.items():
                train_logger.update(key, value, global_batch)
            batch_time.update(time.time() - end, 1)
            if model.Eiters % opt.log_step == 0:
                logging.info(
                    "Epoch: [%d][%d/%d]\t%s\tTime %.3f (%.3f)\tData %.3f (%.3f)\t",
                    epoch,
                    i,
                    num_batches,
                    train_logger,
                    batch_time.val,
                    batch_time.avg,
                    data_time.val,
                    data_time.avg,
                )
            step = model.Eiters
            self.writer.add_scalar("epoch", epoch, step)
            self.writer.add_scalar("step", i, step)
            self.writer.add_scalar("batch_time", batch_time.val, step)
            self.writer.add_scalar("data_time", data_time.val, step)
            train_logger.tb_log(self.writer, step)
            if i + 1 < num_batches:  # the epoch's end validates and saves anyway
                stop = self.stop_requested()
                if model.Eiters % opt.val_step == 0:
                    self.validate_and_save(epoch, epoch, i + 1)
                    model.train_start()
                elif stop:
                    self.save(epoch, epoch, i + 1)
                if stop:
                    return False
            end = time.time()
        return True

    @property
    def checkpoint_path(self):
        return os.path.join(self.opt.logger_name, CHECKPOINT_NAME)


def warn_if_saved_mid_epoch(path, epoch, iterations, batches_per_epoch):
    """An original checkpoint whose iteration count is not whole epochs was saved mid-epoch
    (at a val_step validation); training continues with the epoch after it, as recorded."""
    if iterations % batches_per_epoch:
        logging.warning(
            "%s: Eiters %d is not a whole number of epochs of %d batches: saved during epoch %d, which counts as "
            "finished; continuing with epoch %d",
            path,
            iterations,
            batches_per_epoch,
            epoch - 1,
            epoch,
        )


def validate(opt, val_loader, model, writer):
    """Recall in both directions on the dev split; returns r1 + r5 + r1i + r5i (the original's score)."""
    img_embs, cap_embs = encode_data(model, val_loader)
    caption_images = val_loader.dataset.caption_images  # None: 5 per image
    sims = similarity(img_embs, cap_embs, opt.measure, caption_images)
    r1, r5, r10, medr, meanr = i2t(img_embs, cap_embs, sims=sims, caption_images=caption_images)
    logging.info("Image to text: %.1f, %.1f, %.1f, %.1f, %.1f", r1, r5, r10, medr, meanr)
    r1i, r5i, r10i, medri, meanri = t2i(img_embs, cap_embs, sims=sims, caption_images=caption_images)
    logging.info("Text to image: %.1f, %.1f, %.1f, %.1f, %.1f", r1i, r5i, r10i, medri, meanri)
    rsum = r1 + r5 + r1i + r5i
    metrics = dict(
        r1=r1,
        r5=r5,
        r10=r10,
        medr=medr,
        meanr=meanr,
        r1i=r1i,
        r5i=r5i,
        r10i=r10i,
        medri=medri,
        meanri=meanri,
        rsum=rsum,
    )
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, model.Eiters)
    log_generated_captions(writer, model, val_loader.dataset, model.Eiters)
    return rsum


def open_writer(opt, world):
    """TensorBoard in logger_name for rank 0; a writer that writes nothing for the other processes."""
    from torch.utils.tensorboard import SummaryWriter

    if not world.is_main:
        return contextlib.nullcontext(NullWriter())
    os.makedirs(opt.logger_name, exist_ok=True)
    return SummaryWriter(opt.logger_name, flush_secs=5)


def main(argv=None):
    """Train; returns the exit code. A process of a torchrun job that fails exits at once
    (utils.distributed.DistributedWorld.exit)."""
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO, force=True)
    opt, world = None, SINGLE_PROCESS
    try:
        opt, checkpoint = parse_options(argv)
        check_options(opt)
        world = init_world(opt.batch_size, opt.device, opt.dist_timeout)
        opt.seed = world.broadcast(
            opt.seed
        )  # every process trains with rank 0's seed (each drew its own when none was given)
        code = run(opt, checkpoint, world)
    except (VSRNError, OSError) as e:
        code = report(e)
    except FloatingPointError as e:
        print(f"error: training stopped: {e}; the last checkpoint in {opt.logger_name} is untouched", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        where = f" in {opt.logger_name}" if opt else ""
        print(f"error: interrupted; the last complete checkpoint{where} is intact", file=sys.stderr)
        code = 130
    except Exception as e:
        if not world.lost_peer(e):
            raise
        detail = first_line(e, 160)
        print(
            f"error: rank {world.rank}: communication with the other processes failed ({detail}); "
            "a failing process's own message comes first",
            file=sys.stderr,
        )
        world.defer_to_failed_peer()
        code = 1
    return world.exit(code)


def compile_encoders(model):
    """torch.compile the image and text encoders in place (their state-dict keys stay the
    original's), except an encoder holding a synchronised BatchNorm (multi-GPU training):
    torch.compile of SyncBatchNorm under DistributedDataParallel has open failures upstream,
    and this port has not run it on GPUs. Call after model.distribute."""
    for name, module in (("image encoder", model.img_enc), ("text encoder", model.txt_enc)):
        if holds_sync_batchnorm(module):
            logging.info(
                "--compile: the %s holds a synchronised BatchNorm (multi-process training) and runs uncompiled", name
            )
        else:
            module.compile()


def run(opt, checkpoint=None, world=SINGLE_PROCESS):
    """Train; 0 when complete, 128 + signal number when a signal stopped it (checkpoint saved)."""
    check_output_folder(opt)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 alone logs
    configure_backends(opt.tf32)
    torch.manual_seed(opt.seed)
    # The first process of each node generates the demo data and fills the token cache; the others then read them.
    with world.local_main_first():
        if opt.demo:
            prepare_demo(opt)
        check_data_folder(opt.data_path, opt.data_name)
        if opt.resume:
            vocab = load_checkpoint_vocab(checkpoint, opt.resume, opt.vocab_path, opt.data_name, opt.data_path)
        elif checkpoint is not None:
            vocab, base_vocab_size = fine_tuning_vocab(opt, checkpoint)
            # The run's own vocabulary, beside its checkpoints, is the one they record: not the data's file.
            opt.vocab_path = opt.logger_name
            if world.is_main:
                save_vocab(vocab, os.path.join(opt.logger_name, f"{opt.data_name}_vocab.json"))
        else:
            vocab = load_vocab_by_name(opt.vocab_path, opt.data_name, opt.data_path)
        opt.vocab_size = len(vocab)
        train_loader, val_loader = data.get_loaders(
            opt.data_path,
            opt.data_name,
            vocab,
            batch_size=opt.batch_size,
            workers=opt.workers,
            max_len=opt.max_len,
            img_dim=opt.img_dim,
            seed=opt.seed,
            rank=world.rank,
            world_size=world.size,
        )
    if world.is_main:
        print(opt)
    model = VSRN(opt)
    if checkpoint is not None and not opt.resume:
        model.start_from(checkpoint["model"], base_vocab_size, opt.init_from)
        checkpoint = None  # a new run: its optimizer, schedule and counters start afresh
    if usable_workers(opt.workers) < opt.workers:
        logging.info("--workers %d capped at this machine's %d cores", opt.workers, usable_workers(opt.workers))
    model.distribute(world)
    if opt.compile:
        compile_encoders(model)
    world.seed_dropout(opt.seed)
    with open_writer(opt, world) as writer:
        trainer = Trainer(opt, model, train_loader, val_loader, writer, vocab)
        if checkpoint is not None:
            trainer.resume(checkpoint, opt.resume)
        finished = trainer.run()
    if not finished:
        name = trainer.stop_signal()
        world.close()
        if world.is_main:
            print(
                f"Stopped by {name} before the last epoch ended; the run is not complete. Continue it with:\n"
                f"  {resume_command(trainer.checkpoint_path)}"
                + (
                    "\n(or under torchrun, with your launcher's flags: torchrun ... train.py --resume "
                    f"{shlex.quote(trainer.checkpoint_path)})"
                    if world.size > 1
                    else ""
                ),
                file=sys.stderr,
            )
        return 128 + signal.Signals[name].value
    world.close()
    if opt.demo and world.is_main:
        best = os.path.join(opt.logger_name, BEST_NAME)
        print(f"\nDemo: recall of {best} on the test split of {os.path.join(opt.data_path, opt.data_name)}")
        evalrank(best, data_path=opt.data_path, split="test", vocab_path=opt.vocab_path)
        print_examples(best, opt.data_path, "test", opt.vocab_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
