"""`build_loader`: batches of `dbc_fast.data.collate` dicts with the images already on the device.

Reproducibility: the order of an epoch comes from (seed, epoch) through DistributedSampler (also with one
process), and each sample's random augmentation from (seed, epoch, index), whatever worker decodes it.
So a run resumed from a checkpoint, even from the middle of an epoch (`set_epoch(epoch, start_step)`),
sees exactly the batches an uninterrupted run would have seen, and the global RNG (dropout, drop-path)
is never touched by data loading.

Bad images: in training an image that cannot be read or decoded is dropped from its batch and listed in
batch["skipped"] (SkippedSample: index, path, reason; `loader.skipped` collects them over the current
pass); in evaluation it stops the run with a DatasetError that names the file.
"""
from __future__ import annotations

import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .. import distributed as dist_utils
from .datasets import collate
from .transforms import sample_seed

LOADERS = ("torch", "dali", "auto")

# Exceptions that mean "this image file is unreadable": the data package's DatasetError (a ValueError
# naming the file), and what PIL raises for missing, truncated or non-image files (OSError,
# UnidentifiedImageError) or some malformed headers (SyntaxError) when a dataset does not wrap them.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


class SeededDataset(Dataset):
    """Wraps a dbc_fast dataset: per-sample seeded augmentation and the bad-image policy (skip: the
    sample becomes a `SkippedSample`, which `collate` drops and lists in batch["skipped"]; else raise
    with the file named)."""

    def __init__(self, dataset, seed: int, skip_bad: bool):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.dataset)

    def _path(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return samples[index].path if samples is not None else f"sample #{index}"

    def __getitem__(self, index: int):
        from .datasets import SkippedSample
        from ..errors import DatasetError

        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
                item = self.dataset[index]
        except _IMAGE_ERRORS as e:
            path = getattr(e, "path", None) or self._path(index)
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            if self.skip_bad:
                return SkippedSample(index, path, reason, getattr(self.dataset, "img_size", 0))
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"cannot read image: {reason}", path) from e
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        if isinstance(item, SkippedSample) and not self.skip_bad:
            raise DatasetError(f"cannot read image: {item.reason}", item.path)
        return item


class _SkipSampler(Sampler):
    """The indices of `sampler` after its first `skip` ones (resuming inside an epoch)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.skip = 0

    def __iter__(self):
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


class _ShardSampler(Sampler):
    """Evaluation sharding: rank r takes indices r, r + world, ... with no padding (no duplicates, so
    metrics gathered from all ranks equal the single-process ones)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy seeds from it too.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # Ctrl-C reaches the whole process group: workers keep serving batches while the main process stops
    # at a step boundary and saves (a worker killed by the signal would end the run with a worker error).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_images_open(dataset, what: str) -> None:
    """Every image file of `dataset` exists and opens as an image (its header is read, nothing is decoded),
    so a missing or non-image file stops a run before training rather than at the first validation. A file
    that opens but fails to decode is still found when it is read."""
    from PIL import Image

    from ..errors import DatasetError

    bad = []
    for sample in dataset.samples:
        try:
            with Image.open(sample.path) as im:
                im.size
        except Exception as e:  # PIL raises several types for unreadable files
            reason = str(e).replace(f" '{sample.path}'", "").replace(str(sample.path), "the file")
            bad.append((sample.path, f"{type(e).__name__}: {reason}"))
    if bad:
        more = f" ({len(bad)} of {len(dataset.samples)} {what} images cannot be read)" if len(bad) > 1 else ""
        raise DatasetError(f"{what} image cannot be read: {bad[0][1]}{more}", bad[0][0])


