"""NVIDIA DALI loader: JPEG decoding and the paper's transforms on the GPU, batches as `collate` gives them.

`build_dali_loader(...)` is the `--loader dali` branch of `dbc_fast.data.loader.build_loader`. It yields
the same batch dicts as the PyTorch loader (image already on the device, label, boxes, orig_size, path,
index, skipped) with the same transforms, the same epoch order and the same random crops and flips:

- Decoding: `fn.decoders.image` with device="mixed" (nvJPEG / the hardware JPEG decoder) on a GPU, or
  device="cpu" (libjpeg-turbo, bit-identical to PIL) for CPU-only pipelines (`device_id=None`). EXIF
  orientation is ignored, as PIL's `Image.open(...).convert("RGB")` does.
- Transforms (dbc_fast.data.transforms): eval = resize to S x S; train = resize to R x R
  (R = round(S * 256 / 224)), S x S crop, horizontal flip; then ImageNet mean/std normalisation. Resizing is
  linear with antialiasing (`interp_type=INTERP_LINEAR, antialias=True`), DALI's equivalent of PIL's
  bilinear filter (which widens its support when shrinking). The pixels differ from PIL's by rounding
  (mean |diff| ~0.2 of 255) and at the image border, where PIL renormalises its truncated filter and DALI
  clamps (up to ~12/255 on the outermost row/column); tests/test_dali.py asserts the tolerance.
- Randomness: the crop offset and flip of each sample are drawn exactly as `TrainTransform` draws them,
  from torch's RNG seeded by `transforms.sample_seed(seed, epoch, index)`, and fed to the pipeline, so DALI
  and the PyTorch loader crop and flip each sample identically and a resumed run repeats its batches.
- Feeding: an external source reads the files of `dataset.samples` in Python threads (so the epoch order,
  the sharding and the skipping of bad files are ours, not the file reader's: its shuffle is a buffer, not
  a permutation, and it cannot drop a file once built). Sharding follows the PyTorch loader: training uses
  DistributedSampler(num_replicas=world_size, rank=rank, seed, drop_last) indices; evaluation gives rank r
  the samples r, r + world, ... with no padding, so no duplicate has to be dropped and metrics gathered
  from all ranks equal the single-process ones. Batches are index lists; a shard's last batch is partial
  unless drop_last.
- Bad images: DALI stops the pipeline on a file it cannot decode. The loader then probes each file of the
  batches in flight with a one-image CPU pipeline to find the culprit(s); in training they are dropped
  from their batch (batch["skipped"] gets a `SkippedSample`, `loader.skipped` lists the epoch's) and the
  pipeline is rebuilt at that batch; in evaluation the run stops with an error that names the file.

DALI is an optional dependency (`pip install 'dbc_fast[dali]'`); without it `build_dali_loader` raises an
ImportError that says how to install it.
"""
from __future__ import annotations

import concurrent.futures
import weakref

import numpy as np
import torch

from .datasets import SkippedSample, boxes_for_decoded_size
from .images import load_image
from ..errors import DALIUnavailableError, DatasetError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, scale_boxes, train_boxes, train_params, train_resize_size

INSTALL_HINT = ("NVIDIA DALI is not installed. Install it with `pip install 'dbc_fast[dali]'` (the CUDA 13 "
                "wheel nvidia-dali-cuda130; use nvidia-dali-cuda120 for CUDA 12), or use --loader torch.")

# nvJPEG buffer preallocation for ILSVRC-size images (the values of NVIDIA's ImageNet example), so the
# decoder does not reallocate while the first epoch meets ever larger images.
_DEVICE_MEMORY_PADDING = 211025920
_HOST_MEMORY_PADDING = 140544512


def dali_available() -> bool:
    """True if `nvidia.dali` (with its PyTorch plugin) can be imported."""
    try:
        _import_dali()
    except ImportError:
        return False
    return True


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise DALIUnavailableError(INSTALL_HINT) from e
    return fn, pipeline_def, types, DALIGenericIterator


def resolve_loader(loader: str, device) -> str:
    """'auto' -> 'dali' on a CUDA device when DALI is installed, else 'torch'; other names unchanged."""
    if loader != "auto":
        return loader
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"


