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
import os
import sys

import torch

from ..data.loader import build_loader
from ..engine.bench_loader import (BENCH_DATASETS, batches_forever, device_name, fixed_batches, library_versions,
                                   build_bench_dataset, make_train_step, measure_loader, measure_train_step)
from ..errors import UserError, require_cuda, warn
from ..files import write_json_atomic
from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder, dataset folder or .tar/.tar.gz archive")
    p.add_argument("--dataset", choices=BENCH_DATASETS, default="images",
                   help="layout of --data: images = any folder of image files (default), or a dataset name")
    p.add_argument("--split", default="train", help="split of a named dataset (default train)")
    p.add_argument("--metadata", default=None, help="wsolevaluation metadata (cub, ilsvrc), as for train")
    p.add_argument("--max-images", type=options.POSITIVE_INT, default=None, help="use only the first N images")
    p.add_argument("--img-size", type=options.img_size, default=224, help="square input size S (default 224)")
    p.add_argument("--batch-size", type=options.POSITIVE_INT, default=64, help="batch size (default 64)")
    p.add_argument("--num-workers", type=options.NON_NEGATIVE_INT, default=os.cpu_count() or 1,
                   help="torch loader processes = DALI CPU threads (default: all CPU cores)")
    p.add_argument("--loaders", default="torch,dali",
                   help="comma-separated loaders to measure: torch, dali (default torch,dali)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device (default cuda if available, else cpu)")
    p.add_argument("--batches", type=options.POSITIVE_INT, default=50, help="timed batches per measurement (default 50)")
    p.add_argument("--warmup", type=options.NON_NEGATIVE_INT, default=5, help="untimed batches first (default 5)")
    p.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the training step fed by each loader and with no loader (default on)")
    p.add_argument("--steps", type=options.POSITIVE_INT, default=None, help="timed training steps (default: --batches)")
    p.add_argument("--arch", choices=options.ARCHS, default="conformer_small_patch16",
                   help="model of the training step (default conformer_small_patch16)")
    p.add_argument("--method", choices=options.METHODS, default="dbc", help="WSOL method (default dbc)")
    p.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="bf16 autocast (default bf16)")
    p.add_argument("--channels-last", action="store_true", help="channels_last images and model")
    p.add_argument("--seed", type=int, default=0, help="seed of the loaders' order and augmentation (default 0)")
    p.add_argument("--json", default=None, metavar="FILE", type=options.out_file, help="also write the results as JSON")


def _print_line(loader: str, what: str, m: dict) -> None:
    print(f"{loader:>6} {what:<10} {m['images_per_s']:10.1f} images/s  ({m['images']} images in {m['seconds']:.2f} s)",
          flush=True)


def main(args) -> int:
    result = run(args)
    print(f"device: {result['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        require_cuda()
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = [name for name in loaders if name not in ("torch", "dali")]
    if unknown or not loaders:
        raise UserError(f"--loaders takes torch and/or dali, got {args.loaders!r}")
    dataset = build_bench_dataset(args)
    if len(dataset) < args.batch_size:
        raise UserError(f"{len(dataset)} images, fewer than --batch-size {args.batch_size}")
    steps = args.steps if args.steps is not None else args.batches
    result = {"command": "dbc-fast bench-loader " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench-loader"]
              else " ".join(sys.argv), "device": device_name(device), "versions": library_versions(),
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
            warn(f"{name}: {e}")
            result["loaders"][name] = {"error": str(e)}
            continue
        result["loaders"][name] = {"loader": measure_loader(loader, device, args.warmup, args.batches,
                                                                   desc=f"{name} loader")}
        _print_line(name, "loader", result["loaders"][name]["loader"])
        del loader

    if args.train_step:
        step = make_train_step(args, dataset.num_classes, device)
        working = [n for n in loaders if "error" not in result["loaders"][n]] or ["torch"]
        first = next(batches_forever(new_loader(working[0])))
        fixed = {"image": first["image"].to(device), "label": first["label"].to(device)}
        result["step_only"] = measure_train_step(step, fixed_batches(fixed), device, args.warmup, steps,
                                                 desc="train step alone")
        _print_line("(none)", "step only", result["step_only"])
        for name in loaders:
            if "error" in result["loaders"][name]:
                continue
            measured = measure_train_step(step, batches_forever(new_loader(name)), device, args.warmup, steps,
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
