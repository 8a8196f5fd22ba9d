"""Precomputed region features and captions in SCAN's layout, as the original VSRN reads them.

    DATA/NAME/{split}_ims.npy   (num_images, regions, img_dim) float32
    DATA/NAME/{split}_caps.txt  one UTF-8 caption per line, 5 per image (or 1 per image)

and, optionally (utils.tsv_to_precomp and make_dataset.py write them; SCAN's release has none):

    DATA/NAME/{split}_boxes.npy           (num_images, regions, 4) float32 x1 y1 x2 y2 in pixels
    DATA/NAME/{split}_image_sizes.npy     (num_images, 2) int (height, width)
    DATA/NAME/{split}_image_ids.txt       one image id per line
    DATA/NAME/{split}_caption_images.npy  (num_captions,) int64: the image of each caption, for any
                                          number of captions per image (grouped by image, in image order)

Features are read one image at a time, so RAM does not grow with the dataset; captions
are tokenized once and cached on disk, keyed by the file's content and the vocabulary.
"""

import atexit
import hashlib
import multiprocessing
import os
import signal
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from utils.atomic import atomic_write
from utils.cache import cache_dir
from utils.captions import decode_captions, read_caption_bytes, read_captions
from utils.errors import DataError, OptionError
from vocab import END, START, tokenize, tokenizer_identity, vocab_digest

DEV_CAPTION_LIMIT = 5000  # the original validates on the first 5000 dev captions only


def encode_captions(captions, vocab, desc="tokenizing"):
    """Word ids of every caption (without <start>/<end>) as one flat int32 array plus offsets."""
    pieces = [
        np.asarray([vocab(w) for w in tokenize(c)], dtype=np.int32)
        for c in tqdm(captions, desc=desc, unit="cap", mininterval=1.0, disable=None)
    ]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return flat, offsets


def load_caption_ids(path, vocab):
    """encode_captions(read_captions(path)), cached on disk by content, vocabulary and tokenizer."""
    raw = read_caption_bytes(path)
    content = hashlib.sha256(raw).hexdigest()
    key = hashlib.sha256(f"{content}|{vocab_digest(vocab)}|{tokenizer_identity()}".encode()).hexdigest()[:32]
    cached = os.path.join(cache_dir(), f"caption_ids-{key}.npz")
    if os.path.isfile(cached):
        try:
            with np.load(cached, allow_pickle=False) as z:
                return z["ids"], z["offsets"], [int(i) for i in z["empty_lines"]]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it below
    captions = decode_captions(raw, path)
    ids, offsets = encode_captions(captions, vocab, desc=f"tokenizing {os.path.basename(path)}")
    empty_lines = [n for n, c in enumerate(captions, start=1) if not c]
    try:
        with atomic_write(cached, "wb") as f:
            np.savez(f, ids=ids, offsets=offsets, empty_lines=np.asarray(empty_lines, dtype=np.int64))
    except OSError as e:
        warnings.warn(f"could not write the token cache {cached} ({e}); captions will be tokenized again next time")
    return ids, offsets, empty_lines


def caption_branch_target(caption, max_len):
    """Label and mask (length max_len + 1) of the caption branch, built as the original.

    The caption (<start> ... <end>) is cut to max_len ids with <end> last; the mask
    covers the label up to and including its first padding position.
    """
    if len(caption) > max_len:
        caption = torch.cat([caption[: max_len - 1], caption[-1:]])
    label = torch.zeros(max_len + 1, dtype=torch.int64)
    label[: len(caption)] = caption
    first_pad = int((label == 0).nonzero()[0, 0])
    mask = torch.zeros(max_len + 1, dtype=torch.float32)
    mask[: first_pad + 1] = 1
    return label, mask


