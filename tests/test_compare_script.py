"""benchmarks/tiny_imagenet_compare.py end to end on CPU with a tiny budget on the real 10-class sample: all four
methods trained (2 steps) and scored, the table's figures equal to `evaluate_model` on the torch loader for the
saved weights, the centred-box baseline checked against a direct IoU computation, --resume skipping finished runs
and --max-minutes stopping cleanly."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = ROOT / "benchmarks" / "tiny_imagenet_compare.py"
IMG, LIMIT_VAL, BATCH, STEPS = 32, 20, 8, 2
METHODS = ("dbc", "cls", "tscam", "cam")


def run_script(shared_data, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--data", str(shared_data / "tiny-imagenet-mini.tar.gz"), "--out", str(out),
           "--methods", *METHODS, "--img-size", str(IMG), "--epochs", "1", "--max-steps-per-epoch", str(STEPS),
           "--batch-size", str(BATCH), "--eval-batch-size", "5", "--limit-val-images", str(LIMIT_VAL),
           "--device", "cpu", "--amp", "none", "--eval-threads", "1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per process: 2 busy cores
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


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
        gt = np.trunc(np.asarray(sample.boxes, np.float64) * [img_size / w, img_size / h, img_size / w, img_size / h])
        ix = np.clip(np.minimum(gt[:, 2], box[2]) - np.maximum(gt[:, 0], box[0]) + 1, 0, None)
        iy = np.clip(np.minimum(gt[:, 3], box[3]) - np.maximum(gt[:, 1], box[1]) + 1, 0, None)
        inter = ix * iy
        area_gt = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
        best.append((inter / (area_gt + side * side - inter)).max())
    best = np.array(best)
    acc = {t: float((best >= t / 100).sum() * 100 / len(best)) for t in (30, 50, 70)}
    return acc, [int(v) for v in box]


def torch_loader_metrics(shared_data, run_dir, method):
    """`dbc-fast eval`'s figures for the run's saved weights, through the torch DataLoader (PIL pixels)."""
    import dbc_fast
    from dbc_fast.data import build_dataset, collate
    from dbc_fast.engine.evaluate import evaluate_model

    dataset = build_dataset("tiny-imagenet", str(shared_data / "tiny-imagenet-mini.tar.gz"), "val",
                            img_size=IMG, train=False)
    dataset.samples = dataset.samples[:LIMIT_VAL]
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate)  # the script's --eval-batch-size: same numerics
    model = dbc_fast.create_model("conformer_tiny_patch16", num_classes=200, method=method)
    model.load_state_dict(torch.load(run_dir / "last.pt", weights_only=True)["model"])
    return evaluate_model(model, loader, torch.device("cpu"), progress=False)


def test_compare_script_four_methods(shared_data, tmp_path, one_thread):
    out = tmp_path / "cmp"
    proc = run_script(shared_data, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert report["complete"] is True
    assert report["settings"]["epochs_chosen"] == 1

    rows = report["rows"]
    for method in METHODS:
        expected_maps = ["M", "M_a", "M_c"] if method in ("dbc", "cls") else ["M"]
        mine = [r for r in rows if r["method"] == method]
        assert [r["map"] for r in mine] == expected_maps, mine
        log = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert len(log) == 1 and log[0]["epoch"] == 1 and np.isfinite(log[0]["loss"])
        if method == "cls":  # DBC with the contrastive losses off: the total is the classification loss alone
            assert log[0]["loss"] == pytest.approx(log[0]["loss_cla"]) and log[0]["loss_pos"] > 0
        if method == "dbc":
            assert log[0]["loss"] > log[0]["loss_cla"]
        # the device-resident evaluation gives exactly what the torch loader gives for the same weights
        reference = torch_loader_metrics(shared_data, out / method, method)
        for r in mine:
            assert r["status"] == "done" and r["epochs_done"] == 1
            for key in ("top1_cls", "gt_known_loc", "top1_loc", "MaxBoxAccV2", "best_gt_known_loc"):
                assert r[key] == pytest.approx(reference[r["map"]][key], abs=1e-9), (method, r["map"], key)
            assert r["train_images_per_s"] == pytest.approx(STEPS * BATCH / log[0]["seconds"], rel=1e-6)
            assert f"| {method} | {r['map']} | {r['top1_cls']:.2f} | {r['gt_known_loc']:.2f} |" in table

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
    assert again.stdout.count("already done") == len(METHODS) and ": training" not in again.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_compare_script_stops_at_max_minutes_and_resumes(shared_data, tmp_path):
    out = tmp_path / "cmp"
    # the deadline (max-minutes minus a 20 s margin) has passed before the first step: cam stops at step 0
    proc = run_script(shared_data, out, "--methods", "cam", "--max-minutes", "0.01")
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "re-run with --resume" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] is False
    assert report["rows"] == [{"method": "cam", "map": None, "status": "stopped (time up)"}]
    assert (out / "cam" / "last.pt").is_file()
    assert report["baseline"]["count"] == LIMIT_VAL  # the baseline needs no training
    done = run_script(shared_data, out, "--methods", "cam", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming at epoch 1, step 0" in done.stdout
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_pack_splits_the_set_into_a_usable_core_and_the_rest(shared_data, tmp_path):
    import tarfile

    from dbc_fast.data import build_dataset

    out = tmp_path / "packed"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tiny_imagenet_pack.py"), "--data",
                           str(shared_data / "tiny-imagenet-mini.tar.gz"), "--out", str(out), "--core-per-class", "15"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(shared_data / "tiny-imagenet-mini.tar.gz") as tar:
        original = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    parts = {}
    for name in ("core", "extra"):
        with tarfile.open(out / f"{name}.tar.gz") as tar:
            parts[name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert not parts["core"].keys() & parts["extra"].keys()
    assert {**parts["core"], **parts["extra"]} == original  # together: the set, file for file
    assert all("/train/" in name and name.endswith(".JPEG") for name in parts["extra"])

    # the core alone is a dataset: every val image, 15 training images per class
    train = build_dataset("tiny-imagenet", str(out / "core.tar.gz"), "train", img_size=32, missing_images="skip")
    val = build_dataset("tiny-imagenet", str(out / "core.tar.gz"), "val", img_size=32)
    full_val = build_dataset("tiny-imagenet", str(shared_data / "tiny-imagenet-mini.tar.gz"), "val", img_size=32)
    assert np.bincount([s.label for s in train.samples]).tolist() == [15] * train.num_classes
    assert len(val) == len(full_val)
