"""torchrun + DistributedDataParallel on CPU (gloo): two processes train, validate and resume.

Checks: the run finishes; only rank 0 writes (one last.pt / best.pt / metrics.jsonl with one line per
epoch, no stray temporary files); each rank trains on its own shard (train_images = 2 ranks x batch); the
validation numbers gathered from both ranks equal a single-process `dbc-fast eval` of the same checkpoint
on the same images; a distributed run killed mid-way resumes under torchrun and finishes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from dbc_fast.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, timeout=500):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes share two cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dbc_fast", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_train_validate_resume(shared_data, tmp_path):
    data = shared_data / "tiny-imagenet-mini.tar.gz"
    out = tmp_path / "run"
    train = ["train", "--dataset", "tiny-imagenet", "--data", str(data), "--img-size", "32", "--batch-size", "2",
             "--epochs", "2", "--max-steps-per-epoch", "1", "--limit-val-images", "6", "--eval-batch-size", "2",
             "--device", "cpu", "--num-workers", "0", "--ops-backend", "eager", "--no-progress", "--out", str(out)]

    # first launch: killed (hard exit on every rank) after epoch 1's checkpoint
    proc = torchrun(train + ["--debug-kill-after-steps", "1"])
    assert proc.returncode != 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 1
    assert len(state["rng"]) == 2  # both ranks' RNG streams are saved

    # second launch resumes and finishes epoch 2
    proc = torchrun(train + ["--resume"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "epoch 2" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["train_images"] == 4 for r in records)  # 2 ranks x batch 2
    assert json.load(open(out / "config.json"))["world_size"] == 2
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 2
    assert not any(k.startswith("module.") for k in last["model"])  # the model's own keys, not DDP's

    # validation gathered over both ranks (3 images each) == one process on the 6 images
    best_epoch = last["best_metric"]["epoch"]
    val = records[best_epoch - 1]["val"]
    assert val["count"] == 6
    rc = cli_main(["eval", "--dataset", "tiny-imagenet", "--data", str(data), "--checkpoint", str(out / "best.pt"),
                   "--img-size", "32", "--device", "cpu", "--num-workers", "0", "--limit-images", "6",
                   "--maps", "M", "--no-maxboxacc", "--sweep-interval", "0", "--no-progress",
                   "--out", str(tmp_path / "eval")])
    assert rc == 0
    single = json.load(open(tmp_path / "eval" / "metrics.json"))["metrics"]["M"]
    for key in ("top1_cls", "top5_cls", "gt_known_loc", "top1_loc", "top5_loc", "count"):
        assert single[key] == val[key], key
