"""torchrun + DistributedDataParallel on CPU (gloo): two processes train, validate and resume.

Checks: the run finishes; only rank 0 writes (one last.pt / best.pt / metrics.jsonl with one line per
epoch, no stray temporary files); each rank trains on its own shard (train_images = 2 ranks x batch); the
validation numbers gathered from both ranks equal a single-process `dbc-fast eval` of the same checkpoint
on the same images; a distributed run killed mid-way resumes under torchrun and finishes.
gather_negatives: two gloo processes (DDP) give the losses and gradients of one process on the whole batch.
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


GATHER_ARCH, GATHER_CLASSES = "conformer_tiny_patch16", 5


def _calibrated_model(images, **options):
    """A tiny model with BatchNorm statistics of `images` (identical in every process) in eval mode, so the
    forward is the same function of each image whatever batch it is in."""
    from dbc_fast.models import create_model

    torch.manual_seed(0)
    model = create_model(GATHER_ARCH, GATHER_CLASSES, drop_path_rate=0.0, ops_backend="eager", **options)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # running statistics = this one batch's
    with torch.no_grad():
        model(images)
    return model.eval()


def _gather_worker(rank, world, init_file, images, labels, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _calibrated_model(images, gather_negatives=True)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = images.shape[0] // world
        rows = slice(rank * half, (rank + 1) * half)
        out = ddp(images[rows], labels[rows])
        out["loss"].backward()
        record = {"even": {k: v.detach() for k, v in out.items() if k.startswith("loss")},
                  "grads": {name: p.grad for name, p in model.named_parameters()}}
        with torch.no_grad():  # uneven shards: 3 rows on rank 0, 1 on rank 1
            rows = slice(0, 3) if rank == 0 else slice(3, 4)
            out = model(images[rows], labels[rows])
        record["uneven"] = {k: v for k, v in out.items() if k.startswith("loss")}
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_gather_negatives_two_processes_equal_one_process_on_the_global_batch(shared_data, tmp_path):
    import torch.multiprocessing as mp

    from dbc_fast.data import build_dataset, collate

    dataset = build_dataset("tiny-imagenet", str(shared_data / "tiny-imagenet-mini.tar.gz"), "val", img_size=64)
    images = collate([dataset[i] for i in (0, 10, 20, 30)])["image"]
    labels = torch.tensor([0, 1, 2, 3])
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "rendezvous"), images, labels, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.set_num_threads(1)
    single = _calibrated_model(images)  # gather_negatives off: one process, the whole batch
    out = single(images, labels)
    out["loss"].backward()
    contrastive = ("loss_neg", "loss_neg_c", "loss_neg_t", "loss_pos")
    for key in contrastive:
        for record in ranks:
            for split in ("even", "uneven"):
                torch.testing.assert_close(record[split][key], out[key].detach(), rtol=1e-5, atol=1e-6)
    # each rank's L_cla is its own images' mean, as DDP's gradient average expects
    torch.testing.assert_close((ranks[0]["even"]["loss_cla"] + ranks[1]["even"]["loss_cla"]) / 2,
                               out["loss_cla"].detach(), rtol=1e-5, atol=1e-6)
    # a per-rank batch would see other negatives: the test tells the two apart
    with torch.no_grad():
        per_rank = single(images[:2], labels[:2])
    assert not torch.allclose(per_rank["loss_neg"], out["loss_neg"], rtol=1e-3)
    for name, param in single.named_parameters():
        scale = param.grad.abs().max().item()
        for record in ranks:
            torch.testing.assert_close(record["grads"][name], param.grad, rtol=1e-4, atol=1e-5 * scale + 1e-9,
                                       msg=lambda m: f"{name}: {m}")
