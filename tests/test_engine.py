"""Training loop: exact resume (also after a kill in the middle of an epoch), NaN loss, bad images.

Real data (tiny-imagenet-mini) at 32x32 with a handful of steps. The exact-resume test trains the real
Conformer-Ti DBC model; the NaN and bad-image tests exercise the loop's policies with a small stand-in
model (the loop, not the model, is under test there) to keep the suite fast on 2 CPU cores.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dbc_fast
from dbc_fast.cli import main as cli_main
from dbc_fast.cli.train import train_options
from dbc_fast.engine.train import (build_optimizer, channels_last_enabled, compile_model,
                                   configure_device, count_step_syncs, model_options, train_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common_args(data, out, *extra):
    return ["train", "--dataset", "tiny-imagenet", "--data", str(data), "--img-size", "32", "--batch-size", "2",
            "--device", "cpu", "--num-workers", "0", "--ops-backend", "eager", "--no-progress", "--out", str(out),
            *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_after_kill_mid_epoch_matches_uninterrupted_run(shared_data, tmp_path):
    data = shared_data / "tiny-imagenet-mini.tar.gz"
    settings = ["--epochs", "2", "--max-steps-per-epoch", "2", "--limit-val-images", "2", "--seed", "3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli_main(common_args(data, full, *settings)) == 0

    # A second run is killed (hard exit, no clean-up) after its 3rd step = epoch 2, step 1; it writes a
    # mid-epoch checkpoint every step.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "dbc_fast", *common_args(data, killed, *settings),
                           "--save-every-steps", "1", "--debug-kill-after-steps", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    state = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 1, 3)
    assert len(read_jsonl(killed / "metrics.jsonl")) == 1  # epoch 1 finished, epoch 2 did not

    assert cli_main(common_args(data, killed, *settings, "--save-every-steps", "1", "--resume")) == 0
    a = torch.load(full / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)
    assert (b["epoch"], b["step"], b["global_step"]) == (2, 0, 4)
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert a["scheduler"] == b["scheduler"]
    la, lb = read_jsonl(full / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    assert [r["train"] for r in la] == [r["train"] for r in lb]  # epoch 2's loss includes the step before the kill
    assert [r["val"] for r in la] == [r["val"] for r in lb]
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]
    # nothing half-written is left behind
    assert sorted(p.name for p in killed.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class StandInModel(nn.Module):
    """The model interface (dict of logits, maps and losses) in a few parameters; loss NaN on demand."""

    def __init__(self, arch, num_classes, method="dbc", nan_at_call=None, nan_grad_at_call=None, **options):
        super().__init__()
        self.arch, self.num_classes, self.method = arch, num_classes, method
        self.options = dict(options)
        self.conv = nn.Conv2d(3, 8, 3, stride=16, padding=1)
        self.head = nn.Linear(8, num_classes)
        self.nan_at_call = nan_at_call
        self.nan_grad_at_call = nan_grad_at_call  # a finite loss whose gradient is NaN: the update breaks the weights
        self.calls = 0

    def forward(self, images, labels=None, map_classes=None):
        feat = F.relu(self.conv(images))
        logits = self.head(feat.mean((2, 3)))
        m = feat.mean(1)
        out = {"logits": logits, "map": m, "map_a": m, "map_c": m}
        if labels is not None:
            self.calls += 1
            loss = F.cross_entropy(logits, labels)
            if self.calls == self.nan_at_call:
                loss = loss * float("nan")
            if self.calls == self.nan_grad_at_call:
                loss = NaNGradient.apply(loss)
            zero = loss.new_zeros(())
            out.update(loss=loss, loss_cla=loss, loss_neg=zero, loss_pos=zero)
        return out


def use_stand_in(monkeypatch, **kwargs):
    def create(arch, num_classes, method="dbc", pretrained=None, **options):
        return StandInModel(arch, num_classes, method, **kwargs, **options)

    monkeypatch.setattr(dbc_fast, "create_model", create, raising=False)


@pytest.mark.parametrize("log_every", ["1", "20"])
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(log_every, shared_data, tmp_path, monkeypatch,
                                                                    capsys):
    # Checked at every step (--log-every 1) or only at the epoch's end (the default, 20 > 2 steps): the message
    # names the same first bad step and the checkpoint of epoch 1 stays intact.
    use_stand_in(monkeypatch, nan_at_call=3)  # epoch 1 = calls 1-2, NaN at epoch 2 step 1
    out = tmp_path / "run"
    rc = cli_main(common_args(shared_data / "tiny-imagenet-mini.tar.gz", out, "--epochs", "3",
                              "--max-steps-per-epoch", "2", "--val-split", "none", "--log-every", log_every))
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 1" in err and "loss=nan" in err and "loss_cla=nan" in err
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(read_jsonl(out / "metrics.jsonl")) == 1


def copy_tiny_imagenet(shared_data, tmp_path):
    from dbc_fast.data import resolve_root

    src = resolve_root(shared_data / "tiny-imagenet-mini.tar.gz")
    dst = tmp_path / "tiny"
    shutil.copytree(src, dst)
    return dst


def test_unreadable_training_image_is_skipped_and_counted(shared_data, tmp_path, monkeypatch, capsys):
    from dbc_fast.data import build_dataset

    use_stand_in(monkeypatch)
    data = copy_tiny_imagenet(shared_data, tmp_path)
    first = build_dataset("tiny-imagenet", data, "train", img_size=32).samples[:4]
    bad = first[1].path
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    out = tmp_path / "run"
    rc = cli_main(common_args(data, out, "--epochs", "1", "--limit-train-images", "4", "--val-split", "none",
                              "--max-skipped-fraction", "0.5"))
    assert rc == 0
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert record["skipped_images"] == 1 and record["skipped_files"] == [bad]
    assert record["train_images"] == 3

    # more unreadable images than --max-skipped-fraction allows stop the run, naming a file
    rc = cli_main(common_args(data, tmp_path / "run2", "--epochs", "1", "--limit-train-images", "4",
                              "--val-split", "none", "--max-skipped-fraction", "0.1"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 of 4 images could not be read" in err and bad in err


def test_unreadable_evaluation_image_stops_with_its_name(shared_data, tmp_path):
    from dbc_fast.data import DatasetError, build_dataset
    from dbc_fast.data.loader import build_loader

    data = copy_tiny_imagenet(shared_data, tmp_path)
    dataset = build_dataset("tiny-imagenet", data, "val", img_size=32)
    bad = dataset.samples[2].path
    with open(bad, "wb") as f:
        f.write(b"not an image")
    loader = build_loader(dataset, 4, train=False, device="cpu", num_workers=0)
    with pytest.raises(DatasetError, match=os.path.basename(bad)):
        for _ in loader:
            pass


def test_loader_order_and_augmentation_depend_only_on_seed_and_epoch(shared_data):
    from dbc_fast.data import build_dataset
    from dbc_fast.data.loader import build_loader

    dataset = build_dataset("tiny-imagenet", shared_data / "tiny-imagenet-mini.tar.gz", "train", img_size=32,
                            train=True)

    def epoch_batches(loader, epoch, start=0, n=3):
        loader.set_epoch(epoch, start)
        out = []
        for batch in loader:
            out.append((batch["index"].tolist(), batch["image"].clone()))
            if len(out) == n:
                break
        return out

    a = build_loader(dataset, 4, train=True, device="cpu", num_workers=0, seed=5)
    b = build_loader(dataset, 4, train=True, device="cpu", num_workers=2, seed=5)
    assert len(a) == len(dataset) // 4
    e1a, e1b = epoch_batches(a, 1), epoch_batches(b, 1)
    assert [i for i, _ in e1a] == [i for i, _ in e1b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(e1a, e1b))  # same crops/flips in worker processes
    resumed = epoch_batches(a, 1, start=1, n=2)  # resuming at batch 1 gives batches 1 and 2
    assert [i for i, _ in resumed] == [i for i, _ in e1a[1:]]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(resumed, e1a[1:]))
    assert [i for i, _ in epoch_batches(a, 2)] != [i for i, _ in e1a]  # another epoch, another order


def test_log_every_does_not_change_the_logged_losses(shared_data, tmp_path, monkeypatch):
    # Losses stay on the device between checks; checking every step or every 3rd gives the same metrics.
    use_stand_in(monkeypatch)
    runs = {}
    for every in ("1", "3"):
        out = tmp_path / every
        assert cli_main(common_args(shared_data / "tiny-imagenet-mini.tar.gz", out, "--epochs", "2",
                                    "--max-steps-per-epoch", "5", "--val-split", "none", "--log-every", every)) == 0
        runs[every] = read_jsonl(out / "metrics.jsonl")
    assert [r["train"] for r in runs["1"]] == [r["train"] for r in runs["3"]]
    assert [r["train_images"] for r in runs["1"]] == [r["train_images"] for r in runs["3"]] == [10, 10]
    assert all(r["train"]["loss"] > 0 for r in runs["1"])


def test_train_step_reads_no_tensor_values_on_the_host():
    """The real DBC model's step (forward, losses, backward, clipping, AdamW) on meta tensors, which hold no
    values: any .item(), .tolist(), bool(tensor) or data-dependent shape raises, so on a GPU the host never
    has to wait for the device inside a step."""
    args = train_options("--ops-backend", "eager", "--device", "cpu")
    with torch.device("meta"):
        model = dbc_fast.create_model("conformer_tiny_patch16", 10, method="dbc", **model_options(args))
    optimizer = build_optimizer(model, args, torch.device("cpu"))
    images = torch.empty(2, 3, 64, 64, device="meta")
    labels = torch.empty(2, dtype=torch.long, device="meta")
    model.train()
    for _ in range(2):  # the second step runs AdamW with its state
        record = train_step(model, optimizer, images, labels, clip_grad=1.0)
    assert record.shape == (5,) and record.device.type == "meta"
    assert len(optimizer.state) == len(list(model.parameters()))
    with pytest.raises(RuntimeError, match="meta"):  # the premise: reading a value would have failed
        record[0].item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sync debug mode counts host syncs on a GPU")
@pytest.mark.parametrize("ops_backend", ["auto", "eager"])
def test_trainer_step_makes_no_host_sync_on_cuda(ops_backend):
    # mode "error": the first synchronizing CUDA call raises with its stack.
    options = train_options("--ops-backend", ops_backend, "--amp", "bf16", "--device", "cuda")
    assert count_step_syncs(options, batch_size=8, img_size=224, steps=3, mode="error") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_count_step_syncs_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        count_step_syncs(train_options(), device="cpu")


def test_gpu_defaults_channels_last_fused_adamw_cudnn_benchmark(monkeypatch):
    def on_cuda(*argv):  # --device cuda is refused at parse time on a machine without CUDA
        args = train_options(*argv)
        args.device = "cuda"
        return args

    assert channels_last_enabled(on_cuda())
    assert not channels_last_enabled(on_cuda("--no-channels-last"))
    assert not channels_last_enabled(train_options("--device", "cpu"))
    assert channels_last_enabled(train_options("--device", "cpu", "--channels-last"))
    model, args = nn.Linear(3, 2), train_options()
    # torch also has a fused AdamW for CPU tensors, so the CUDA choice can be built here.
    fused = build_optimizer(model, args, torch.device("cuda"))
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    assert not build_optimizer(model, args, torch.device("cpu")).defaults.get("fused")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_device(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True


def test_compile_fullgraph_step_matches_eager(monkeypatch):
    """--compile: the DBC model compiles with inductor on CPU in one graph (fullgraph=True: a graph break, e.g. in
    the ops backend choice, raises) through the trainer's step, with the eager model's loss and gradients.
    A 3-block Conformer of the tiny family at 64x64 keeps the compile near a minute on 2 cores."""
    from dbc_fast import ops
    from dbc_fast.models import conformer

    monkeypatch.setitem(conformer.ARCH_CONFIGS, "conformer_tiny_patch16",
                        dict(patch_size=16, channel_ratio=1, embed_dim=48, depth=3, num_heads=2))
    monkeypatch.setattr(ops, "_AVAILABLE", {})  # the backend probe happens inside compile_model, not before
    args = train_options("--ops-backend", "auto", "--device", "cpu", "--drop-path", "0", "--fstar-block", "2")
    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", 5, method="dbc", **model_options(args))
    model.train()
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(2, 3, 64, 64, generator=gen), torch.tensor([1, 3])
    torch._dynamo.reset()
    compiled = compile_model(model, torch.device("cpu"), fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put: eager sees the same model
    got = train_step(compiled, optimizer, images, labels)
    got_grads = [p.grad.clone() for p in model.parameters()]
    want = train_step(model, optimizer, images, labels)
    want_grads = [p.grad for p in model.parameters()]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(want).all() and want[0] > 0 and want[2] > 0  # L_neg took part
    total = torch.cat([g.flatten() for g in want_grads]).norm()
    for a, b in zip(got_grads, want_grads):  # biases before a BatchNorm have ~1e-9 grads: error relative to all
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6 * total
