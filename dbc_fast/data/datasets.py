"""Datasets for WSOL training and evaluation: `build_dataset`, `collate`, and bad-image handling."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import readers
from .archive import resolve_root
from ..errors import DatasetError, warn
from .images import IMAGE_EXTENSIONS, is_image_file, load_image
from .readers import NO_BOXES, ReadResult, Sample
from .transforms import EvalTransform, TrainTransform, check_img_size

DATASET_NAMES = ("cub", "ilsvrc", "tiny-imagenet", "folder", "voc-seg")
SPLITS = ("train", "val", "test")


class SkippedSample(NamedTuple):
    """What `dataset[i]` returns instead of raising when `on_corrupt="skip"` and the image cannot be read."""
    index: int
    path: str
    reason: str
    img_size: int


def load_mask(path: str, decoded_wh: tuple[int, int], img_size: int) -> torch.Tensor:
    """A sample's class mask [S, S] uint8 for evaluation: read as stored (class ids, 0 background, 255
    ignore), resized to the S x S evaluation image with nearest-neighbour (cv2.INTER_NEAREST, as
    wsolevaluation resizes its masks); it must have the image's size."""
    import cv2

    mask = readers.read_class_mask(Path(path))
    if (mask.shape[1], mask.shape[0]) != tuple(decoded_wh):
        raise DatasetError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                           f"{decoded_wh[0]}x{decoded_wh[1]}", path)
    return torch.from_numpy(cv2.resize(mask, (img_size, img_size), interpolation=cv2.INTER_NEAREST))


def boxes_for_decoded_size(sample: Sample, decoded_wh: tuple[int, int], train: bool = False,
                           notes: list | None = None) -> tuple[tuple[int, int], np.ndarray]:
    """(image size, boxes) of a sample once decoded: boxes refer to `sample.size` where the metadata gave it;
    where it did not, the decoded size is known only now and the policy of readers.check_box applies: a box
    reaching outside is clipped, with a warning; a box wholly outside is an error, except in training, which
    uses the image's label and not its boxes: there the box is dropped with a warning that says so. The
    warnings go to `notes` when given (a worker process hands them to the main one), else errors.warn."""
    size = tuple(sample.size) if sample.size is not None else tuple(decoded_wh)
    boxes = sample.boxes
    said = []
    if sample.size is None and len(boxes):
        w, h = size
        outside = (boxes[:, 0] > w) | (boxes[:, 1] > h)
        if outside.any():
            what = f"box(es) {boxes[outside].tolist()} lie wholly outside the {w}x{h} image"
            if not train:
                raise DatasetError(what, sample.path)
            said.append(f"{sample.path}: {what}: dropped (training uses the image's label, not its boxes)")
            boxes = boxes[~outside]
        if (boxes[:, 2] > w).any() or (boxes[:, 3] > h).any():
            said.append(f"{sample.path}: box(es) reach outside the {w}x{h} image and were clipped to it")
            boxes = np.minimum(boxes, np.array([w, h, w, h], np.float32))
    for note in said:
        if notes is not None:
            notes.append(note)
        else:
            warn(note, stacklevel=2)
    return size, boxes


class WSOLDataset(torch.utils.data.Dataset):
    """A list of `Sample`s plus a transform. See `build_dataset`."""

    def __init__(self, samples: list[Sample], class_names: list[str], img_size: int = 224, train: bool = False,
                 name: str = "", split: str = "", root: str = "", on_corrupt: str = "error"):
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.samples = samples
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.img_size = check_img_size(img_size)
        self.train = train
        self.transform = TrainTransform(img_size) if train else EvalTransform(img_size)
        self.name, self.split, self.root = name, split, str(root)
        self.on_corrupt = on_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = load_image(sample.path)
        except DatasetError as e:
            if self.on_corrupt == "skip":
                return SkippedSample(index, sample.path, e.reason, self.img_size)
            raise
        notes: list | None = [] if self.train else None  # training: said by the loop's SkippedImages, once
        size, boxes = boxes_for_decoded_size(sample, image.size, train=self.train, notes=notes)
        tensor, boxes = self.transform(image, boxes, size)
        item = {"image": tensor, "label": sample.label, "boxes": boxes, "orig_size": tuple(size),
                "path": sample.path, "index": index, "notes": notes or []}
        if sample.mask is not None and not self.train:  # masks serve evaluation; training uses labels only
            item["mask"] = load_mask(sample.mask, image.size, self.img_size)
        return item

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    def __repr__(self):
        return (f"WSOLDataset({self.name!r}, split={self.split!r}, {len(self)} images, {self.num_classes} classes, "
                f"{self.transform!r}, root={self.root!r})")


