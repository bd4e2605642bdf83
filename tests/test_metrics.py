"""dbc_fast.metrics against an independent, literal re-implementation of clovaai/wsolevaluation.

The reference below follows wsolevaluation step by step (inference.py: cv2 bicubic resize of the CAM to
the 224x224 image, normalize_scoremap; evaluation.py: resize_bbox, compute_bboxes_from_scoremaps,
calculate_multiple_iou, BoxEvaluator.accumulate/compute). It is written separately from
dbc_fast/metrics.py on purpose (tiled IoU as upstream, no caching, no vectorised reduce), so a shared
mistake is unlikely. The maps are synthetic but the boxes are the real ILSVRC validation boxes of the
300 images in ../shared/data/ilsvrc-val-300.tar.
"""
from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch

from dbc_fast import metrics
from dbc_fast.data import build_dataset
from dbc_fast.data.transforms import scale_boxes

RESIZE = 224  # wsolevaluation _RESIZE_LENGTH


# ----------------------------------------------------------------- reference (wsolevaluation, literal)
def ref_normalize_scoremap(cam):
    # inference.py normalize_scoremap: NaN -> zeros, constant -> zeros, else min-max in place
    if np.isnan(cam).any():
        return np.zeros_like(cam)
    if cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def ref_cam_for_image(cam_small):
    # inference.py CAMComputer.compute_and_evaluate_cams: t2n (float64), cv2.resize INTER_CUBIC to the
    # image size, normalize_scoremap
    cam = np.asarray(cam_small, dtype=np.float64)
    cam_resized = cv2.resize(cam, (RESIZE, RESIZE), interpolation=cv2.INTER_CUBIC)
    return ref_normalize_scoremap(cam_resized)


def ref_resize_bbox(box, image_size, resize_size):
    # evaluation.py resize_bbox: float scaling, then int() truncation
    box_x0, box_y0, box_x1, box_y1 = map(float, box)
    image_w, image_h = map(float, image_size)
    new_image_w, new_image_h = map(float, resize_size)
    return (int(box_x0 * new_image_w / image_w), int(box_y0 * new_image_h / image_h),
            int(box_x1 * new_image_w / image_w), int(box_y1 * new_image_h / image_h))


def ref_compute_bboxes_from_scoremaps(scoremap, scoremap_threshold_list, multi_contour_eval):
    # evaluation.py compute_bboxes_from_scoremaps
    height, width = scoremap.shape
    scoremap_image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)

    def scoremap2bbox(threshold):
        _, thr_gray_heatmap = cv2.threshold(src=scoremap_image, thresh=int(threshold * np.max(scoremap_image)),
                                            maxval=255, type=cv2.THRESH_BINARY)
        contours = cv2.findContours(image=thr_gray_heatmap, mode=cv2.RETR_TREE,
                                    method=cv2.CHAIN_APPROX_SIMPLE)[0]  # OpenCV >= 4: (contours, hierarchy)
        if len(contours) == 0:
            return np.asarray([[0, 0, 0, 0]]), 1
        if not multi_contour_eval:
            contours = [max(contours, key=cv2.contourArea)]
        estimated_boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            x0, y0, x1, y1 = x, y, x + w, y + h
            x1 = min(x1, width - 1)
            y1 = min(y1, height - 1)
            estimated_boxes.append([x0, y0, x1, y1])
        return np.asarray(estimated_boxes), len(contours)

    boxes_at_thr, number_of_box_list = [], []
    for threshold in scoremap_threshold_list:
        boxes, number_of_box = scoremap2bbox(threshold)
        boxes_at_thr.append(boxes)
        number_of_box_list.append(number_of_box)
    return boxes_at_thr, number_of_box_list


