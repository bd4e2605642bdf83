"""`dbc-fast export`: a checkpoint as an inference module for deployment without Python.

Formats: TorchScript (``--format torchscript``, a ``torch.jit.trace`` of the module; TorchScript is
deprecated upstream but still loads in every libtorch) and torch.export + AOTInductor (``--format aoti``,
a ``.pt2`` package compiled for one device). Both hold the same :class:`InferenceModule`:

    forward(images, classes) -> (logits, top_probs, top_classes, maps, boxes, box_classes, box_scores)

* ``images`` [n, 3, H, W], RGB pixels 0..255 as uint8 (or float32; a ``.pt2`` takes the dtype it was
  exported for, ``--input-dtype``), H x W = the export's ``--img-size``; ImageNet normalisation is inside.
* ``classes`` [n] int64: the class whose box (and, for cam/tscam, whose map) is wanted; -1 = the predicted
  top-1 class.
* ``logits`` [n, S] float32: the model's class scores (dbc/cls: log of the mean of both branches'
  probabilities), ``top_probs`` / ``top_classes`` [n, k]: the top-k of softmax(logits);
* ``maps`` [n, H, W] float32: the localisation map bicubically upsampled to the input size and min-max
  normalised to [0, 1];
* ``boxes`` [n, 4] int64: ``dbc_fast::largest_box(maps, cam_threshold)`` (csrc/boxes.cpp): x0, y0, x1, y1
  in input pixels, with the rules of dbc_fast.metrics.extract_boxes (wsolevaluation);
* ``box_classes`` [n] int64 (given or predicted class), ``box_scores`` [n] float32: its softmax score.

The exported files need only libtorch and the op library (``dbc_fast.ops.library_path()``), no dbc_fast:
Python loads them with ``torch.ops.load_library(path)`` then ``torch.jit.load`` /
``torch._inductor.aoti_load_package``; C++ with ``dlopen`` then ``torch::jit::load`` /
``torch::inductor::AOTIModelPackageLoader`` (csrc/example/dbc_infer.cpp). Metadata travel in the file
(TorchScript extra files / AOTInductor package metadata, keys ``dbc_fast.<name>``, all strings): img_h,
img_w, input_dtype, class_names (one per line), threshold, topk, arch, method, device, num_classes.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.images import load_image
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, STRIDE, check_img_size
from .errors import ExportError, require_cuda
from .files import atomic_write
from .models.dbc import CLASS_SPECIFIC_METHODS, minmax_normalize

FORMATS = ("torchscript", "aoti")
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
META_PREFIX = "dbc_fast."
META_KEYS = ("img_h", "img_w", "input_dtype", "class_names", "threshold", "topk", "arch", "method", "device",
             "num_classes")
OUTPUT_NAMES = ("logits", "top_probs", "top_classes", "maps", "boxes", "box_classes", "box_scores")


def load_op_library() -> str:
    """Loads the op library (it holds dbc_fast::largest_box) and returns its path; clear error if absent."""
    from . import ops

    path = ops.library_path()
    if path is None:
        raise ExportError("the dbc_fast op library (dbc_fast/_C.so) is not built; it holds dbc_fast::largest_box, "
                           "which exported models call. Build it with `pip install --no-build-isolation -e .` "
                           "(see docs/export.md) and retry")
    ops.load_library()
    return path


class InferenceModule(nn.Module):
    """Pixels in, (logits, top-k, maps, boxes) out; see the module docstring for the exact contract."""

    def __init__(self, model: nn.Module, img_size: Tuple[int, int], cam_threshold: float = 0.2, topk: int = 5):
        super().__init__()
        height, width = parse_img_size(img_size)
        if not 0.0 <= cam_threshold <= 1.0:
            raise ExportError(f"the map threshold must be in [0, 1], got {cam_threshold}")
        self.model = model.eval()
        self.img_h, self.img_w = int(height), int(width)
        self.cam_threshold = float(cam_threshold)
        self.topk = int(max(1, min(topk, model.num_classes)))
        self.class_specific = getattr(model, "method", "dbc") in CLASS_SPECIFIC_METHODS
        # pixels 0..255 -> ImageNet-normalised, as ToTensor + Normalize: (x / 255 - mean) / std
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, classes: torch.Tensor):
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        out = self.model(x)
        logits = out["logits"].float()
        probs = logits.softmax(dim=1)
        top_probs, top_classes = probs.topk(self.topk, dim=1)
        box_classes = torch.where(classes >= 0, classes, top_classes[:, 0])
        if self.class_specific:  # CAM / TS-CAM maps are per class: a second pass for the wanted classes
            out = self.model(x, map_classes=box_classes)
        maps = F.interpolate(out["map"].float()[:, None], size=(self.img_h, self.img_w), mode="bicubic",
                             align_corners=False)[:, 0]
        maps = minmax_normalize(maps)
        boxes = torch.ops.dbc_fast.largest_box(maps, self.cam_threshold)
        box_scores = probs.gather(1, box_classes[:, None])[:, 0]
        return logits, top_probs, top_classes, maps, boxes, box_classes, box_scores


# ----------------------------------------------------------------------------------------------- building

def parse_img_size(value) -> Tuple[int, int]:
    """(height, width) from S, "S", "HxW" or (H, W); each a positive multiple of the backbone's stride."""
    if isinstance(value, (tuple, list)):
        h, w = value
    else:
        text = str(value).lower()
        parts = text.split("x") if "x" in text else [text, text]
        try:
            h, w = (int(p) for p in parts)
        except ValueError:
            raise ExportError(f"--img-size wants S or HxW (multiples of {STRIDE}), got {value!r}") from None
    try:
        return check_img_size(int(h), "--img-size height"), check_img_size(int(w), "--img-size width")
    except ValueError as e:
        raise ExportError(str(e)) from None


