"""`dbc-fast predict`: class, score and box for each image, from a checkpoint.

Each image is resized to S x S (S = --img-size, default: the checkpoint's), normalised, and run through the
model. The map (M) is resized to the ORIGINAL image size, min-max normalised and thresholded at
--cam-threshold; the box is the bounding box of the largest connected region (dbc_fast.metrics
.extract_boxes), in original image pixels [x0, y0, x1, y1] (inclusive). Writes OUT/predictions.json; with
--draw also OUT/<image name>.png: the image beside its maps (M_a, M_c, M for dbc/cls; M for cam/tscam) as
heat-maps with their boxes, drawn by dbc_fast.engine.visualize.render_panel.
An image that cannot be read stops the run with its file named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

# A large image is decoded at >= 4 x --img-size on each side, not at full size: the S x S input then comes from
# a >= 4x antialiased downscale either way (on upscaled photos the input differs by at most 3 grey levels in
# 255, 0.1 on average), while a 108-megapixel JPEG decodes at 1/8 scale: 16 MB instead of 830 MB.
DECODE_SIDE_PER_INPUT_SIDE = 4
DEFAULT_MAX_MEGAPIXELS = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import cli

    p.add_argument("--checkpoint", help="dbc_fast checkpoint (required)")
    p.add_argument("--images", nargs="+", help="image files and/or folders of images (required)")
    p.add_argument("--img-size", type=options.img_size, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device (default cuda if available, else cpu)")
    p.add_argument("--out", type=options.out_dir, help="output folder (required)")
    p.add_argument("--cam-threshold", type=options.FRACTION, default=0.2, help="map threshold for the box (default 0.2)")
    p.add_argument("--batch-size", type=options.POSITIVE_INT, default=16, help="images per forward pass (default 16)")
    p.add_argument("--max-megapixels", type=options.POSITIVE, default=DEFAULT_MAX_MEGAPIXELS,
                   help=f"refuse images above this many megapixels (default {DEFAULT_MAX_MEGAPIXELS})")
    p.add_argument("--topk", type=options.POSITIVE_INT, default=5, help="also list the top-k classes (default 5)")
    p.add_argument("--draw", action="store_true", help="write a PNG per image: the image beside its maps with their boxes")
    # --- DALI branch (DALI helper) ---
    p.add_argument("--loader", choices=("torch", "dali", "auto"), default="torch",
                   help="image decoding + resizing: PIL (torch) or NVIDIA DALI (GPU decode on cuda); auto = DALI "
                        "on a GPU when it is installed (default torch)")
    p.add_argument("--num-workers", type=options.NON_NEGATIVE_INT, default=4, help="DALI CPU threads (default 4)")


def list_images(inputs) -> list[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, f) for root, _, names in os.walk(item) for f in names
                           if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise SystemExit(f"--images: {item} is neither a file nor a folder")
    return files


def check_image_sizes(files, max_megapixels: float) -> None:
    """Every image's header (nothing decoded): one larger than --max-megapixels stops the run before any work,
    naming it (decoding it, and its full-size map, would take gigabytes)."""
    from PIL import Image

    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the limit is checked here, in one line
    try:
        for path in files:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception as e:  # PIL raises several types for unreadable files
                raise SystemExit(f"cannot read image {path}: {type(e).__name__}: {e}") from e
            if w * h > max_megapixels * 1e6:
                raise SystemExit(f"image {path} is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the "
                                 f"{max_megapixels:g}-megapixel limit (raise it with --max-megapixels)")
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def _load(path: str, min_side: int = 0):
    """(RGB image, original (w, h), the image's region that holds the original: (0, 0, w', h'), fractional
    where a side is not a multiple of the scale). A large image is decoded smaller, at least `min_side` on
    each side: JPEGs by the decoder's DCT scaling (draft: 1/2, 1/4 or 1/8; memory and time fall with the scale
    squared), other formats by an integer box reduction."""
    from PIL import Image

    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # sizes were checked by check_image_sizes
    try:
        with Image.open(path) as im:
            size = im.size
            factor = min(size) // min_side if min_side else 1
            region = (0.0, 0.0, float(size[0]), float(size[1]))
            if factor >= 2 and im.format == "JPEG":
                # the smallest scale still >= min_side on both sides; ceil(w / scale) pixels are decoded
                drafted = im.draft("RGB", (min_side, min_side))
                region = drafted[1] if drafted else region
            rgb = im.convert("RGB")
            if factor >= 2 and im.format != "JPEG":
                rgb, region = rgb.reduce(factor), (0.0, 0.0, size[0] / factor, size[1] / factor)
            return rgb, size, region
    except Exception as e:  # PIL raises several types for unreadable files
        raise SystemExit(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def _to_tensor(image, size: int, region=None) -> torch.Tensor:
    from PIL import Image

    from ..data import IMAGENET_MEAN, IMAGENET_STD

    arr = np.asarray(image.resize((size, size), Image.BILINEAR, box=region), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


def map_to_original(m: torch.Tensor, w: int, h: int) -> np.ndarray:
    """A low-resolution map [h', w'] -> [h, w] (bicubic, as wsolevaluation), min-max normalised to [0, 1]."""
    import cv2

    up = cv2.resize(m.float().cpu().numpy(), (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def box_in_original(m: torch.Tensor, w: int, h: int, threshold: float, band_rows: int = 256) -> list[float]:
    """The box of extract_boxes(map_to_original(m, w, h), threshold), the same numbers, computed in bands of
    rows: extract_boxes' float64 copies of a full-size map cost 24 bytes a pixel (2.6 GB at 108 megapixels);
    this holds the float32 map and the uint8 score map it thresholds (5 bytes a pixel)."""
    import cv2

    from ..metrics import _boxes_from_uint8

    up = cv2.resize(m.float().cpu().numpy(), (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(up.min()), float(up.max())
    bands = [slice(r, r + band_rows) for r in range(0, h, band_rows)]
    if not hi > lo:  # constant or NaN: map_to_original gives zeros, extract_boxes (0, 0, 0, 0)
        return [0.0] * 4
    heat_lo = min(float(((up[b] - lo) / (hi - lo)).min()) for b in bands)  # map_to_original, band by band
    heat_hi = max(float(((up[b] - lo) / (hi - lo)).max()) for b in bands)
    if not heat_hi > heat_lo:
        return [0.0] * 4
    score = np.empty((h, w), np.uint8)
    for b in bands:  # then prepare_map's float64 min-max normalisation and the uint8 score map
        band = ((up[b] - lo) / (hi - lo)).astype(np.float64)
        band -= heat_lo
        band /= heat_hi - heat_lo
        score[b] = (band * 255).astype(np.uint8)
    del up
    return [float(v) for v in _boxes_from_uint8(score, threshold, False).reshape(-1, 4)[0]]


def _batches(files, size, names, args, device):
    """(paths, PIL images or None, original (w, h) sizes, normalised batch on device) per --batch-size files."""
    from ..data.dali import resolve_loader

    if resolve_loader(getattr(args, "loader", "torch"), device) == "torch":
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            loaded = [_load(f, DECODE_SIDE_PER_INPUT_SIDE * size) for f in chunk]
            images = [im for im, _, _ in loaded]
            batch = torch.stack([_to_tensor(im, size, region) for im, _, region in loaded]).to(device)
            yield chunk, images, [original for _, original, _ in loaded], batch
        return
    # --- DALI branch (DALI helper): the same eval transform, decoded/resized by DALI (on the GPU on cuda) ---
    from ..data import Sample, WSOLDataset
    from ..data.dali import build_dali_loader

    samples = [Sample(f, 0, np.zeros((0, 4), np.float32), None) for f in files]
    dataset = WSOLDataset(samples, names, img_size=size, train=False, name="predict")
    try:
        loader = build_dali_loader(dataset, args.batch_size, train=False, device=device,
                                   num_workers=args.num_workers, distributed=False)
    except ImportError as e:  # DALI not installed: say how to install it
        raise SystemExit(f"--loader dali: {e}") from e
    try:
        for b in loader:
            images = [_load(f, DECODE_SIDE_PER_INPUT_SIDE * size)[0] for f in b["path"]] if args.draw else \
                [None] * len(b["path"])
            yield b["path"], images, b["orig_size"], b["image"]
    except RuntimeError as e:  # an unreadable image: the loader's message names it
        raise SystemExit(str(e)) from e


@torch.no_grad()
def main(args) -> int:
    from ..progress import Progress
    from .checkpoint import load_model

    missing = [f"--{k}" for k in ("checkpoint", "images", "out") if not getattr(args, k, None)]
    if missing:
        raise SystemExit(f"dbc-fast predict: missing required option(s) {', '.join(missing)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device (use --device cpu)")
    model, config = load_model(args.checkpoint, device=device)
    size = args.img_size or config["img_size"]
    if size % 32:
        raise SystemExit(f"--img-size must be a multiple of 32, got {size}")
    names = config.get("class_names") or [str(i) for i in range(config["num_classes"])]
    files = list_images(args.images)
    check_image_sizes(files, args.max_megapixels)
    os.makedirs(args.out, exist_ok=True)
    predictions = []
    used_names: dict = {}
    bar = Progress(len(files), "predicting", unit="image")
    for chunk, images, sizes, batch in _batches(files, size, names, args, device):
        out = model(batch)
        probs = out["logits"].float().softmax(dim=1).cpu()
        maps = out["map"].float().cpu()
        k = min(args.topk, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        for j, (path, image) in enumerate(zip(chunk, images)):
            w, h = sizes[j]
            box = box_in_original(maps[j], w, h, args.cam_threshold)
            cls = int(top_i[j, 0])
            record = {"file": path, "class_index": cls, "class_name": names[cls], "score": float(top_p[j, 0]),
                      "box": box, "image_size": [w, h],
                      "topk": [{"class_index": int(c), "class_name": names[int(c)], "score": float(p)}
                               for p, c in zip(top_p[j], top_i[j])]}
            if args.draw:
                stem = os.path.splitext(os.path.basename(path))[0]
                count = used_names.get(stem, 0)
                used_names[stem] = count + 1
                png = os.path.join(args.out, f"{stem}.png" if count == 0 else f"{stem}_{count}.png")
                from .visualize import model_maps, render_panel

                render_panel(image, model_maps(out, j), args.cam_threshold,
                             f"{os.path.basename(path)}   predicted: {names[cls]} ({top_p[j, 0]:.2f})")[0].save(png)
                record["drawing"] = png
            predictions.append(record)
        bar.update(len(chunk))
    bar.close()
    path = os.path.join(args.out, "predictions.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"checkpoint": os.path.abspath(args.checkpoint), "img_size": size,
                   "cam_threshold": args.cam_threshold, "predictions": predictions}, f, indent=2)
    os.replace(path + ".tmp", path)
    for p in predictions:
        print(f"{p['file']}: {p['class_name']} ({p['score']:.3f}) box {[round(v, 1) for v in p['box']]}")
    print(f"wrote {path}", file=sys.stderr)
    return 0