def ref_calculate_multiple_iou(box_a, box_b):
    # evaluation.py calculate_multiple_iou: tile both sets to num_a x num_b x 4, +1 areas
    num_a, num_b = box_a.shape[0], box_b.shape[0]
    box_a = np.expand_dims(np.tile(box_a, num_b), axis=1).reshape((num_a, num_b, -1))
    box_b = np.expand_dims(np.tile(box_b, num_a), axis=1).reshape((num_b, num_a, -1))
    box_b = np.transpose(box_b, (1, 0, 2))
    min_x = np.maximum(box_a[:, :, 0], box_b[:, :, 0])
    min_y = np.maximum(box_a[:, :, 1], box_b[:, :, 1])
    max_x = np.minimum(box_a[:, :, 2], box_b[:, :, 2])
    max_y = np.minimum(box_a[:, :, 3], box_b[:, :, 3])
    area_intersect = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
    area_a = (box_a[:, :, 2] - box_a[:, :, 0] + 1) * (box_a[:, :, 3] - box_a[:, :, 1] + 1)
    area_b = (box_b[:, :, 2] - box_b[:, :, 0] + 1) * (box_b[:, :, 3] - box_b[:, :, 1] + 1)
    denominator = area_a + area_b - area_intersect
    degenerate_indices = np.where(denominator <= 0)
    denominator[degenerate_indices] = 1
    ious = area_intersect / denominator
    ious[degenerate_indices] = 0
    return ious


class RefBoxEvaluator:
    # evaluation.py BoxEvaluator (boxes given already resized, as _load_resized_boxes does)
    def __init__(self, cam_threshold_list, iou_threshold_list, multi_contour_eval):
        self.cam_threshold_list = cam_threshold_list
        self.iou_threshold_list = iou_threshold_list
        self.multi_contour_eval = multi_contour_eval
        self.cnt = 0
        self.num_correct = {t: np.zeros(len(cam_threshold_list)) for t in iou_threshold_list}

    def accumulate(self, scoremap, gt_bboxes):
        boxes_at_thresholds, number_of_box_list = ref_compute_bboxes_from_scoremaps(
            scoremap, self.cam_threshold_list, self.multi_contour_eval)
        boxes_at_thresholds = np.concatenate(boxes_at_thresholds, axis=0)
        multiple_iou = ref_calculate_multiple_iou(np.array(boxes_at_thresholds), np.array(gt_bboxes))
        idx = 0
        sliced_multiple_iou = []
        for nr_box in number_of_box_list:
            sliced_multiple_iou.append(max(multiple_iou.max(1)[idx:idx + nr_box]))
            idx += nr_box
        for threshold in self.iou_threshold_list:
            correct = np.where(np.asarray(sliced_multiple_iou) >= (threshold / 100))[0]
            self.num_correct[threshold][correct] += 1
        self.cnt += 1

    def compute(self):
        return [(self.num_correct[t] * 100. / float(self.cnt)).max() for t in self.iou_threshold_list]


# ------------------------------------------------------------------------------------ real boxes
@pytest.fixture(scope="module")
def ilsvrc_boxes(shared_data):
    """The real boxes of the 300 ilsvrc-val-300 images, from wsolevaluation's ILSVRC metadata (the
    metadata files inside ilsvrc-val-300.tar are empty), in original pixels with the original sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_dataset("ilsvrc", shared_data / "ilsvrc-val-300.tar", "test",
                           metadata=shared_data / "wsolevaluation-metadata.tar.gz", missing_images="skip")
    assert len(ds) == 300
    return [(s.boxes, s.size) for s in ds.samples]


def synthetic_maps(boxes_and_sizes, seed, small=14):
    """14x14 maps like a model's: Gaussian blobs at, near or away from a GT box, extra blobs, noise,
    and a few degenerate ones (constant, a single hot cell, pure noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:small, 0:small] + 0.5
    maps = []
    for i, (boxes, (w, h)) in enumerate(boxes_and_sizes):
        kind = i % 10
        m = np.zeros((small, small))
        if kind == 7:
            m[:] = 0.3  # constant -> zeros -> the (0,0,0,0) box at every threshold
        elif kind == 8:
            m[rng.integers(small), rng.integers(small)] = 1.0
        elif kind == 9:
            m = rng.random((small, small))
        else:
            b = boxes[rng.integers(len(boxes))] * np.array([small / w, small / h, small / w, small / h])
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            sx, sy = max((b[2] - b[0]) / 2, 0.5), max((b[3] - b[1]) / 2, 0.5)
            shift = rng.normal(0, 1.5 if kind < 4 else 3.0, 2)
            scale = rng.uniform(0.4, 1.3)
            m += np.exp(-(((xx - cx - shift[0]) / (sx * scale)) ** 2 + ((yy - cy - shift[1]) / (sy * scale)) ** 2))
            for _ in range(rng.integers(0, 3)):  # distractor blobs -> several contours
                px, py = rng.uniform(0, small, 2)
                m += rng.uniform(0.2, 0.8) * np.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / rng.uniform(0.5, 4)))
            m += rng.normal(0, 0.05, m.shape)
            m = (m - m.min()) / (m.max() - m.min())  # the model's own min-max at 14x14
        maps.append(m.astype(np.float32))
    return np.stack(maps)


