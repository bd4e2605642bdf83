"""Readers that turn a dataset folder into a list of `Sample`s and the class names.

Box convention everywhere: `x0, y0, x1, y1` float32 in the pixels of the image the annotation refers to,
with the values exactly as the source writes them (inclusive pixel coordinates in ILSVRC XML/CSV, Tiny
ImageNet, wsolevaluation metadata and PASCAL VOC; CUB's `x y w h` becomes `x, y, x + w, y + h`, which is
what wsolevaluation's CUB metadata holds). Coordinates may reach the image width/height (1-based VOC
boxes and CUB's x + w do); a box reaching further is clipped to [0, w] x [0, h] with one warning per
dataset; a box with x1 < x0 or y1 < y0, a negative or non-number coordinate, or one entirely outside the
image is an error.
"""
from __future__ import annotations

import csv
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DatasetError, warn
from .images import is_image_file

class Sample(NamedTuple):
    path: str  # a real file on disk
    label: int  # 0-based class index
    boxes: np.ndarray  # [k, 4] float32 x0, y0, x1, y1 in the pixels of `size` (or of the decoded image)
    size: tuple[int, int] | None  # (w, h) the boxes refer to; None if unknown before decoding
    mask: str | None = None  # segmentation mask file (class id per pixel, 0 background, 255 ignore), if any


@dataclass
class ReadResult:
    samples: list[Sample]
    class_names: list[str]
    origins: list[tuple[str, int | None]] = field(default_factory=list)  # (file, line) per sample
    clipped: list[tuple[str, int | None]] = field(default_factory=list)  # where boxes were clipped


NO_BOXES = np.zeros((0, 4), np.float32)


