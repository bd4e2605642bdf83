"""Images/s of the data loaders, alone and feeding a full training step (behind `dbc-fast bench-loader`, whose
docstring says what each figure is)."""
from __future__ import annotations

import os
import platform
import time

import torch

from ..data.datasets import DATASET_NAMES, WSOLDataset, build_dataset, image_folder_dataset
from ..models import create_model
from ..progress import Progress

# images: any folder of image files; voc-seg is an evaluation set (no train split)
BENCH_DATASETS = ("images",) + tuple(name for name in DATASET_NAMES if name != "voc-seg")


# --------------------------------------------------------------------------------------------- data
def build_bench_dataset(args):
    if args.dataset == "images":
        return image_folder_dataset(args.data, args.img_size, args.max_images)
    options = {"metadata": args.metadata} if args.metadata else {}
    ds = build_dataset(args.dataset, args.data, args.split, img_size=args.img_size, train=True, **options)
    if args.max_images is not None:
        ds = WSOLDataset(ds.samples[:args.max_images], ds.class_names, img_size=args.img_size, train=True,
                         name=ds.name, split=ds.split, root=ds.root)
    return ds


def batches_forever(loader):
    """Batches across epochs (small folders end before the measurement does)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the loader gave no batch: fewer images than --batch-size?")
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------- measurements
def measure_loader(loader, device, warmup: int, batches: int, desc: str = "") -> dict:
    """images/s of pulling `batches` batches after `warmup` (timed from the first timed batch request);
    with `desc`, progress on stderr (see dbc_fast.progress)."""
    it = batches_forever(loader)
    with Progress(warmup + batches, desc, unit="batch", enabled=bool(desc)) as bar:
        for _ in range(warmup):
            next(it)
            bar.update()
        _sync(device)
        images = 0
        t0 = time.perf_counter()
        for _ in range(batches):
            images += len(next(it)["index"])
            bar.update()
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def make_train_step(args, num_classes: int, device: torch.device):
    """A training step on (images, labels) like the trainer's: autocast forward, backward, AdamW step."""
    model = create_model(args.arch, num_classes, method=args.method).to(device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=5e-4)

    def step(images, labels):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = model(images, labels=labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_train_step(step, batches, device, warmup: int, steps: int, desc: str = "") -> dict:
    images = 0
    with Progress(warmup + steps, desc, unit="step", enabled=bool(desc)) as bar:
        for _ in range(warmup):
            b = next(batches)
            step(b["image"], b["label"])
            bar.update()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            b = next(batches)
            bar.update()
            if len(b["label"]) == 0:
                continue
            step(b["image"], b["label"])
            images += len(b["label"])
        _sync(device)
        seconds = time.perf_counter() - t0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def fixed_batches(batch):
    while True:
        yield batch


def library_versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import nvidia.dali as dali
        out["dali"] = dali.__version__
    except ImportError:
        out["dali"] = None
    import PIL
    out["pillow"] = PIL.__version__
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