def our_eval_boxes(boxes_and_sizes):
    # what the dataset's eval transform gives (boxes scaled to 224x224), as float32
    return [torch.from_numpy(scale_boxes(b, size, RESIZE, RESIZE).astype(np.float32)) for b, size in boxes_and_sizes]


@pytest.mark.parametrize("multi_contour,interval,count", [(True, 0.01, 300), (False, 0.01, 150), (True, 0.05, 300)])
def test_box_evaluator_equals_wsolevaluation(ilsvrc_boxes, multi_contour, interval, count):
    data = ilsvrc_boxes[:count]
    maps = synthetic_maps(data, seed=count + int(multi_contour))
    ours = metrics.BoxEvaluator(iou_thresholds=(30, 50, 70), cam_curve_interval=interval,
                                multi_contour=multi_contour)
    # maps as torch tensors in two batches, like a trainer would pass them
    gt = our_eval_boxes(data)
    ours.accumulate(torch.from_numpy(maps[:100]), gt[:100], image_size=RESIZE)
    ours.accumulate(torch.from_numpy(maps[100:]), gt[100:], image_size=RESIZE)
    result = ours.compute()

    ref = RefBoxEvaluator(list(np.arange(0, 1, interval)), [30, 50, 70], multi_contour)
    for m, (boxes, size) in zip(maps, data):
        ref.accumulate(ref_cam_for_image(m), [ref_resize_bbox(b, size, (RESIZE, RESIZE)) for b in boxes])
    expected = ref.compute()

    assert [result["MaxBoxAcc@30"], result["MaxBoxAcc@50"], result["MaxBoxAcc@70"]] == expected
    assert result["MaxBoxAccV2"] == np.average(expected)
    assert result["count"] == count
    # the maps are informative but not perfect: accuracies strictly between the extremes
    assert 0 < expected[2] < expected[1] < expected[0] < 100


