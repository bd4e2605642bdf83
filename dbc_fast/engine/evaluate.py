"""Evaluation of a model on a loader: every WSOL figure of the paper (behind `dbc-fast eval` and per-epoch validation).

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


