"""`dbc-fast predict`: class, score and box for each image, from a checkpoint (see dbc_fast.engine.predict).

Writes OUT/predictions.json; with --draw also OUT/<image name>.png: the image beside its maps (M_a, M_c, M for
dbc/cls; M for cam/tscam) as heat-maps with their boxes, drawn by dbc_fast.engine.visualize.render_panel.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..data.images import check_image_sizes, list_images
from ..engine.checkpoint import load_model
from ..engine.predict import DEFAULT_MAX_MEGAPIXELS, image_batches, predict_batch
from ..engine.visualize import model_maps, render_panel
from ..files import write_json_atomic
from ..progress import Progress
from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="dbc_fast checkpoint (required)")
    p.add_argument("--images", nargs="+", help="image files and/or folders of images (required)")
    p.add_argument("--img-size", type=options.img_size, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=options.DEFAULT_DEVICE,
                   help="device (default cuda if available, else cpu)")
    p.add_argument("--out", type=options.out_dir, help="output folder (required)")
    p.add_argument("--cam-threshold", type=options.FRACTION, default=0.2, help="map threshold for the box (default 0.2)")
    p.add_argument("--batch-size", type=options.POSITIVE_INT, default=16, help="images per forward pass (default 16)")
    p.add_argument("--max-megapixels", type=options.POSITIVE, default=DEFAULT_MAX_MEGAPIXELS,
                   help=f"refuse images above this many megapixels (default {DEFAULT_MAX_MEGAPIXELS})")
    p.add_argument("--topk", type=options.POSITIVE_INT, default=5, help="also list the top-k classes (default 5)")
    p.add_argument("--draw", action="store_true", help="write a PNG per image: the image beside its maps with their boxes")
    p.add_argument("--loader", choices=("torch", "dali", "auto"), default="torch",
                   help="image decoding + resizing: PIL (torch) or NVIDIA DALI (GPU decode on cuda); auto = DALI "
                        "on a GPU when it is installed (default torch)")
    p.add_argument("--num-workers", type=options.NON_NEGATIVE_INT, default=4, help="DALI CPU threads (default 4)")


def drawing_path(out: str, path: str, used_names: dict) -> str:
    """OUT/<image stem>.png, numbered (_1, _2, ..) when several images share a stem."""
    stem = os.path.splitext(os.path.basename(path))[0]
    count = used_names.get(stem, 0)
    used_names[stem] = count + 1
    return os.path.join(out, f"{stem}.png" if count == 0 else f"{stem}_{count}.png")


def main(args) -> int:
    options.require_options(args, "checkpoint", "images", "out")
    device = torch.device(args.device)
    model, config = load_model(args.checkpoint, device=device)
    size = args.img_size or config["img_size"]
    names = config.get("class_names") or [str(i) for i in range(config["num_classes"])]
    files = list_images(args.images)
    check_image_sizes(files, args.max_megapixels)
    os.makedirs(args.out, exist_ok=True)
    predictions = []
    used_names: dict = {}
    bar = Progress(len(files), "predicting", unit="image")
    for chunk, images, sizes, batch in image_batches(files, size, names, device, args.batch_size, args.loader,
                                                     args.num_workers, keep_images=args.draw):
        out, records = predict_batch(model, batch, sizes, names, args.topk, args.cam_threshold)
        for j, (path, image, record) in enumerate(zip(chunk, images, records)):
            record = {"file": path, **record}
            if args.draw:
                png = drawing_path(args.out, path, used_names)
                title = f"{os.path.basename(path)}   predicted: {record['class_name']} ({record['score']:.2f})"
                render_panel(image, model_maps(out, j), args.cam_threshold, title)[0].save(png)
                record["drawing"] = png
            predictions.append(record)
        bar.update(len(chunk))
    bar.close()
    path = os.path.join(args.out, "predictions.json")
    write_json_atomic(path, {"checkpoint": os.path.abspath(args.checkpoint), "img_size": size,
                             "cam_threshold": args.cam_threshold, "predictions": predictions})
    for p in predictions:
        print(f"{p['file']}: {p['class_name']} ({p['score']:.3f}) box {[round(v, 1) for v in p['box']]}")
    print(f"wrote {path}", file=sys.stderr)
    return 0