def test_localization_evaluator_equals_reference(ilsvrc_boxes):
    data = ilsvrc_boxes[:120]
    maps = synthetic_maps(data, seed=7)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, len(data))
    logits = rng.normal(0, 1, (len(data), 10))
    logits[np.arange(len(data)), labels] += rng.choice([3.0, 0.8, -2.0], len(data))  # some right, some wrong
    threshold = 0.2

    ev = metrics.LocalizationEvaluator(cam_thresholds=np.arange(0, 1, 0.01), image_size=RESIZE)
    ev.accumulate(torch.tensor(logits), torch.tensor(labels), torch.from_numpy(maps), our_eval_boxes(data),
                  threshold=threshold)
    result = ev.compute()

    # reference: GT-known = wsolevaluation box accuracy at one map threshold, IoU 50, largest contour
    gt_known, top1_loc, top5_loc = [], [], []
    grid = list(np.arange(0, 1, 0.01))
    per_threshold = RefBoxEvaluator(grid, [50], False)
    for i, (m, (boxes, size)) in enumerate(zip(maps, data)):
        scoremap = ref_cam_for_image(m)
        gt = [ref_resize_bbox(b, size, (RESIZE, RESIZE)) for b in boxes]
        (pred,), _ = ref_compute_bboxes_from_scoremaps(scoremap, [threshold], False)
        ok = ref_calculate_multiple_iou(pred, np.array(gt)).max() >= 0.5
        top5 = labels[i] in np.argsort(-logits[i])[:5]
        gt_known.append(ok)
        top1_loc.append(ok and np.argmax(logits[i]) == labels[i])
        top5_loc.append(ok and top5)
        per_threshold.accumulate(scoremap, gt)
    n = len(data)
    assert result["gt_known_loc"] == sum(gt_known) * 100.0 / n
    assert result["top1_loc"] == sum(top1_loc) * 100.0 / n
    assert result["top5_loc"] == sum(top5_loc) * 100.0 / n
    assert result["top1_cls"] == (np.argmax(logits, 1) == labels).sum() * 100.0 / n
    assert result["threshold"] == threshold
    best = per_threshold.num_correct[50] * 100.0 / n
    assert result["best_gt_known_loc"] == best.max()
    assert result["best_threshold"] == grid[int(best.argmax())]
    assert 0 < result["top1_loc"] < result["top5_loc"] <= result["gt_known_loc"] < 100


