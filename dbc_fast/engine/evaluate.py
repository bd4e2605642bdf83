"""`dbc-fast eval`: every WSOL figure of the paper for a checkpoint, on a dataset split.

For each map the method has (M = the final map, M_a = attention map, M_c = CNN map; cam/tscam have M only):
Top-1/Top-5 Cls, GT-known / Top-1 / Top-5 Loc at --cam-threshold and at the best threshold of a sweep,
MaxBoxAccV2 and its per-IoU accuracies, and on a dataset with masks (voc-seg) PxAP and foreground IoU /
precision / recall (Table 11) at --mask-threshold and at the best threshold, computed by dbc_fast.metrics
(wsolevaluation conventions). Maps are
asked for the ground-truth class (`map_classes=labels`) as wsolevaluation does; class-agnostic maps (dbc,
cls) ignore it. Prints one line per figure (`GT-known Loc (M): 57.30`) and writes OUT/metrics.json.
The best-threshold figures (best-threshold Loc, MaxBoxAccV2) take their map thresholds from the evaluated
split itself, or with --threshold-from SPLIT from another split (e.g. val) and are then reported on the
evaluated split at those thresholds; the output says which.
Under torchrun every rank evaluates its shard and rank 0 computes the metrics from all of them (the same
numbers as one process).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from .. import distributed as dist_utils

MAP_NAMES = {"map": "M", "map_a": "M_a", "map_c": "M_c"}
# metric key (as dbc_fast.metrics computes it) -> the paper's name, in print order
FIGURES = (
    ("top1_cls", "Top-1 Cls"), ("top5_cls", "Top-5 Cls"),
    ("gt_known_loc", "GT-known Loc"), ("top1_loc", "Top-1 Loc"), ("top5_loc", "Top-5 Loc"),
    ("threshold", "map threshold"),
    ("best_gt_known_loc", "GT-known Loc, best threshold"), ("best_top1_loc", "Top-1 Loc, best threshold"),
    ("best_top5_loc", "Top-5 Loc, best threshold"), ("best_threshold", "best map threshold"),
    ("MaxBoxAccV2", "MaxBoxAccV2"),
    ("MaxBoxAcc@30", "MaxBoxAcc IoU 0.3"), ("MaxBoxAcc@50", "MaxBoxAcc IoU 0.5"),
    ("MaxBoxAcc@70", "MaxBoxAcc IoU 0.7"),
    ("PxAP", "PxAP"),
    ("mask_IoU", "foreground IoU"), ("mask_precision", "foreground precision"), ("mask_recall", "foreground recall"),
    ("mask_threshold", "mask threshold"),
    ("mask_best_IoU", "foreground IoU, best threshold"),
    ("mask_best_precision", "foreground precision, best threshold"),
    ("mask_best_recall", "foreground recall, best threshold"), ("mask_best_threshold", "best mask threshold"),
    ("background_IoU", "background IoU"), ("background_precision", "background precision"),
    ("background_recall", "background recall"),
)
# MaskEvaluator key -> the key in the results (its threshold keys would clash with the box figures')
MASK_KEYS = {"PxAP": "PxAP", "IoU": "mask_IoU", "precision": "mask_precision", "recall": "mask_recall",
             "threshold": "mask_threshold", "best_IoU": "mask_best_IoU", "best_precision": "mask_best_precision",
             "best_recall": "mask_best_recall", "best_threshold": "mask_best_threshold",
             "background_IoU": "background_IoU", "background_precision": "background_precision",
             "background_recall": "background_recall"}
DEFAULT_SWEEP = tuple(round(0.01 * i, 2) for i in range(100))  # 0.00 .. 0.99, wsolevaluation's grid


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import cli
    from ..data import DATASET_NAMES
    from .train import add_data_arguments

    add_data_arguments(p)
    for action in p._actions:  # eval takes every layout build_dataset reads, mask sets included
        if action.dest == "dataset":
            action.choices = DATASET_NAMES
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


# ------------------------------------------------------------------------------------------ the metrics


class MapMetrics:
    """The evaluators of one map: Cls/Loc at the chosen threshold (and the sweep), MaxBoxAccV2, and with
    mask_threshold the mask figures (PxAP, foreground IoU / precision / recall; keys as MASK_KEYS)."""

    def __init__(self, cam_threshold: float, sweep, box_eval: bool, mask_threshold: float | None = None,
                 mask_interval: float = 0.01):
        from ..metrics import BoxEvaluator, LocalizationEvaluator, MaskEvaluator

        self.cam_threshold = cam_threshold
        # with a sweep, compute() adds the threshold of the highest GT-known Loc and its figures
        self.loc = LocalizationEvaluator(cam_thresholds=list(sweep) if sweep else None)
        self.box = BoxEvaluator() if box_eval else None
        self.mask = None if mask_threshold is None else MaskEvaluator(mask_interval, threshold=mask_threshold)

    def accumulate(self, logits, labels, maps, boxes, image_size, masks=None):
        # maps are resized (bicubic) to the evaluation image size, where the boxes and masks are
        self.loc.accumulate(logits, labels, maps, boxes, self.cam_threshold, image_size=image_size)
        if self.box is not None:
            self.box.accumulate(maps, boxes, image_size=image_size)
        if self.mask is not None:
            if masks is None:
                raise ValueError("MapMetrics with mask_threshold needs the masks of every batch")
            self.mask.accumulate(maps, masks)

    def compute(self, chosen: dict | None = None) -> dict:
        """The figures; with `chosen` ({"best_threshold": t, "best_threshold@30": t30, ...}, thresholds picked
        on another split) the best-threshold Loc and MaxBoxAcc figures are those at the chosen thresholds."""
        out = self.loc.compute()
        if self.box is not None:
            out.update(self.box.compute())
        if chosen is not None:
            out.update(self._at_thresholds(chosen))
        if self.mask is not None:
            out.update({MASK_KEYS[k]: v for k, v in self.mask.compute().items() if k in MASK_KEYS})
        return out


    def _at_thresholds(self, chosen: dict) -> dict:
        # the evaluators count every threshold of their grids; read the counts at the chosen ones
        def index(grid, t):
            j = int(np.argmin(np.abs(np.asarray(grid, np.float64) - t)))
            if abs(grid[j] - t) > 1e-6:
                raise ValueError(f"map threshold {t} is not on this evaluation's grid (same --sweep-interval?)")
            return j

        loc, out = self.loc, {}
        offset = 0 if loc.fixed_threshold is None else 1  # the fixed threshold comes first in loc.thresholds
        j = offset + index(loc.thresholds[offset:], chosen["best_threshold"])
        k = loc.topk
        out.update({"best_threshold": loc.thresholds[j], "best_gt_known_loc": loc.gt_known[j] * 100.0 / loc.count,
                    "best_top1_loc": loc.top1_loc[j] * 100.0 / loc.count,
                    f"best_top{k}_loc": loc.topk_loc[j] * 100.0 / loc.count})
        if self.box is not None:
            accs = []
            for iou in self.box.iou_thresholds:
                t = chosen[f"best_threshold@{iou}"]
                acc = self.box.num_correct[iou][index(self.box.cam_thresholds, t)] * 100.0 / self.box.count
                out.update({f"MaxBoxAcc@{iou}": acc, f"best_threshold@{iou}": t})
                accs.append(acc)
            out["MaxBoxAccV2"] = float(np.average(accs))
        return {key: float(v) for key, v in out.items()}


class NonFiniteMaps(RuntimeError):
    """A localization map with NaN/inf values: a broken model, whose maps would silently score as misses."""


@torch.no_grad()
def evaluate_model(model, loader, device, amp: str = "none", cam_threshold: float = 0.2,
                   map_keys=("map", "map_a", "map_c"), box_eval: bool = True, threshold_sweep=DEFAULT_SWEEP,
                   progress: bool = True, mask_threshold: float = 0.3, mask_interval: float = 0.01,
                   allow_nonfinite_maps: bool = False, chosen_thresholds: dict | None = None) -> dict:
    """{"M": {...}, "M_a": {...}, "M_c": {...}} of the maps the model gives, over every sample of `loader`
    (all ranks' shards). Batches with "mask" (a mask set) add the mask figures. chosen_thresholds: per map
    name, the thresholds of the best-threshold figures picked on another split (see chosen_thresholds()),
    else they are the best ones on these samples. Every rank gets the same
    result. A map with NaN/inf values raises NonFiniteMaps, unless allow_nonfinite_maps: then it is scored as
    an empty map (a miss) and counted in each map's "nonfinite_maps"."""
    from ..progress import Progress

    was_training = model.training
    model.eval()
    if threshold_sweep is True:
        threshold_sweep = DEFAULT_SWEEP
    elif threshold_sweep is False:
        threshold_sweep = ()
    main = dist_utils.is_main()
    evaluators: dict = {}
    nonfinite: dict = {}
    n_batches = dist_utils.all_reduce_max(len(loader))  # shards may differ by one batch
    it = iter(loader)
    bar = Progress(n_batches, "evaluating", unit="batch", enabled=main and progress)
    for _ in range(n_batches):
        batch = next(it, None)
        local = None
        if batch is not None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                outputs = model(batch["image"], map_classes=batch["label"])
            local = {"logits": outputs["logits"].float().cpu(), "labels": batch["label"].cpu(),
                     "image_size": tuple(batch["image"].shape[-2:]),
                     "boxes": [b.cpu() for b in batch["boxes"]],
                     "maps": {k: outputs[k].float().cpu() for k in map_keys if outputs.get(k) is not None},
                     "masks": batch["mask"].cpu() if "mask" in batch else None}
        parts = dist_utils.all_gather_objects(local)
        if main:
            for part in parts:
                if part is None:
                    continue
                for key, maps in part["maps"].items():
                    bad = int((~torch.isfinite(maps.flatten(1)).all(1)).sum())
                    nonfinite[key] = nonfinite.get(key, 0) + bad
                    if bad and not allow_nonfinite_maps:
                        raise NonFiniteMaps(f"{bad} of {len(maps)} {MAP_NAMES[key]} maps in a batch hold NaN/inf "
                                            f"values: the model is broken (its maps would count as misses); "
                                            f"pass --allow-nonfinite-maps to score them as empty maps")
                    if key not in evaluators:
                        with_masks = part["masks"] is not None
                        evaluators[key] = MapMetrics(cam_threshold, threshold_sweep, box_eval,
                                                     mask_threshold if with_masks else None, mask_interval)
                    evaluators[key].accumulate(part["logits"], part["labels"], maps, part["boxes"],
                                               part["image_size"], masks=part["masks"])
        bar.update(1)
    bar.close()
    chosen_thresholds = chosen_thresholds or {}
    results = {MAP_NAMES[k]: {**ev.compute(chosen_thresholds.get(MAP_NAMES[k])), "nonfinite_maps": nonfinite.get(k, 0)}
               for k, ev in evaluators.items()} if main else None
    if was_training:
        model.train()
    return dist_utils.broadcast_object(results)


def chosen_thresholds(results: dict) -> dict:
    """Per map name, the map thresholds of its best-threshold figures in `results` (of evaluate_model)."""
    return {name: {key: figures[key] for key in figures if key.startswith("best_threshold")}
            for name, figures in results.items()}


def headline(metrics: dict, map_name: str) -> str:
    return (f"Top-1 Cls {metrics['top1_cls']:.2f}, GT-known Loc ({map_name}) {metrics['gt_known_loc']:.2f}, "
            f"Top-1 Loc ({map_name}) {metrics['top1_loc']:.2f}")


def format_results(results: dict) -> list[str]:
    """One line per figure, named as in the paper: `Top-1 Cls: 80.10`, then per map `GT-known Loc (M): 57.30`
    (classification does not depend on the map, so it is printed once)."""
    lines = []
    for map_name, metrics in results.items():
        if not lines:
            lines += [f"{name}: {metrics[key]:.2f}" for key, name in FIGURES[:2] if key in metrics]
        for key, name in FIGURES[2:]:
            if key in metrics:
                digits = 2 if "threshold" not in key else 3
                lines.append(f"{name} ({map_name}): {metrics[key]:.{digits}f}")
    return lines


def _sweep(interval: float):
    if interval <= 0:
        return ()
    if interval >= 1:
        raise SystemExit(f"--sweep-interval must be in (0, 1), got {interval}")
    return tuple(round(float(t), 6) for t in np.arange(0, 1, interval))


def default_split(dataset: str) -> str:
    # the split the paper reports: CUB test, ILSVRC val (called "test" in wsolevaluation's metadata);
    # Tiny ImageNet only has val; VOC's segmentation test masks are not public, so val.
    return "val" if dataset in ("tiny-imagenet", "voc-seg") else "test"


def check_classes(data_names, config: dict, data: str, checkpoint: str) -> None:
    """The data's classes must be the checkpoint's, in the same order (by name, not only by count): class i
    of the model is class i of the labels, or every metric is silently wrong."""
    data_names = list(data_names)
    if len(data_names) != config["num_classes"]:
        raise SystemExit(f"{data} has {len(data_names)} classes but {checkpoint} was trained for "
                         f"{config['num_classes']}")
    trained = config.get("class_names")
    if trained is None:  # a checkpoint without names: only the count can be checked
        return
    if list(trained) != data_names:
        i = next(i for i, (a, b) in enumerate(zip(trained, data_names)) if a != b)
        how = "in another order" if sorted(trained) == sorted(data_names) else "with other names"
        raise SystemExit(f"{data} has the classes of {checkpoint} {how}: class {i} is {data_names[i]!r} in the "
                         f"data but {trained[i]!r} in the checkpoint")


def main(args) -> int:
    from ..data import build_dataset
    from ..data.loader import build_loader
    from .checkpoint import load_model
    from ..data.datasets import first_samples
    from .train import dataset_options

    missing = [f"--{k}" for k in ("dataset", "data", "checkpoint", "out") if not getattr(args, k, None)]
    if missing:
        raise SystemExit(f"dbc-fast eval: missing required option(s) {', '.join(missing)}")
    if args.img_size % 32:
        raise SystemExit(f"--img-size must be a multiple of 32, got {args.img_size}")
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
            raise SystemExit(f"dbc-fast eval: {args.dataset} has masks, which the DALI loader does not read; "
                             "use --loader torch")
        loader_name = "torch"
    if not 0 <= args.mask_threshold <= 1:
        raise SystemExit(f"--mask-threshold must be in [0, 1], got {args.mask_threshold}")
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
            raise SystemExit(f"--threshold-from {threshold_split} is the evaluated split itself; name another "
                             f"split (or leave the option out)")
        if args.sweep_interval <= 0:
            raise SystemExit("--threshold-from needs the threshold sweep (--sweep-interval > 0)")
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
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
        print(f"{config['arch']}/{config['method']} on {args.dataset} {split} ({len(dataset)} images):")
        for line in format_results(results):
            print(line)
        print(threshold_note)
        for name, figures in results.items():
            if figures.get("nonfinite_maps"):
                print(f"WARNING: {figures['nonfinite_maps']} of {len(dataset)} {name} maps held NaN/inf values and "
                      f"were scored as misses", file=sys.stderr)
        print(f"wrote {path}")
    dist_utils.cleanup()
    return 0
