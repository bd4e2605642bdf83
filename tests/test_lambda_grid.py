"""benchmarks/lambda_grid.py (paper Fig. 6) at toy size on CPU on the real 10-class Tiny ImageNet sample: each
cell trains with its own lambdas (its logged loss = L_cla + lambda_neg L_neg + lambda_pos L_pos), the table
holds each cell's scored figures, the heat-map PNG is written, and --resume skips finished cells."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lambda_grid.py"
POS, NEG = ("0", "2"), ("0.1", "1")


def run_grid(shared_data, out, *extra):
    cmd = [sys.executable, str(SCRIPT), "--data", str(shared_data / "tiny-imagenet-mini.tar.gz"), "--out", str(out),
           "--lambda-pos", *POS, "--lambda-neg", *NEG, "--img-size", "32", "--epochs", "1",
           "--max-steps-per-epoch", "1", "--batch-size", "8", "--eval-batch-size", "5", "--limit-val-images", "10",
           "--device", "cpu", "--amp", "none", "--eval-threads", "1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)


def test_lambda_grid_toy(shared_data, tmp_path):
    out = tmp_path / "grid"
    proc = run_grid(shared_data, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] and len(report["cells"]) == 4
    table = (out / "results.md").read_text()
    for lp in POS:
        for ln in NEG:
            name = f"pos{float(lp):g}_neg{float(ln):g}"
            cell = report["cells"][name]
            assert cell["status"] == "done" and cell["lambda_pos"] == float(lp) and cell["lambda_neg"] == float(ln)
            (record,) = [json.loads(line) for line in open(out / name / "metrics.jsonl")]
            expected = record["loss_cla"] + float(ln) * record["loss_neg"] + float(lp) * record["loss_pos"]
            assert record["loss"] == pytest.approx(expected, rel=1e-5)
            assert cell["metrics"]["M"]["count"] == 10
    # each table row: lambda_pos, then the cells' Top-1 Loc of M in lambda_neg order
    top1 = table.split("## Top-1 Loc (M)")[1].split("##")[0]
    for lp in POS:
        row = re.search(rf"^\| {float(lp):g} \| (.*) \|$", top1, re.M).group(1).split(" | ")
        assert row == [f"{report['cells'][f'pos{float(lp):g}_neg{float(ln):g}']['metrics']['M']['top1_loc']:.2f}"
                       for ln in NEG]
    losses = {json.loads(open(out / n / "metrics.jsonl").readline())["loss"] for n in report["cells"]}
    assert len(losses) == 4  # the lambdas reached the models
    heat = Image.open(out / "heatmap.png")
    assert heat.format == "PNG" and heat.size[0] > 2 * 96 and heat.size[1] > 2 * 96

    again = run_grid(shared_data, out, "--resume")
    assert again.returncode == 0 and again.stdout.count("already done") == 4
    refused = run_grid(shared_data, out)
    assert refused.returncode != 0 and "--resume" in refused.stderr