def collate(items: list) -> dict:
    """Batch dict: image [n,3,S,S], label LongTensor[n], boxes list of [k,4], orig_size list, path list,
    index LongTensor[n], skipped list of SkippedSample (images dropped because they could not be read;
    n may then be smaller than the number of items, even 0); mask uint8 [n,S,S] when every item has one."""
    kept = [it for it in items if not isinstance(it, SkippedSample)]
    skipped = [it for it in items if isinstance(it, SkippedSample)]
    if kept:
        image = torch.stack([it["image"] for it in kept])
    else:
        s = skipped[0].img_size if skipped else 0
        image = torch.zeros((0, 3, s, s))
    batch = {
        "image": image,
        "label": torch.tensor([it["label"] for it in kept], dtype=torch.long),
        "boxes": [it["boxes"] for it in kept],
        "orig_size": [it["orig_size"] for it in kept],
        "path": [it["path"] for it in kept],
        "index": torch.tensor([it["index"] for it in kept], dtype=torch.long),
        "skipped": skipped,
        "notes": [note for it in kept for note in it.get("notes", ())],
    }
    if kept and all("mask" in it for it in kept):
        batch["mask"] = torch.stack([it["mask"] for it in kept])
    return batch


class SkippedImages:
    """Counts the images a loader skipped (batch["skipped"]) and stops the run when there are too many.

    Use: `tracker = SkippedImages(len(dataset)); for batch in loader: tracker.update(batch) ...;
    print(tracker.summary())`. More than `max_fraction` of the dataset skipped raises DatasetError. The
    batch's notes (boxes dropped or clipped, found in a loader's worker process) are warned here.
    """

    def __init__(self, dataset_size: int, max_fraction: float = 0.01):
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.paths: dict[str, str] = {}

    @property
    def count(self) -> int:
        return len(self.paths)

    def update(self, batch: dict) -> int:
        for note in batch.get("notes", ()):  # e.g. a box dropped in a loader's worker process: said here, once
            warn(note)
        for item in batch.get("skipped", ()):
            if item.path not in self.paths:
                self.paths[item.path] = item.reason
                warn(f"skipped unreadable image {item.path}: {item.reason}")
        if self.count > self.max_fraction * max(self.dataset_size, 1):
            raise DatasetError(f"{self.count} of {self.dataset_size} images could not be read (more than "
                               f"{self.max_fraction:.1%}); first: {self.summary()}", next(iter(self.paths)))
        return len(batch.get("skipped", ()))

    def summary(self) -> str:
        if not self.paths:
            return "no images skipped"
        path, reason = next(iter(self.paths.items()))
        return f"{self.count} image(s) skipped, e.g. {path}: {reason}"