def caption_images_of(folder, split, num_captions, num_images):
    """(the image of each caption (num_captions,) int64, captions per image: 5, 1 or None when they vary).

    From SPLIT_caption_images.npy when the folder has one (any number of captions per image,
    grouped by image in image order, every image with at least one), else 5 consecutive
    captions per image, or 1; any other count is a DataError naming the files. A map that gives
    every image 5 captions (or 1) is that layout: evaluated as the original evaluates it.
    """
    caps_path = os.path.join(folder, f"{split}_caps.txt")
    map_path = os.path.join(folder, f"{split}_caption_images.npy")
    given = None
    if os.path.isfile(map_path):
        given = check_caption_images(_load_array(map_path), num_captions, num_images, map_path)
    for per_image in (5, 1):
        if num_captions == per_image * num_images:
            uniform = np.arange(num_captions, dtype=np.int64) // per_image
            if given is None or np.array_equal(given, uniform):
                return uniform, per_image
    if given is not None:
        return given, None
    raise DataError(
        f"{caps_path}: {num_captions} captions for the {num_images} images of {split}_ims.npy; "
        f"expected 5 captions per image (or 1), or {split}_caption_images.npy saying which image each one describes"
    )


def check_caption_images(images, num_captions, num_images, path):
    """`images` as int64 when it maps each of `num_captions` captions to its image, grouped by image in
    image order with none left out (0, 0, 1, 2, 2, 2, ...); a DataError naming `path` otherwise."""
    if images.ndim != 1 or not np.issubdtype(images.dtype, np.integer):
        raise DataError(f"{path}: holds {images.dtype} of shape {images.shape}; expected one integer per caption")
    if len(images) != num_captions:
        raise DataError(f"{path}: {len(images)} entries for {num_captions} captions; expected one per caption")
    images = images.astype(np.int64)
    steps = np.diff(images)
    bad = np.flatnonzero((steps < 0) | (steps > 1))
    if num_captions and (images[0] != 0 or len(bad) or images[-1] != num_images - 1):
        if len(bad):
            at = bad[0] + 1
            where = f"entry {at} (0-based) goes from image {images[at - 1]} to {images[at]}"
        else:
            where = f"the entries run from image {images[0]} to {images[-1]}"
        raise DataError(
            f"{path}: {where}; expected the captions grouped by image in image order, "
            f"every one of the {num_images} images with at least one (0, 0, 1, 2, 2, ...)"
        )
    return images


def whole_images_prefix(caption_images, limit):
    """How many leading captions to keep so that at most `limit` are kept and no image loses some
    of its captions (at least the first image's)."""
    if len(caption_images) <= limit:
        return len(caption_images)
    cut = int(np.searchsorted(caption_images, caption_images[limit], side="left"))
    return cut or int(np.searchsorted(caption_images, caption_images[0], side="right"))


