"""`dbc-fast bench-loader`: images/s of each data loader, alone and feeding a full training step.

For each loader of --loaders (torch: DataLoader + PIL with --num-workers processes; dali: NVIDIA DALI with
--num-workers CPU threads, decoding on the GPU when --device is cuda) it measures, on the training
transform (resize, random crop, flip, normalise) of the given images:
  loader      images/s of the loader alone: batches pulled and (on a GPU) synchronised, nothing else;
  train step  images/s of forward + backward + AdamW step of the model fed by that loader;
and once, with no loader at all, `step only`: the images/s the training step consumes from a batch already
on the device. A loader keeps up with training when its `loader` rate is above `step only`.

--data is any dataset build_dataset reads (--dataset cub|ilsvrc|tiny-imagenet|folder) or, with the default
--dataset images, any folder (or .tar/.tar.gz) of image files: every image below it, labelled by its
top-level subfolder (ImageFolder layout) or all 0. --json FILE also writes the results with the device,
versions and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from ..progress import Progress

DATASETS = ("images", "cub", "ilsvrc", "tiny-imagenet", "folder")
ARCHS = ("conformer_tiny_patch16", "conformer_small_patch16", "conformer_small_patch32", "conformer_base_patch16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder, dataset folder or .tar/.tar.gz archive")
    p.add_argument("--dataset", choices=DATASETS, default="images",
                   help="layout of --data: images = any folder of image files (default), or a dataset name")
    p.add_argument("--split", default="train", help="split of a named dataset (default train)")
    p.add_argument("--metadata", default=None, help="wsolevaluation metadata (cub, ilsvrc), as for train")
    p.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    p.add_argument("--img-size", type=int, default=224, help="square input size S (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                   help="torch loader processes = DALI CPU threads (default: all CPU cores)")
    p.add_argument("--loaders", default="torch,dali",
                   help="comma-separated loaders to measure: torch, dali (default torch,dali)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device (default cuda if available, else cpu)")
    p.add_argument("--batches", type=int, default=50, help="timed batches per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (default 5)")
    p.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the training step fed by each loader and with no loader (default on)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default: --batches)")
    p.add_argument("--arch", choices=ARCHS, default="conformer_small_patch16",
                   help="model of the training step (default conformer_small_patch16)")
    p.add_argument("--method", choices=("dbc", "cls", "cam", "tscam"), default="dbc", help="WSOL method (default dbc)")
    p.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="bf16 autocast (default bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels_last images and model")
    p.add_argument("--seed", type=int, default=0, help="seed of the loaders' order and augmentation (default 0)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


# --------------------------------------------------------------------------------------------- data
def image_folder_dataset(root, img_size: int, max_images: int | None = None):
    """A training WSOLDataset of every image file below `root` (folder or archive): label = index of the
    top-level subfolder (sorted), or 0 for images directly in `root`; no boxes."""
    from .archive import resolve_root
    from .datasets import WSOLDataset
    from ..errors import DatasetError
    from .readers import NO_BOXES, Sample, is_image_file

    base = resolve_root(root)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(base) for f in names
                   if is_image_file(f) and not f.startswith("."))
    if not files:
        raise DatasetError("no image files (.jpg .jpeg .png .bmp .webp .tif .tiff) below this folder", base)
    if max_images is not None:
        files = files[:max_images]
    top = [os.path.relpath(f, base).split(os.sep) for f in files]
    classes = sorted({parts[0] for parts in top if len(parts) > 1}) or ["images"]
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(f, index.get(parts[0], 0) if len(parts) > 1 else 0, NO_BOXES, None)
               for f, parts in zip(files, top)]
    return WSOLDataset(samples, classes, img_size=img_size, train=True, name="images", split="all",
                       root=str(base))


def build_bench_dataset(args):
    if args.dataset == "images":
        return image_folder_dataset(args.data, args.img_size, args.max_images)
    from .datasets import WSOLDataset, build_dataset

    options = {"metadata": args.metadata} if args.metadata else {}
    ds = build_dataset(args.dataset, args.data, args.split, img_size=args.img_size, train=True, **options)
    if args.max_images is not None:
        ds = WSOLDataset(ds.samples[:args.max_images], ds.class_names, img_size=args.img_size, train=True,
                         name=ds.name, split=ds.split, root=ds.root)
    return ds


def _batches_forever(loader):
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
    it = _batches_forever(loader)
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
    import dbc_fast

    model = dbc_fast.create_model(args.arch, num_classes, method=args.method).to(device).train()
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


def _fixed_batches(batch):
    while True:
        yield batch


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import nvidia.dali as dali
        out["dali"] = dali.__version__
    except ImportError:
        out["dali"] = None
    import PIL
    out["pillow"] = PIL.__version__
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def run(args) -> dict:
    from .loader import build_loader

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench-loader: --device cuda but torch sees no CUDA device")
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = [name for name in loaders if name not in ("torch", "dali")]
    if unknown or not loaders:
        raise SystemExit(f"bench-loader: --loaders takes torch and/or dali, got {args.loaders!r}")
    dataset = build_bench_dataset(args)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"bench-loader: {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    steps = args.steps if args.steps is not None else args.batches
    result = {"command": "dbc-fast bench-loader " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench-loader"]
              else " ".join(sys.argv), "device": _device_name(device), "versions": _versions(),
              "data": str(args.data), "dataset": args.dataset, "images": len(dataset), "img_size": args.img_size,
              "batch_size": args.batch_size, "num_workers": args.num_workers, "amp": args.amp,
              "arch": args.arch if args.train_step else None, "loaders": {}}

    def new_loader(name):
        return build_loader(dataset, args.batch_size, train=True, loader=name, device=device,
                            num_workers=args.num_workers, seed=args.seed, drop_last=True, distributed=False,
                            channels_last=args.channels_last)

    for name in loaders:
        try:
            loader = new_loader(name)
        except ImportError as e:  # DALI not installed: say how to get it, measure the others
            print(f"bench-loader: {name}: {e}", file=sys.stderr)
            result["loaders"][name] = {"error": str(e)}
            continue
        result["loaders"][name] = {"loader": measure_loader(loader, device, args.warmup, args.batches,
                                                                   desc=f"{name} loader")}
        _print_line(name, "loader", result["loaders"][name]["loader"])
        del loader

    if args.train_step:
        step = make_train_step(args, dataset.num_classes, device)
        working = [n for n in loaders if "error" not in result["loaders"][n]] or ["torch"]
        first = next(_batches_forever(new_loader(working[0])))
        fixed = {"image": first["image"].to(device), "label": first["label"].to(device)}
        result["step_only"] = measure_train_step(step, _fixed_batches(fixed), device, args.warmup, steps,
                                                 desc="train step alone")
        _print_line("(none)", "step only", result["step_only"])
        for name in loaders:
            if "error" in result["loaders"][name]:
                continue
            measured = measure_train_step(step, _batches_forever(new_loader(name)), device, args.warmup, steps,
                                          desc=f"{name} loader + train step")
            result["loaders"][name]["train_step"] = measured
            _print_line(name, "train step", measured)

    rates = {n: r["loader"]["images_per_s"] for n, r in result["loaders"].items() if "loader" in r}
    if "torch" in rates and "dali" in rates:
        result["dali_over_torch"] = rates["dali"] / rates["torch"]
        print(f"dali / torch loader images/s: {result['dali_over_torch']:.2f}x")
    if "step_only" in result:
        for name, rate in rates.items():
            keeps_up = rate >= result["step_only"]["images_per_s"]
            print(f"{name} loader {'keeps up with' if keeps_up else 'is slower than'} the training step "
                  f"({rate:.1f} vs {result['step_only']['images_per_s']:.1f} images/s)")
    return result


def _print_line(loader: str, what: str, m: dict) -> None:
    print(f"{loader:>6} {what:<10} {m['images_per_s']:10.1f} images/s  ({m['images']} images in {m['seconds']:.2f} s)",
          flush=True)


def main(args) -> int:
    result = run(args)
    print(f"device: {result['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0
