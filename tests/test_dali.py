"""DALI loader (dbc_fast.data.dali) against the PyTorch loader on the real samples in ../shared/data.

Runs DALI's CPU pipelines (device_id=None); the GPU (device="mixed") pipeline is checked only for its graph
(which operators run on the GPU), since CI has no GPU. Without DALI installed the DALI tests skip; the
install-hint and fallback tests run either way.

Tolerance (pixels in 0..255 units, after undoing the normalisation): JPEG decoding is bit-identical
(libjpeg-turbo in both); resizing differs by rounding inside the image (|diff| <= 1) and at the outermost
row/column when shrinking (PIL renormalises its truncated filter, DALI clamps: up to ~12 measured on the
raccoon photos). Asserted: mean |diff| <= 0.3, interior max <= 1 (+ float noise), 99.9th percentile
<= 2, max <= 16. Labels, indices, order, paths, original sizes and boxes are identical.
"""
from __future__ import annotations

import functools
import importlib
import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

from dbc_fast.data import Sample, WSOLDataset, build_dataset
from dbc_fast.data.loader import build_loader

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install 'dbc_fast[dali]')")

STD255 = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


@functools.lru_cache(maxsize=None)
def _read(shared, name, split):
    archives = {"tiny-imagenet": "tiny-imagenet-mini.tar.gz", "cub": "cub-sample.tar.gz",
                "ilsvrc": "ilsvrc-val-300.tar", "folder": "raccoon.tar"}
    options = {}
    if name == "ilsvrc":  # the metadata files inside ilsvrc-val-300.tar are empty: use wsolevaluation's
        options = dict(metadata=shared / "wsolevaluation-metadata.tar.gz", missing_images="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_dataset(name, shared / archives[name], split, **options)


def _build(shared, name, split, n, train, img_size=224):
    ds = _read(shared, name, split)
    return WSOLDataset(ds.samples[:n], ds.class_names, img_size=img_size, train=train, name=ds.name,
                       split=ds.split, root=ds.root)


def _dali(ds, batch_size, train, **kw):
    from dbc_fast.data.dali import DaliLoader
    return DaliLoader(ds, batch_size, train=train, device="cpu", num_threads=2, **kw)


def _torch(ds, batch_size, train, **kw):
    return build_loader(ds, batch_size, train=train, loader="torch", device="cpu", num_workers=0,
                        distributed=False, **kw)


def _compare(dali_loader, torch_loader):
    """Asserts identical metadata batch by batch; returns |diff| of all pixels and of the interior."""
    diffs, interior, batches = [], [], 0
    for a, b in zip(dali_loader, torch_loader, strict=True):
        batches += 1
        assert a["index"].tolist() == b["index"].tolist()
        assert a["label"].tolist() == b["label"].tolist()
        assert a["path"] == b["path"]
        assert a["orig_size"] == b["orig_size"]
        assert len(a["boxes"]) == len(b["boxes"])
        for x, y in zip(a["boxes"], b["boxes"]):
            assert x.dtype == y.dtype and torch.equal(x, y), (x, y)
        assert a["image"].shape == b["image"].shape and a["image"].dtype == torch.float32
        assert a["label"].dtype == torch.long
        d = (a["image"] - b["image"]).abs() * STD255
        diffs.append(d.flatten())
        interior.append(d[:, :, 1:-1, 1:-1].flatten())
    assert batches == len(dali_loader) == len(torch_loader)
    return torch.cat(diffs), torch.cat(interior)


def _assert_tolerance(d, inner):
    assert d.mean() <= 0.3, float(d.mean())
    assert inner.max() <= 1.01, float(inner.max())
    assert float(np.quantile(d.numpy(), 0.999)) <= 2.01
    assert d.max() <= 16.0, float(d.max())


# ------------------------------------------------------------------------------- same images as torch
CASES = [("tiny-imagenet", "val", 32), ("cub", "test", 2), ("cub", "train", 2), ("ilsvrc", "test", 32),
         ("folder", "train", 16)]


@needs_dali
@pytest.mark.parametrize("name,split,n", CASES)
def test_eval_matches_torch_loader(shared_data, name, split, n):
    ds = _build(shared_data, name, split, n, train=False)
    d, inner = _compare(_dali(ds, 8, train=False), _torch(ds, 8, train=False))
    assert d.numel() == len(ds) * 3 * 224 * 224
    _assert_tolerance(d, inner)


@needs_dali
@pytest.mark.parametrize("name,split,n", [("tiny-imagenet", "train", 16), ("ilsvrc", "test", 12),
                                          ("folder", "train", 8)])
def test_train_matches_torch_loader_crop_and_flip(shared_data, name, split, n):
    """Same shuffled order, and the same crop offset and flip per sample (drawn from (seed, epoch, index)),
    so the training batches agree within the resize tolerance, boxes exactly; over two epochs."""
    from dbc_fast.data.transforms import train_params

    ds = _build(shared_data, name, split, n, train=True)
    dali, torch_loader = _dali(ds, 4, train=True, seed=7, drop_last=True), _torch(ds, 4, train=True, seed=7)
    orders = []
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        torch_loader.set_epoch(epoch)
        d, inner = _compare(dali, torch_loader)
        _assert_tolerance(d, inner)
        orders.append([i for b in dali.batches for i in b])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
    params = [train_params(7, 0, i, 224) for i in range(len(ds))]
    assert {p[2] for p in params} == {True, False} or len(ds) < 8  # both flips happen
    assert len({p[:2] for p in params}) > 1  # crop offsets vary
    assert all(0 <= p[0] <= 32 and 0 <= p[1] <= 32 for p in params)  # 256 - 224


@needs_dali
def test_train_pipeline_crop_and_flip_are_exact(shared_data):
    """The DALI train output equals DALI's own R x R resize cropped at (left, top) and flipped as
    train_params says: the crop/flip parameters reach the pipeline exactly (no off-by-one)."""
    from dbc_fast.data.dali import DaliLoader
    from dbc_fast.data.transforms import train_params

    ds = _build(shared_data, "tiny-imagenet", "val", 12, train=True)
    r = 256
    big = WSOLDataset(ds.samples, ds.class_names, img_size=r, train=False)  # 256 = a multiple of 32
    resized = {int(i): img for b in DaliLoader(big, 6, train=False, device="cpu", num_threads=2)
               for i, img in zip(b["index"], b["image"])}
    flips = set()
    for b in DaliLoader(ds, 6, train=True, device="cpu", num_threads=2, seed=3):
        assert b["image"].shape == (len(b["index"]), 3, 224, 224)
        for i, img in zip(b["index"].tolist(), b["image"]):
            left, top, flip = train_params(3, 0, i, 224)
            want = resized[i][:, top:top + 224, left:left + 224]
            if flip:
                want = want.flip(-1)
            flips.add(flip)
            assert torch.allclose(img, want, atol=1e-5), i
    assert flips == {True, False}


@needs_dali
def test_resume_inside_an_epoch_repeats_the_batches(shared_data):
    ds = _build(shared_data, "tiny-imagenet", "train", 20, train=True)
    full = _dali(ds, 4, train=True, seed=1, drop_last=True)
    full.set_epoch(2)
    whole = [(b["index"].tolist(), b["image"]) for b in full]
    resumed = _dali(ds, 4, train=True, seed=1, drop_last=True)
    resumed.set_epoch(2, start_step=3)
    rest = [(b["index"].tolist(), b["image"]) for b in resumed]
    assert [i for i, _ in rest] == [i for i, _ in whole[3:]]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(rest, whole[3:]))


