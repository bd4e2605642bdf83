"""WSOL metrics with clovaai/wsolevaluation's conventions (tests/test_metrics.py checks equality).

Pipeline for one image (what wsolevaluation's inference.py + evaluation.py do):
1. map -> float64; resized to the evaluation image size with cv2.resize(..., INTER_CUBIC) unless it
   already has that size;
2. min-max normalised (a constant or NaN map becomes all zeros);
3. scoremap = uint8(map * 255) (truncation); for a threshold t the binary mask is
   scoremap > int(t * max(scoremap)) (cv2.THRESH_BINARY is strict);
4. cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE); no contour -> the box (0, 0, 0, 0); otherwise the
   bounding rectangle of the largest contour (cv2.contourArea; first one on ties), or of every contour
   with multi_contour; a rectangle x, y, w, h -> (x, y, min(x + w, W - 1), min(y + h, H - 1));
5. IoU with the +1 pixel convention (a box x0..x1 covers x1 - x0 + 1 pixels); an image counts as
   correct when the best IoU over its GT boxes (and over its predicted boxes with multi_contour) is
   >= the IoU threshold (0.5, or t / 100 for t in 30, 50, 70).
GT boxes are given in the pixels of the evaluation image (the dataset's eval boxes, scaled as x * S / w)
and truncated to integers as wsolevaluation's resize_bbox does.
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import cv2
import numpy as np

__all__ = ["BoxEvaluator", "LocalizationEvaluator", "MaskEvaluator", "extract_boxes", "iou_matrix", "normalize_map",
           "prepare_map", "resize_map", "cam_threshold_grid"]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, any device / dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def cam_threshold_grid(interval: float = 0.01) -> np.ndarray:
    """The map thresholds wsolevaluation scans: np.arange(0, 1, interval) (0.00, 0.01, ..., 0.99)."""
    return np.arange(0, 1, interval)


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float64; NaN or constant maps give zeros (wsolevaluation normalize_scoremap)."""
    m = np.array(m, dtype=np.float64)  # a copy
    if np.isnan(m).any() or m.min() == m.max():
        return np.zeros_like(m)
    m -= m.min()
    m /= m.max()
    return m