def load_checkpoint_model(path: str, device: str = "cpu"):
    """(model in eval mode, config) from a dbc_fast checkpoint (trainer format: {"model", "config", ...})."""
    from .engine.checkpoint import load_model

    return load_model(path, device=device)


def metadata_for(module: InferenceModule, config: dict, input_dtype: str, device: str) -> Dict[str, str]:
    model = module.model
    names = [str(n).replace("\n", " ") for n in (config.get("class_names") or [])]
    values = {
        "img_h": str(module.img_h), "img_w": str(module.img_w), "input_dtype": input_dtype,
        "class_names": "\n".join(names), "threshold": repr(module.cam_threshold), "topk": str(module.topk),
        "arch": str(getattr(model, "arch", config.get("arch", ""))),
        "method": str(getattr(model, "method", config.get("method", ""))),
        "device": device, "num_classes": str(model.num_classes),
    }
    return {META_PREFIX + k: v for k, v in values.items()}


def example_inputs(module: InferenceModule, batch: int, input_dtype: str, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, module.img_h, module.img_w), generator=g, dtype=torch.uint8)
    images = images.to(INPUT_DTYPES[input_dtype]).to(device)
    classes = torch.full((batch,), -1, dtype=torch.long, device=device)
    return images, classes


def export_torchscript(module: InferenceModule, path: str, metadata: Dict[str, str], example) -> None:
    """torch.jit.trace (under no_grad) and save with the metadata as extra files."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks; the shapes are fixed
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
    atomic_write(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files=metadata))


def export_aoti(module: InferenceModule, path: str, metadata: Dict[str, str], example, max_batch: int = 256,
                inductor_configs: Optional[dict] = None) -> None:
    """torch.export (dynamic batch 1..max_batch) + AOTInductor into a .pt2 package with the metadata."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max(2, max_batch))
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch}))
    configs = {"aot_inductor.metadata": dict(metadata)}
    configs.update(inductor_configs or {})
    atomic_write(path, lambda tmp: torch._inductor.aoti_compile_and_package(
        program, package_path=tmp, inductor_configs=configs), suffix=".pt2")  # the packager wants a .pt2 name


# ----------------------------------------------------------------------------------------------- loading

class ExportedModel:
    """An exported file loaded in Python (op library loaded first): call it like the InferenceModule."""

    def __init__(self, path: str, op_library: Optional[str] = None):
        if not os.path.isfile(path):
            raise ExportError(f"exported model not found: {path}")
        if op_library:
            torch.ops.load_library(op_library)
        elif not hasattr(torch.ops.dbc_fast, "largest_box"):
            load_op_library()
        self.path = path
        self.is_aoti = path.endswith(".pt2")
        if self.is_aoti:
            self._runner = torch._inductor.aoti_load_package(path)
            raw = self._runner.get_metadata()
        else:
            extra = {META_PREFIX + k: "" for k in META_KEYS}
            self._runner = torch.jit.load(path, _extra_files=extra)  # on the device it was exported for
            raw = {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}
        self.metadata = {k[len(META_PREFIX):]: v for k, v in raw.items() if k.startswith(META_PREFIX) and v != ""}
        missing = [k for k in ("img_h", "img_w", "input_dtype", "device") if k not in self.metadata]
        if missing:
            raise ExportError(f"{path}: not a dbc-fast export (metadata {missing} missing)")
        self.img_size = (int(self.metadata["img_h"]), int(self.metadata["img_w"]))
        self.input_dtype = INPUT_DTYPES[self.metadata["input_dtype"]]
        self.device = torch.device(self.metadata["device"])
        self.class_names = self.metadata.get("class_names", "").split("\n") if self.metadata.get("class_names") else []

    def __call__(self, images: torch.Tensor, classes: Optional[torch.Tensor] = None):
        if classes is None:
            classes = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        with torch.no_grad():
            out = self._runner(images, classes)
        return tuple(out)


