"""Data-parallel training over several processes, as torchrun launches them.

    torchrun --standalone --nproc_per_node=N train.py <the usual flags>

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_world`
reads them and joins the process group (NCCL on CUDA, gloo on the CPU). Without them —
a plain `python train.py` — there is no process group and SINGLE_PROCESS stands in: each
of its collectives is the identity, so the single-process step is unchanged.

The semantics are one process's: `--batch_size` is the global batch, each process takes
a contiguous share of it (data.GlobalBatchShareSampler), and the embeddings are gathered
so that the hinge loss sees every negative of the global batch.
"""

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

from utils.device import check_device, default_device
from utils.errors import OptionError, VSRNError, first_line

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Longer than torchrun's monitor interval (0.1 s; 5 s in early releases).
PEER_FAILURE_GRACE_S = 10


class DistributedError(VSRNError):
    """The launcher's environment is not usable, or the process group cannot be joined."""


class SingleProcess:
    """The world of a process trained alone: no process group, every collective the identity."""

    rank = 0
    local_rank = 0
    size = 1

    @property
    def is_main(self):
        """The process that validates and writes checkpoints, TensorBoard and the log."""
        return self.rank == 0

    def batch_sizes(self, local_size):
        """The sizes of every process's share of the current global batch, in rank order."""
        return [local_size]

    def gather(self, rows, sizes):
        """Every process's rows, concatenated in rank order; gradients flow to this process's own rows."""
        return rows

    def sum(self, tensor):
        """The sum of a (detached) tensor over the processes."""
        return tensor

    def any(self, flag):
        """Whether any process's flag is set: every process gets the same answer."""
        return bool(flag)

    def broadcast(self, value):
        """Rank 0's value, on every process (picklable values)."""
        return value

    def gather_objects(self, value):
        """Every process's value, in rank order (picklable values)."""
        return [value]

    def gather_to_main(self, value):
        """Every process's value, in rank order, on the main process; None on the others (picklable values)."""
        return [value]

    def wrap(self, module):
        """`module` as its training forward runs in this world (DistributedDataParallel when distributed)."""
        return module

    @contextlib.contextmanager
    def local_main_first(self):
        """Run the block on each node's first process before the others (it fills caches they then read)."""
        yield

    def seed_dropout(self, seed):
        """Give the processes other than rank 0 their own dropout stream (rank 0 keeps the single-process one)."""

    def close(self):
        """Leave the process group (all processes together, at the end of a successful run)."""

    def exit(self, code):
        """Return the exit code; a distributed process that fails leaves at once (see DistributedWorld.exit)."""
        return code

    def lost_peer(self, error):
        """Whether `error` is a failure of the communication between the processes (most
        often: another process failed and closed its connections)."""
        return False

    def defer_to_failed_peer(self):
        """Before a process that lost its peers exits, give the launcher time to see the peer
        that failed first, so that it names that one as the root cause."""


SINGLE_PROCESS = SingleProcess()


class _GatherRows(torch.autograd.Function):
    """All processes' rows concatenated in rank order; backward returns the gradient of this
    process's own rows, without communication.

    Every process computes the same loss from the same gathered rows, so the gradient it
    computes for its own rows is already complete; summing it over the processes (what a
    reduce-scatter would do) would count it once per process.
    """

    @staticmethod
    def forward(ctx, rows, sizes, rank):
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        width = max(sizes)
        padded = rows if len(rows) == width else torch.cat([rows, rows.new_zeros((width - len(rows), *rows.shape[1:]))])
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous())
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.size], None, None