@needs_dali
def test_channels_last_output(shared_data):
    ds = _build(shared_data, "cub", "test", 2, train=False)
    plain = next(iter(_dali(ds, 2, train=False)))["image"]
    cl = next(iter(_dali(ds, 2, train=False, channels_last=True)))["image"]
    assert cl.shape == plain.shape and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, plain)


@needs_dali
def test_unpacked_folder_and_archive_give_the_same_batches(shared_data, tmp_path):
    import tarfile

    with tarfile.open(shared_data / "cub-sample.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    folder = build_dataset("cub", tmp_path / "CUB_200_2011", "test")
    archive = _build(shared_data, "cub", "test", 2, train=False)
    a, b = next(iter(_dali(folder, 2, train=False))), next(iter(_dali(archive, 2, train=False)))
    assert torch.equal(a["image"], b["image"]) and a["label"].tolist() == b["label"].tolist()
    assert all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"]))


@needs_dali
def test_dropped_loader_leaves_no_live_pipeline(shared_data):
    """A loader dropped in the middle of an epoch shuts its pipeline down at once. Left to the cycle
    collector, a pipeline could be destroyed in a forked DataLoader worker and hang it (seen: bench-loader
    running the torch loader after the DALI one)."""
    import gc

    from nvidia.dali.pipeline import Pipeline

    def live():
        return sum(1 for o in gc.get_objects() if type(o) is Pipeline and getattr(o, "_pipe", None) is not None)

    gc.collect()
    before = live()
    ds = _build(shared_data, "tiny-imagenet", "train", 16, train=True)
    loader = _dali(ds, 4, train=True, drop_last=True)
    it = iter(loader)
    image = next(it)["image"]
    copy = image.clone()
    assert live() == before + 1
    del it, loader
    assert live() == before  # without any gc.collect()
    assert torch.equal(image, copy)  # the batch outlives the pipeline
    torch_loader = build_loader(ds, 4, train=True, loader="torch", device="cpu", num_workers=1, distributed=False)
    assert len(next(iter(torch_loader))["index"]) == 4


# ------------------------------------------------------------------------------------------ sharding
@needs_dali
def test_eval_shards_cover_the_dataset_exactly_once(shared_data):
    ds = _build(shared_data, "tiny-imagenet", "val", 23, train=False)
    seen = []
    for rank in (0, 1):
        loader = _dali(ds, 4, train=False, rank=rank, world_size=2)
        got = [i for b in loader for i in b["index"].tolist()]
        assert got == list(range(rank, 23, 2))  # the torch loader's eval sharding, no padding
        assert len(loader) == -(-len(got) // 4)
        seen += got
    assert sorted(seen) == list(range(23))


@needs_dali
def test_train_shards_follow_distributed_sampler(shared_data):
    ds = _build(shared_data, "tiny-imagenet", "train", 22, train=True)
    shards = []
    for rank in (0, 1):
        loader = _dali(ds, 4, train=True, seed=5, drop_last=True, rank=rank, world_size=2)
        loader.set_epoch(1)
        got = [i for b in loader for i in b["index"].tolist()]
        sampler = torch.utils.data.DistributedSampler(range(22), num_replicas=2, rank=rank, shuffle=True, seed=5,
                                                      drop_last=True)
        sampler.set_epoch(1)
        assert got == list(sampler)[:len(got)] and len(got) == 8 == len(loader) * 4
        shards.append(set(got))
    assert not shards[0] & shards[1]


# ---------------------------------------------------------------------------------------- bad images
@pytest.fixture()
def bad_image_dataset(shared_data, tmp_path):
    """12 real images with a truncated JPEG, a text file, an empty file and a missing file among them."""
    good = _build(shared_data, "tiny-imagenet", "val", 12, train=False).samples
    raw = open(good[0].path, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    bad = [tmp_path / "truncated.jpg", tmp_path / "text.jpg", tmp_path / "empty.jpg", tmp_path / "missing.jpg"]
    samples = list(good[:3]) + [Sample(str(bad[0]), 1, np.zeros((0, 4), np.float32), None)] + list(good[3:7]) \
        + [Sample(str(p), 2, np.zeros((0, 4), np.float32), None) for p in bad[1:]] + list(good[7:])
    return samples, [str(p) for p in bad]


@needs_dali
def test_training_skips_and_counts_bad_images_like_the_torch_loader(bad_image_dataset):
    samples, bad = bad_image_dataset
    ds = WSOLDataset(samples, [str(i) for i in range(200)], img_size=64, train=True)
    dali = _dali(ds, 4, train=True, seed=2, drop_last=True, skip_bad=True)
    torch_loader = _torch(ds, 4, train=True, seed=2)
    for epoch in (0, 1):  # the second epoch knows the bad files already (no pipeline failure)
        dali.set_epoch(epoch)
        torch_loader.set_epoch(epoch)
        got, want = list(dali), list(torch_loader)
        assert len(got) == len(want) == len(dali) == 4
        for a, b in zip(got, want):  # the bad images leave holes in the same batches
            assert a["index"].tolist() == b["index"].tolist()
            assert [s.path for s in a["skipped"]] == [getattr(s, "path", s[0]) for s in b["skipped"]]
            assert len(a["image"]) == len(a["label"]) == len(a["index"])
        assert sorted(s.path for s in dali.skipped) == sorted(bad)
        reasons = {s.path: s.reason for s in dali.skipped}
        assert "does not exist" in reasons[bad[3]] and "empty" in reasons[bad[2]]
        assert "truncated" in reasons[bad[0]]


@needs_dali
def test_evaluation_stops_at_a_bad_image_naming_it(bad_image_dataset):
    samples, bad = bad_image_dataset
    ds = WSOLDataset(samples, [str(i) for i in range(200)], img_size=64, train=False)
    with pytest.raises(RuntimeError, match="truncated.jpg"):
        list(_dali(ds, 4, train=False))
    with pytest.raises(RuntimeError, match=r"missing.jpg: image file does not exist"):
        list(_dali(WSOLDataset(samples[10:], ds.class_names, img_size=64), 4, train=False))


# ------------------------------------------------------------------------------------ GPU graph, auto
@needs_dali
@pytest.mark.parametrize("augment", [False, True])
def test_gpu_pipeline_graph_decodes_and_transforms_on_the_gpu(augment):
    """Without a GPU the mixed pipeline cannot be built, but its graph can be defined: the decoder is
    "mixed" (GPU output) and resize/crop/flip/normalise run on the GPU; index and shape stay on the CPU."""
    from dbc_fast.data.dali import build_pipeline

    def source(iteration):
        raise StopIteration

    pipe = build_pipeline(source, augment=augment, img_size=224, batch_size=4, num_threads=2, device_id=0)
    if not hasattr(pipe, "_build_graph"):
        pytest.skip("this DALI version has no Pipeline._build_graph to inspect the graph without a GPU")
    pipe._build_graph()
    devices = {str(op.spec).split("\n")[0].replace("OpSpec for ", "").rstrip(":"): op.outputs[0].device
               for op in pipe._ops}
    assert devices["decoders__Image"] == "gpu" and devices["Resize"] == "gpu"
    assert devices["CropMirrorNormalize"] == "gpu" and devices["PeekImageShape"] == "cpu"
    assert [o.device for o in pipe._graph_outputs] == ["gpu", "cpu", "cpu"]


def test_auto_picks_torch_without_a_gpu():
    from dbc_fast.data.dali import resolve_loader

    assert resolve_loader("auto", "cpu") == "torch"
    assert resolve_loader("dali", "cpu") == "dali" and resolve_loader("torch", "cuda") == "torch"


@pytest.fixture()
def no_dali(monkeypatch):
    """Makes `import nvidia.dali` fail, as on a machine without DALI."""
    for name in list(sys.modules):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)


def test_loader_dali_without_dali_says_how_to_install(shared_data, no_dali):
    from dbc_fast.data import dali

    ds = _build(shared_data, "cub", "test", 2, train=False)
    assert not dali.dali_available()
    with pytest.raises(ImportError, match=r"pip install 'dbc_fast\[dali\]'"):
        build_loader(ds, 2, train=False, loader="dali", device="cpu", distributed=False)
    with pytest.raises(ImportError, match="nvidia-dali-cuda130"):
        dali.DaliLoader(ds, 2, train=False, device="cpu")
    # auto falls back to the torch loader, everything else works
    assert dali.resolve_loader("auto", "cuda") == "torch"
    batch = next(iter(build_loader(ds, 2, train=False, loader="auto", device="cpu", num_workers=0,
                                   distributed=False)))
    assert batch["image"].shape == (2, 3, 224, 224)


def test_cli_loader_dali_without_dali_says_how_to_install(shared_data, no_dali, capsys):
    from dbc_fast.cli import main

    code = main(["bench-loader", "--data", str(shared_data / "cub-sample.tar.gz"), "--loaders", "dali",
                 "--batch-size", "2", "--batches", "1", "--warmup", "0", "--no-train-step", "--device", "cpu"])
    assert code == 0
    assert "pip install 'dbc_fast[dali]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bench-loader
@needs_dali
def test_bench_loader_reports_images_per_second(shared_data, tmp_path, capsys):
    from dbc_fast.cli import main

    out = tmp_path / "bench.json"
    code = main(["bench-loader", "--data", str(shared_data / "tiny-imagenet-mini.tar.gz"), "--img-size", "64",
                 "--batch-size", "8", "--num-workers", "1", "--batches", "3", "--warmup", "1", "--device", "cpu",
                 "--no-train-step", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "torch loader" in text and "dali loader" in text and "images/s" in text
    result = json.loads(out.read_text())
    assert result["images"] == 250  # 200 train + 50 val images below the folder
    for name in ("torch", "dali"):
        m = result["loaders"][name]["loader"]
        assert m["images"] == 24 and m["images_per_s"] > 0
    assert result["versions"]["dali"] and result["dali_over_torch"] > 0


class _TinyModel(torch.nn.Module):
    """Stands in for the Conformer in the bench's training step (the real model is tested elsewhere; here
    the measurement machinery is): the same call convention, a loss that needs a backward pass."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, num_classes)
        self.calls = 0

    def forward(self, images, labels=None):
        self.calls += 1
        logits = self.fc(self.conv(images).mean(dim=(2, 3)))
        return {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)}


@needs_dali
def test_bench_loader_train_step(shared_data, monkeypatch):
    """The training-step measurements: fed by each loader, and alone on a fixed batch."""
    import argparse

    bench = importlib.import_module("dbc_fast.cli.bench_loader")
    measure = importlib.import_module("dbc_fast.engine.bench_loader")
    models = []
    monkeypatch.setattr(measure, "create_model",
                        lambda arch, n, method: models.append(_TinyModel(n)) or models[-1])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--data", str(shared_data / "tiny-imagenet-mini.tar.gz"), "--img-size", "32",
                              "--batch-size", "4", "--num-workers", "1", "--batches", "2", "--warmup", "1",
                              "--steps", "3", "--amp", "none", "--device", "cpu"])
    result = bench.run(args)
    assert result["step_only"]["images"] == 12 and result["step_only"]["images_per_s"] > 0
    for name in ("torch", "dali"):
        assert result["loaders"][name]["train_step"]["images"] == 12
        assert result["loaders"][name]["loader"]["images"] == 8
    assert models[0].calls == 3 * (1 + 3)  # warm-up + timed steps, three times


def test_image_folder_dataset_labels_by_subfolder(tmp_path, shared_data):
    from dbc_fast.data.datasets import image_folder_dataset

    src = _build(shared_data, "cub", "test", 2, train=False).samples
    for k, s in enumerate(src):
        (tmp_path / f"class{k}").mkdir()
        shutil.copy(s.path, tmp_path / f"class{k}" / "a.jpg")
    shutil.copy(src[0].path, tmp_path / "top.jpg")
    ds = image_folder_dataset(tmp_path, 64)
    assert ds.class_names == ["class0", "class1"] and ds.train
    assert [(s.path.split("/")[-2:], s.label) for s in ds.samples] == [
        (["class0", "a.jpg"], 0), (["class1", "a.jpg"], 1), ([tmp_path.name, "top.jpg"], 0)]
    assert image_folder_dataset(tmp_path, 64, max_images=1).samples == ds.samples[:1]


# -------------------------------------------------------------------------------- predict --loader dali
@needs_dali
def test_predict_with_dali_matches_torch(shared_data, tmp_path):
    """`dbc-fast predict --loader dali` gives the torch path's predictions (a random tiny model)."""
    import dbc_fast
    from dbc_fast.cli import main
    from dbc_fast.engine.checkpoint import model_config, save_atomic

    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", 3, method="cls")
    ckpt = tmp_path / "model.pt"
    save_atomic({"model": model.state_dict(), "config": model_config(model, 32, ["a", "b", "c"], "test")}, str(ckpt))
    images = [s.path for s in _build(shared_data, "cub", "test", 2, train=False).samples]
    results = {}
    for loader in ("torch", "dali"):
        out = tmp_path / loader
        assert main(["predict", "--checkpoint", str(ckpt), "--images", *images, "--out", str(out), "--device", "cpu",
                     "--loader", loader, "--num-workers", "1"]) == 0
        results[loader] = json.loads((out / "predictions.json").read_text())["predictions"]
    for a, b in zip(results["torch"], results["dali"], strict=True):
        assert a["file"] == b["file"] and a["image_size"] == b["image_size"]
        assert [t["score"] for t in a["topk"]] == pytest.approx([t["score"] for t in b["topk"]], abs=1e-2)
        assert len(b["box"]) == 4