def read_image_uint8(path: str) -> torch.Tensor:
    """[3, h, w] uint8 RGB of an image file, decoded by data.images.load_image (PIL, as dbc_infer does with libjpeg /
    libpng); an unreadable file is a DatasetError naming it."""
    rgb = np.asarray(load_image(path))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def resize_pixels(image: torch.Tensor, img_size: Tuple[int, int]) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [1, 3, H, W]: bilinear with antialias (align_corners=False), rounded."""
    x = F.interpolate(image[None].float(), size=img_size, mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def predict_image(model: ExportedModel, path: str, given_class: int = -1) -> dict:
    """The dict dbc_infer prints as JSON for one image: class, score, box in the image's own pixels.

    The box is the module's box (input pixels) scaled by (image width / W, image height / H)."""
    image = read_image_uint8(path)
    height, width = image.shape[1:]
    images = resize_pixels(image, model.img_size).to(model.input_dtype).to(model.device)
    classes = torch.full((1,), int(given_class), dtype=torch.long, device=model.device)
    logits, top_probs, top_classes, maps, boxes, box_classes, box_scores = model(images, classes)
    sx, sy = width / model.img_size[1], height / model.img_size[0]
    box = [int(v) for v in boxes[0].tolist()]
    cls = int(box_classes[0])
    return {
        "image": path, "width": int(width), "height": int(height), "class": cls,
        "class_name": model.class_names[cls] if 0 <= cls < len(model.class_names) else None,
        "score": round(float(box_scores[0]), 6),
        "box": [round(box[0] * sx, 3), round(box[1] * sy, 3), round(box[2] * sx, 3), round(box[3] * sy, 3)],
        "topk": [[int(c), round(float(p), 6)] for c, p in zip(top_classes[0].tolist(), top_probs[0].tolist())],
    }


def export_checkpoint(checkpoint: str, out: str, fmt: str = "torchscript", img_size=None, cam_threshold: float = 0.2,
                      topk: int = 5, input_dtype: str = "uint8", device: str = "cpu", batch: int = 2,
                      max_batch: int = 256, inductor_configs: Optional[dict] = None):
    """Writes the export; returns (InferenceModule (eager), metadata)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"unknown input dtype {input_dtype!r}; choose one of {', '.join(INPUT_DTYPES)}")
    if device == "cuda":
        require_cuda()
    if (fmt == "aoti") != out.endswith(".pt2"):
        raise ExportError(f"--out {out}: an aoti export must be named *.pt2 and a torchscript one must not "
                         "(dbc_infer and ExportedModel tell the formats apart by that suffix)")
    if topk < 1:
        raise ExportError(f"--topk must be >= 1, got {topk}")
    if batch < 1 or max_batch < batch:
        raise ExportError(f"want 1 <= --batch <= --max-batch, got {batch} and {max_batch}")
    load_op_library()
    model, config = load_checkpoint_model(checkpoint, device=device)
    size = parse_img_size(img_size if img_size is not None else config.get("img_size", 224))
    module = InferenceModule(model, size, cam_threshold=cam_threshold, topk=topk).to(device).eval()
    metadata = metadata_for(module, config, input_dtype, device)
    example = example_inputs(module, batch, input_dtype, device)
    if fmt == "torchscript":
        export_torchscript(module, out, metadata, example)
    else:
        export_aoti(module, out, metadata, example, max_batch=max_batch, inductor_configs=inductor_configs)
    return module, metadata


def compare_outputs(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Max abs difference per output (boxes and classes: number of differing entries)."""
    diffs = {}
    for name, a, b in zip(OUTPUT_NAMES, expected, got):
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.shape != b.shape:
            diffs[name] = math.inf
        elif a.is_floating_point():
            diffs[name] = float((a - b).abs().max()) if a.numel() else 0.0
        else:
            diffs[name] = float((a != b).sum())
    return diffs