class DistributedWorld(SingleProcess):
    """This process's place in a torchrun job, and the few collectives training needs.

    Tensors of the training step travel on the default group (NCCL on CUDA); the small
    host-side agreements (batch shares, stop requests, the validation score, random-number
    states) on a gloo group, so that they never wait for the GPU.
    """

    def __init__(self, rank, size, local_rank, device, control_group):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device
        self.control = control_group
        self._closed = False

    def batch_sizes(self, local_size):
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([local_size], dtype=torch.int64), group=self.control)
        return [int(s) for s in sizes]

    def gather(self, rows, sizes):
        return _GatherRows.apply(rows, sizes, self.rank)

    def sum(self, tensor):
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def any(self, flag):
        value = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())

    def broadcast(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather_objects(self, value):
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.control)
        return values

    def gather_to_main(self, value):
        values = [None] * self.size if self.is_main else None
        dist.gather_object(value, values, dst=0, group=self.control)
        return values

    def wrap(self, module):
        # BatchNorm statistics of the global batch, as one process computes them.
        if self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        else:
            module = convert_gloo_sync_batchnorm(module)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    @contextlib.contextmanager
    def local_main_first(self):
        if self.local_rank != 0:
            dist.barrier(group=self.control)
        yield
        if self.local_rank == 0:
            dist.barrier(group=self.control)

    def seed_dropout(self, seed):
        if self.rank:
            torch.manual_seed(dropout_seed(seed, self.rank))

    def close(self):
        if not self._closed:
            self._closed = True
            # Every process done with the group before any tears its connections down.
            dist.barrier(group=self.control)
            dist.destroy_process_group()

    def exit(self, code):
        """A failing process leaves at once: its peers may be waiting in a collective, and
        leaving the group gracefully could wait on them. torchrun sees the exit code, ends
        the other processes and names this one as the first failure. A process that left the
        group with the others (a finished or stopped run) just returns its code."""
        if code == 0 or self._closed:
            return code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def defer_to_failed_peer(self):
        time.sleep(PEER_FAILURE_GRACE_S)  # torchrun ends this process sooner (SIGTERM) once it has seen the failure

    def lost_peer(self, error):
        if isinstance(error, dist.DistError):
            return True
        text = str(error)
        return isinstance(error, RuntimeError) and any(
            sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out")
        )


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for processes on the CPU (gloo): torch's runs on GPUs only (and
    DistributedDataParallel refuses it on the CPU).

    In training, the mean and the biased variance are the global batch's, summed over the
    processes by an all-reduce that gradients flow back through, and the running statistics
    take the global batch's unbiased variance: what BatchNorm computes in one process on the
    whole batch, also when a process's share is a single sample. Elsewhere it is BatchNorm.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_tensor([input.numel() // input.size(1)])
        sums = all_reduce(torch.cat([input.sum(dims), count]))
        total = int(sums[-1])
        if total < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got a global batch of {total}")
        mean = sums[:-1] / total
        centred = input - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / total
        output = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * total / (total - 1))
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)


def convert_gloo_sync_batchnorm(module):
    """`module` with each BatchNorm layer replaced by a GlooSyncBatchNorm sharing its parameters
    and buffers (nn.SyncBatchNorm.convert_sync_batchnorm for the CPU)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_gloo_sync_batchnorm(child))
    return module


def holds_sync_batchnorm(module):
    """Whether `module` contains a BatchNorm that synchronises the processes."""
    return any(isinstance(layer, (nn.SyncBatchNorm, GlooSyncBatchNorm)) for layer in module.modules())


def dropout_seed(seed, rank):
    """The dropout seed of a process other than rank 0 (which keeps `seed`)."""
    return (seed * 1_000_003 + rank) % 2**63


def launched():
    """Whether a launcher (torchrun) started this process as part of a job."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def _launch_variable(name):
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={value!r}: expected an integer (set by torchrun)"
        ) from None
    return number


def _die_with_launcher():
    """Have Linux kill this process when its launcher dies (kill -9 on torchrun), as a
    single process would die, instead of training on unseen."""
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # it died before prctl took effect
        os._exit(1)


def _device(requested, local_rank):
    device_type = torch.device(requested).type if requested else default_device().type
    if device_type != "cuda":
        return torch.device("cpu")
    if requested and torch.device(requested).index is not None:
        raise OptionError(
            f"--device {requested}: under torchrun each process uses the GPU of its LOCAL_RANK; pass --device cuda"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise OptionError(
            f"LOCAL_RANK {local_rank} needs GPU cuda:{local_rank}, but this node has {count}: "
            f"start at most {count} processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init_world(batch_size, device=None, dist_timeout=10.0):
    """Join the job's process group when a launcher started this process; SINGLE_PROCESS otherwise.

    Checks first that `batch_size` (the global batch) divides among the processes.
    """
    if not launched():
        return SINGLE_PROCESS
    size = _launch_variable("WORLD_SIZE")
    if batch_size % size:
        raise OptionError(
            f"--batch_size {batch_size} is the global batch and must divide evenly among the {size} processes "
            f"(e.g. --batch_size {batch_size // size * size or size})"
        )
    return join_world(device, dist_timeout)


def join_world(device=None, dist_timeout=10.0):
    """Join the job's process group when a launcher started this process (on `device`'s type; each
    process takes its LOCAL_RANK's GPU; waits bounded by `dist_timeout` minutes); SINGLE_PROCESS otherwise."""
    if not launched():
        return SINGLE_PROCESS
    check_device(device)
    rank, size, local_rank = (_launch_variable(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = _device(device, local_rank)
    _die_with_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so that --device cuda means this process's GPU
    timeout = datetime.timedelta(minutes=dist_timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except (RuntimeError, ValueError) as e:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedError(
            f"cannot join the {backend} process group at {where} as rank {rank} of {size}: {first_line(e)}"
        ) from None
    return DistributedWorld(rank, size, local_rank, device, control)