class TorchLoader:
    """Iterable of batch dicts with `image` (and `label`) on `device`; `len()` = batches per epoch."""

    def __init__(self, dataset, batch_size: int, train: bool, device, num_workers: int, seed: int,
                 drop_last: bool, channels_last: bool, pin_memory: bool, skip_bad: bool, sharded: bool):
        self.rank, self.world = (dist_utils.rank(), dist_utils.world_size()) if sharded else (0, 1)
        self.data = SeededDataset(dataset, seed, skip_bad=skip_bad)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.seed = seed
        self.skipped: list = []
        if train:
            self.sampler = DistributedSampler(self.data, num_replicas=self.world, rank=self.rank, shuffle=True,
                                              seed=seed, drop_last=drop_last)
        else:
            self.sampler = _ShardSampler(len(self.data), self.rank, self.world)
        self.skip_sampler = _SkipSampler(self.sampler)
        self.generator = torch.Generator()
        self.loader = DataLoader(self.data, batch_size=batch_size, sampler=self.skip_sampler,
                                 num_workers=num_workers, collate_fn=collate,
                                 pin_memory=pin_memory, drop_last=drop_last, generator=self.generator,
                                 worker_init_fn=_worker_init if num_workers > 0 else None,
                                 persistent_workers=False)
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch's order and augmentation; the next iteration starts at batch `start_step`."""
        self.epoch = epoch
        self.start_step = start_step
        self.data.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.skip_sampler.skip = start_step * self.batch_size
        self.generator.manual_seed(self.seed * 1000003 + epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        self.skipped = []
        non_blocking = self.device.type == "cuda"
        try:
            yield from self._batches(non_blocking)
        except Exception as e:
            raise _worker_cause(e) from None

    def _batches(self, non_blocking: bool):
        batches = iter(self.loader)
        try:
            for batch in batches:
                self.skipped.extend(batch["skipped"])
                if len(batch["image"]):
                    image = batch["image"].to(self.device, non_blocking=non_blocking)
                    if self.channels_last:
                        image = image.contiguous(memory_format=torch.channels_last)
                    batch["image"] = image
                    batch["label"] = batch["label"].to(self.device, non_blocking=non_blocking)
                yield batch
        finally:
            # Workers stop now, not when the iterator is collected: an error's traceback keeps it alive until exit,
            # where multiprocessing would SIGTERM workers that ignore SIGTERM (see _worker_init) and wait forever.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def _worker_cause(e: Exception) -> Exception:
    """A DataLoader worker's error arrives re-raised with the worker's whole traceback in its message; the
    user needs its last line (e.g. `<file>: cannot read image: ...`), as the same exception type."""
    text = str(e)
    if "Original Traceback" not in text:
        return e
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    name, _, message = last.partition(": ")
    if not message or not name.split(".")[-1].strip().isidentifier():
        return e
    try:
        return type(e)(message.strip())
    except Exception:  # an exception type that needs other arguments
        return RuntimeError(message.strip())


# NVIDIA DALI (dbc_fast/data/dali.py), imported only when asked for: it is optional
def _build_dali_loader(dataset, batch_size, train, device, num_workers, seed, drop_last, channels_last,
                       skip_bad_images, distributed):
    # ImportError with the install hint when DALI is not installed
    from .dali import build_dali_loader
    return build_dali_loader(dataset, batch_size, train, device=device, num_workers=num_workers, seed=seed,
                             drop_last=drop_last, channels_last=channels_last, skip_bad_images=skip_bad_images,
                             distributed=distributed)
# --- end of the DALI branch ---


def build_loader(dataset, batch_size: int, train: bool, loader: str = "torch", device="cpu",
                 num_workers: int = 4, distributed: bool | None = None, seed: int = 0,
                 drop_last: bool | None = None, channels_last: bool = False, pin_memory: bool | None = None,
                 skip_bad_images: bool | None = None):
    """Batches of `dataset` as `dbc_fast.data.collate` gives them, images already on `device`.

    train: shuffled (DistributedSampler, seeded by `seed` and the epoch set with `set_epoch`), bad images
    skipped and counted; eval: in order, sharded over ranks without padding, bad images raise.
    distributed: None = follow the initialised process group (torchrun); False forces one shard.
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to load")
    drop_last = train if drop_last is None else drop_last
    skip_bad_images = train if skip_bad_images is None else skip_bad_images
    device = torch.device(device)
    pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
    if loader == "auto":  # DALI on a GPU when it is installed, else torch (DALI branch)
        from .dali import resolve_loader
        loader = resolve_loader(loader, device)
    if loader == "dali":
        return _build_dali_loader(dataset, batch_size, train, device, num_workers, seed, drop_last, channels_last,
                                  skip_bad_images, distributed)
    sharded = dist_utils.is_distributed() if distributed is None else distributed
    if sharded and not dist_utils.is_distributed():
        raise RuntimeError("distributed=True needs an initialised process group (run under torchrun)")
    tl = TorchLoader(dataset, batch_size, train, device, num_workers, seed, drop_last, channels_last,
                     pin_memory, skip_bad_images, sharded)
    tl.set_epoch(0)
    return tl