def resize_map(m: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bicubic resize (cv2.INTER_CUBIC, as wsolevaluation) of a [h, w] map to size = S or (H, W)."""
    height, width = (size, size) if np.isscalar(size) else size
    m = np.asarray(m, dtype=np.float64)
    if m.shape == (height, width):
        return m
    return cv2.resize(m, (int(width), int(height)), interpolation=cv2.INTER_CUBIC)


def prepare_map(m, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """float64, resized to `size` (if given), min-max normalised: the score map wsolevaluation evaluates."""
    m = _to_numpy(m).astype(np.float64)
    if m.ndim != 2:
        raise ValueError(f"a localization map must be 2-D [h, w], got shape {m.shape}")
    if size is not None:
        m = resize_map(m, size)
    return normalize_map(m)


def _scoremap_uint8(normalized: np.ndarray) -> np.ndarray:
    return (normalized * 255).astype(np.uint8)


def _boxes_from_uint8(score: np.ndarray, threshold: float, multi_contour: bool) -> np.ndarray:
    height, width = score.shape
    _, mask = cv2.threshold(score, int(threshold * score.max()), 255, cv2.THRESH_BINARY)  # strict: > thresh
    contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return np.zeros((1, 4), np.int64)
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes, np.int64)


def _boxes_at_thresholds(normalized: np.ndarray, thresholds: Iterable[float], multi_contour: bool) -> list:
    score = _scoremap_uint8(normalized)
    cache: dict[int, np.ndarray] = {}  # thresholds that round to the same integer give the same mask
    out = []
    peak = int(score.max())
    for t in thresholds:
        key = int(t * peak)
        if key not in cache:
            cache[key] = _boxes_from_uint8(score, t, multi_contour)
        out.append(cache[key])
    return out


def extract_boxes(m, threshold: float, multi_contour: bool = False) -> np.ndarray:
    """Boxes [k, 4] int64 (x0, y0, x1, y1, inclusive, in pixels of `m`) of a map at a threshold in [0, 1]
    of its min-max normalised values: the largest contour's box (k = 1), or every contour's with
    multi_contour; (0, 0, 0, 0) when nothing is above the threshold. Resize the map first (resize_map)
    to get boxes in image pixels."""
    return _boxes_at_thresholds(prepare_map(m), [threshold], multi_contour)[0]


def iou_matrix(boxes_a, boxes_b) -> np.ndarray:
    """IoU [na, nb] of x0,y0,x1,y1 boxes with the +1 pixel convention (wsolevaluation
    calculate_multiple_iou); degenerate pairs (union <= 0) give 0. A box with x1 < x0 or y1 < y0 raises
    ValueError (it has no IoU; wsolevaluation's tests expect the error)."""
    a = np.asarray(boxes_a).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b).reshape(-1, 4)[None, :, :]
    for boxes in (a.reshape(-1, 4), b.reshape(-1, 4)):
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            raise ValueError(f"invalid box {boxes[bad][0].tolist()}: expected x0 <= x1 and y0 <= y1")
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    degenerate = union <= 0
    iou = inter / np.where(degenerate, 1, union)
    iou[degenerate] = 0
    return iou


def _gt_boxes_int(boxes, map_shape: tuple[int, int], index: int) -> np.ndarray:
    b = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    if len(b) == 0:
        raise ValueError(f"image {index} of the batch has no ground-truth box; localization needs at least one")
    if (b < 0).any() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"image {index}: ground-truth boxes must be x0 <= x1, y0 <= y1, non-negative: {b.tolist()}")
    height, width = map_shape
    if (b[:, 0::2] > width).any() or (b[:, 1::2] > height).any():
        raise ValueError(f"image {index}: ground-truth box {b.tolist()} reaches outside the {width}x{height} "
                         "evaluation image; boxes must be in the pixels of the evaluation image (pass "
                         "image_size=S when the maps are smaller than the images)")
    return np.trunc(b).astype(np.int64)  # wsolevaluation resize_bbox: int()


def _iter_maps(maps, gt_boxes, size):
    """Yield (prepared map, int GT boxes) per image; a single [h, w] map goes with a single box set."""
    if isinstance(maps, (list, tuple)):
        maps = [_to_numpy(m) for m in maps]
    else:
        maps = _to_numpy(maps)
        if maps.ndim == 2:
            maps, gt_boxes = maps[None], [gt_boxes]
    if len(maps) != len(gt_boxes):
        raise ValueError(f"got {len(maps)} maps but {len(gt_boxes)} ground-truth box sets")
    for i, (m, b) in enumerate(zip(maps, gt_boxes)):
        prepared = prepare_map(m, size)
        yield prepared, _gt_boxes_int(b, prepared.shape, i)


def default_threads() -> int:
    """Threads for box extraction (OpenCV releases the GIL): $DBC_FAST_EVAL_THREADS, else up to 8."""
    env = os.environ.get("DBC_FAST_EVAL_THREADS")
    return max(1, int(env)) if env else max(1, min(8, os.cpu_count() or 1))


def _map_images(fn, items: Iterable, num_threads: int, chunk: int = 256) -> list:
    """fn over items, in order, `chunk` prepared maps at a time (so a whole evaluation set passed at once
    does not hold every resized map in memory); threads only help with more than one image."""
    results: list = []
    items = iter(items)
    pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None
    try:
        while True:
            block = list(itertools.islice(items, chunk))
            if not block:
                return results
            results.extend(pool.map(fn, block) if pool is not None and len(block) > 1 else map(fn, block))
    finally:
        if pool is not None:
            pool.shutdown()


def _best_iou_per_threshold(boxes_per_threshold: list, gt: np.ndarray) -> np.ndarray:
    """For each threshold, the best IoU over its predicted boxes and the GT boxes."""
    counts = [len(b) for b in boxes_per_threshold]
    ious = iou_matrix(np.concatenate(boxes_per_threshold, 0), gt).max(1)
    return np.maximum.reduceat(ious, np.cumsum([0] + counts[:-1]))


