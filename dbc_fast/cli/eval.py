"""`dbc-fast eval`: every WSOL figure of the paper for a checkpoint, on a dataset split (see dbc_fast.engine.evaluate
for the figures and their conventions). Prints one line per figure and writes OUT/metrics.json."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from .. import distributed as dist_utils
from ..data import build_dataset
from ..data.datasets import first_samples
from ..data.loader import build_loader
from ..engine.checkpoint import load_model
from ..engine.evaluate import MAP_NAMES, chosen_thresholds, evaluate_model, format_results
from ..engine.train import dataset_options
from ..errors import UserError, warn
from ..files import write_json_atomic
from . import options
from .options import add_data_arguments, check_classes, default_split


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--split", default="auto",
                   help="split to evaluate: test (cub, ilsvrc) / val (tiny-imagenet, voc-seg) by default (auto)")
    p.add_argument("--checkpoint", help="dbc_fast checkpoint (best.pt / last.pt) (required)")
    p.add_argument("--batch-size", type=options.POSITIVE_INT, default=64, help="images per batch per process (default 64)")
    p.add_argument("--out", type=options.out_dir, help="folder for metrics.json (required)")
    p.add_argument("--cam-threshold", type=options.FRACTION, default=0.2, help="map threshold for the boxes (default 0.2)")
    p.add_argument("--sweep-interval", type=options.bounded(float, 0, 1, high_open=True), default=0.01,
                   help="map thresholds 0, i, 2i, .. < 1 tried for the best-threshold figures (default 0.01; 0 = skip)")
    p.add_argument("--maps", nargs="+", choices=("M", "M_a", "M_c"), default=["M", "M_a", "M_c"],
                   help="maps to evaluate, where the method has them (default all)")
    p.add_argument("--no-maxboxacc", action="store_true", help="skip MaxBoxAccV2 (the slowest part)")
    p.add_argument("--threshold-from", default=None, metavar="SPLIT",
                   help="choose the best-threshold figures' map thresholds (best-threshold Loc, MaxBoxAccV2 per "
                        "IoU) on SPLIT, e.g. val (cub/ilsvrc with --metadata), and report the evaluated split at "
                        "them (default: chosen on the evaluated split itself, an optimistic figure)")
    p.add_argument("--mask-threshold", type=options.FRACTION, default=0.3,
                   help="map threshold for the foreground IoU / precision / recall of a mask set (default 0.3, "
                        "C2AM's cut for its background cues)")
    p.add_argument("--missing-images", choices=("error", "skip"), default="error",
                   help="an annotated image missing on disk: stop (error, default) or leave it out with a warning")
    p.add_argument("--allow-nonfinite-maps", action="store_true",
                   help="score maps with NaN/inf values as empty maps (misses) instead of stopping; their count "
                        "is reported")
    p.add_argument("--limit-images", type=options.POSITIVE_INT, default=None, help="evaluate the first N images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sweep(interval: float):
    if interval <= 0:
        return ()
    if interval >= 1:
        raise UserError(f"--sweep-interval must be in (0, 1), got {interval}")
    return tuple(round(float(t), 6) for t in np.arange(0, 1, interval))


def main(args) -> int:
    options.require_options(args, "dataset", "data", "checkpoint", "out")
    device = dist_utils.setup(args.device)
    model, config = load_model(args.checkpoint, device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    split = default_split(args.dataset) if args.split == "auto" else args.split
    dataset = first_samples(build_dataset(args.dataset, args.data, split, img_size=args.img_size, train=False,
                                   missing_images=args.missing_images, **dataset_options(args)),
                     args.limit_images)
    check_classes(dataset.class_names, config, args.data, args.checkpoint)
    loader_name = args.loader
    if any(getattr(s, "mask", None) for s in dataset.samples):  # masks come through the torch loader only
        if loader_name == "dali":
            raise UserError(f"{args.dataset} has masks, which the DALI loader does not read; "
                             "use --loader torch")
        loader_name = "torch"
    if not 0 <= args.mask_threshold <= 1:
        raise UserError(f"--mask-threshold must be in [0, 1], got {args.mask_threshold}")
    loader = build_loader(dataset, args.batch_size, train=False, loader=loader_name, device=device,
                          num_workers=args.num_workers, channels_last=args.channels_last)
    inv = {v: k for k, v in MAP_NAMES.items()}
    t0 = time.perf_counter()

    def run(eval_loader, chosen=None):
        return evaluate_model(model, eval_loader, device, amp=args.amp, cam_threshold=args.cam_threshold,
                              map_keys=tuple(inv[m] for m in args.maps), box_eval=not args.no_maxboxacc,
                              threshold_sweep=_sweep(args.sweep_interval), progress=not args.no_progress,
                              mask_threshold=args.mask_threshold,
                              mask_interval=args.sweep_interval if args.sweep_interval > 0 else 0.01,
                              allow_nonfinite_maps=args.allow_nonfinite_maps, chosen_thresholds=chosen)

    threshold_split, threshold_results, chosen, threshold_images = split, None, None, len(dataset)
    if args.threshold_from:
        threshold_split = args.threshold_from
        if threshold_split == split:
            raise UserError(f"--threshold-from {threshold_split} is the evaluated split itself; name another "
                             f"split (or leave the option out)")
        if args.sweep_interval <= 0:
            raise UserError("--threshold-from needs the threshold sweep (--sweep-interval > 0)")
        picking = first_samples(build_dataset(args.dataset, args.data, threshold_split, img_size=args.img_size,
                                       train=False, missing_images=args.missing_images, **dataset_options(args)),
                         args.limit_images)
        check_classes(picking.class_names, config, args.data, args.checkpoint)
        threshold_images = len(picking)
        threshold_results = run(build_loader(picking, args.batch_size, train=False, loader=loader_name,
                                             device=device, num_workers=args.num_workers,
                                             channels_last=args.channels_last))
        chosen = chosen_thresholds(threshold_results)
    results = run(loader, chosen)
    elapsed = time.perf_counter() - t0
    threshold_note = (f"best-threshold figures (Loc, MaxBoxAccV2): map thresholds chosen on {threshold_split} "
                      f"({threshold_images} images), reported on {split}" if args.threshold_from else
                      f"best-threshold figures (Loc, MaxBoxAccV2): map thresholds chosen on {split} itself "
                      f"(optimistic; --threshold-from val chooses them on a validation split)")
    if dist_utils.is_main():
        os.makedirs(args.out, exist_ok=True)
        report = {"checkpoint": os.path.abspath(args.checkpoint), "dataset": args.dataset, "data": args.data,
                  "split": split, "images": len(dataset), "img_size": args.img_size,
                  "arch": config["arch"], "method": config["method"], "metrics": results,
                  "threshold_from": threshold_split, "threshold_note": threshold_note,
                  "time_s": elapsed}
        if threshold_results is not None:
            report["threshold_split_images"] = threshold_images
            report["threshold_split_metrics"] = threshold_results
        path = os.path.join(args.out, "metrics.json")
        write_json_atomic(path, report)
        print(f"{config['arch']}/{config['method']} on {args.dataset} {split} ({len(dataset)} images):")
        for line in format_results(results):
            print(line)
        print(threshold_note)
        for name, figures in results.items():
            if figures.get("nonfinite_maps"):
                warn(f"{figures['nonfinite_maps']} of {len(dataset)} {name} maps held NaN/inf values and were "
                     f"scored as misses")
        print(f"wrote {path}")
    dist_utils.cleanup()
    return 0
