"""Prediction on image files: class, score and box for each image, from a model (behind `dbc-fast predict`).

Each image is resized to S x S, normalised, and run through the model. The map (M) is resized to the ORIGINAL
image size, min-max normalised and thresholded; the box is the bounding box of the largest connected region
(dbc_fast.metrics.box_in_original, the numbers of extract_boxes), in original image pixels [x0, y0, x1, y1]
(inclusive). An image that cannot be read stops the run with its file named.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data import Sample, WSOLDataset
from ..data.dali import build_dali_loader, resolve_loader
from ..data.images import load_image_reduced
from ..data.transforms import to_normalized_tensor
from ..errors import DatasetError
from ..metrics import box_in_original

# A large image is decoded at >= 4 x --img-size on each side, not at full size: the S x S input then comes from
# a >= 4x antialiased downscale either way (on upscaled photos the input differs by at most 3 grey levels in
# 255, 0.1 on average), while a 108-megapixel JPEG decodes at 1/8 scale: 16 MB instead of 830 MB.
DECODE_SIDE_PER_INPUT_SIDE = 4
DEFAULT_MAX_MEGAPIXELS = 64


def image_tensor(image: Image.Image, size: int, region=None) -> torch.Tensor:
    """The model's input [3, S, S] for a decoded image (`region`: the part of it that holds the original)."""
    return to_normalized_tensor(image.resize((size, size), Image.BILINEAR, box=region))


def image_batches(files, size: int, names, device, batch_size: int, loader: str = "torch", num_workers: int = 4,
                  keep_images: bool = False):
    """(paths, PIL images (None unless keep_images or the torch loader), original (w, h) sizes, normalised batch
    on device) per `batch_size` files; decoded by PIL, or by DALI with loader "dali" ("auto": DALI on a GPU when
    it is installed)."""
    decode_side = DECODE_SIDE_PER_INPUT_SIDE * size
    if resolve_loader(loader, device) == "torch":
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            loaded = [load_image_reduced(f, decode_side) for f in chunk]
            images = [im for im, _, _ in loaded]
            batch = torch.stack([image_tensor(im, size, region) for im, _, region in loaded]).to(device)
            yield chunk, images, [original for _, original, _ in loaded], batch
        return
    # the same eval transform, decoded and resized by DALI (on the GPU on cuda)
    samples = [Sample(f, 0, np.zeros((0, 4), np.float32), None) for f in files]
    dataset = WSOLDataset(samples, names, img_size=size, train=False, name="predict")
    dali = build_dali_loader(dataset, batch_size, train=False, device=device, num_workers=num_workers,
                             distributed=False)
    try:
        for b in dali:
            images = [load_image_reduced(f, decode_side)[0] for f in b["path"]] if keep_images else \
                [None] * len(b["path"])
            yield b["path"], images, b["orig_size"], b["image"]
    except RuntimeError as e:  # an unreadable image: the loader's message names it
        raise DatasetError(str(e)) from e


@torch.no_grad()
def predict_batch(model, batch: torch.Tensor, sizes, names, topk: int, cam_threshold: float):
    """(model outputs, [record per image]): top-1 class, score, box in original pixels and the top-k."""
    out = model(batch)
    probs = out["logits"].float().softmax(dim=1).cpu()
    maps = out["map"].float().cpu()
    k = min(topk, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    records = []
    for j, (w, h) in enumerate(sizes):
        cls = int(top_i[j, 0])
        records.append({"class_index": cls, "class_name": names[cls], "score": float(top_p[j, 0]),
                        "box": box_in_original(maps[j], w, h, cam_threshold), "image_size": [w, h],
                        "topk": [{"class_index": int(c), "class_name": names[int(c)], "score": float(p)}
                                 for p, c in zip(top_p[j], top_i[j])]})
    return out, records