class BoxEvaluator:
    """MaxBoxAcc / MaxBoxAccV2 (Choe et al. 2020, wsolevaluation BoxEvaluator).

    For each IoU threshold (percent), the box accuracy at every map threshold of np.arange(0, 1,
    cam_curve_interval) is counted; MaxBoxAcc@t is the best over map thresholds, MaxBoxAccV2 the mean
    over the IoU thresholds (30, 50, 70) with multi_contour=True (every contour's box competes).
    maps: [n, h, w] (numpy or torch), resized bicubically to image_size (S or (H, W)) when given, else
    taken to be at image size already; gt_boxes: n arrays [k, 4] in evaluation-image pixels.
    """

    def __init__(self, iou_thresholds: Sequence[int] = (30, 50, 70), cam_curve_interval: float = 0.01,
                 multi_contour: bool = True, image_size: int | tuple[int, int] | None = None,
                 num_threads: int | None = None):
        self.iou_thresholds = tuple(iou_thresholds)
        self.num_threads = default_threads() if num_threads is None else num_threads
        self.cam_thresholds = cam_threshold_grid(cam_curve_interval)
        self.multi_contour = multi_contour
        self.image_size = image_size
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.num_correct = {t: np.zeros(len(self.cam_thresholds), np.int64) for t in self.iou_thresholds}

    def accumulate(self, maps, gt_boxes, image_size: int | tuple[int, int] | None = None) -> None:
        size = image_size if image_size is not None else self.image_size

        def best_ious(item):
            prepared, gt = item
            return _best_iou_per_threshold(_boxes_at_thresholds(prepared, self.cam_thresholds, self.multi_contour), gt)

        for best in _map_images(best_ious, _iter_maps(maps, gt_boxes, size), self.num_threads):
            for t in self.iou_thresholds:
                self.num_correct[t] += best >= (t / 100)
            self.count += 1

    def compute(self) -> dict:
        """{"MaxBoxAccV2": mean, "MaxBoxAcc@30": ..., "MaxBoxAcc@50": ..., "MaxBoxAcc@70": ...,
        "best_threshold@30": map threshold of that maximum (first on ties), ..., "count": images}; percent."""
        if self.count == 0:
            raise ValueError("BoxEvaluator.compute() before any accumulate()")
        out: dict = {}
        accs = []
        for t in self.iou_thresholds:
            acc = self.num_correct[t] * 100.0 / float(self.count)
            accs.append(acc.max())
            out[f"MaxBoxAcc@{t}"] = float(acc.max())
            out[f"best_threshold@{t}"] = float(self.cam_thresholds[int(acc.argmax())])
        out["MaxBoxAccV2"] = float(np.average(accs))
        out["count"] = self.count
        return out