def build_pipeline(source, *, augment: bool, img_size: int, batch_size: int, num_threads: int,
                   device_id: int | None, channels_last: bool = False, prefetch: int = 2):
    """The DALI pipeline of one loader.

    source: the external-source callback, `source(iteration) -> (jpegs, index[, crop_x, crop_y, mirror])`
    with one entry per sample (np arrays), raising StopIteration at the end of the epoch.
    device_id None: everything on the CPU (decoder "cpu"); otherwise decode with device="mixed" and
    resize/crop/flip/normalise on that GPU.
    Outputs: images float32 [n,3,S,S] (or [n,S,S,3] when channels_last), index int64 [n], shape int64 [n,3]
    (decoded h, w, c).
    """
    fn, pipeline_def, types, _ = _import_dali()
    s = img_size
    r = train_resize_size(img_size)
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=0)
    def pipeline():
        if augment:
            jpegs, index, crop_x, crop_y, mirror = fn.external_source(
                source=source, num_outputs=5, batch=True,
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32])
        else:
            jpegs, index = fn.external_source(source=source, num_outputs=2, batch=True,
                                              dtype=[types.UINT8, types.INT64])
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
        if gpu:
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, adjust_orientation=False,
                                       device_memory_padding=_DEVICE_MEMORY_PADDING,
                                       host_memory_padding=_HOST_MEMORY_PADDING)
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False)
        side = r if augment else s
        images = fn.resize(images, resize_x=side, resize_y=side, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        normalise = dict(dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                         mean=[m * 255.0 for m in IMAGENET_MEAN], std=[d * 255.0 for d in IMAGENET_STD])
        if augment:
            # crop_x/crop_y are the integer offsets divided by (R - S): DALI multiplies back and rounds.
            images = fn.crop_mirror_normalize(images, crop=(s, s), crop_pos_x=crop_x, crop_pos_y=crop_y,
                                              mirror=mirror, **normalise)
        else:
            images = fn.crop_mirror_normalize(images, **normalise)
        return images, index, shape

    return pipeline()


def sample_boxes(sample, decoded_wh: tuple[int, int], img_size: int,
                 params: tuple[int, int, bool] | None) -> tuple[tuple[int, int], torch.Tensor]:
    """(orig_size, boxes in the output image's pixels) of a sample, as WSOLDataset/EvalTransform/
    TrainTransform compute them: boxes refer to `sample.size` where known, else the decoded size (clipped
    to it); params None = evaluation (scale to S x S), else the training crop/flip."""
    size, boxes = boxes_for_decoded_size(sample, decoded_wh, train=params is not None)
    if params is None:
        out = scale_boxes(boxes, size, img_size, img_size)
    else:
        out = train_boxes(boxes, size, img_size, *params)
    return size, torch.from_numpy(out.astype(np.float32).reshape(-1, 4))


def probe_image(path: str) -> str | None:
    """None if DALI's CPU decoder reads `path`, else why not (a one-image pipeline; used to find the
    culprit after a pipeline failed, since DALI's error does not name the file)."""
    fn, pipeline_def, types, _ = _import_dali()
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        return f"cannot read file: {e}"
    if data.size == 0:
        return "empty file"

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def probe():
        jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False), shape

    pipe = probe()
    try:
        pipe.build()
        pipe.feed_input("jpegs", [data])
        pipe.run()
    except RuntimeError:
        return "corrupt, truncated or not an image: DALI cannot decode it" + _pil_opinion(path)
    finally:
        shutdown_pipeline(pipe)
    return None


def shutdown_pipeline(pipe) -> None:
    """Stops a pipeline's threads now. Left to Python's cycle collector, a pipeline can be destroyed inside a
    forked process (a DataLoader worker) that has no copy of DALI's threads: its destructor then waits for
    them forever. (DALI has no public close(); its own atexit hook calls the same `_shutdown`.)"""
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


def _pil_opinion(path: str) -> str:
    """What PIL says about a file DALI cannot decode (DALI's own error does not say what is wrong)."""
    try:
        load_image(path)
    except DatasetError as e:
        return f" ({e.reason})"
    return " (PIL reads it)"


