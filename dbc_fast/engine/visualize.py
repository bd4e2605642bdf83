"""Localization-map panels (paper Figs. 3-5, 7), drawn by `dbc-fast visualize`, `predict --draw` and `train --visualize`.

`render_panel` draws, side by side at a readable size (each panel's shorter side `panel_size` pixels, small
images upscaled): the original image, then each map (M_a, M_c, M for dbc/cls; M for cam/tscam) as a heat-map
over the image with the box predicted from that map (green), the ground-truth boxes (red) where known and
the mask's foreground contour (cyan) for a mask set. Titles and the legend are written in white strips
above and below the pictures, never over them.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

# model output key -> panel title, in drawing order
MAP_TITLES = (("map_a", "M_a (Transformer attention)"), ("map_c", "M_c (CNN activation)"), ("map", "M (final map)"))
PRED_COLOUR, GT_COLOUR, MASK_COLOUR = (0, 230, 0), (230, 20, 20), (0, 230, 230)
_GAP, _TEXT_PAD = 8, 6


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _boxes_on_panel(boxes, scale: float):
    """Inclusive original-pixel boxes [k, 4] -> panel rectangles covering those pixels."""
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        yield (int(round(x0 * scale)), int(round(y0 * scale)),
               int(round((x1 + 1) * scale)) - 1, int(round((y1 + 1) * scale)) - 1)


def _draw_boxes(picture: np.ndarray, boxes, scale: float, colour, thick: int) -> None:
    import cv2

    for x0, y0, x1, y1 in _boxes_on_panel(boxes, scale):
        cv2.rectangle(picture, (x0, y0), (x1, y1), colour, thick)


def _mask_contour(picture: np.ndarray, mask: np.ndarray, thick: int) -> None:
    """Outline of the foreground (class ids other than 0 background and 255 ignore) of an original-size mask."""
    import cv2

    h, w = picture.shape[:2]
    fg = ((mask != 0) & (mask != 255)).astype(np.uint8)
    fg = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(picture, contours, -1, MASK_COLOUR, thick)


def render_panel(image, maps: dict, threshold: float = 0.2, title: str = "", gt_boxes=None, mask=None,
                 panel_size: int = 256):
    """(PIL image of the panel, {map key: predicted box [x0, y0, x1, y1] in original pixels}).

    image: PIL RGB at its original size; maps: {"map_a"|"map_c"|"map": low-resolution map [h', w']} (any
    subset; each is resized bicubically to the image, min-max normalised and thresholded at `threshold`,
    its box the largest region's, as `dbc-fast predict` and eval do); gt_boxes [k, 4] and mask [H, W]
    (class ids) in original pixels, optional."""
    import cv2
    from PIL import Image, ImageDraw

    from ..metrics import extract_boxes, map_to_original

    if not maps:
        raise ValueError("render_panel needs at least one map")
    w, h = image.size
    scale = panel_size / min(w, h)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    base = np.asarray(image.convert("RGB").resize((pw, ph), Image.LANCZOS), dtype=np.uint8)
    thick = max(2, panel_size // 128)

    def annotate(picture):
        if gt_boxes is not None:
            _draw_boxes(picture, gt_boxes, scale, GT_COLOUR, thick)
        if mask is not None:
            _mask_contour(picture, mask, thick)
        return picture

    pictures, titles, boxes = [annotate(base.copy())], ["image"], {}
    for key, map_title in MAP_TITLES:
        if key not in maps:
            continue
        heat = map_to_original(torch.as_tensor(maps[key]), w, h)
        box = np.asarray(extract_boxes(heat, threshold)).reshape(-1, 4)[0]
        boxes[key] = [float(v) for v in box]
        big = np.clip(cv2.resize(heat, (pw, ph), interpolation=cv2.INTER_CUBIC), 0, 1)
        colour = cv2.applyColorMap((big * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB
        picture = annotate((0.5 * base + 0.5 * colour).astype(np.uint8))
        _draw_boxes(picture, [box], scale, PRED_COLOUR, thick)
        pictures.append(picture)
        titles.append(map_title)

    font = _font(max(12, panel_size // 16))
    small = _font(max(11, panel_size // 20))
    line = font.getbbox("Ag")[3] + 2 * _TEXT_PAD
    top = line * (2 if title else 1)
    legend = (f"green: box from each map at threshold {threshold:g}"
              + ("   red: ground-truth boxes" if gt_boxes is not None else "")
              + ("   cyan: mask foreground contour" if mask is not None else ""))
    bottom = small.getbbox("Ag")[3] + 2 * _TEXT_PAD
    width = max(len(pictures) * pw + (len(pictures) + 1) * _GAP,  # wide enough for the text too
                int(font.getlength(title)) + 2 * _GAP, int(small.getlength(legend)) + 2 * _GAP)
    canvas = Image.new("RGB", (width, top + ph + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_GAP, _TEXT_PAD), title, fill="black", font=font)
    for i, (picture, name) in enumerate(zip(pictures, titles)):
        x = _GAP + i * (pw + _GAP)
        canvas.paste(Image.fromarray(picture), (x, top))
        draw.text((x, top - line + _TEXT_PAD), name, fill="black", font=font)
    draw.text((_GAP, top + ph + _TEXT_PAD), legend, fill=(60, 60, 60), font=small)
    return canvas, boxes


def model_maps(out: dict, j: int) -> dict:
    """The maps of image j in a model output dict, by key (M_a, M_c only for dbc/cls)."""
    return {key: out[key][j].float().cpu() for key, _ in MAP_TITLES if out.get(key) is not None}


def _original_annotations(sample, image):
    """GT boxes and mask of a sample in the pixels of its decoded image."""
    from pathlib import Path

    from ..data import readers
    from ..data.datasets import boxes_for_decoded_size

    size, boxes = boxes_for_decoded_size(sample, image.size)
    sx, sy = image.size[0] / size[0], image.size[1] / size[1]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
    mask = readers.read_class_mask(Path(sample.mask)) if sample.mask is not None else None
    return (boxes if len(boxes) else None), mask


@torch.no_grad()
def draw_panels(model, dataset, indices, out_dir: str, cam_threshold: float = 0.2, panel_size: int = 256,
                epoch: int | None = None, device=None, quiet: bool = False) -> list:
    """One panel PNG per dataset index in `out_dir` (`<index>_<stem>[_epoch<E>].png`): the image, the model's maps
    and boxes, the ground truth. The model is put in eval mode for this and restored. Returns the paths."""
    from ..data.images import load_image

    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    suffix = f"_epoch{epoch}" if epoch is not None else ""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for n, i in enumerate(indices, 1):
        item, sample = dataset[i], dataset.samples[i]
        out = model(item["image"][None].to(device), map_classes=torch.tensor([item["label"]], device=device))
        probs = out["logits"].float().softmax(1)[0].cpu()
        image = load_image(sample.path)
        gt_boxes, mask = _original_annotations(sample, image)
        names = dataset.class_names
        pred = int(probs.argmax())
        title = (f"{os.path.basename(sample.path)}   true: {names[item['label']]}   predicted: {names[pred]} "
                 f"({float(probs[pred]):.2f})" + (f"   epoch {epoch}" if suffix else ""))
        panel, _ = render_panel(image, model_maps(out, 0), cam_threshold, title, gt_boxes, mask, panel_size)
        stem = os.path.splitext(os.path.basename(sample.path))[0]
        path = os.path.join(out_dir, f"{i:05d}_{stem}{suffix}.png")
        panel.save(path)
        paths.append(path)
        if not quiet:
            print(f"[{n}/{len(indices)}] {path}", file=sys.stderr)
    if was_training:
        model.train()
    return paths