class LocalizationEvaluator:
    """GT-known / Top-1 / Top-5 Loc and Top-1 / Top-5 Cls.

    GT-known Loc: the box from the map of the GT class (for class-agnostic maps, the map) has IoU >=
    iou_threshold / 100 with one of the GT boxes. Top-k Loc: GT-known correct and the label among the top
    k logits. Top-k Cls: the label among the top k logits (k capped at the number of classes).
    Boxes: largest contour (multi_contour=False, the usual protocol) at the map threshold `threshold` of
    accumulate(). With cam_thresholds (e.g. cam_threshold_grid(0.01)) every threshold of that list is
    counted too and compute() adds the best one (highest GT-known Loc, first on ties).
    """

    def __init__(self, iou_threshold: int = 50, multi_contour: bool = False, cam_thresholds=None,
                 image_size: int | tuple[int, int] | None = None, topk: int = 5, num_threads: int | None = None):
        self.iou_threshold = iou_threshold
        self.num_threads = default_threads() if num_threads is None else num_threads
        self.multi_contour = multi_contour
        self.grid = None if cam_thresholds is None else [float(t) for t in cam_thresholds]
        self.image_size = image_size
        self.topk = topk
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.fixed_threshold = None
        self.thresholds: list[float] | None = None
        self.top1_cls = 0
        self.topk_cls = 0
        self.gt_known = self.top1_loc = self.topk_loc = None

    def _setup(self, threshold):
        if self.thresholds is None:
            if threshold is None and self.grid is None:
                raise ValueError("give a map threshold to accumulate() or cam_thresholds to the evaluator")
            self.fixed_threshold = None if threshold is None else float(threshold)
            self.thresholds = ([] if threshold is None else [float(threshold)]) + (self.grid or [])
            n = len(self.thresholds)
            self.gt_known, self.top1_loc, self.topk_loc = (np.zeros(n, np.int64) for _ in range(3))
        elif (None if threshold is None else float(threshold)) != self.fixed_threshold:
            raise ValueError(f"map threshold changed between accumulate() calls ({self.fixed_threshold} -> "
                             f"{threshold}); use one threshold per evaluator")

    def accumulate(self, logits, labels, maps, gt_boxes, threshold: float | None = None,
                   image_size: int | tuple[int, int] | None = None) -> None:
        """logits [n, C]; labels [n]; maps [n, h, w] (GT class's map); gt_boxes n x [k, 4] in eval-image
        pixels; threshold: map threshold in [0, 1]."""
        self._setup(threshold)
        logits = _to_numpy(logits).astype(np.float64)
        labels = _to_numpy(labels).astype(np.int64).reshape(-1)
        if logits.ndim != 2 or len(logits) != len(labels):
            raise ValueError(f"logits must be [n, C] with n = len(labels); got {logits.shape} and {labels.shape}")
        k = min(self.topk, logits.shape[1])
        # stable sort on -logits: ties go to the lower class index, as torch.topk/argmax usually do
        order = np.argsort(-logits, axis=1, kind="stable")
        top1 = order[:, 0] == labels
        topk = (order[:, :k] == labels[:, None]).any(1)
        size = image_size if image_size is not None else self.image_size
        if len(maps) != len(labels):
            raise ValueError(f"got {len(maps)} maps for {len(labels)} labels")

        def best_ious(item):
            prepared, gt = item
            return _best_iou_per_threshold(_boxes_at_thresholds(prepared, self.thresholds, self.multi_contour), gt)

        results = _map_images(best_ious, _iter_maps(maps, gt_boxes, size), self.num_threads)
        for i, best in enumerate(results):
            ok = best >= (self.iou_threshold / 100)
            self.gt_known += ok
            self.top1_loc += ok & top1[i]
            self.topk_loc += ok & topk[i]
        self.top1_cls += int(top1.sum())
        self.topk_cls += int(topk.sum())
        self.count += len(labels)

    def compute(self) -> dict:
        """Percentages: top1_cls, top5_cls, gt_known_loc, top1_loc, top5_loc and threshold (at the fixed
        threshold, else at the best one); with a grid also best_threshold, best_gt_known_loc,
        best_top1_loc, best_top5_loc; count."""
        if self.count == 0:
            raise ValueError("LocalizationEvaluator.compute() before any accumulate()")
        k = self.topk

        def pct(x):  # count * 100 / n, in that order (as wsolevaluation), so equal counts give equal floats
            return x * 100.0 / self.count

        out = {"top1_cls": pct(self.top1_cls), f"top{k}_cls": pct(self.topk_cls), "count": self.count}
        if self.grid is not None:
            offset = 0 if self.fixed_threshold is None else 1
            j = offset + int(np.argmax(self.gt_known[offset:]))
            out.update({"best_threshold": self.thresholds[j], "best_gt_known_loc": pct(self.gt_known[j]),
                        "best_top1_loc": pct(self.top1_loc[j]), f"best_top{k}_loc": pct(self.topk_loc[j])})
        j = 0 if self.fixed_threshold is not None else int(np.argmax(self.gt_known))
        out.update({"threshold": self.thresholds[j], "gt_known_loc": pct(self.gt_known[j]),
                    "top1_loc": pct(self.top1_loc[j]), f"top{k}_loc": pct(self.topk_loc[j])})
        return {key: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for key, v in out.items()}