class PrecompDataset(Dataset):
    """Item: (image (regions, img_dim), caption ids <start>..<end>, index, image index,
    caption-branch label, caption-branch mask). Each caption is an item; the captions of an
    image (5, 1, or any number with SPLIT_caption_images.npy) share its features."""

    def __init__(self, data_path, data_split, vocab, max_len, img_dim):
        self.split = data_split
        self.vocab = vocab
        self.max_len = max_len
        self.start_id, self.end_id = vocab(START), vocab(END)
        self.ims_path = os.path.join(data_path, f"{data_split}_ims.npy")
        caps_path = os.path.join(data_path, f"{data_split}_caps.txt")
        for path in (self.ims_path, caps_path):
            if not os.path.isfile(path):
                raise DataError(
                    f"{path}: not found; expected the precomputed layout {data_path}/{data_split}_ims.npy "
                    f"and {data_split}_caps.txt (see docs/data.md)"
                )
        self.images = open_features(self.ims_path, img_dim)
        self.caption_ids, self.offsets, empty_lines = load_caption_ids(caps_path, vocab)
        num_captions, num_images = len(self.offsets) - 1, self.images.shape[0]
        if empty_lines:
            warnings.warn(
                f"{caps_path}: {len(empty_lines)} empty caption line(s) (first: line {empty_lines[0]}); "
                "kept as <start> <end>, as the original"
            )
        # im_div: captions per image when all images have 5 (or 1), None when the number varies.
        self.image_of, self.im_div = caption_images_of(data_path, data_split, num_captions, num_images)
        # The original validates on the first 5000 dev captions (1000 images); with a varying
        # number per image, on the whole images within them.
        self.length = whole_images_prefix(self.image_of, DEV_CAPTION_LIMIT) if data_split == "dev" else num_captions

    def __len__(self):
        return self.length

    @property
    def caption_images(self):
        """The image of each of the len(self) captions, or None when captions 5i..5i+4 describe
        image i (the layout evaluation.py assumes when given none)."""
        return None if self.im_div == 5 else self.image_of[: self.length]

    def captions_of(self, image):
        """The indices (a range) of the captions of image `image` (of the split: some may be beyond len(self))."""
        first, end = np.searchsorted(self.image_of, [image, image + 1], side="left")
        return range(int(first), int(end))

    def caption(self, index):
        words = self.caption_ids[self.offsets[index] : self.offsets[index + 1]]
        caption = torch.empty(len(words) + 2, dtype=torch.int64)
        caption[0], caption[-1] = self.start_id, self.end_id
        caption[1:-1] = torch.from_numpy(words.astype(np.int64))
        return caption

    def __getitem__(self, index):
        img_id = int(self.image_of[index])
        features = self.images[img_id]
        if not np.isfinite(features).all():
            raise DataError(
                f"{self.ims_path}: NaN or Inf in the features of image {img_id} "
                f"({self.split} split, caption index {index})"
            )
        caption = self.caption(index)
        label, mask = caption_branch_target(caption, self.max_len)
        return torch.from_numpy(features), caption, index, img_id, label, mask


class FeatureFile:
    """Rows of a (num_images, regions, img_dim) .npy file, read one image at a time.

    Each read copies one image from the file (the OS page cache keeps hot ones), so the
    process's memory holds only the images of the current batches: neither a full
    np.load (8.6 GB for Flickr30K) nor a memory map, whose touched pages count as the
    process's resident memory until the kernel reclaims them.
    """

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(f)
                self.offset = f.tell()
        except (ValueError, OSError) as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from None
        if fortran_order and len(shape) > 1:
            raise DataError(f"{path}: features are stored in Fortran order; save them C-ordered (np.ascontiguousarray)")
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        expected = self.offset + shape[0] * self.row_bytes if shape else self.offset
        if os.path.getsize(path) < expected:
            raise DataError(
                f"{path}: file is truncated ({os.path.getsize(path)} bytes, the header promises {expected})"
            )
        self._file, self._pid = None, None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if self._pid != os.getpid():  # a DataLoader worker opens its own handle
            self._file, self._pid = open(self.path, "rb", buffering=0), os.getpid()
        self._file.seek(self.offset + index * self.row_bytes)
        row = np.frombuffer(self._file.read(self.row_bytes), dtype=self.dtype).reshape(self.shape[1:])
        return row.astype(np.float32)

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}


def open_features(path, img_dim):
    """A FeatureFile of (num_images, regions, img_dim) floats, its shape checked."""
    images = FeatureFile(path)
    if images.ndim != 3:
        raise DataError(f"{path}: features have shape {images.shape}; expected 3-D (num_images, regions, img_dim)")
    if images.shape[2] != img_dim:
        raise DataError(f"{path}: features have {images.shape[2]} dims per region; --img_dim is {img_dim}")
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{path}: features are {images.dtype}; expected floating point")
    return images


def read_image_ids(folder, split):
    """The split's image ids (str, one per image, in feature order), or None when the file is absent."""
    path = os.path.join(folder, f"{split}_image_ids.txt")
    if not os.path.isfile(path):
        return None
    ids = read_captions(path)
    num_images = len(FeatureFile(os.path.join(folder, f"{split}_ims.npy")))
    if len(ids) != num_images:
        raise DataError(f"{path}: {len(ids)} image ids for the {num_images} images of {split}_ims.npy")
    return ids


