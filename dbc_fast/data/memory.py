"""A whole dataset decoded once into one uint8 tensor on the device, batches cut from it there.

For sets that fit in device memory (Tiny ImageNet: 50,000 images at 146x146 are 3.2 GB; CUB at 256 is 1.2 GB)
this removes the loader from the training step: no decoding, no host-to-device copies, no worker processes.
The pixels are those of the torch loader: every image is decoded with `load_image` and resized with PIL's
bilinear filter to the size the transforms use (R x R = train_resize_size(S) for training, S x S for
evaluation), once, by a pool of worker processes. Training batches then
take the paper's augmentation on the device: a random S x S crop of the R x R image and a horizontal flip
with probability 0.5, per image, from a generator seeded by (seed, epoch), and the ImageNet normalisation.
Evaluation batches are the S x S images in order with their boxes scaled to S, as `collate` gives them, so
`engine.evaluate.evaluate_model` takes this loader as it is.
"""
from __future__ import annotations

import os
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat

import numpy as np
import torch
from PIL import Image

from ..errors import warn
from ..progress import Progress
from .datasets import WSOLDataset, boxes_for_decoded_size
from .images import load_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, scale_boxes, train_resize_size


def _decode_chunk(samples: list, side: int, train: bool) -> tuple[np.ndarray, list, list]:
    """uint8 [len(samples), side, side, 3] (PIL bilinear resize), each image's (size, boxes), and the
    warnings about boxes (for the main process to give)."""
    pixels = np.empty((len(samples), side, side, 3), np.uint8)
    meta, notes = [], []
    for i, sample in enumerate(samples):
        image = load_image(sample.path)
        meta.append(boxes_for_decoded_size(sample, image.size, train=train, notes=notes))
        pixels[i] = np.asarray(image.resize((side, side), Image.BILINEAR))
    return pixels, meta, notes


def _decode_all(dataset: WSOLDataset, side: int, train: bool, num_workers: int,
                progress: bool) -> tuple[np.ndarray, list]:
    """Every image of `dataset` decoded and resized, by `num_workers` processes (threads would serialise on the
    GIL: small images cost more Python than decoding), in chunks, in order."""
    n = len(dataset)
    pixels = np.empty((n, side, side, 3), np.uint8)
    meta: list = []
    chunk = max(64, min(1024, -(-n // max(1, num_workers * 4))))
    starts = range(0, n, chunk)
    bar = Progress(n, f"decoding {dataset.name} {dataset.split}", unit="image", enabled=progress)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with bar, ProcessPoolExecutor(num_workers, mp_context=context) if num_workers > 1 else _Serial() as pool:
        for start, (block, block_meta, notes) in zip(starts, pool.map(
                _decode_chunk, (dataset.samples[s:s + chunk] for s in starts), repeat(side), repeat(train))):
            pixels[start:start + len(block)] = block
            meta.extend(block_meta)
            for note in notes:
                warn(note)
            bar.update(len(block))
    return pixels, meta


class _Serial:
    """In-process stand-in for a one-worker pool."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, *iterables):
        return map(fn, *iterables)


class DeviceDataset:
    """`dataset` (a WSOLDataset) held on `device` as uint8: `train_batches` for training, iteration for evaluation.

    train=True stores R x R images (R = train_resize_size(S)) for random crops; train=False stores S x S images
    and the boxes scaled to S (float32, as EvalTransform gives them).
    """

    def __init__(self, dataset: WSOLDataset, device: torch.device | str, train: bool, batch_size: int = 256,
                 channels_last: bool = False, num_workers: int | None = None, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.train, self.batch_size = dataset, train, batch_size
        self.device = torch.device(device)
        self.img_size = dataset.img_size
        self.channels_last = channels_last
        side = train_resize_size(self.img_size) if train else self.img_size
        pixels, meta = _decode_all(dataset, side, train, num_workers or min(16, os.cpu_count() or 1), progress)
        self.images = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2)  # [N,3,side,side], NHWC memory
        self.labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.long, device=self.device)
        self.orig_sizes = [tuple(size) for size, _ in meta]
        self.boxes = [torch.from_numpy(scale_boxes(boxes, size, side, side).astype(np.float32))
                      for size, boxes in meta]
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __len__(self) -> int:
        """Evaluation batches (the last one may be short)."""
        return -(-len(self.labels) // self.batch_size)

    def _normalize(self, uint8_images: torch.Tensor) -> torch.Tensor:
        # the arithmetic of to_tensor + normalize, so the pixels are bit-identical to the torch loader's
        x = (uint8_images.float().div(255) - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def train_steps(self) -> int:
        """Batches per epoch of `train_batches` (the last partial batch is dropped)."""
        return len(self.labels) // self.batch_size

    def train_batches(self, epoch: int, seed: int = 0, start_step: int = 0):
        """The epoch's batches {"image" [B,3,S,S] float32 normalised, "label" [B]}: a permutation, random crops
        and flips drawn from a device generator seeded by (seed, epoch), so an epoch is the same whatever step it
        is resumed from."""
        if not self.train:
            raise RuntimeError("train_batches needs a DeviceDataset built with train=True")
        s, r = self.img_size, self.images.shape[-1]
        n, steps = len(self.labels), self.train_steps()
        gen = torch.Generator(device=self.device).manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, device=self.device, generator=gen)
        left = torch.randint(0, r - s + 1, (n,), device=self.device, generator=gen)
        top = torch.randint(0, r - s + 1, (n,), device=self.device, generator=gen)
        flip = torch.rand(n, device=self.device, generator=gen) < 0.5
        offsets = torch.arange(s, device=self.device)
        channels = torch.arange(3, device=self.device).view(1, 3, 1, 1)
        for step in range(start_step, steps):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            rows = (top[idx, None] + offsets).view(-1, 1, s, 1)
            cols = torch.where(flip[idx, None], left[idx, None] + s - 1 - offsets, left[idx, None] + offsets)
            crops = self.images[idx.view(-1, 1, 1, 1), channels, rows, cols.view(-1, 1, 1, s)]
            yield {"image": self._normalize(crops), "label": self.labels[idx]}

    def __iter__(self):
        """Evaluation batches in dataset order, as `collate` gives them (images normalised on the device)."""
        for start in range(0, len(self.labels), self.batch_size):
            stop = min(start + self.batch_size, len(self.labels))
            yield {"image": self._normalize(self.images[start:stop]), "label": self.labels[start:stop],
                   "boxes": self.boxes[start:stop], "orig_size": self.orig_sizes[start:stop],
                   "path": [self.dataset.samples[i].path for i in range(start, stop)],
                   "index": torch.arange(start, stop), "skipped": []}