def _as_list(arrays) -> list:
    """[n, h, w] array / tensor, or a list of [h, w] ones, or one [h, w] -> a list of numpy [h, w]."""
    if isinstance(arrays, (list, tuple)):
        return [_to_numpy(a) for a in arrays]
    arrays = _to_numpy(arrays)
    return [arrays] if arrays.ndim == 2 else list(arrays)


class MaskEvaluator:
    """PxAP (Choe et al. 2020, wsolevaluation MaskEvaluator) and foreground IoU / precision / recall.

    Masks: 0 = background, 255 = ignore (VOC's void border), any other value = foreground (every object
    class counts: the map is class-agnostic). Maps are prepared as for boxes: resized bicubically to the
    mask's size when they differ, then min-max normalised (prepare_map).
    PxAP: the foreground and background pixels' scores are histogrammed over the bins [0, i), [i, 2i), ...,
    [1 - i, 1), [1, 2), [2, 3] (i = cam_curve_interval); for each bin edge t from the top, a pixel is
    predicted foreground when its score >= t; precision and recall over all pixels of all images give the
    curve, and PxAP = sum over the curve of precision * recall step (points with no predicted pixel left
    out), in percent - wsolevaluation's definition, term by term.
    Segmentation figures (percent, pixels pooled over the set, ignore pixels excluded): foreground IoU =
    TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN), with foreground = score >=
    `threshold` (the same rule as the curve). The paper does not state Table 11's threshold; the default
    0.3 is the one C2AM, the method Table 11 compares with, uses to cut its class-agnostic map into
    background cues. compute() also gives the threshold of the grid with the best foreground IoU and the
    figures there (chosen on the evaluated set itself), and background IoU / precision / recall at
    `threshold` (Table 11 is titled "background segmentation").
    """

    def __init__(self, cam_curve_interval: float = 0.01, threshold: float = 0.3):
        if not 0 < cam_curve_interval < 1:
            raise ValueError(f"cam_curve_interval must be in (0, 1), got {cam_curve_interval}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.cam_thresholds = cam_threshold_grid(cam_curve_interval)
        self.bin_edges = np.append(self.cam_thresholds, [1.0, 2.0, 3.0])
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.fg_hist = np.zeros(len(self.bin_edges) - 1, np.int64)
        self.bg_hist = np.zeros(len(self.bin_edges) - 1, np.int64)
        self.tp = self.fp = 0  # at self.threshold
        self.num_fg = self.num_bg = 0

    def accumulate(self, maps, masks) -> None:
        """maps [n, h, w] (numpy or torch; a single [h, w] map with a single mask also works); masks [n, H, W]
        integer (or a list of masks of different sizes)."""
        maps, masks = _as_list(maps), _as_list(masks)
        if len(maps) != len(masks):
            raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
        for i, (m, mask) in enumerate(zip(maps, masks)):
            if mask.ndim != 2:
                raise ValueError(f"mask {i} must be 2-D [H, W], got shape {mask.shape}")
            score = prepare_map(m, mask.shape)
            fg = score[(mask != 0) & (mask != 255)]
            bg = score[mask == 0]
            self.fg_hist += np.histogram(fg, bins=self.bin_edges)[0]
            self.bg_hist += np.histogram(bg, bins=self.bin_edges)[0]
            self.tp += int((fg >= self.threshold).sum())
            self.fp += int((bg >= self.threshold).sum())
            self.num_fg += fg.size
            self.num_bg += bg.size
            self.count += 1

    def curve(self) -> dict:
        """The precision-recall curve from the histograms, from the highest bin edge (2.0) down to 0:
        thresholds, tp, fp, fn, tn (pixel counts at `score >= threshold`)."""
        tp = self.fg_hist[::-1].cumsum()
        fp = self.bg_hist[::-1].cumsum()
        return {"thresholds": self.bin_edges[:-1][::-1], "tp": tp, "fp": fp, "fn": self.num_fg - tp,
                "tn": self.num_bg - fp}

    @staticmethod
    def _segmentation(tp, fp, fn, tn) -> dict:
        def pct(a, b):
            return float(a * 100.0 / b) if b > 0 else 0.0

        return {"IoU": pct(tp, tp + fp + fn), "precision": pct(tp, tp + fp), "recall": pct(tp, tp + fn),
                "background_IoU": pct(tn, tn + fn + fp), "background_precision": pct(tn, tn + fn),
                "background_recall": pct(tn, tn + fp)}

    def compute(self) -> dict:
        """{"PxAP", "IoU", "precision", "recall", "threshold", "best_IoU", "best_precision", "best_recall",
        "best_threshold", "background_IoU", "background_precision", "background_recall", "count"}."""
        if self.count == 0:
            raise ValueError("MaskEvaluator.compute() before any accumulate()")
        if self.num_fg == 0:
            raise ValueError("no foreground pixel in the masks: PxAP is undefined")
        c = self.curve()
        tp, fp, fn = (c[k].astype(np.float64) for k in ("tp", "fp", "fn"))
        predicted = (tp + fp) != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        pxap = float((precision[1:] * np.diff(recall))[predicted[1:]].sum() * 100)
        out: dict = {"PxAP": pxap}
        out.update(self._segmentation(self.tp, self.fp, self.num_fg - self.tp, self.num_bg - self.fp))
        out["threshold"] = self.threshold
        # the grid thresholds are the curve's points 2.. (0.99 down to 0); first in ascending order on ties
        grid = slice(len(tp) - 1, 1, -1)
        iou = tp[grid] / np.maximum(tp[grid] + fp[grid] + fn[grid], 1)
        j = int(np.argmax(iou))
        k = len(tp) - 1 - j
        best = self._segmentation(c["tp"][k], c["fp"][k], c["fn"][k], c["tn"][k])
        out.update({"best_IoU": best["IoU"], "best_precision": best["precision"], "best_recall": best["recall"],
                    "best_threshold": float(c["thresholds"][k])})
        out["count"] = self.count
        return out


# ------------------------------------------------------------------------- maps at the original image size


def map_to_original(m, w: int, h: int) -> np.ndarray:
    """A low-resolution map [h', w'] (a torch tensor) -> [h, w] float32 (bicubic, as wsolevaluation), min-max
    normalised to [0, 1]: what `dbc-fast predict` and the panels draw. float32, unlike normalize_map's float64
    evaluation copy, because a photo's full-size map can be 100 megapixels; box_in_original gives its box."""
    up = cv2.resize(m.float().cpu().numpy(), (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def box_in_original(m, w: int, h: int, threshold: float, band_rows: int = 256) -> list[float]:
    """The box of extract_boxes(map_to_original(m, w, h), threshold), the same numbers, computed in bands of
    rows: extract_boxes' float64 copies of a full-size map cost 24 bytes a pixel (2.6 GB at 108 megapixels);
    this holds the float32 map and the uint8 score map it thresholds (5 bytes a pixel)."""
    up = cv2.resize(m.float().cpu().numpy(), (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(up.min()), float(up.max())
    bands = [slice(r, r + band_rows) for r in range(0, h, band_rows)]
    if not hi > lo:  # constant or NaN: map_to_original gives zeros, extract_boxes (0, 0, 0, 0)
        return [0.0] * 4
    heat_lo = min(float(((up[b] - lo) / (hi - lo)).min()) for b in bands)  # map_to_original, band by band
    heat_hi = max(float(((up[b] - lo) / (hi - lo)).max()) for b in bands)
    if not heat_hi > heat_lo:
        return [0.0] * 4
    score = np.empty((h, w), np.uint8)
    for b in bands:  # then prepare_map's float64 min-max normalisation and the uint8 score map
        band = ((up[b] - lo) / (hi - lo)).astype(np.float64)
        band -= heat_lo
        band /= heat_hi - heat_lo
        score[b] = (band * 255).astype(np.uint8)
    del up
    return [float(v) for v in _boxes_from_uint8(score, threshold, False).reshape(-1, 4)[0]]
