"""dbc_fast.data on the real samples in ../shared/data: every reader, archives, transforms, bad input.

Archives are unpacked through the package's own cache ($DBC_FAST_CACHE or ~/.cache/dbc_fast), so
repeated runs do not unpack again; layouts the shared data does not ship (ILSVRC train folders, the
official XML and LOC_val_solution.csv val layouts, CSV boxes) are built in tmp from the real files.
The 77 MB tiny-imagenet-200-wsol archive is deliberately not used here.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dbc_fast.data import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, EvalTransform, SkippedImages, SkippedSample,
                           TrainTransform, available_splits, build_dataset, collate, resolve_root,
                           train_resize_size, unpack_archive)


def quiet_build(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_dataset(*args, **kwargs)


@pytest.fixture(scope="module")
def roots(shared_data):
    """Unpacked roots of the small shared archives (cached across runs)."""
    return {name: resolve_root(shared_data / name) for name in (
        "cub-sample.tar.gz", "ilsvrc-val-300.tar", "tiny-imagenet-mini.tar.gz", "raccoon.tar",
        "wsolevaluation-metadata.tar.gz")}


@pytest.fixture(scope="module")
def wsol_meta(roots):
    return roots["wsolevaluation-metadata.tar.gz"] / "metadata"


def read_wsol_boxes(meta_split: Path) -> dict[str, list[list[float]]]:
    boxes: dict[str, list] = {}
    for line in (meta_split / "localization.txt").read_text().splitlines():
        image_id, *coords = line.split(",")
        boxes.setdefault(image_id, []).append([float(c) for c in coords])
    return boxes


# ------------------------------------------------------------------------------------------------ CUB
def test_cub_official_layout(shared_data, wsol_meta):
    train = build_dataset("cub", shared_data / "cub-sample.tar.gz", "train")
    test = build_dataset("cub", shared_data / "cub-sample.tar.gz", "test")
    assert (len(train), len(test)) == (2, 2)
    assert [s.label for s in train.samples] == [5, 6] and [s.label for s in test.samples] == [0, 0]
    assert train.num_classes == 7 and train.class_names[5] == "006.Least_Auklet"
    # x y w h -> x0 y0 x0+w y0+h: the same numbers as wsolevaluation's CUB metadata for these images
    for ds, split in ((train, "train"), (test, "test")):
        wsol = read_wsol_boxes(wsol_meta / "CUB" / split)
        for s in ds.samples:
            image_id = "/".join(Path(s.path).parts[-2:])
            assert s.boxes.tolist() == wsol[image_id]
            assert s.size is None and os.path.isfile(s.path)
    item = test[0]
    w, h = item["orig_size"]
    assert (w, h) == Image.open(test.samples[0].path).size == (320, 223)
    assert item["image"].shape == (3, 224, 224)
    np.testing.assert_allclose(item["boxes"].numpy(), [[69 * 224 / w, 57 * 224 / h, 268 * 224 / w, 198 * 224 / h]],
                               rtol=1e-6)
    with pytest.raises(DatasetError, match="train and test, not 'val'.*metadata"):
        build_dataset("cub", shared_data / "cub-sample.tar.gz", "val")
    assert available_splits("cub", shared_data / "cub-sample.tar.gz") == ["train", "test"]


def test_cub_wsolevaluation_metadata(shared_data, roots):
    meta = shared_data / "wsolevaluation-metadata.tar.gz"
    sizes = {"train": 5994, "val": 1000, "test": 5794}
    for split, count in sizes.items():
        ds = build_dataset("cub", shared_data / "cub-sample.tar.gz", split, metadata=meta, check_files=False)
        assert len(ds) == count and ds.num_classes == 200
        assert all(len(s.boxes) >= 1 and s.size is not None for s in ds.samples)
        assert {s.label for s in ds.samples} == set(range(200))
    assert ds.class_names[199] == "200.Common_Yellowthroat"
    # only the sample's images, which must agree with the official-layout reader and their real sizes
    for split in ("train", "test"):
        ds = quiet_build("cub", shared_data / "cub-sample.tar.gz", split, metadata=meta, missing_images="skip")
        official = {s.path: s for s in build_dataset("cub", shared_data / "cub-sample.tar.gz", split).samples}
        assert len(ds) == 2
        for s in ds.samples:
            assert s.label == official[s.path].label
            assert s.boxes.tolist() == official[s.path].boxes.tolist()
            assert Image.open(s.path).size == s.size
    with pytest.raises(DatasetError, match="image file does not exist.*missing in all"):
        build_dataset("cub", shared_data / "cub-sample.tar.gz", "test", metadata=meta)


# --------------------------------------------------------------------------------------------- ILSVRC
def test_ilsvrc_val_300_shipped_metadata(shared_data, roots, wsol_meta):
    # The archive's own wsolevaluation files (227x227 sizes and boxes, synset_words.txt) with no metadata=: the
    # same images, labels and boxes as the official ILSVRC2012 val metadata, its boxes scaled from the original
    # size to the squashed 227x227 images (written with 2 decimals).
    root = roots["ilsvrc-val-300.tar"]
    official = wsol_meta / "ILSVRC" / "test"
    labels = dict(line.split(",") for line in (official / "class_labels.txt").read_text().splitlines())
    sizes = {i: (int(w), int(h)) for i, w, h in
             (line.split(",") for line in (official / "image_sizes.txt").read_text().splitlines())}
    boxes = read_wsol_boxes(official)
    val = build_dataset("ilsvrc", shared_data / "ilsvrc-val-300.tar", "val")
    test = build_dataset("ilsvrc", shared_data / "ilsvrc-val-300.tar", "test")
    assert [(s.path, s.label) for s in val.samples] == [(s.path, s.label) for s in test.samples]
    assert len(val) == 300 and val.num_classes == 1000 and val.class_names[:2] == ["n01440764", "n01443537"]
    for s in val.samples:
        image_id = os.path.relpath(s.path, root)
        assert s.size == (227, 227) and Image.open(s.path).size == (227, 227), image_id
        assert s.label == int(labels[image_id]), image_id
        w, h = sizes[image_id]
        want = np.array(boxes[image_id]) * [227 / w, 227 / h, 227 / w, 227 / h]
        np.testing.assert_allclose(s.boxes, want, atol=0.005 + 1e-6, err_msg=image_id)
    assert sum(len(s.boxes) for s in val.samples) == sum(len(boxes[os.path.relpath(s.path, root)])
                                                         for s in val.samples) > 300
    # eval boxes follow the 227 -> 224 resize
    item = val[0]
    assert item["orig_size"] == (227, 227)
    np.testing.assert_allclose(item["boxes"].numpy(), val.samples[0].boxes * 224 / 227, rtol=1e-6)


@pytest.fixture(scope="module")
def ilsvrc300(shared_data):
    ds = quiet_build("ilsvrc", shared_data / "ilsvrc-val-300.tar", "test",
                     metadata=shared_data / "wsolevaluation-metadata.tar.gz", missing_images="skip")
    return ds


def test_ilsvrc_wsolevaluation_metadata(shared_data, ilsvrc300):
    meta = shared_data / "wsolevaluation-metadata.tar.gz"
    test = build_dataset("ilsvrc", shared_data / "ilsvrc-val-300.tar", "test", metadata=meta, check_files=False)
    val = build_dataset("ilsvrc", shared_data / "ilsvrc-val-300.tar", "val", metadata=meta, check_files=False)
    assert (len(test), sum(len(s.boxes) for s in test.samples)) == (50000, 80477)
    assert (len(val), sum(len(s.boxes) for s in val.samples)) == (10000, 18532)
    assert test.num_classes == 1000 and test.class_names[:2] == ["n01440764", "n01443537"]
    first = test.samples[0]
    assert first.path.endswith("val/ILSVRC2012_val_00000001.JPEG") and first.label == 65
    assert first.size == (500, 375) and first.boxes.tolist() == [[111, 108, 441, 193]]
    # the 300 shipped images: squashed to 227x227 on disk; boxes stay in the metadata size's pixels and the
    # eval transform scales them with that size (as wsolevaluation does)
    assert len(ilsvrc300) == 300 and sum(len(s.boxes) for s in ilsvrc300.samples) > 300
    s = ilsvrc300.samples[0]
    assert Image.open(s.path).size == (227, 227) and s.size != (227, 227)
    item = ilsvrc300[0]
    assert item["orig_size"] == s.size
    w, h = s.size
    np.testing.assert_allclose(item["boxes"].numpy(), s.boxes * np.array([224 / w, 224 / h] * 2), rtol=1e-6)


def write_voc_xml(path: Path, filename: str, size, objects):
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]:g}</xmin><ymin>{b[1]:g}</ymin><xmax>{b[2]:g}</xmax>"
                   f"<ymax>{b[3]:g}</ymax></bndbox></object>" for n, b in objects)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


@pytest.fixture(scope="module")
def ilsvrc_official(tmp_path_factory, ilsvrc300, roots):
    """The first 40 of the 300 real images in the official val layouts, with their real boxes and labels."""
    samples = ilsvrc300.samples[:40]
    names = ilsvrc300.class_names
    synsets = roots["ilsvrc-val-300.tar"] / "synset_words.txt"
    xml_root = tmp_path_factory.mktemp("ilsvrc_xml")
    kaggle = tmp_path_factory.mktemp("ilsvrc_kaggle")
    (xml_root / "val").mkdir()
    ann = kaggle / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
    data = kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    ann.mkdir(parents=True)
    data.mkdir(parents=True)
    shutil.copy(synsets, xml_root / "synset_words.txt")
    # Kaggle's LOC_synset_mapping.txt has the same `wnid words` lines
    shutil.copy(synsets, kaggle / "LOC_synset_mapping.txt")
    rows = ["ImageId,PredictionString"]
    for s in samples:
        stem = Path(s.path).stem
        objects = [(names[s.label], b) for b in s.boxes.tolist()]
        os.symlink(s.path, xml_root / "val" / Path(s.path).name)
        os.symlink(s.path, data / Path(s.path).name)
        write_voc_xml(xml_root / "val" / f"{stem}.xml", Path(s.path).name, s.size, objects)
        write_voc_xml(ann / f"{stem}.xml", Path(s.path).name, s.size, objects)
        rows.append(f"{stem}," + " ".join(f"{n} {b[0]:g} {b[1]:g} {b[2]:g} {b[3]:g}" for n, b in objects))
    (kaggle / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return samples, xml_root, kaggle


def test_ilsvrc_val_xml_and_csv_layouts(ilsvrc_official, tmp_path):
    samples, xml_root, kaggle = ilsvrc_official
    expected = {Path(s.path).name: (s.label, s.boxes.tolist()) for s in samples}
    from_xml = build_dataset("ilsvrc", xml_root, "val")  # XML files beside the images in val/
    from_csv = build_dataset("ilsvrc", kaggle, "val")  # LOC_val_solution.csv wins over the XML folder
    from_kaggle_xml = build_dataset("ilsvrc", kaggle, "test", val_boxes=kaggle / "ILSVRC/Annotations/CLS-LOC/val")
    for ds in (from_xml, from_csv, from_kaggle_xml):
        assert len(ds) == 40 and ds.num_classes == 1000
        got = {Path(s.path).name: (s.label, s.boxes.tolist()) for s in ds.samples}
        assert got == expected
    assert all(s.size is not None for s in from_xml.samples) and all(s.size is None for s in from_csv.samples)
    # images in val/<wnid>/ class folders (PyTorch's ImageNet example layout) are found too
    folders = tmp_path / "folders"
    for s in samples:
        wnid = from_xml.class_names[s.label]
        (folders / "val" / wnid).mkdir(parents=True, exist_ok=True)
        os.symlink(s.path, folders / "val" / wnid / Path(s.path).name)
    shutil.copy(kaggle / "LOC_val_solution.csv", folders)
    shutil.copy(kaggle / "LOC_synset_mapping.txt", folders)
    in_folders = build_dataset("ilsvrc", folders, "val")
    assert {Path(s.path).name: (s.label, s.boxes.tolist()) for s in in_folders.samples} == expected
    assert all(Path(s.path).parent.name == in_folders.class_names[s.label] for s in in_folders.samples)
    # no class order anywhere -> clear error
    bare = tmp_path / "bare"
    shutil.copytree(xml_root / "val", bare / "val", symlinks=True)
    with pytest.raises(DatasetError, match="needs the class order"):
        build_dataset("ilsvrc", bare, "val")
    # a wnid the class list does not have
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000347,n99999999 1 2 3 4\n")
    with pytest.raises(DatasetError, match=r"bad.csv, line 2: class 'n99999999' is not in the class list"):
        build_dataset("ilsvrc", kaggle, "val", val_boxes=bad)


@pytest.fixture(scope="module")
def ilsvrc_train(tmp_path_factory, roots):
    """ILSVRC train layout train/<wnid>/*.JPEG from real Tiny ImageNet mini images (4 per class)."""
    tiny = roots["tiny-imagenet-mini.tar.gz"]
    root = tmp_path_factory.mktemp("ilsvrc_train")
    for wnid_dir in sorted((tiny / "train").iterdir()):
        (root / "train" / wnid_dir.name).mkdir(parents=True)
        for f in sorted((wnid_dir / "images").iterdir())[:4]:
            shutil.copy(f, root / "train" / wnid_dir.name / f.name)
    (root / "train" / "n01443537" / "notes.txt").write_text("not an image")  # ignored
    return root


def test_ilsvrc_train_folders(ilsvrc_train, tmp_path, monkeypatch):
    ds = build_dataset("ilsvrc", ilsvrc_train, "train", img_size=64, train=True)
    wnids = sorted(p.name for p in (ilsvrc_train / "train").iterdir())
    assert ds.class_names == wnids and len(ds) == 40
    assert all(Path(s.path).parent.name == wnids[s.label] and s.boxes.shape == (0, 4) for s in ds.samples)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["boxes"].shape == (0, 4)
    # a class list fixes the order
    order = list(reversed(wnids)) + ["n09999999"]
    (tmp_path / "classes.txt").write_text("\n".join(f"{w} some words, more" for w in order) + "\n")
    ds = build_dataset("ilsvrc", ilsvrc_train, "train", class_list=tmp_path / "classes.txt")
    assert ds.num_classes == 11 and all(order[s.label] == Path(s.path).parent.name for s in ds.samples)
    (tmp_path / "short.txt").write_text("\n".join(wnids[:9]) + "\n")
    with pytest.raises(DatasetError, match=f"class folder '{wnids[9]}' is not in the class list"):
        build_dataset("ilsvrc", ilsvrc_train, "train", class_list=tmp_path / "short.txt")
    # the same layout as a .tar.gz archive: unpacked once into the cache, keyed by path + mtime + size
    monkeypatch.setenv("DBC_FAST_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "ilsvrc_train.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(ilsvrc_train / "train", arcname="my_ilsvrc/train")
    from_archive = build_dataset("ilsvrc", archive, "train")
    assert [(Path(s.path).name, s.label) for s in from_archive.samples] == \
           [(Path(s.path).name, s.label) for s in build_dataset("ilsvrc", ilsvrc_train, "train").samples]
    unpacked = unpack_archive(archive)
    assert from_archive.root == str(unpacked / "my_ilsvrc")
    marker = unpacked / "marker"
    marker.write_text("x")
    assert unpack_archive(archive) == unpacked and marker.exists()  # not unpacked again
    os.utime(archive, (1, 1))  # a changed archive gets a fresh folder
    assert unpack_archive(archive) != unpacked
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------------------- Tiny ImageNet
def test_tiny_imagenet(shared_data, roots):
    archive = shared_data / "tiny-imagenet-mini.tar.gz"
    train = build_dataset("tiny-imagenet", archive, "train", img_size=64, train=True)
    val = build_dataset("tiny-imagenet", archive, "val", img_size=128)
    assert (len(train), len(val), train.num_classes) == (200, 50, 10)
    wnids = (roots["tiny-imagenet-mini.tar.gz"] / "wnids.txt").read_text().split()
    assert train.class_names == wnids == val.class_names
    s = train.samples[0]
    assert Path(s.path).name == "n01443537_0.JPEG" and s.label == 0 and s.boxes.tolist() == [[0, 10, 63, 58]]
    v = val.samples[0]
    assert Path(v.path).name == "val_23.JPEG" and wnids[v.label] == "n01629819" and v.boxes.tolist() == [[0, 1, 52, 48]]
    item = val[0]
    assert item["image"].shape == (3, 128, 128) and item["orig_size"] == (64, 64)
    assert item["boxes"].tolist() == [[0.0, 2.0, 104.0, 96.0]]  # exactly x * 128 / 64
    with pytest.raises(DatasetError, match="train and val, not 'test'"):
        build_dataset("tiny-imagenet", archive, "test")
    assert available_splits("tiny-imagenet", archive) == ["train", "val"]


# ------------------------------------------------------------------------------------ generic folder
def test_folder_voc_xml(shared_data, roots):
    with pytest.warns(UserWarning, match="no val/ subfolder"):
        ds = build_dataset("folder", shared_data / "raccoon.tar", "val")
    assert len(ds) == 200 and ds.class_names == ["raccoon"]
    assert sum(len(s.boxes) for s in ds.samples) == 217
    first = next(s for s in ds.samples if s.path.endswith("raccoon-1.jpg"))
    assert first.boxes.tolist() == [[81, 88, 522, 408]] and first.size == (650, 417)
    for s in ds.samples[:10]:
        assert Image.open(s.path).size == s.size


def test_folder_csv_and_split_folders(roots, tmp_path):
    raccoon = roots["raccoon.tar"]
    ds = quiet_build("folder", raccoon, "val")
    for split, chosen in (("train", ds.samples[:6]), ("val", ds.samples[6:9])):
        (tmp_path / split / "img").mkdir(parents=True)
        lines = ["path,x0,y0,x1,y1,label"]
        for s in chosen:
            shutil.copy(s.path, tmp_path / split / "img" / Path(s.path).name)
            lines += [f"img/{Path(s.path).name},{b[0]:g},{b[1]:g},{b[2]:g},{b[3]:g},raccoon" for b in s.boxes.tolist()]
        (tmp_path / split / "boxes.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("cat\nraccoon\n")
    train = build_dataset("folder", tmp_path, "train")
    val = build_dataset("folder", tmp_path, "val")
    assert (len(train), len(val)) == (6, 3) and train.class_names == ["cat", "raccoon"]
    assert [s.boxes.tolist() for s in val.samples] == [s.boxes.tolist() for s in ds.samples[6:9]]
    assert all(s.label == 1 for s in train.samples + val.samples)
    assert available_splits("folder", tmp_path) == ["train", "val"]


# ----------------------------------------------------------------------------------------- transforms
def test_transform_sizes_and_normalisation():
    assert [train_resize_size(s) for s in (224, 64, 128, 256)] == [256, 73, 146, 293]
    for bad in (100, 0, 224.0):
        with pytest.raises(ValueError, match="multiple of 32"):
            EvalTransform(bad)
    gray = Image.new("RGB", (50, 30), (124, 116, 104))
    image, boxes = EvalTransform(64)(gray, np.array([[5, 3, 49, 29]], np.float32), (50, 30))
    assert image.shape == (3, 64, 64)
    expected = [(v / 255 - m) / s for v, m, s in zip((124, 116, 104), IMAGENET_MEAN, IMAGENET_STD)]
    np.testing.assert_allclose(image.mean((1, 2)).numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(boxes.numpy(), np.array([[5 * 64 / 50, 3 * 64 / 30, 49 * 64 / 50, 29 * 64 / 30]],
                                                          np.float32))


def white_box_image(size, box):
    im = np.zeros((size[1], size[0], 3), np.uint8)
    x0, y0, x1, y1 = box
    im[y0:y1 + 1, x0:x1 + 1] = 255  # inclusive pixels
    return Image.fromarray(im)


def test_train_transform_crop_and_flip_move_boxes_with_pixels():
    box = (40, 20, 99, 69)
    image = white_box_image((160, 120), box)
    transform = TrainTransform(64)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        tensor, boxes = transform(image, np.array([box], np.float32), (160, 120))
        assert tensor.shape == (3, 64, 64)
        white = (tensor[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) > 0.5
        ys, xs = torch.nonzero(white, as_tuple=True)
        if len(boxes) == 0:  # the crop missed the object entirely
            assert len(xs) == 0
            continue
        bx0, by0, bx1, by1 = boxes[0].tolist()
        # the white pixels and the transformed box agree to about one pixel (bilinear edges)
        assert abs(xs.min().item() - bx0) <= 1.5 and abs(xs.max().item() - bx1) <= 1.5
        assert abs(ys.min().item() - by0) <= 1.5 and abs(ys.max().item() - by1) <= 1.5
        # flipped iff the white region's centre moved to the other side of where it is without flip
        torch.manual_seed(seed)
        _, unflipped = TrainTransform(64, flip_prob=0.0)(image, np.array([box], np.float32), (160, 120))
        flips.add(not torch.equal(unflipped, boxes))
    assert flips == {True, False}


def test_train_transform_is_seeded():
    image = white_box_image((90, 70), (10, 10, 50, 40))
    torch.manual_seed(5)
    a = TrainTransform(32)(image, np.array([[10, 10, 50, 40]], np.float32), (90, 70))
    torch.manual_seed(5)
    b = TrainTransform(32)(image, np.array([[10, 10, 50, 40]], np.float32), (90, 70))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_collate(shared_data):
    ds = build_dataset("tiny-imagenet", shared_data / "tiny-imagenet-mini.tar.gz", "val", img_size=64)
    batch = collate([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["label"].dtype == torch.long
    assert batch["label"].tolist() == [s.label for s in ds.samples[:3]] and batch["index"].tolist() == [0, 1, 2]
    assert [b.shape for b in batch["boxes"]] == [(1, 4)] * 3 and batch["orig_size"] == [(64, 64)] * 3
    assert batch["path"] == [s.path for s in ds.samples[:3]] and batch["skipped"] == []
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate)
    assert sum(len(b["label"]) for b in loader) == 50


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def tiny_copy(roots, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(roots["tiny-imagenet-mini.tar.gz"], root)
    return root


def test_corrupt_and_truncated_images(tiny_copy):
    val_images = tiny_copy / "val" / "images"
    ds = build_dataset("tiny-imagenet", tiny_copy, "val", img_size=64)
    garbage, truncated = ds.samples[1].path, ds.samples[2].path
    Path(garbage).write_bytes(b"this is not a jpeg at all")
    data = (val_images / Path(truncated).name).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{garbage}: not an image PIL can read"):
        ds[1]
    with pytest.raises(DatasetError, match=f"{truncated}: corrupt or truncated image"):
        ds[2]
    # skip mode: the dataset hands back a SkippedSample, collate drops it, the tracker counts it
    ds = build_dataset("tiny-imagenet", tiny_copy, "val", img_size=64, on_corrupt="skip")
    assert isinstance(ds[1], SkippedSample) and ds[1].path == garbage
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape[0] == 2 and batch["index"].tolist() == [0, 3]
    assert [s.path for s in batch["skipped"]] == [garbage, truncated]
    assert collate([ds[1]])["image"].shape == (0, 3, 64, 64)
    tracker = SkippedImages(len(ds), max_fraction=0.05)
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        assert tracker.update(batch) == 2
    assert tracker.count == 2 and "2 image(s) skipped" in tracker.summary()
    with pytest.raises(DatasetError, match="3 of 50 images could not be read"):
        with pytest.warns(UserWarning):
            tracker.update({"skipped": [SkippedSample(9, "/x/other.jpg", "bad", 64)]})


def test_missing_file_and_malformed_lines(tiny_copy):
    ann = tiny_copy / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    os.remove(tiny_copy / "val" / "images" / lines[3].split()[0])
    with pytest.raises(DatasetError, match=rf"val_annotations.txt, line 4: image file does not exist: .*{lines[3].split()[0]}"):
        build_dataset("tiny-imagenet", tiny_copy, "val")
    ann.write_text("\n".join(lines[:2] + ["val_1.JPEG\tn01443537\t1\t2\t3"] + lines[3:]) + "\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt, line 3: expected 6 fields"):
        build_dataset("tiny-imagenet", tiny_copy, "val")
    ann.write_text("\n".join(lines[:2] + ["val_1.JPEG\tn01443537\t1\t2\tthree\t4"]) + "\n")
    with pytest.raises(DatasetError, match=r"line 3: box coordinate is not a number: 'three'"):
        build_dataset("tiny-imagenet", tiny_copy, "val")
    ann.write_text("\n".join(lines[:2] + ["val_1.JPEG\tn99999999\t1\t2\t3\t4"]) + "\n")
    with pytest.raises(DatasetError, match=r"line 3: class 'n99999999' is not in wnids.txt"):
        build_dataset("tiny-imagenet", tiny_copy, "val")
    ann.write_text("\n".join(lines[:2] + ["val_1.JPEG\tn01443537\t30\t2\t3\t4"]) + "\n")
    with pytest.raises(DatasetError, match=r"line 3: box .* has x1 < x0"):
        build_dataset("tiny-imagenet", tiny_copy, "val")
    ann.write_text("\n")
    with pytest.raises(DatasetError, match="empty split"):
        build_dataset("tiny-imagenet", tiny_copy, "val")


def write_wsol(folder: Path, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "image_ids.txt").write_text("".join(f"{r[0]}\n" for r in rows))
    (folder / "class_labels.txt").write_text("".join(f"{r[0]},{r[1]}\n" for r in rows))
    (folder / "image_sizes.txt").write_text("".join(f"{r[0]},{r[2][0]},{r[2][1]}\n" for r in rows))
    (folder / "localization.txt").write_text("".join(f"{r[0]},{','.join(map(str, b))}\n" for r in rows for b in r[3]))


def test_wsol_metadata_bad_input(ilsvrc300, tmp_path):
    s = ilsvrc300.samples
    root = Path(ilsvrc300.root)
    rows = [(f"val/{Path(x.path).name}", x.label, x.size, x.boxes.astype(int).tolist()) for x in s[:3]]
    write_wsol(tmp_path / "ok", rows)
    ds = build_dataset("ilsvrc", root, "test", metadata=tmp_path / "ok")
    assert [x.boxes.tolist() for x in ds.samples] == [x.boxes.tolist() for x in s[:3]]
    # label out of range for the 1000-class list
    write_wsol(tmp_path / "label", rows[:1] + [(rows[1][0], 1000, rows[1][2], rows[1][3])])
    with pytest.raises(DatasetError, match=r"class_labels.txt, line 2: label 1000 out of range 0..999"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "label")
    # a box reaching past the image is clipped with a warning; one entirely outside is an error
    w, h = rows[0][2]
    write_wsol(tmp_path / "clip", [(rows[0][0], rows[0][1], (w, h), [[1, 2, w + 40, h + 1]])])
    with pytest.warns(UserWarning, match=r"1 box\(es\) reached outside their image and were clipped"):
        ds = build_dataset("ilsvrc", root, "test", metadata=tmp_path / "clip")
    assert ds.samples[0].boxes.tolist() == [[1, 2, w, h]]
    write_wsol(tmp_path / "out", [(rows[0][0], rows[0][1], (w, h), [[w + 1, 2, w + 5, 9]])])
    with pytest.raises(DatasetError, match=r"localization.txt, line 1: box .* entirely outside"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "out")
    write_wsol(tmp_path / "neg", [(rows[0][0], rows[0][1], (w, h), [[-3, 2, 5, 9]])])
    with pytest.raises(DatasetError, match=r"line 1: box .* negative"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "neg")
    # malformed line, unknown id, missing label
    write_wsol(tmp_path / "bad", rows)
    (tmp_path / "bad" / "image_sizes.txt").write_text(f"{rows[0][0]},500\n")
    with pytest.raises(DatasetError, match=r"image_sizes.txt, line 1: expected 3 fields \(id,w,h\)"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "bad")
    write_wsol(tmp_path / "bad", rows)
    with open(tmp_path / "bad" / "localization.txt", "a") as f:
        f.write("val/nope.JPEG,1,2,3,4\n")
    with pytest.raises(DatasetError, match=r"localization.txt, line \d+: image id 'val/nope.JPEG' is not in image_ids"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "bad")
    write_wsol(tmp_path / "bad", rows)
    (tmp_path / "bad" / "class_labels.txt").write_text(f"{rows[0][0]},{rows[0][1]}\n")
    with pytest.raises(DatasetError, match=r"image_ids.txt, line 2: .* has no line in class_labels.txt"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "bad")
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(DatasetError, match="nothing-here: no wsolevaluation metadata for split 'test'"):
        build_dataset("ilsvrc", root, "test", metadata=tmp_path / "nothing-here")


def test_cub_bad_input(roots, tmp_path):
    cub = tmp_path / "CUB_200_2011"
    shutil.copytree(roots["cub-sample.tar.gz"], cub)
    labels = (cub / "image_class_labels.txt").read_text()
    (cub / "image_class_labels.txt").write_text(labels.replace("3 6", "3 2"))
    with pytest.raises(DatasetError, match=r"image_class_labels.txt, line 3: class id 2 is not in classes.txt"):
        build_dataset("cub", tmp_path, "train")
    (cub / "image_class_labels.txt").write_text(labels)
    boxes = (cub / "bounding_boxes.txt").read_text()
    (cub / "bounding_boxes.txt").write_text(boxes.replace("4 90.0", "4 x"))
    with pytest.raises(DatasetError, match=r"bounding_boxes.txt, line 4: box value is not a number: 'x'"):
        build_dataset("cub", tmp_path, "train")
    (cub / "bounding_boxes.txt").write_text(boxes.replace("4 90.0 57.0", "4 90.0"))
    with pytest.raises(DatasetError, match=r"bounding_boxes.txt, line 4: expected 5 fields \(id x y w h\), got 4"):
        build_dataset("cub", tmp_path, "train")
    (cub / "bounding_boxes.txt").write_text(boxes)
    (cub / "train_test_split.txt").write_text("1 0\n2 0\n3 1\n")
    with pytest.raises(DatasetError, match=r"train_test_split.txt: image id 4 \(images.txt line 4\) has no line"):
        build_dataset("cub", tmp_path, "train")


def test_bad_xml_archive_and_root(roots, tmp_path, shared_data, monkeypatch):
    folder = tmp_path / "voc"
    (folder / "annotations").mkdir(parents=True)
    (folder / "images").mkdir()
    src = roots["raccoon.tar"]
    shutil.copy(src / "images" / "raccoon-1.jpg", folder / "images")
    (folder / "annotations" / "raccoon-1.xml").write_text("<annotation><filename>raccoon-1.jpg</filename><object>")
    with pytest.raises(DatasetError, match=r"raccoon-1.xml, line 1: malformed XML"):
        quiet_build("folder", folder, "test")
    write_voc_xml(folder / "annotations" / "raccoon-1.xml", "raccoon-1.jpg", (650, 417), [])
    with pytest.raises(DatasetError, match=r"raccoon-1.xml: no <object> in the annotation"):
        quiet_build("folder", folder, "test")
    os.remove(folder / "annotations" / "raccoon-1.xml")
    write_voc_xml(folder / "annotations" / "other.xml", "gone.jpg", (650, 417), [("raccoon", [1, 2, 3, 4])])
    with pytest.raises(DatasetError, match=r"other.xml: image 'gone.jpg' not found"):
        quiet_build("folder", folder, "test")
    # truncated archive
    monkeypatch.setenv("DBC_FAST_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes((shared_data / "cub-sample.tar.gz").read_bytes()[:50000])
    with pytest.raises(DatasetError, match=r"broken.tar.gz: cannot unpack archive"):
        build_dataset("cub", broken, "train")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-unpacked left
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        build_dataset("cub", tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        build_dataset("coco", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        build_dataset("cub", tmp_path, "dev")


def test_archive_unpacked_once_under_concurrency(roots, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("DBC_FAST_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "tiny.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(roots["tiny-imagenet-mini.tar.gz"], arcname="tiny-imagenet-mini")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: unpack_archive(archive), range(4)))
    assert len(set(results)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [results[0].name]
    ds = build_dataset("tiny-imagenet", archive, "val", img_size=32)
    assert len(ds) == 50 and ds.root == str(results[0] / "tiny-imagenet-mini")


def test_archive_extraction_without_the_data_filter_refuses_escapes(tmp_path, monkeypatch):
    """Pythons before 3.11.4 have no tarfile "data" filter: the fallback must still refuse escaping members."""
    import io
    import tarfile

    from dbc_fast.data import archive

    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good, bad = tmp_path / "good.tar", tmp_path / "bad.tar"
    for path, name in ((good, "root/a.txt"), (bad, "../escape.txt")):
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with tarfile.open(good) as tar:
        archive._extract_safely(tar, tmp_path / "out")
    assert (tmp_path / "out" / "root" / "a.txt").read_bytes() == b"hi"
    with tarfile.open(bad) as tar, pytest.raises(tarfile.TarError, match="outside"):
        archive._extract_safely(tar, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()


# ------------------------------------------------------------------------- VOC segmentation (voc-seg)
VOC_SEG = "voc2012-seg-sample.tar"
VOC_NAMES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def test_voc_segmentation_labels_boxes_and_masks(shared_data):
    voc = resolve_root(shared_data / VOC_SEG) / "VOC2012"
    single_class = 0
    for split, count in (("train", 147), ("val", 153)):
        ds = build_dataset("voc-seg", shared_data / VOC_SEG, split)
        assert len(ds) == count and ds.class_names == VOC_NAMES and ds.has_masks
        ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert [Path(s.path).name for s in ds.samples] == [f"{i}.jpg" for i in ids]
        for s, image_id in zip(ds.samples, ids):
            mask = np.array(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
            classes, pixels = np.unique(mask[(mask > 0) & (mask < 255)], return_counts=True)
            single_class += len(classes) == 1
            # the label: the class with the most pixels; its box: the bounding box of that class's pixels
            assert s.label == classes[np.argmax(pixels)] - 1
            ys, xs = np.nonzero(mask == s.label + 1)
            assert s.boxes.tolist() == [[xs.min(), ys.min(), xs.max(), ys.max()]]
            assert s.size == (mask.shape[1], mask.shape[0]) == Image.open(s.path).size
    assert single_class == 197  # as SOURCES.md counts over the 300 images

    ds = build_dataset("voc-seg", shared_data / VOC_SEG, "val", img_size=64)
    item = ds[1]
    original = np.array(Image.open(ds.samples[1].mask))
    expected = torch.from_numpy(cv2.resize(original, (64, 64), interpolation=cv2.INTER_NEAREST))
    assert item["mask"].dtype == torch.uint8 and torch.equal(item["mask"], expected)
    assert set(item["mask"].unique().tolist()) <= set(np.unique(original).tolist())
    w, h = ds.samples[1].size
    assert np.allclose(item["boxes"].numpy(), ds.samples[1].boxes * np.array([64 / w, 64 / h, 64 / w, 64 / h]))
    batch = collate([ds[i] for i in range(3)])
    assert batch["mask"].shape == (3, 64, 64)
    assert all(torch.equal(batch["mask"][i], ds[i]["mask"]) for i in range(3))
    # training reads labels only
    assert "mask" not in build_dataset("voc-seg", shared_data / VOC_SEG, "train", img_size=64, train=True)[0]


def test_voc_segmentation_bad_input(shared_data, tmp_path):
    voc = resolve_root(shared_data / VOC_SEG) / "VOC2012"
    copy = tmp_path / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:3]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (copy / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(voc / "JPEGImages" / f"{i}.jpg", copy / "JPEGImages")
        shutil.copy(voc / "SegmentationClass" / f"{i}.png", copy / "SegmentationClass")
    (copy / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    assert len(build_dataset("voc-seg", tmp_path, "val")) == 3  # VOCdevkit/VOC2012 found from the root
    with pytest.raises(DatasetError, match=r"no 'train' split.*found: val"):
        build_dataset("voc-seg", tmp_path, "train")
    with pytest.raises(DatasetError, match="not a VOC segmentation folder"):
        build_dataset("voc-seg", tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages", "val")
    mask_file = copy / "SegmentationClass" / f"{ids[0]}.png"
    original = Image.open(mask_file)
    original.convert("RGB").save(mask_file)  # a colour rendering, not class ids
    with pytest.raises(DatasetError, match="palette or grayscale"):
        build_dataset("voc-seg", tmp_path, "val")
    values = np.array(original)
    values[values == values[(values > 0) & (values < 255)][0]] = 21  # VOC has 20 classes
    Image.fromarray(values).save(mask_file)
    with pytest.raises(DatasetError, match=r"mask values \[21\]"):
        build_dataset("voc-seg", tmp_path, "val")
    # a class list names the ids of another mask set; a mask of another size than its image fails when read
    (tmp_path / "classes.txt").write_text("\n".join(VOC_NAMES + ["extra"]) + "\n")
    ds = build_dataset("voc-seg", tmp_path, "val", class_list=tmp_path / "classes.txt")
    assert ds.num_classes == 21
    Image.fromarray(values[:-1]).save(mask_file)
    with pytest.raises(DatasetError, match="mask is .* but its image is"):
        build_dataset("voc-seg", tmp_path, "val", class_list=tmp_path / "classes.txt")[0]
    Image.fromarray(np.where(values == 255, 255, 0).astype(np.uint8)).save(mask_file)
    with pytest.raises(DatasetError, match="no object pixel"):
        build_dataset("voc-seg", tmp_path, "val")


def test_eval_reports_mask_metrics_on_voc(shared_data, tmp_path, capsys, one_thread):
    """`dbc-fast eval --dataset voc-seg`: box and mask figures for every map, the mask figures equal to
    MaskEvaluator fed with the same model's maps and the dataset's masks."""
    import json

    import dbc_fast
    from dbc_fast.cli import main
    from dbc_fast.engine.checkpoint import model_config
    from dbc_fast.metrics import MaskEvaluator

    torch.manual_seed(0)
    model = dbc_fast.create_model("conformer_tiny_patch16", 20, method="dbc", ops_backend="eager").eval()
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(),
                "config": model_config(model, 64, VOC_NAMES, "voc-seg")}, checkpoint)
    rc = main(["eval", "--dataset", "voc-seg", "--data", str(shared_data / VOC_SEG), "--checkpoint", str(checkpoint),
               "--img-size", "64", "--batch-size", "4", "--limit-images", "6", "--device", "cpu", "--num-workers",
               "0", "--no-maxboxacc", "--no-progress", "--out", str(tmp_path / "eval")])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert report["split"] == "val" and report["images"] == 6

    ds = build_dataset("voc-seg", shared_data / VOC_SEG, "val", img_size=64)
    batch = collate([ds[i] for i in range(6)])
    with torch.no_grad():
        outputs = model(batch["image"])
    for key, name in (("map", "M"), ("map_a", "M_a"), ("map_c", "M_c")):
        reference = MaskEvaluator(0.01, threshold=0.3)
        reference.accumulate(outputs[key], batch["mask"])
        expected = reference.compute()
        figures = report["metrics"][name]
        assert figures["PxAP"] == pytest.approx(expected["PxAP"], abs=1e-9)
        assert (figures["mask_IoU"], figures["mask_precision"], figures["mask_recall"]) == pytest.approx(
            (expected["IoU"], expected["precision"], expected["recall"]), abs=1e-9)
        assert figures["mask_threshold"] == 0.3 and figures["mask_best_IoU"] == pytest.approx(expected["best_IoU"])
        assert 0 <= figures["gt_known_loc"] <= 100  # boxes from the masks make the box figures work too
        assert f"PxAP ({name}): {figures['PxAP']:.2f}" in printed
        assert f"foreground IoU ({name}): {figures['mask_IoU']:.2f}" in printed