# --------------------------------------------------------------------------------------------- helpers
def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file (a UTF-8 byte order mark, which
    editors on Windows add, is dropped: it would be an invisible part of the first name)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(i, ln.strip()) for i, ln in enumerate(f, 1) if ln.strip()]
    except FileNotFoundError as e:
        raise DatasetError("file not found", path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read text file: {e}", path) from e


def _fields(text: str, count: int, path: Path, line: int, sep: str | None = None, what: str = "") -> list[str]:
    parts = [p.strip() for p in text.split(sep)] if sep else text.split()
    if len(parts) != count:
        raise DatasetError(f"expected {count} fields{' (' + what + ')' if what else ''}, got {len(parts)}: {text!r}",
                           path, line)
    return parts


def _int(text: str, path: Path, line: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{what} is not an integer: {text!r}", path, line) from None


def _float(text: str, path: Path, line: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{what} is not a number: {text!r}", path, line) from None
    if not math.isfinite(value):
        raise DatasetError(f"{what} is not finite: {text!r}", path, line)
    return value


def check_box(box: list[float], size: tuple[int, int] | None, path, line, clipped: list) -> list[float]:
    """Validate one x0,y0,x1,y1 box (see the module docstring for the policy); returns it, clipped."""
    x0, y0, x1, y1 = box
    if min(box) < 0:
        raise DatasetError(f"box {box} has a negative coordinate", path, line)
    if x1 < x0 or y1 < y0:
        raise DatasetError(f"box {box} has x1 < x0 or y1 < y0 (expected x0 y0 x1 y1)", path, line)
    if size is not None:
        w, h = size
        if x0 > w or y0 > h:
            raise DatasetError(f"box {box} lies entirely outside the {w}x{h} image", path, line)
        if x1 > w or y1 > h:
            clipped.append((str(path), line))
            box = [x0, y0, min(x1, w), min(y1, h)]
    return box


def _boxes_array(boxes: list[list[float]]) -> np.ndarray:
    return np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else NO_BOXES.copy()


def warn_clipped(result: ReadResult, dataset: str) -> None:
    if result.clipped:
        path, line = result.clipped[0]
        where = path if line is None else f"{path}, line {line}"
        warn(f"{dataset}: {len(result.clipped)} box(es) reached outside their image and were clipped "
                      f"to it (first: {where})", stacklevel=3)


def check_files_exist(result: ReadResult, skip_missing: bool = False) -> int:
    """Every sample's image must exist; the error names the annotation line that lists it. With
    skip_missing, samples without an image are dropped instead; returns how many were dropped."""
    missing = [(s.path, o) for s, o in zip(result.samples, result.origins) if not os.path.isfile(s.path)]
    if missing and skip_missing:
        gone = {p for p, _ in missing}
        kept = [(s, o) for s, o in zip(result.samples, result.origins) if s.path not in gone]
        result.samples = [s for s, _ in kept]
        result.origins = [o for _, o in kept]
        return len(missing)
    if missing:
        path, (src, line) = missing[0]
        more = f" ({len(missing)} missing in all)" if len(missing) > 1 else ""
        raise DatasetError(f"image file does not exist: {path}{more}", src, line)
    return 0


def check_labels(result: ReadResult, num_classes: int) -> None:
    for s, (src, line) in zip(result.samples, result.origins):
        if not 0 <= s.label < num_classes:
            raise DatasetError(f"label {s.label} out of range 0..{num_classes - 1}", src, line)


def require_samples(result: ReadResult, what: str, where) -> ReadResult:
    """A split's samples: at least one, and each image listed once (a repeated line would count an image
    twice in training and in the metrics); the error names the repeated line."""
    if not result.samples:
        raise DatasetError(f"empty split: no images found for {what}", where)
    first: dict[str, tuple] = {}
    for sample, origin in zip(result.samples, result.origins or [(None, None)] * len(result.samples)):
        if sample.path in first:
            src, line = origin
            before = first[sample.path]
            earlier = f" (first at {before[0]}, line {before[1]})" if before[1] is not None else ""
            raise DatasetError(f"image {sample.path} is listed twice{earlier}", src if src is not None else where,
                               line)
        first[sample.path] = origin
    return result


def read_class_list(path: Path) -> list[str]:
    """A class list, one class a line; only the first word counts (`n01440764 tench, Tinca tinca`)."""
    names = []
    seen: dict[str, int] = {}
    for line, text in _read_lines(path):
        name = text.split()[0].split(",")[0]
        if name in seen:
            raise DatasetError(f"class {name!r} listed twice (first on line {seen[name]})", path, line)
        seen[name] = line
        names.append(name)
    if not names:
        raise DatasetError("class list is empty", path)
    return names


# ------------------------------------------------------------------------- wsolevaluation metadata
WSOL_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")


def is_wsol_metadata(folder: Path) -> bool:
    return (folder / "image_ids.txt").is_file() and (folder / "class_labels.txt").is_file()


def find_wsol_split(metadata: Path, split: str, dataset_dir: str) -> Path:
    """`metadata` may hold the four files itself, or be a wsolevaluation metadata root
    (`<root>/<dataset_dir>/<split>/` or `<root>/metadata/<dataset_dir>/<split>/`) or `<root>/<split>/`."""
    metadata = Path(metadata)
    for candidate in (metadata, metadata / split, metadata / dataset_dir / split,
                      metadata / "metadata" / dataset_dir / split):
        if is_wsol_metadata(candidate):
            return candidate
    raise DatasetError(f"no wsolevaluation metadata for split {split!r} (looked for image_ids.txt and "
                       f"class_labels.txt in it, {split}/, {dataset_dir}/{split}/, metadata/{dataset_dir}/{split}/)",
                       metadata)


def read_wsol_metadata(meta: Path, image_root: Path) -> ReadResult:
    """wsolevaluation metadata: image_ids.txt (`id`), class_labels.txt (`id,label`), image_sizes.txt
    (`id,w,h`, optional), localization.txt (`id,x0,y0,x1,y1`, a line per box, optional). Image paths
    are `image_root/id`; boxes are in the pixels of image_sizes.txt's size (wsolevaluation scales boxes
    with that size, whatever the decoded image's size)."""
    ids_file = meta / "image_ids.txt"
    order: dict[str, int] = {}
    id_lines: list[tuple[str, int]] = []
    for line, text in _read_lines(ids_file):
        if text in order:
            raise DatasetError(f"image id {text!r} listed twice", ids_file, line)
        order[text] = len(id_lines)
        id_lines.append((text, line))

    def known(image_id, path, line):
        if image_id not in order:
            raise DatasetError(f"image id {image_id!r} is not in image_ids.txt", path, line)
        return image_id

    labels: dict[str, tuple[int, int]] = {}
    labels_file = f = meta / "class_labels.txt"
    for line, text in _read_lines(f):
        image_id, label = _fields(text, 2, f, line, ",", "id,label")
        label = _int(label, f, line, "label")
        if label < 0:
            raise DatasetError(f"label {label} is negative", f, line)
        if image_id in labels:
            raise DatasetError(f"image id {image_id!r} listed twice (first on line {labels[image_id][1]})", f, line)
        labels[known(image_id, f, line)] = (label, line)
    sizes: dict[str, tuple[int, int]] = {}
    f = meta / "image_sizes.txt"
    if f.is_file():
        for line, text in _read_lines(f):
            image_id, w, h = _fields(text, 3, f, line, ",", "id,w,h")
            w, h = _int(w, f, line, "width"), _int(h, f, line, "height")
            if w <= 0 or h <= 0:
                raise DatasetError(f"image size {w}x{h} is not positive", f, line)
            if image_id in sizes:
                raise DatasetError(f"image id {image_id!r} listed twice", f, line)
            sizes[known(image_id, f, line)] = (w, h)
    result = ReadResult([], [])
    boxes: dict[str, list] = {}
    f = meta / "localization.txt"
    if f.is_file():
        for line, text in _read_lines(f):
            image_id, *coords = _fields(text, 5, f, line, ",", "id,x0,y0,x1,y1")
            box = [_float(c, f, line, "box coordinate") for c in coords]
            image_id = known(image_id, f, line)
            boxes.setdefault(image_id, []).append(check_box(box, sizes.get(image_id), f, line, result.clipped))
    for image_id, line in id_lines:
        if image_id not in labels:
            raise DatasetError(f"image id {image_id!r} has no line in class_labels.txt", ids_file, line)
        label, label_line = labels[image_id]
        result.samples.append(Sample(str(image_root / image_id), label,
                                     _boxes_array(boxes.get(image_id, [])), sizes.get(image_id)))
        result.origins.append((str(labels_file), label_line))  # the line that names the image and its label
    return require_samples(result, "this wsolevaluation split", ids_file)


# ----------------------------------------------------------------------------------------- CUB
def find_cub_root(root: Path) -> Path:
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DatasetError("not a CUB-200-2011 folder: no images.txt in it or in CUB_200_2011/", root)


MISSING_CUB_CLASS = "(class {} not in classes.txt)"


def cub_class_names(cub: Path) -> list[str]:
    """classes.txt (`id name`, ids 1-based); label = id - 1; ids the file skips get a placeholder name
    (the 4-image sample lists only its 3 classes, ids 1, 6, 7)."""
    f = cub / "classes.txt"
    by_id: dict[int, str] = {}
    for line, text in _read_lines(f):
        cid, name = _fields(text, 2, f, line, None, "id name")
        cid = _int(cid, f, line, "class id")
        if cid < 1:
            raise DatasetError(f"class id {cid} must be >= 1", f, line)
        by_id[cid] = name
    if not by_id:
        raise DatasetError("class list is empty", f)
    return [by_id.get(i, MISSING_CUB_CLASS.format(i)) for i in range(1, max(by_id) + 1)]


def read_cub(root: Path, split: str) -> ReadResult:
    """Official CUB_200_2011 layout. Splits: train (is_training_image = 1), test (0)."""
    cub = find_cub_root(root)
    if split not in ("train", "test"):
        raise DatasetError(f"CUB-200-2011 has the splits train and test, not {split!r} (its val split, CUBV2, "
                           "comes with wsolevaluation: pass metadata=<wsolevaluation metadata folder>)", cub)
    class_names = cub_class_names(cub)

    def table(name, count, what):
        f = cub / name
        out = {}
        for line, text in _read_lines(f):
            parts = _fields(text, count, f, line, None, what)
            image_id = _int(parts[0], f, line, "image id")
            if image_id in out:
                raise DatasetError(f"image id {image_id} listed twice", f, line)
            out[image_id] = (parts[1:], line)
        return f, out

    images_f, images = table("images.txt", 2, "id path")
    labels_f, labels = table("image_class_labels.txt", 2, "id class_id")
    split_f, splits = table("train_test_split.txt", 2, "id is_training_image")
    boxes_f, boxes = table("bounding_boxes.txt", 5, "id x y w h")
    result = ReadResult([], class_names)
    want = "1" if split == "train" else "0"
    for image_id, ((rel,), line) in images.items():
        for f, t in ((labels_f, labels), (split_f, splits), (boxes_f, boxes)):
            if image_id not in t:
                raise DatasetError(f"image id {image_id} (images.txt line {line}) has no line here", f)
        (flag,), fline = splits[image_id]
        if flag not in ("0", "1"):
            raise DatasetError(f"is_training_image must be 0 or 1, got {flag!r}", split_f, fline)
        if flag != want:
            continue
        (cid,), lline = labels[image_id]
        label = _int(cid, labels_f, lline, "class id") - 1
        if not 0 <= label < len(class_names) or class_names[label] == MISSING_CUB_CLASS.format(label + 1):
            raise DatasetError(f"class id {label + 1} is not in classes.txt", labels_f, lline)
        xywh, bline = boxes[image_id]
        x, y, w, h = (_float(v, boxes_f, bline, "box value") for v in xywh)
        if w < 0 or h < 0:
            raise DatasetError(f"box width/height is negative: {xywh}", boxes_f, bline)
        box = check_box([x, y, x + w, y + h], None, boxes_f, bline, result.clipped)
        result.samples.append(Sample(str(cub / "images" / rel), label, _boxes_array([box]), None))
        result.origins.append((str(images_f), line))
    return require_samples(result, f"CUB split {split!r}", cub)


def read_cub_wsol(root: Path, split: str, metadata: Path) -> ReadResult:
    """CUB images with wsolevaluation's CUB metadata (train/val/test; val = CUBV2 images)."""
    try:
        cub = find_cub_root(root)
        images = cub / "images"
    except DatasetError:
        cub, images = root, (root / "images" if (root / "images").is_dir() else root)
    result = read_wsol_metadata(find_wsol_split(metadata, split, "CUB"), images)
    # CUB has 200 classes; names from classes.txt where it has them, else from the image ids, which look
    # like `001.Black_footed_Albatross/file.jpg`
    num = max(200, max(s.label for s in result.samples) + 1)
    listed = cub_class_names(cub) if (cub / "classes.txt").is_file() else []
    from_ids = {s.label: Path(s.path).parent.name for s in result.samples}
    result.class_names = [listed[i] if i < len(listed) and listed[i] != MISSING_CUB_CLASS.format(i + 1)
                          else from_ids.get(i, MISSING_CUB_CLASS.format(i + 1)) for i in range(num)]
    return result


# ---------------------------------------------------------------------------------------- ILSVRC
CLASS_LIST_NAMES = ("synset_words.txt", "LOC_synset_mapping.txt", "wnids.txt", "synsets.txt")


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def ilsvrc_class_names(root: Path, class_list: Path | None, train_dir: Path | None) -> list[str] | None:
    if class_list is not None:
        return read_class_list(Path(class_list))
    for name in CLASS_LIST_NAMES:
        if (root / name).is_file():
            return read_class_list(root / name)
    if train_dir is not None:
        return sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
    return None


def _ilsvrc_dirs(root: Path):
    train = _first_dir(root / "train", root / "ILSVRC" / "Data" / "CLS-LOC" / "train",
                       root / "Data" / "CLS-LOC" / "train")
    val = _first_dir(root / "val", root / "ILSVRC" / "Data" / "CLS-LOC" / "val", root / "Data" / "CLS-LOC" / "val")
    return train, val


def read_ilsvrc_train(root: Path, class_list: Path | None) -> ReadResult:
    """`train/<wnid>/*.JPEG` (also the Kaggle `ILSVRC/Data/CLS-LOC/train/`); no boxes."""
    train, _ = _ilsvrc_dirs(root)
    if train is None:
        raise DatasetError("no ILSVRC training folder (train/<wnid>/*.JPEG) in the dataset root", root)
    names = ilsvrc_class_names(root, class_list, train)
    index = {n: i for i, n in enumerate(names)}
    result = ReadResult([], names)
    for wnid in sorted(d.name for d in os.scandir(train) if d.is_dir()):
        if wnid not in index:
            raise DatasetError(f"class folder {wnid!r} is not in the class list", train / wnid)
        files = sorted(e.name for e in os.scandir(train / wnid) if e.is_file() and is_image_file(e.name))
        for name in files:
            result.samples.append(Sample(str(train / wnid / name), index[wnid], NO_BOXES, None))
            result.origins.append((str(train / wnid), None))
    return require_samples(result, "ILSVRC train", train)


def _voc_objects(xml_path: Path) -> tuple[str | None, tuple[int, int] | None, list[tuple[str, list[float]]]]:
    """(filename, (w, h) or None, [(name, box)]) of a PASCAL VOC / ILSVRC XML annotation."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as e:
        raise DatasetError(f"malformed XML: {e}", xml_path, e.position[0] if e.position else None) from e
    except OSError as e:
        raise DatasetError(f"cannot read XML: {e}", xml_path) from e
    node = tree.getroot()
    filename = (node.findtext("filename") or "").strip() or None
    size = None
    w, h = node.findtext("size/width"), node.findtext("size/height")
    if w is not None and h is not None:
        w, h = _int(w.strip(), xml_path, None, "size/width"), _int(h.strip(), xml_path, None, "size/height")
        size = (w, h) if w > 0 and h > 0 else None  # some tools write 0 when they do not know
    objects = []
    for obj in node.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError("an <object> has no <name>", xml_path)
        box = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            text = obj.findtext(f"bndbox/{key}")
            if text is None:
                raise DatasetError(f"an <object> ({name}) has no bndbox/{key}", xml_path)
            box.append(_float(text.strip(), xml_path, None, f"bndbox/{key}"))
        objects.append((name, box))
    return filename, size, objects


def _label_and_boxes(objects, index, xml_path, result, size):
    """WSOL wants one class per image: the first object's class; the boxes are that class's objects."""
    if not objects:
        raise DatasetError("no <object> in the annotation: the image has no label", xml_path)
    name = objects[0][0]
    if name not in index:
        raise DatasetError(f"class {name!r} is not in the class list", xml_path)
    boxes = [check_box(b, size, xml_path, None, result.clipped) for n, b in objects if n == name]
    return index[name], _boxes_array(boxes)


def read_ilsvrc_val_xml(val_dir: Path, xml_dir: Path, names: list[str]) -> ReadResult:
    """Official per-image XML files (`ILSVRC2012_val_00000001.xml`, VOC style, `<name>` = wnid)."""
    index = {n: i for i, n in enumerate(names)}
    result = ReadResult([], names)
    for xml_name in sorted(e.name for e in os.scandir(xml_dir) if e.name.lower().endswith(".xml")):
        xml_path = xml_dir / xml_name
        _, size, objects = _voc_objects(xml_path)
        label, boxes = _label_and_boxes(objects, index, xml_path, result, size)
        image = _find_val_image(val_dir, Path(xml_name).stem, names[label], xml_path)
        result.samples.append(Sample(str(image), label, boxes, size))
        result.origins.append((str(xml_path), None))
    return require_samples(result, "ILSVRC val (XML annotations)", xml_dir)


def _find_image(folder: Path, stem: str, origin: Path, line: int | None = None) -> Path:
    for ext in (".JPEG", ".jpg", ".jpeg", ".JPG", ".png", ".PNG"):
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    raise DatasetError(f"no image file for {stem!r} in {folder}", origin, line)


def _find_val_image(val_dir: Path, stem: str, wnid: str, origin: Path, line: int | None = None) -> Path:
    """val/<stem>.JPEG, or val/<wnid>/<stem>.JPEG (the class-folder layout of PyTorch's ImageNet example)."""
    if (val_dir / wnid).is_dir():
        try:
            return _find_image(val_dir / wnid, stem, origin, line)
        except DatasetError:
            pass
    try:
        return _find_image(val_dir, stem, origin, line)
    except DatasetError:
        raise DatasetError(f"no image file for {stem!r} in {val_dir} or {val_dir / wnid}", origin, line) from None


def read_ilsvrc_val_csv(val_dir: Path, csv_path: Path, names: list[str]) -> ReadResult:
    """`LOC_val_solution.csv`: header `ImageId,PredictionString`, then `id,"wnid x0 y0 x1 y1 wnid ..."`."""
    index = {n: i for i, n in enumerate(names)}
    result = ReadResult([], names)
    rows = _read_lines(csv_path)
    if rows and rows[0][1].replace(" ", "").lower().startswith("imageid,"):
        rows = rows[1:]
    for line, text in rows:
        parts = _fields(text, 2, csv_path, line, ",", "ImageId,PredictionString")
        image_id, prediction = parts[0], parts[1].split()
        if not prediction or len(prediction) % 5:
            raise DatasetError("PredictionString must be groups of 5 (wnid x0 y0 x1 y1)", csv_path, line)
        objects = [(prediction[i], [_float(v, csv_path, line, "box coordinate") for v in prediction[i + 1:i + 5]])
                   for i in range(0, len(prediction), 5)]
        name = objects[0][0]
        if name not in index:
            raise DatasetError(f"class {name!r} is not in the class list", csv_path, line)
        boxes = [check_box(b, None, csv_path, line, result.clipped) for n, b in objects if n == name]
        image = _find_val_image(val_dir, image_id, name, csv_path, line)
        result.samples.append(Sample(str(image), index[name], _boxes_array(boxes), None))
        result.origins.append((str(csv_path), line))
    return require_samples(result, "ILSVRC val (LOC_val_solution.csv)", csv_path)


def read_ilsvrc(root: Path, split: str, metadata: Path | None = None, class_list: Path | None = None,
                val_boxes: Path | None = None) -> ReadResult:
    """ILSVRC. train: class folders. val/test (both the official ILSVRC2012 validation images, which
    wsolevaluation calls `test`): boxes from, in this order, wsolevaluation metadata (`metadata=` or the
    four files in the root), `val_boxes=` (a CSV file or an XML folder), LOC_val_solution.csv in the root,
    or per-image XML files (beside the images in val/, or in [ILSVRC/]Annotations/CLS-LOC/val/)."""
    if split == "train" and metadata is None:
        return read_ilsvrc_train(root, class_list)
    train_dir, val_dir = _ilsvrc_dirs(root)
    if metadata is not None or is_wsol_metadata(root):
        meta = find_wsol_split(Path(metadata), split, "ILSVRC") if metadata is not None else root
        result = read_wsol_metadata(meta, root)
        names = ilsvrc_class_names(root, class_list, train_dir)
        num = max(s.label for s in result.samples) + 1
        result.class_names = names if names is not None else [str(i) for i in range(max(num, 1000))]
        return result
    if split not in ("val", "test"):
        raise DatasetError(f"unknown split {split!r} for ILSVRC (train, val, test)", root)
    if val_dir is None:
        raise DatasetError("no ILSVRC validation image folder (val/ or ILSVRC/Data/CLS-LOC/val/)", root)
    names = ilsvrc_class_names(root, class_list, train_dir)
    if names is None:
        raise DatasetError("ILSVRC val needs the class order: a train/ folder, a class list in the root "
                           f"({', '.join(CLASS_LIST_NAMES)}) or class_list=<file>", root)
    source = Path(val_boxes) if val_boxes is not None else None
    if source is None:
        for candidate in (root / "LOC_val_solution.csv", root / "ILSVRC" / "LOC_val_solution.csv"):
            if candidate.is_file():
                source = candidate
                break
    if source is None:
        source = _first_dir(root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val",
                            root / "Annotations" / "CLS-LOC" / "val")
    if source is None and any(e.name.lower().endswith(".xml") for e in os.scandir(val_dir)):
        source = val_dir
    if source is None:
        raise DatasetError("no ILSVRC val boxes: give wsolevaluation metadata (metadata=), LOC_val_solution.csv "
                           "or the per-image XML files (val_boxes=)", root)
    if source.is_dir():
        return read_ilsvrc_val_xml(val_dir, source, names)
    return read_ilsvrc_val_csv(val_dir, source, names)


# ---------------------------------------------------------------------------------- Tiny ImageNet
def read_tiny_imagenet(root: Path, split: str) -> ReadResult:
    """Native Tiny ImageNet: wnids.txt (class order), train/<wnid>/images/*.JPEG with
    train/<wnid>/<wnid>_boxes.txt (`file x0 y0 x1 y1`), val/images/*.JPEG with val/val_annotations.txt
    (`file wnid x0 y0 x1 y1`). The test split has no labels and is refused."""
    if not (root / "wnids.txt").is_file():
        raise DatasetError("not a Tiny ImageNet folder: no wnids.txt", root)
    if split not in ("train", "val"):
        raise DatasetError(f"Tiny ImageNet has the labelled splits train and val, not {split!r}", root)
    names = read_class_list(root / "wnids.txt")
    index = {n: i for i, n in enumerate(names)}
    result = ReadResult([], names)
    if split == "train":
        for wnid in names:
            f = root / "train" / wnid / f"{wnid}_boxes.txt"
            for line, text in _read_lines(f):
                name, *coords = _fields(text, 5, f, line, None, "file x0 y0 x1 y1")
                box = check_box([_float(c, f, line, "box coordinate") for c in coords], None, f, line, result.clipped)
                result.samples.append(Sample(str(root / "train" / wnid / "images" / name), index[wnid],
                                             _boxes_array([box]), None))
                result.origins.append((str(f), line))
    else:
        f = root / "val" / "val_annotations.txt"
        for line, text in _read_lines(f):
            name, wnid, *coords = _fields(text, 6, f, line, None, "file wnid x0 y0 x1 y1")
            if wnid not in index:
                raise DatasetError(f"class {wnid!r} is not in wnids.txt", f, line)
            box = check_box([_float(c, f, line, "box coordinate") for c in coords], None, f, line, result.clipped)
            result.samples.append(Sample(str(root / "val" / "images" / name), index[wnid], _boxes_array([box]), None))
            result.origins.append((str(f), line))
    return require_samples(result, f"Tiny ImageNet split {split!r}", root)


# --------------------------------------------------------------------------------- generic folder
CSV_NAMES = ("boxes.csv", "annotations.csv", "labels.csv")


def folder_split_root(root: Path, split: str) -> tuple[Path, bool]:
    """`root/<split>/` when it exists, else the root itself (the same images for every split)."""
    return (root / split, True) if (root / split).is_dir() else (root, False)


def read_folder(root: Path, split: str, boxes: Path | None = None, class_list: Path | None = None) -> ReadResult:
    """A folder of images with boxes, either PASCAL VOC XML files (annotations/ or Annotations/ or beside
    the images; the image is <filename> in images/ or JPEGImages/ or beside the XML) or a CSV file
    (`path,x0,y0,x1,y1,label`, a line per box, optional header, paths relative to the CSV's folder).
    Class order: classes.txt in the root (or class_list=), else the sorted class names found."""
    base, _ = folder_split_root(root, split)
    if boxes is None:
        boxes = next((base / n for n in CSV_NAMES if (base / n).is_file()), None)
    if boxes is None:
        boxes = _first_dir(base / "annotations", base / "Annotations")
    if boxes is None and any(e.name.lower().endswith(".xml") for e in os.scandir(base)):
        boxes = base
    if boxes is None:
        raise DatasetError("no boxes found: expected annotations/*.xml (PASCAL VOC) or boxes.csv "
                           "(path,x0,y0,x1,y1,label), or pass boxes=<file or folder>", base)
    boxes = Path(boxes)
    if class_list is None and (root / "classes.txt").is_file():
        class_list = root / "classes.txt"
    names = read_class_list(Path(class_list)) if class_list is not None else None
    if boxes.is_dir():
        return _read_voc_folder(base, boxes, names)
    return _read_box_csv(boxes, names)


def _read_voc_folder(base: Path, xml_dir: Path, names: list[str] | None) -> ReadResult:
    parsed = []
    for xml_name in sorted(e.name for e in os.scandir(xml_dir) if e.name.lower().endswith(".xml")):
        xml_path = xml_dir / xml_name
        filename, size, objects = _voc_objects(xml_path)
        if not objects:
            raise DatasetError("no <object> in the annotation: the image has no label", xml_path)
        parsed.append((xml_path, filename, size, objects))
    if names is None:
        names = sorted({o[0][0] for *_, o in parsed})
    index = {n: i for i, n in enumerate(names)}
    result = ReadResult([], names)
    image_dirs = [d for d in (base / "images", base / "JPEGImages", xml_dir, base) if d.is_dir()]
    for xml_path, filename, size, objects in parsed:
        label, boxes = _label_and_boxes(objects, index, xml_path, result, size)
        image = None
        for d in image_dirs:
            if filename and (d / filename).is_file():
                image = d / filename
                break
        if image is None:
            try:
                image = next(_find_image(d, xml_path.stem, xml_path) for d in image_dirs
                             if any((d / (xml_path.stem + e)).is_file() for e in (".JPEG", ".jpg", ".jpeg", ".JPG",
                                                                                   ".png", ".PNG")))
            except StopIteration:
                raise DatasetError(f"image {filename or xml_path.stem!r} not found in "
                                   f"{', '.join(str(d) for d in image_dirs)}", xml_path) from None
        result.samples.append(Sample(str(image), label, boxes, size))
        result.origins.append((str(xml_path), None))
    return require_samples(result, "image folder (VOC XML)", xml_dir)


def _read_box_csv(csv_path: Path, names: list[str] | None) -> ReadResult:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # without a byte order mark
            rows = [(i, r) for i, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except OSError as e:
        raise DatasetError(f"cannot read CSV: {e}", csv_path) from e
    if rows and rows[0][1] and rows[0][1][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    per_image: dict[str, list] = {}
    first_line: dict[str, int] = {}
    for line, row in rows:
        if len(row) != 6:
            raise DatasetError(f"expected 6 fields (path,x0,y0,x1,y1,label), got {len(row)}: {row}", csv_path, line)
        rel, *coords, label = (c.strip() for c in row)
        box = [_float(c, csv_path, line, "box coordinate") for c in coords]
        per_image.setdefault(rel, []).append((label, box, line))
        first_line.setdefault(rel, line)
    if names is None:
        names = sorted({objs[0][0] for objs in per_image.values()})
    index = {n: i for i, n in enumerate(names)}
    result = ReadResult([], names)
    for rel, objs in per_image.items():
        label = objs[0][0]
        if label not in index:
            raise DatasetError(f"class {label!r} is not in the class list", csv_path, first_line[rel])
        boxes = [check_box(b, None, csv_path, ln, result.clipped) for n, b, ln in objs if n == label]
        result.samples.append(Sample(str(csv_path.parent / rel), index[label], _boxes_array(boxes), None))
        result.origins.append((str(csv_path), first_line[rel]))
    return require_samples(result, "image folder (CSV boxes)", csv_path)


# ------------------------------------------------------------------------ PASCAL VOC segmentation
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
MASK_BACKGROUND, MASK_IGNORE = 0, 255
VOC_MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")


def find_voc_root(root: Path) -> Path:
    """The folder holding JPEGImages/ and ImageSets/Segmentation/: root, root/VOC2012 or
    root/VOCdevkit/VOC2012."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    raise DatasetError("not a VOC segmentation folder: no JPEGImages/ and ImageSets/Segmentation/ in it, "
                       "in VOC2012/ or in VOCdevkit/VOC2012/", root)


def read_class_mask(path: Path) -> np.ndarray:
    """A class-index mask [H, W] uint8 from a palette (P) or grayscale (L) PNG: the stored index per pixel."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DatasetError(f"a class mask must be a palette or grayscale PNG of class indices, got mode "
                                   f"{im.mode} (a colour rendering of the classes cannot be read back)", path)
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError("mask file does not exist", path) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"corrupt or unreadable mask: {e}", path) from e


def mask_label_and_boxes(mask: np.ndarray, num_classes: int, path: Path) -> tuple[int, np.ndarray]:
    """One label per image for classification: the class with the most pixels (lowest id on ties). Its box:
    the bounding box of all that class's pixels, x0, y0, x1, y1 inclusive pixels of the mask (one box per
    class, not per connected region: VOC's void borders cut objects into specks - one sample dog is a
    55,927-pixel region plus 113 regions of <= 5 pixels - so regions are not objects)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [int(v) for v in np.nonzero(counts)[0] if v != MASK_IGNORE and v > num_classes]
    if bad:
        raise DatasetError(f"mask values {bad} are neither a class id (1..{num_classes}), 0 (background) nor "
                           f"{MASK_IGNORE} (ignore)", path)
    per_class = counts[1:num_classes + 1]
    if not per_class.any():
        raise DatasetError("the mask has no object pixel (only background / ignore): the image has no label", path)
    class_id = int(np.argmax(per_class)) + 1
    ys, xs = np.nonzero(mask == class_id)
    return class_id - 1, np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], np.float32)


def read_voc_segmentation(root: Path, split: str, class_list: Path | None = None) -> ReadResult:
    """PASCAL VOC segmentation layout: ImageSets/Segmentation/<split>.txt (one image id a line),
    JPEGImages/<id>.jpg, SegmentationClass/<id>.png (or SegmentationClassAug/, SBD's augmented masks),
    a class id per pixel: 0 background, 1..N the classes (VOC's 20, or the lines of class_list=), 255
    ignore. Labels and boxes come from the masks (mask_label_and_boxes); each sample keeps its mask."""
    voc = find_voc_root(root)
    list_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        have = sorted(p.stem for p in (voc / "ImageSets" / "Segmentation").glob("*.txt"))
        raise DatasetError(f"no {split!r} split: ImageSets/Segmentation/{split}.txt does not exist "
                           f"(found: {', '.join(have) or 'none'})", list_file.parent)
    mask_dir = _first_dir(*(voc / d for d in VOC_MASK_DIRS))
    if mask_dir is None:
        raise DatasetError(f"no mask folder ({' or '.join(VOC_MASK_DIRS)})", voc)
    names = read_class_list(Path(class_list)) if class_list is not None else list(VOC_CLASSES)
    if len(names) >= MASK_IGNORE:
        raise DatasetError(f"{len(names)} classes do not fit in a mask (ids 1..254, 255 = ignore)", class_list)
    result = ReadResult([], names)
    for line, image_id in _read_lines(list_file):
        image_id = image_id.split()[0]
        mask_path = mask_dir / f"{image_id}.png"
        if not mask_path.is_file():
            raise DatasetError(f"no mask {mask_path.name} in {mask_dir}", list_file, line)
        mask = read_class_mask(mask_path)
        label, boxes = mask_label_and_boxes(mask, len(names), mask_path)
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        result.samples.append(Sample(str(image), label, boxes, (mask.shape[1], mask.shape[0]), str(mask_path)))
        result.origins.append((str(list_file), line))
    return require_samples(result, f"VOC segmentation split {split!r}", list_file)