# ----------------------------------------------------------------------------- hand-checked cases
def test_iou_plus_one_convention():
    # 10x10-pixel boxes overlapping in a 5x5 corner: 25 / (100 + 100 - 25)
    assert metrics.iou_matrix([[0, 0, 9, 9]], [[5, 5, 14, 14]])[0, 0] == pytest.approx(25 / 175)
    assert metrics.iou_matrix([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 1.0  # a one-pixel box is not empty
    assert metrics.iou_matrix([[0, 0, 4, 4]], [[5, 0, 9, 4]])[0, 0] == 0.0  # touching, no shared pixel
    assert metrics.iou_matrix([[0, 0, 9, 9]], [[0, 0, 9, 19]])[0, 0] == 0.5
    iou = metrics.iou_matrix([[0, 0, 9, 9], [0, 0, 0, 0]], [[0, 0, 9, 9], [10, 10, 19, 19], [0, 0, 1, 1]])
    assert iou.shape == (2, 3) and iou[0, 0] == 1.0 and iou[0, 1] == 0.0 and iou[1, 2] == 0.25


def block_map(h, w, rows, cols, value=1.0):
    m = np.zeros((h, w))
    m[rows, cols] = value
    return m


def test_extract_boxes_conventions():
    m = block_map(20, 30, slice(2, 7), slice(4, 10))  # rows 2..6, cols 4..9
    # bounding rect x, y, w, h -> (x, y, x + w, y + h): one past the last pixel, as wsolevaluation
    assert metrics.extract_boxes(m, 0.5).tolist() == [[4, 2, 10, 7]]
    # clipped to W - 1, H - 1 at the border
    assert metrics.extract_boxes(block_map(20, 30, slice(15, 20), slice(25, 30)), 0.5).tolist() == [[25, 15, 29, 19]]
    # largest contour vs all contours
    m[12:14, 20:22] = 1.0
    assert metrics.extract_boxes(m, 0.5).tolist() == [[4, 2, 10, 7]]
    assert sorted(metrics.extract_boxes(m, 0.5, multi_contour=True).tolist()) == [[4, 2, 10, 7], [20, 12, 22, 14]]
    # nothing above the threshold (constant map) -> the (0, 0, 0, 0) box
    assert metrics.extract_boxes(np.full((8, 8), 0.7), 0.5).tolist() == [[0, 0, 0, 0]]
    # strict threshold: after normalisation 0.5 -> uint8 127; threshold 0.5 -> int(0.5 * 255) = 127,
    # so the 0.5 block is not above it but the 1.0 block is
    two = block_map(10, 10, slice(0, 3), slice(0, 3), 1.0) + block_map(10, 10, slice(5, 9), slice(5, 9), 0.5)
    assert metrics.extract_boxes(two, 0.5, multi_contour=True).tolist() == [[0, 0, 3, 3]]
    assert sorted(metrics.extract_boxes(two, 0.49, multi_contour=True).tolist()) == [[0, 0, 3, 3], [5, 5, 9, 9]]


def test_box_evaluator_hit_miss_and_iou_exactly_half():
    hit = block_map(32, 32, slice(0, 9), slice(0, 9))  # box (0, 0, 9, 9)
    ev = metrics.BoxEvaluator(multi_contour=False)
    ev.accumulate(hit[None], [np.array([[0, 0, 9, 19]], np.float32)])  # IoU exactly 0.5: counts at 30 and 50
    r = ev.compute()
    assert (r["MaxBoxAcc@30"], r["MaxBoxAcc@50"], r["MaxBoxAcc@70"]) == (100.0, 100.0, 0.0)
    assert r["MaxBoxAccV2"] == pytest.approx(200 / 3)
    ev.accumulate(hit[None], [np.array([[20, 20, 31, 31]])])  # a box that misses
    r = ev.compute()
    assert (r["MaxBoxAcc@50"], r["count"]) == (50.0, 2)
    # several GT boxes: the best one counts
    ev = metrics.BoxEvaluator()
    ev.accumulate(hit[None], [np.array([[20, 20, 31, 31], [0, 0, 9, 9]])])
    assert ev.compute()["MaxBoxAcc@70"] == 100.0


def test_gt_boxes_truncated_like_resize_bbox():
    hit = block_map(32, 32, slice(0, 9), slice(0, 9))
    ev = metrics.BoxEvaluator(iou_thresholds=(100,), multi_contour=False)
    ev.accumulate(hit[None], [np.array([[0.9, 0.2, 9.99, 9.5]])])  # int() -> (0, 0, 9, 9)
    assert ev.compute()["MaxBoxAcc@100"] == 100.0


def test_localization_evaluator_hand_case():
    hit = block_map(14, 14, slice(2, 7), slice(2, 7))
    maps = np.stack([hit, hit, hit])
    gt = [np.array([[32, 32, 112, 112]])] * 2 + [np.array([[150, 150, 200, 200]])]  # two hits, one miss
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0.0, 1, 5, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 0])  # right, wrong (but top-5), right
    ev = metrics.LocalizationEvaluator(image_size=224)
    ev.accumulate(logits, labels, torch.from_numpy(maps), gt, threshold=0.5)
    r = ev.compute()
    assert r["top1_cls"] == pytest.approx(200 / 3) and r["top5_cls"] == 100.0
    assert r["gt_known_loc"] == pytest.approx(200 / 3)
    assert r["top1_loc"] == pytest.approx(100 / 3) and r["top5_loc"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="threshold changed"):
        ev.accumulate(logits, labels, maps, gt, threshold=0.3)