def read_region_boxes(folder, split, needed_by):
    """(boxes (N, regions, 4) float32 pixels x1 y1 x2 y2, sizes (N, 2) int height, width) of a split.

    `needed_by` names the feature that needs them, for the error when they are absent.
    """
    boxes_path = os.path.join(folder, f"{split}_boxes.npy")
    sizes_path = os.path.join(folder, f"{split}_image_sizes.npy")
    for path in (boxes_path, sizes_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path}: not found; {needed_by} needs the region boxes and image sizes that "
                "utils.tsv_to_precomp writes (SCAN's precomputed features have none)"
            )
    boxes = _load_array(boxes_path).astype(np.float32)
    sizes = _load_array(sizes_path).astype(np.int64)
    images = FeatureFile(os.path.join(folder, f"{split}_ims.npy"))
    if boxes.shape != (*images.shape[:2], 4):
        raise DataError(
            f"{boxes_path}: boxes have shape {boxes.shape}; expected {(*images.shape[:2], 4)} for {split}_ims.npy"
        )
    if sizes.shape != (images.shape[0], 2):
        raise DataError(
            f"{sizes_path}: sizes have shape {sizes.shape}; expected {(images.shape[0], 2)} (height, width per image)"
        )
    return boxes, sizes


def _load_array(path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None


def collate_fn(data):
    """Batch items sorted by caption length, longest first, as the original."""
    data = sorted(data, key=lambda item: len(item[1]), reverse=True)
    images, captions, ids, img_ids, caption_labels, caption_masks = zip(*data)
    lengths = [len(c) for c in captions]
    targets = torch.zeros(len(captions), max(lengths), dtype=torch.int64)
    for i, caption in enumerate(captions):
        targets[i, : lengths[i]] = caption
    return torch.stack(images), targets, lengths, ids, torch.stack(caption_labels), torch.stack(caption_masks)


class EpochShuffleSampler(Sampler):
    """A fresh random order each epoch, fixed by (seed, epoch) so a resumed run can continue
    an epoch with exactly the batches it had not yet seen."""

    def __init__(self, length, seed):
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Iterate epoch `epoch`'s order from position `start` on."""
        self.epoch, self.start = epoch, start

    def order(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=generator)

    def __iter__(self):
        return iter(self.order(self.epoch)[self.start :].tolist())

    def __len__(self):
        return self.length - self.start


def share_sizes(batch_size, world_size):
    """Sizes of the world_size contiguous shares of a batch, the first ones one larger when it does not divide."""
    base, extra = divmod(batch_size, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


class GlobalBatchShareSampler(EpochShuffleSampler):
    """One process's share of every global batch of the single-process order.

    The global batches are EpochShuffleSampler's (same seed, same epochs, same resume
    position); each is sorted by caption length as collate_fn sorts it and cut into
    `world_size` contiguous shares, so the shares concatenated in rank order are the
    single-process batch row for row. Batched by batch_size // world_size, the indices
    this sampler yields are exactly the shares.
    """

    def __init__(self, length, seed, caption_lengths, batch_size, rank, world_size):
        super().__init__(length, seed)
        if batch_size % world_size:
            raise OptionError(f"--batch_size {batch_size} must divide evenly among the {world_size} processes")
        last = length % batch_size
        if 0 < last < world_size:
            raise OptionError(
                f"--batch_size {batch_size}: the last batch of each epoch holds {last} of the {length} "
                f"training captions, fewer than the {world_size} processes; "
                f"choose a --batch_size that leaves none or at least {world_size}"
            )
        self.caption_lengths = caption_lengths
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self):
        order = self.order(self.epoch)[self.start :].tolist()
        for begin in range(0, len(order), self.batch_size):
            batch = sorted(order[begin : begin + self.batch_size], key=self.caption_lengths.__getitem__, reverse=True)
            sizes = share_sizes(len(batch), self.world_size)
            first = sum(sizes[: self.rank])
            yield from batch[first : first + sizes[self.rank]]

    def __len__(self):
        full, last = divmod(self.length - self.start, self.batch_size)
        return full * (self.batch_size // self.world_size) + share_sizes(last, self.world_size)[self.rank]


def _ignore_stop_signals(worker_id):
    # Ctrl-C and schedulers signal the whole process group; the main process alone decides
    # how to stop (it finishes the step and saves), and then ends its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_workers_left_at_exit():
    # Workers ignore SIGTERM (above). multiprocessing's own exit handler terminates daemonic
    # children with SIGTERM and then joins them, so a loader still alive at exit (persistent
    # workers, an unfinished iterator) would keep the interpreter from ever exiting.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# Registered after multiprocessing's handler (torch imports it first), so it runs before it.
atexit.register(_kill_workers_left_at_exit)


def usable_workers(requested):
    """--workers capped at this machine's cores: more processes than cores only compete
    (and torch warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(requested, cores))


def check_data_folder(data_path, data_name, flag_hint="check --data_path and --data_name"):
    """DATA/NAME must exist before anything is built from it; the error names the folder."""
    folder = os.path.join(data_path, data_name)
    if not os.path.isdir(folder):
        raise DataError(
            f"{folder}: dataset folder not found; expected {data_name}/{{train,dev,test}}_ims.npy and _caps.txt "
            f"under {data_path} (see docs/data.md); {flag_hint}"
        )
    return folder


def worker_context():
    """DataLoader workers are spawned: a fresh interpreter each, never a fork of the training
    process, which runs threads (torch's thread pools) and whose fork can deadlock on a lock
    another thread held (Python 3.12+ warns about it; 3.14 no longer forks by default). A
    fork server would start workers faster, but its workers are not this process's children:
    they would outlive a training process killed with kill -9."""
    return multiprocessing.get_context("spawn")


def _loader(dataset, batch_size, workers, sampler=None):
    workers = usable_workers(workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        multiprocessing_context=worker_context() if workers > 0 else None,
        shuffle=False,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0 and sampler is not None,
        collate_fn=collate_fn,
        worker_init_fn=_ignore_stop_signals,
        # Its own generator: creating an iterator must not draw from the global RNG, which
        # drives dropout, or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator(),
    )


def get_precomp_loader(
    data_path,
    data_split,
    vocab,
    max_len,
    img_dim,
    batch_size=100,
    shuffle=True,
    num_workers=2,
    seed=0,
    rank=0,
    world_size=1,
):
    """A loader of the split; shuffled, it yields process `rank`'s shares of the global batches of `batch_size`."""
    dataset = PrecompDataset(data_path, data_split, vocab, max_len, img_dim)
    if shuffle and world_size > 1:
        caption_lengths = np.diff(dataset.offsets)
        sampler = GlobalBatchShareSampler(len(dataset), seed, caption_lengths, batch_size, rank, world_size)
        return _loader(dataset, batch_size // world_size, num_workers, sampler)
    sampler = EpochShuffleSampler(len(dataset), seed) if shuffle else None
    return _loader(dataset, batch_size, num_workers, sampler)


def get_loaders(data_path, data_name, vocab, *, batch_size, workers, max_len, img_dim, seed=0, rank=0, world_size=1):
    """Train loader (shuffled by an EpochShuffleSampler seeded with `seed`; in data-parallel
    training, process `rank`'s shares of its global batches) and dev loader."""
    path = os.path.join(data_path, data_name)
    train_loader = get_precomp_loader(
        path, "train", vocab, max_len, img_dim, batch_size, True, workers, seed, rank, world_size
    )
    val_loader = get_precomp_loader(path, "dev", vocab, max_len, img_dim, batch_size, False, workers)
    return train_loader, val_loader


def get_test_loader(data_path, data_name, split, vocab, *, batch_size, workers, max_len, img_dim):
    """The split in order, for evaluation."""
    return get_precomp_loader(
        os.path.join(data_path, data_name), split, vocab, max_len, img_dim, batch_size, False, workers
    )