class _Source:
    """The external-source callback: pipeline iteration i -> the files and parameters of batch run_ids[i]."""

    def __init__(self, loader: "DaliLoader", run_ids: list[int]):
        # a weak reference: loader -> pipeline -> source -> loader would be a cycle, and the loader (and
        # its pipeline) would then be freed by the cycle collector, possibly in a forked child
        self.loader = weakref.proxy(loader)
        self.run_ids = run_ids
        self.requested = -1  # the last iteration DALI asked for (batches up to it may be in flight)
        self.error: BaseException | None = None  # a read error in eval, re-raised by the loader

    def __call__(self, iteration: int):
        if iteration >= len(self.run_ids):
            raise StopIteration
        self.requested = max(self.requested, iteration)
        loader = self.loader
        batch = loader.batches[self.run_ids[iteration]]
        indices = [i for i in batch if i not in loader.bad]
        paths = [loader.samples[i].path for i in indices]
        datas = list(loader.pool.map(_read_file, paths))
        jpegs, kept = [], []
        for i, path, data in zip(indices, paths, datas):
            if isinstance(data, str):  # could not read the file: no pipeline needed to know it is bad
                if not loader.skip_bad:
                    self.error = DatasetError(data, path)
                    raise self.error
                loader.bad[i] = data
                continue
            jpegs.append(data)
            kept.append(i)
        if not kept:
            # every file of this batch turned out unreadable now: feed the next batch's first good file
            # would shift batches, so stop this run; the loader yields the empty batch and restarts.
            self.error = _EmptyBatch(self.run_ids[iteration])
            raise self.error
        index = [np.array(i, dtype=np.int64) for i in kept]
        if not loader.augment:
            return jpegs, index
        span = float(loader.resize - loader.img_size)
        params = [loader.params(i) for i in kept]
        crop_x = [np.array(p[0] / span, dtype=np.float32) for p in params]
        crop_y = [np.array(p[1] / span, dtype=np.float32) for p in params]
        mirror = [np.array(int(p[2]), dtype=np.int32) for p in params]
        return jpegs, index, crop_x, crop_y, mirror


class _EmptyBatch(Exception):
    def __init__(self, batch_id: int):
        super().__init__(f"every image of batch {batch_id} is unreadable")
        self.batch_id = batch_id