def test_evaluator_input_errors():
    ev = metrics.BoxEvaluator()
    with pytest.raises(ValueError, match="image_size"):  # 14x14 maps with 224-pixel boxes, no image_size
        ev.accumulate(np.random.rand(1, 14, 14), [np.array([[10, 10, 200, 200]])])
    with pytest.raises(ValueError, match="no ground-truth box"):
        ev.accumulate(np.random.rand(1, 14, 14), [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="2 maps but 1"):
        ev.accumulate(np.random.rand(2, 14, 14), [np.array([[1, 1, 2, 2]])])
    with pytest.raises(ValueError, match="before any accumulate"):
        metrics.BoxEvaluator().compute()


def test_threads_do_not_change_results(ilsvrc_boxes):
    data = ilsvrc_boxes[:40]
    maps = synthetic_maps(data, seed=11)
    results = []
    for threads in (1, 3):
        ev = metrics.BoxEvaluator(cam_curve_interval=0.05, num_threads=threads)
        ev.accumulate(maps, our_eval_boxes(data), image_size=RESIZE)
        results.append(ev.compute())
    assert results[0] == results[1]


# ------------------------------------------------------------------------- masks (PxAP, Table 11)
VOC_SEG = "voc2012-seg-sample.tar"


@pytest.fixture(scope="module")
def voc_masks_and_maps(shared_data, tmp_path_factory):
    """The first 30 VOC2012 val images of the sample with their class masks (palette PNG values: 0
    background, 1..20 classes, 255 void) read straight from the archive, and a map made from each image:
    colour distance to the mean border colour, blurred and shrunk to 14x14 like a model's map."""
    import tarfile

    from PIL import Image

    root = tmp_path_factory.mktemp("voc")
    with tarfile.open(shared_data / VOC_SEG) as tar:
        tar.extractall(root, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(root)
    voc = root / "voc2012-seg-sample" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:30]
    masks, maps = [], []
    for image_id in ids:
        mask = np.array(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
        image = np.asarray(Image.open(voc / "JPEGImages" / f"{image_id}.jpg").convert("RGB"), np.float32) / 255
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        distance = np.linalg.norm(image - border.mean(0), axis=2)
        distance = cv2.GaussianBlur(distance, (0, 0), max(distance.shape) / 50)
        masks.append(mask)
        maps.append(cv2.resize(distance, (14, 14), interpolation=cv2.INTER_AREA))
    return masks, maps


def direct_scores(maps, masks):
    """Foreground and background pixel scores: bicubic resize to the mask, min-max, 255 left out."""
    fg, bg = [], []
    for m, mask in zip(maps, masks):
        s = cv2.resize(np.asarray(m, np.float64), (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_CUBIC)
        s = (s - s.min()) / (s.max() - s.min())
        fg.append(s[(mask > 0) & (mask < 255)])
        bg.append(s[mask == 0])
    return np.concatenate(fg), np.concatenate(bg)


def direct_pxap(fg, bg, interval):
    """PxAP counted threshold by threshold (score >= t) from the top, without histograms."""
    thresholds = [1.0] + list(np.arange(0, 1, interval))[::-1]
    auc, previous_recall = 0.0, 0.0
    for t in thresholds:
        tp, fp = np.count_nonzero(fg >= t), np.count_nonzero(bg >= t)
        recall = tp / len(fg)
        if tp + fp:
            auc += tp / (tp + fp) * (recall - previous_recall)
        previous_recall = recall
    return auc * 100


def sorted_score_ap(fg, bg):
    """Exact average precision of the pixel ranking: every distinct score is a threshold."""
    scores = np.concatenate([fg, bg])
    positive = np.concatenate([np.ones(len(fg), bool), np.zeros(len(bg), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_level = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(positive)[last_of_level]
    predicted = np.arange(1, len(scores) + 1)[last_of_level]
    recall = tp / len(fg)
    return float(np.sum(tp / predicted * np.diff(np.r_[0.0, recall])) * 100)


def test_mask_evaluator_pxap_equals_direct_count(voc_masks_and_maps):
    masks, maps = voc_masks_and_maps
    fg, bg = direct_scores(maps, masks)
    assert len(fg) > 100_000 and len(bg) > 100_000
    ev = metrics.MaskEvaluator(cam_curve_interval=0.01)
    ev.accumulate(maps[:17], masks[:17])  # two calls, as batches come
    ev.accumulate(maps[17:], masks[17:])
    out = ev.compute()
    assert out["count"] == 30
    assert out["PxAP"] == pytest.approx(direct_pxap(fg, bg, 0.01), abs=1e-9)
    # a real signal: far above the constant map's PxAP (the foreground share of the pixels)
    share = 100 * len(fg) / (len(fg) + len(bg))
    assert out["PxAP"] > share + 5
    # with a fine grid PxAP approaches the exact AP of the sorted pixel scores
    fine = metrics.MaskEvaluator(cam_curve_interval=0.001)
    fine.accumulate(maps, masks)
    exact = sorted_score_ap(fg, bg)
    assert abs(fine.compute()["PxAP"] - exact) < 0.1
    assert abs(out["PxAP"] - exact) < 1.0


def test_mask_evaluator_iou_precision_recall(voc_masks_and_maps):
    masks, maps = voc_masks_and_maps
    fg, bg = direct_scores(maps, masks)
    ev = metrics.MaskEvaluator(threshold=0.3)
    ev.accumulate(maps, masks)
    out = ev.compute()

    def figures(t):
        tp, fp = np.count_nonzero(fg >= t), np.count_nonzero(bg >= t)
        fn, tn = len(fg) - tp, len(bg) - fp
        return 100 * tp / (tp + fp + fn), 100 * tp / (tp + fp), 100 * tp / (tp + fn), 100 * tn / (tn + fn + fp)

    iou, precision, recall, background_iou = figures(0.3)
    assert out["threshold"] == 0.3
    assert (out["IoU"], out["precision"], out["recall"], out["background_IoU"]) == pytest.approx(
        (iou, precision, recall, background_iou), abs=1e-9)
    grid = np.arange(0, 1, 0.01)
    ious = [figures(t)[0] for t in grid]
    best = int(np.argmax(ious))
    assert out["best_threshold"] == grid[best]
    assert (out["best_IoU"], out["best_precision"], out["best_recall"]) == pytest.approx(figures(grid[best])[:3],
                                                                                          abs=1e-9)
    assert out["best_IoU"] >= out["IoU"]


def test_mask_evaluator_known_cases(voc_masks_and_maps):
    masks, _ = voc_masks_and_maps
    foreground = [((m > 0) & (m < 255)).astype(np.float32) for m in masks]
    # the mask itself as the map: a perfect separation at every threshold above 0
    perfect = metrics.MaskEvaluator()
    perfect.accumulate(foreground, masks)
    out = perfect.compute()
    assert out["PxAP"] == 100.0 and out["IoU"] == out["precision"] == out["recall"] == 100.0
    # a constant map: every pixel at score 0, predicted foreground only at threshold 0
    n_fg = sum(int(f.sum()) for f in foreground)
    n_bg = sum(int((m == 0).sum()) for m in masks)
    flat = metrics.MaskEvaluator()
    flat.accumulate([np.full((14, 14), 0.5)] * len(masks), masks)
    out = flat.compute()
    assert out["PxAP"] == pytest.approx(100 * n_fg / (n_fg + n_bg))
    assert out["IoU"] == 0.0 and out["recall"] == 0.0 and out["best_threshold"] == 0.0
    # void pixels do not count: marking them foreground or background in the map changes nothing
    void_hot = [np.where(m == 255, 1.0, f) for m, f in zip(masks, foreground)]
    ev = metrics.MaskEvaluator()
    ev.accumulate(void_hot, masks)
    assert ev.compute()["PxAP"] == 100.0
    # torch maps and a stacked batch give the same numbers as numpy lists
    same = [cv2.resize(f, (64, 48)) for f in foreground[:4]]
    small = [cv2.resize(m, (64, 48), interpolation=cv2.INTER_NEAREST) for m in masks[:4]]
    a, b = metrics.MaskEvaluator(), metrics.MaskEvaluator()
    a.accumulate(same, small)
    b.accumulate(torch.from_numpy(np.stack(same)), torch.from_numpy(np.stack(small)))
    assert a.compute() == b.compute()


def test_mask_evaluator_input_errors():
    with pytest.raises(ValueError, match="before any accumulate"):
        metrics.MaskEvaluator().compute()
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        metrics.MaskEvaluator().accumulate(np.random.rand(2, 14, 14), np.zeros((1, 20, 20), np.uint8))
    ev = metrics.MaskEvaluator()
    ev.accumulate(np.random.rand(1, 14, 14), np.zeros((1, 20, 20), np.uint8))
    with pytest.raises(ValueError, match="no foreground pixel"):
        ev.compute()
    with pytest.raises(ValueError, match="cam_curve_interval"):
        metrics.MaskEvaluator(cam_curve_interval=0)
