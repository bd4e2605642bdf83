"""benchmarks/tiny_imagenet_compare.py end to end on CPU with a tiny budget on the real 10-class sample:
all four methods trained (2 steps) and evaluated through `python -m dbc_fast`, one table, the centred-box
baseline checked against a direct IoU computation, and --resume skipping finished runs."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = ROOT / "benchmarks" / "tiny_imagenet_compare.py"
IMG, LIMIT_VAL, BATCH, STEPS = 32, 20, 8, 2
METHODS = ("dbc", "cls", "cam", "tscam")


def run_script(shared_data, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--data", str(shared_data / "tiny-imagenet-mini.tar.gz"), "--out", str(out),
           "--methods", *METHODS, "--img-size", str(IMG), "--epochs", "1", "--max-steps-per-epoch", str(STEPS),
           "--batch-size", str(BATCH), "--eval-batch-size", "20", "--limit-val-images", str(LIMIT_VAL),
           "--device", "cpu", "--amp", "none", "--num-workers", "0", "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per process: 2 busy cores
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def direct_centered_box(shared_data, img_size, n):
    """Fraction of images whose GT box best overlaps the centred round(0.75*S) box at IoU >= t, computed
    here from the annotations with the +1 pixel IoU and int-truncated resized boxes (wsolevaluation)."""
    from dbc_fast.data import build_dataset

    dataset = build_dataset("tiny-imagenet", str(shared_data / "tiny-imagenet-mini.tar.gz"), "val",
                            img_size=img_size, train=False)
    side = round(0.75 * img_size)
    x0 = (img_size - side) // 2
    box = np.array([x0, x0, x0 + side - 1, x0 + side - 1], np.float64)
    best = []
    for sample in dataset.samples[:n]:
        w, h = 64, 64  # every Tiny ImageNet image is 64x64
        gt = np.asarray(sample.boxes, np.float64) * [img_size / w, img_size / h, img_size / w, img_size / h]
        gt = np.trunc(gt)
        ix = np.clip(np.minimum(gt[:, 2], box[2]) - np.maximum(gt[:, 0], box[0]) + 1, 0, None)
        iy = np.clip(np.minimum(gt[:, 3], box[3]) - np.maximum(gt[:, 1], box[1]) + 1, 0, None)
        inter = ix * iy
        area_gt = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
        iou = inter / (area_gt + side * side - inter)
        best.append(iou.max())
    best = np.array(best)
    acc = {t: float((best >= t / 100).sum() * 100 / len(best)) for t in (30, 50, 70)}
    return acc, [int(v) for v in box]


def test_compare_script_four_methods(shared_data, tmp_path):
    out = tmp_path / "cmp"
    proc = run_script(shared_data, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert report["complete"] is True

    rows = report["rows"]
    for method in METHODS:
        expected_maps = ["M", "M_a", "M_c"] if method in ("dbc", "cls") else ["M"]
        mine = [r for r in rows if r["method"] == method]
        assert [r["map"] for r in mine] == expected_maps, mine
        evaluated = json.loads((out / method / "eval" / "metrics.json").read_text())
        assert evaluated["method"] == method and evaluated["images"] == LIMIT_VAL
        log = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert len(log) == 1 and log[0]["train_images"] == STEPS * BATCH
        for r in mine:
            assert r["status"] == "done"
            for key in ("top1_cls", "gt_known_loc", "top1_loc", "MaxBoxAccV2"):
                assert 0 <= r[key] <= 100, (method, r["map"], key, r[key])
                assert r[key] == evaluated["metrics"][r["map"]][key]  # the table shows what eval measured
            # images/s from the run's own log: the images it trained over its training time
            assert r["train_images_per_s"] == pytest.approx(STEPS * BATCH / log[0]["train_time_s"], rel=1e-6)
            assert r["epochs_done"] == 1
            assert f"| {method} | {r['map']} | {r['top1_cls']:.2f} | {r['gt_known_loc']:.2f} |" in table
    # cls is DBC with the contrastive losses off
    cls_args = json.loads((out / "cls" / "config.json").read_text())["args"]
    assert cls_args["lambda_pos"] == 0 and cls_args["lambda_neg"] == 0

    baseline = report["baseline"]
    acc, box = direct_centered_box(shared_data, IMG, LIMIT_VAL)
    assert baseline["count"] == LIMIT_VAL and baseline["box"] == box == [4, 4, 27, 27]
    assert baseline["gt_known_loc"] == pytest.approx(acc[50])
    assert baseline["MaxBoxAccV2"] == pytest.approx(np.mean([acc[30], acc[50], acc[70]]))
    assert f"| centred box 24x24 (0.75*S) | - | - | {acc[50]:.2f} |" in table

    # an existing OUT without --resume is refused; with --resume finished runs are skipped, same table
    refused = run_script(shared_data, out)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    again = run_script(shared_data, out, "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training already done" in again.stdout and "evaluation already done" in again.stdout
    assert "$ " not in again.stdout  # no train/eval command ran
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_compare_script_stops_at_max_minutes(shared_data, tmp_path):
    out = tmp_path / "cmp"
    proc = run_script(shared_data, out, "--methods", "cam", "--max-minutes", "0.02")  # ~1 s: stops in training
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "re-run with --resume" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] is False
    assert report["rows"] == [{"method": "cam", "map": None, "status": "stopped (time up)"}]
    assert report["baseline"]["count"] == LIMIT_VAL  # the baseline needs no training