def _read_file(path: str):
    """The file's bytes, or a message (str) saying why it cannot be read."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        return "image file does not exist"
    except OSError as e:
        return f"cannot read image file: {e}"
    if data.size == 0:
        return "empty image file"
    return data


class DaliLoader:
    """Iterable of batch dicts (see the module doc); `len()` = batches per epoch; `set_epoch(epoch,
    start_step)` as the PyTorch loader's; `skipped` lists the SkippedSamples of the current epoch."""

    def __init__(self, dataset, batch_size: int, train: bool, device, num_threads: int = 4, seed: int = 0,
                 drop_last: bool = False, channels_last: bool = False, skip_bad: bool = False,
                 rank: int = 0, world_size: int = 1, prefetch: int = 2):
        _import_dali()
        samples = getattr(dataset, "samples", None)
        if samples is None or not hasattr(dataset, "img_size"):
            raise TypeError("the DALI loader needs a dbc_fast dataset (with .samples and .img_size), "
                            f"got {type(dataset).__name__}")
        if len(samples) == 0:
            raise ValueError("the dataset is empty: nothing to load")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.dataset = dataset
        self.samples = samples
        self.img_size = int(dataset.img_size)
        self.resize = train_resize_size(self.img_size)
        # The dataset's transform decides the augmentation (as dataset[i] does); `train` the order.
        self.augment = bool(getattr(dataset, "train", train))
        self.batch_size = batch_size
        self.train = train
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"the DALI loader runs on cpu or cuda devices, not {self.device}")
        self.num_threads = max(1, int(num_threads))
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.skip_bad = skip_bad
        self.rank, self.world_size = rank, world_size
        self.prefetch = prefetch
        n = len(samples)
        if train:
            self.sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world_size, rank=rank,
                                                               shuffle=True, seed=seed, drop_last=drop_last)
            self.shard_size = len(self.sampler)
        else:
            self.sampler = None
            self.shard_size = len(range(rank, n, world_size))
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, self.num_threads),
                                                          thread_name_prefix="dali-read")
        self.bad: dict[int, str] = {}  # dataset index -> why it cannot be read (kept across epochs)
        self.skipped: list[SkippedSample] = []
        self.batches: list[list[int]] = []
        self._params: dict[int, tuple[int, int, bool]] = {}
        self._pipe = None
        self._iter = None
        self._clean = False  # the live pipeline finished its last epoch (reset() is then safe)
        self.set_epoch(0)

    # -- epoch plan -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Selects the epoch's order and augmentation; the next iteration starts at batch `start_step`."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _plan(self) -> list[list[int]]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
        else:
            order = list(range(self.rank, len(self.samples), self.world_size))
        order = order[self.start_step * self.batch_size:]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def params(self, index: int) -> tuple[int, int, bool]:
        p = self._params.get(index)
        if p is None:
            p = self._params[index] = train_params(self.seed, self.epoch, index, self.img_size)
        return p

    # -- pipeline -----------------------------------------------------------------------------------
    def _start(self, first: int) -> list[int]:
        """(Re)starts the pipeline at batch `first` of the plan; returns the batch ids it will produce."""
        _, _, _, DALIGenericIterator = _import_dali()
        run_ids = [k for k in range(first, len(self.batches))
                   if any(i not in self.bad for i in self.batches[k])]
        if self._pipe is not None and self._clean:
            self._source.run_ids = run_ids
            self._source.requested = -1
            self._source.error = None
            self._iter.reset()
        else:
            self._close_pipeline()
            self._source = _Source(self, run_ids)
            self._pipe = build_pipeline(self._source, augment=self.augment, img_size=self.img_size,
                                        batch_size=self.batch_size, num_threads=self.num_threads,
                                        device_id=self.device_id, channels_last=self.channels_last,
                                        prefetch=self.prefetch)
            self._pipe.build()
            self._iter = DALIGenericIterator([self._pipe], ["image", "index", "shape"], auto_reset=False,
                                             prepare_first_batch=False)
        self._clean = False
        return run_ids

    def _close_pipeline(self) -> None:
        if self._pipe is not None:
            shutdown_pipeline(self._pipe)
        self._iter = None
        self._pipe = None
        self._clean = False

    def close(self) -> None:
        """Frees the pipeline (its GPU buffers) and the file-reading threads now instead of at collection."""
        self._close_pipeline()
        self.pool.shutdown(wait=False)

    def __del__(self):
        if getattr(self, "_pipe", None) is not None:
            shutdown_pipeline(self._pipe)
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _find_bad(self, consumed: int, run_ids: list[int], error: Exception) -> dict[int, str]:
        """The unreadable files among the batches the failed pipeline had in flight."""
        last = min(max(self._source.requested, consumed), len(run_ids) - 1)
        found = {}
        for k in run_ids[consumed:last + 1]:
            for i in self.batches[k]:
                if i not in self.bad and i not in found:
                    why = probe_image(self.samples[i].path)
                    if why is not None:
                        found[i] = why
        if not found:
            paths = [self.samples[i].path for k in run_ids[consumed:last + 1] for i in self.batches[k]]
            raise RuntimeError(f"the DALI pipeline failed on a batch of {len(paths)} images (first: "
                               f"{paths[:3]}), but each of them decodes on its own: {error}") from error
        return found

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self):
        self.skipped = []
        self._params = {}
        self.batches = self._plan()
        k = 0  # the next batch of the plan to yield
        while k < len(self.batches):
            run_ids = self._start(k)
            consumed = 0
            failed = False
            while True:
                try:
                    out = next(self._iter)[0]
                except StopIteration:
                    self._clean = True
                    break
                except (RuntimeError, DatasetError, _EmptyBatch) as e:
                    self._recover(e, consumed, run_ids)  # raises unless bad images are skipped
                    failed = True
                    break
                batch_id = run_ids[consumed]
                consumed += 1
                while k < batch_id:  # a batch whose every image is bad: yielded empty, as collate does
                    yield self._empty_batch(k)
                    k += 1
                yield self._batch(out, k)
                k += 1
            if not failed:  # the pipeline ran to the end: what is left are all-bad batches
                while k < len(self.batches):
                    yield self._empty_batch(k)
                    k += 1

    def _recover(self, error: Exception, consumed: int, run_ids: list[int]) -> None:
        """After a pipeline failure: raise in evaluation; in training mark the culprits bad (the caller
        restarts the pipeline at the failed batch)."""
        self._close_pipeline()
        source_error = self._source.error
        if isinstance(source_error, DatasetError):
            raise RuntimeError(f"cannot read image {source_error.path}: {source_error.reason}") from source_error
        if isinstance(source_error, _EmptyBatch):
            return  # the source already marked that batch's files bad
        found = self._find_bad(consumed, run_ids, error)
        if not self.skip_bad:
            i, why = next(iter(found.items()))
            raise RuntimeError(f"cannot read image {self.samples[i].path}: {why}") from error
        self.bad.update(found)

    def _skipped_of(self, k: int) -> list[SkippedSample]:
        found = [SkippedSample(i, self.samples[i].path, self.bad[i], self.img_size)
                 for i in self.batches[k] if i in self.bad]
        self.skipped.extend(found)
        return found

    def _empty_batch(self, k: int) -> dict:
        s = self.img_size
        return {"image": torch.zeros((0, 3, s, s), device=self.device),
                "label": torch.zeros(0, dtype=torch.long, device=self.device), "boxes": [], "orig_size": [],
                "path": [], "index": torch.zeros(0, dtype=torch.long), "skipped": self._skipped_of(k)}

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor to the loader's device; for CUDA from pinned memory without blocking, so the host can run
        ahead of the GPU (a pageable copy would wait for every queued kernel)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _batch(self, out: dict, k: int) -> dict:
        index = out["index"].view(-1).cpu()
        shapes = out["shape"].view(-1, 3).tolist()
        image = out["image"]
        if self.channels_last:
            image = image.permute(0, 3, 1, 2)  # NHWC memory = channels_last NCHW
        image = image.to(self.device, non_blocking=True)
        labels, boxes, sizes, paths = [], [], [], []
        for i, (h, w, _) in zip(index.tolist(), shapes):
            sample = self.samples[i]
            params = self._params.pop(i, None) if self.augment else None
            if self.augment and params is None:
                params = train_params(self.seed, self.epoch, i, self.img_size)
            size, b = sample_boxes(sample, (w, h), self.img_size, params)
            labels.append(sample.label)
            boxes.append(b)
            sizes.append(size)
            paths.append(sample.path)
        return {"image": image, "label": self._to_device(torch.tensor(labels, dtype=torch.long)),
                "boxes": boxes, "orig_size": sizes, "path": paths, "index": index,
                "skipped": self._skipped_of(k)}


def build_dali_loader(dataset, batch_size: int, train: bool, device="cuda", num_workers: int = 4, seed: int = 0,
                      drop_last: bool = False, channels_last: bool = False, skip_bad_images: bool | None = None,
                      distributed: bool | None = None, prefetch: int = 2) -> DaliLoader:
    """The DALI loader (see the module doc). num_workers = DALI CPU threads (and file-reading threads);
    distributed None = shard over the initialised process group (rank, world size), False = one shard."""
    from .. import distributed as dist_utils

    _import_dali()  # the install hint, before anything else
    sharded = dist_utils.is_distributed() if distributed is None else distributed
    if sharded and not dist_utils.is_distributed():
        raise RuntimeError("distributed=True needs an initialised process group (run under torchrun)")
    rank, world = (dist_utils.rank(), dist_utils.world_size()) if sharded else (0, 1)
    skip_bad = train if skip_bad_images is None else skip_bad_images
    return DaliLoader(dataset, batch_size, train, device, num_threads=num_workers, seed=seed, drop_last=drop_last,
                      channels_last=channels_last, skip_bad=skip_bad, rank=rank, world_size=world,
                      prefetch=prefetch)
