"""Command-line options of train.py: every flag of the original VSRN with its default, plus ours; and what
every script's flags have in common (their help, the request they make)."""

import argparse
import dataclasses


class ScriptHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the scripts: the module docstring as written, and every flag's default once.

    A default is added unless the help already states it, or it says nothing: None (an
    optional value, or a required one), an empty string and the off state of a switch.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or "%(default)" in text:
            return text
        silent = action.default is None or action.default is argparse.SUPPRESS or action.default == ""
        if silent or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


# Small enough to learn the toy dataset quickly on two CPU cores (docs/training.md, The demo: how long). No gradient
# clipping: the demo's sum-of-hinges loss has gradient norms of 200 to 10,000 at batch 128,
# and clipping them to 2.0 leaves the caption branch writing nearly the same caption for
# every image.
DEMO_PRESET = dict(
    data_path="data",
    data_name="toy_precomp",
    vocab_path="vocab",
    logger_name="runs/demo",
    img_dim=128,
    embed_size=128,
    dim_vid=128,
    word_dim=64,
    dim_hidden=64,
    dim_word=64,
    max_len=24,
    batch_size=128,
    num_epochs=6,
    learning_rate=0.004,
    lr_update=10,
    grad_clip=0,
    workers=0,
    log_step=10,
    val_step=10**9,
    seed=0,
)


def request_from(request_class, args, **values):
    """A library request (a dataclass) of parsed flags: each of its fields from the flag of the same name,
    unless `values` gives it."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(request_class) if f.init and hasattr(args, f.name)
    }
    return request_class(**{**given, **values})


def build_parser():
    p = argparse.ArgumentParser(
        description="Train VSRN on precomputed region features.", formatter_class=ScriptHelpFormatter
    )
    add_original_flags(p.add_argument)
    add_port_flags(p.add_argument)
    return p


def add_original_flags(add):
    """The original's flags, names and defaults unchanged."""
    add("--data_path", default="/data", help="folder that holds DATA_NAME/{train,dev,test}_{ims.npy,caps.txt}")
    add("--data_name", default="precomp", help="{coco,f8k,f30k,10crop}_precomp (only precomputed features)")
    add("--vocab_path", default="./vocab/", help="folder with DATA_NAME_vocab.json (or the original .pkl)")
    add("--margin", default=0.2, type=float, help="rank loss margin")
    add("--num_epochs", default=30, type=int, help="number of training epochs")
    add("--batch_size", default=128, type=int, help="size of a training mini-batch")
    add("--word_dim", default=300, type=int, help="dimensionality of the word embedding")
    add("--embed_size", default=2048, type=int, help="dimensionality of the joint embedding")
    add("--grad_clip", default=2.0, type=float, help="gradient clipping threshold (0 disables)")
    add("--crop_size", default=224, type=int, help="unused: raw-image crop size of the original")
    add("--num_layers", default=1, type=int, help="number of GRU layers of the text encoder")
    add("--learning_rate", default=0.0002, type=float, help="initial learning rate")
    add("--lr_update", default=15, type=int, help="divide the learning rate by 10 every this many epochs")
    add(
        "--workers",
        default=10,
        type=int,
        help="number of data loader worker processes (capped at this machine's cores)",
    )
    add("--log_step", default=10, type=int, help="print and record the log every this many steps")
    add("--val_step", default=500, type=int, help="validate every this many steps")
    add("--logger_name", default="runs/runX", help="folder for checkpoints and TensorBoard logs")
    add(
        "--resume",
        default="",
        type=str,
        metavar="PATH",
        help="checkpoint to continue training from; the run's options come from it (see docs/training.md, Resuming)",
    )
    add("--max_violation", action="store_true", help="use the hardest negative instead of the sum in the rank loss")
    add("--img_dim", default=2048, type=int, help="dimensionality of the region features")
    add("--finetune", action="store_true", help="unused: fine-tuned the CNN on raw images in the original")
    add("--cnn_type", default="vgg19", help="unused: CNN of the original's raw-image encoder")
    add("--use_restval", action="store_true", help="unused: COCO restval images for raw-image training")
    add("--measure", default="cosine", choices=("cosine", "order"), help="similarity measure")
    add("--use_abs", action="store_true", help="take the absolute value of the embeddings (order embeddings)")
    add("--no_imgnorm", action="store_true", help="do not l2-normalise the image embeddings")
    add("--reset_train", action="store_true", help="unused: the original always switched back to train mode")
    # Caption branch.
    add("--dim_vid", default=2048, type=int, help="input size of the caption encoder; must equal --embed_size")
    add("--dim_hidden", default=512, type=int, help="hidden size of the caption encoder and decoder")
    add("--bidirectional", default=0, type=int, help="1 for a bidirectional caption encoder")
    add("--input_dropout_p", default=0.2, type=float, help="dropout on the caption branch inputs")
    add(
        "--rnn_type",
        default="gru",
        choices=("gru",),
        help="caption RNN cell (the original decoder works with gru only)",
    )
    add(
        "--rnn_dropout_p",
        default=0.5,
        type=float,
        help="dropout between caption RNN layers (no effect with one layer, as in the original)",
    )
    add("--dim_word", default=300, type=int, help="word embedding size of the caption decoder")
    add("--max_len", default=60, type=int, help="caption-branch length, <start> and <end> included")
    add(
        "--caption_updates",
        default=2,
        type=int,
        choices=(1, 2),
        help="Adam updates per step of the caption branch's parameters: 2 as the original (which listed them "
        "twice: two updates from one gradient, counted twice by the gradient clipping), 1 for one update",
    )


def add_port_flags(add):
    """The flags this port adds."""
    add("--seed", default=None, type=int, help="seed for weights, dropout and batch order (CPU runs repeat exactly)")
    add(
        "--demo",
        action="store_true",
        help="train and evaluate on a generated toy dataset: about 80 s on an idle 2-core CPU with AVX-512 "
        "(a float32 GEMM of 150-160 GFLOP/s), longer on slower cores or beside other jobs "
        "(a preset: see docs/training.md, The demo; explicit flags override it)",
    )
    add(
        "--init_from",
        default="",
        metavar="CHECKPOINT",
        help="start a new run from a trained checkpoint's weights (the original release's or this port's): its "
        "model options, its vocabulary with the new data's words appended, a fresh optimizer and schedule "
        "(see docs/training.md, Fine-tuning)",
    )
    add("--amp", action="store_true", help="bfloat16 autocast on CUDA (faster, not bit-faithful)")
    add("--tf32", action="store_true", help="allow TF32 matrix products on CUDA (faster, not bit-faithful)")
    add(
        "--compile",
        action="store_true",
        help="torch.compile the image and text encoders (CUDA); "
        "under torchrun the image encoder, which then holds SyncBatchNorm, stays uncompiled",
    )
    add("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add(
        "--dist_timeout",
        default=10.0,
        type=float,
        help="minutes a torchrun process waits for the others before failing",
    )


# What a resumed run may change: none of these alters the model or the batches already seen.
# (A mid-epoch checkpoint also pins --batch_size; train.py checks that.)
RESUME_OVERRIDABLE = frozenset(
    {
        "num_epochs",
        "workers",
        "log_step",
        "val_step",
        "learning_rate",
        "lr_update",
        "batch_size",
        "data_path",
        "vocab_path",
        "logger_name",
        "device",
        "amp",
        "tf32",
        "compile",
    }
)


def explicit_options(argv):
    """The option names given on the command line `argv` (defaults and presets excluded)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def option_defaults():
    """Every option's default, for filling in options that older checkpoints lack."""
    return vars(build_parser().parse_args([]))