def _read(name: str, root: Path, split: str, metadata=None, class_list=None, val_boxes=None,
          boxes=None) -> ReadResult:
    if name == "cub":
        if metadata is not None:
            return readers.read_cub_wsol(root, split, Path(metadata))
        return readers.read_cub(root, split)
    if name == "ilsvrc":
        return readers.read_ilsvrc(root, split, metadata=metadata, class_list=class_list,
                                   val_boxes=val_boxes if val_boxes is not None else boxes)
    if name == "tiny-imagenet":
        return readers.read_tiny_imagenet(root, split)
    if name == "folder":
        base, own = readers.folder_split_root(root, split)
        if not own:
            warn(f"folder dataset {root} has no {split}/ subfolder: split {split!r} uses all its images")
        return readers.read_folder(root, split, boxes=boxes if boxes is not None else val_boxes,
                                   class_list=class_list)
    if name == "voc-seg":
        return readers.read_voc_segmentation(root, split, class_list=class_list)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def build_dataset(name: str, root: str | os.PathLike, split: str, img_size: int = 224, train: bool = False, *,
                  metadata: str | os.PathLike | None = None, class_list: str | os.PathLike | None = None,
                  val_boxes: str | os.PathLike | None = None, boxes: str | os.PathLike | None = None,
                  check_files: bool = True, missing_images: str = "error",
                  on_corrupt: str = "error") -> WSOLDataset:
    """Build a dataset.

    name: cub | ilsvrc | tiny-imagenet | folder | voc-seg. root: a folder or a .tar/.tar.gz/.tgz archive
    (unpacked once into the cache, see dbc_fast.data.archive). split: train | val | test. train: training
    transform (random crop + flip) instead of the evaluation one; evaluation items of a dataset with masks
    (voc-seg) also carry "mask" [S, S] uint8 (see load_mask).
    Options: metadata (wsolevaluation metadata folder: cub and ilsvrc), class_list (a class-order file:
    ilsvrc, folder; voc-seg: the names of mask ids 1..N, else VOC's 20), val_boxes / boxes (ilsvrc val:
    LOC_val_solution.csv or a folder of XML files; folder: a CSV file or an XML folder), check_files (every
    listed image must exist; not needed for folders that are listed from disk), missing_images ("error": a
    listed image that does not exist is an error; "skip": such samples are left out with a warning, e.g. to
    evaluate the ILSVRC images you have against the full wsolevaluation metadata), on_corrupt ("error": an unreadable image raises DatasetError; "skip": dataset[i]
    returns a SkippedSample, which `collate` drops and reports in batch["skipped"]).
    """
    name = name.lower().replace("_", "-")
    if name in ("tiny", "tinyimagenet"):
        name = "tiny-imagenet"
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    check_img_size(img_size)
    root_dir = resolve_root(root)
    metadata_dir = resolve_root(metadata) if metadata is not None else None
    result = _read(name, root_dir, split, metadata=metadata_dir, class_list=class_list, val_boxes=val_boxes,
                   boxes=boxes)
    readers.check_labels(result, len(result.class_names))
    if missing_images not in ("error", "skip"):
        raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
    if check_files or missing_images == "skip":
        dropped = readers.check_files_exist(result, skip_missing=missing_images == "skip")
        if dropped:
            warn(f"{name} {split}: {dropped} image(s) listed in the annotations are not on disk and were "
                          f"left out (missing_images='skip'); {len(result.samples)} remain")
        readers.require_samples(result, f"{name} split {split!r} (no listed image exists)", root_dir)
    readers.warn_clipped(result, f"{name} {split}")
    if train:
        warn_empty_classes(result, f"{name} {split}")
    return WSOLDataset(result.samples, result.class_names, img_size=img_size, train=train, name=name, split=split,
                       root=str(root_dir), on_corrupt=on_corrupt)


def warn_empty_classes(result: ReadResult, what: str) -> None:
    """One warning naming the classes without a single image: the model cannot learn them."""
    counts = np.bincount([s.label for s in result.samples], minlength=len(result.class_names))
    empty = [name for name, count in zip(result.class_names, counts) if count == 0]
    if empty:
        names = ", ".join(empty[:20]) + (f" and {len(empty) - 20} more" if len(empty) > 20 else "")
        warn(f"{what}: {len(empty)} of {len(result.class_names)} classes have no images: {names}",
                      stacklevel=3)


def available_splits(name: str, root: str | os.PathLike, **options) -> list[str]:
    """The splits `build_dataset` can build for this dataset and options (reads the annotations)."""
    found = []
    for split in SPLITS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_dataset(name, root, split, **{**options, "check_files": False, "missing_images": "error"})
            found.append(split)
        except DatasetError:
            pass
    return found


def first_samples(dataset, n):
    """The first `n` samples of `dataset` (keeps samples/class_names/num_classes visible)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {n}")
    return FirstSamples(dataset, n)


class FirstSamples(torch.utils.data.Dataset):
    """The first n samples of a dataset, with its samples/class_names/num_classes/img_size."""

    def __init__(self, dataset, n):
        self.dataset = dataset
        self.samples = dataset.samples[:n]
        self.img_size = getattr(dataset, "img_size", 0)
        self.class_names = dataset.class_names
        self.num_classes = dataset.num_classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.dataset[i]


def image_folder_dataset(root, img_size: int, max_images: int | None = None):
    """A training WSOLDataset of every image file below `root` (folder or archive): label = index of the
    top-level subfolder (sorted), or 0 for images directly in `root`; no boxes."""
    base = resolve_root(root)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(base) for f in names
                   if is_image_file(f) and not f.startswith("."))
    if not files:
        raise DatasetError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) below this folder", base)
    if max_images is not None:
        files = files[:max_images]
    top = [os.path.relpath(f, base).split(os.sep) for f in files]
    classes = sorted({parts[0] for parts in top if len(parts) > 1}) or ["images"]
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(f, index.get(parts[0], 0) if len(parts) > 1 else 0, NO_BOXES, None)
               for f, parts in zip(files, top)]
    return WSOLDataset(samples, classes, img_size=img_size, train=True, name="images", split="all",
                       root=str(base))
