"""`dbc-fast visualize`: panels of a checkpoint's maps (M_a, M_c, M) with boxes for a dataset split's images.

Saves the panel of dbc_fast.engine.visualize.render_panel for a fixed set of images of a split (the first N, or
--indices); run it on the checkpoints of several epochs to see the maps form (Fig. 4). Maps of cam/tscam are asked
for the ground-truth class, as `dbc-fast eval` does.
"""
from __future__ import annotations

import argparse

import torch

from ..data import build_dataset
from ..engine.checkpoint import load_model
from ..engine.train import dataset_options
from ..engine.visualize import draw_panels
from ..errors import UserError
from . import options
from .options import add_data_arguments, check_classes, default_split


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.set_defaults(img_size=None)  # the checkpoint's input size unless given
    p.add_argument("--split", default="auto", help="split to draw from (default: the one eval reports)")
    p.add_argument("--checkpoint", help="dbc_fast checkpoint (required)")
    p.add_argument("--out", type=options.out_dir, help="output folder for the PNGs (required)")
    p.add_argument("--num-images", type=options.POSITIVE_INT, default=8,
                   help="draw the split's first N images (default 8)")
    p.add_argument("--indices", type=options.NON_NEGATIVE_INT, nargs="+", default=None,
                   help="draw these sample indices of the split instead")
    p.add_argument("--cam-threshold", type=options.FRACTION, default=0.2, help="map threshold for the boxes (default 0.2)")
    p.add_argument("--panel-size", type=options.POSITIVE_INT, default=256,
                   help="pixels of each panel's shorter side (default 256)")


def main(args) -> int:
    options.require_options(args, "dataset", "data", "checkpoint", "out")
    device = torch.device(args.device)
    model, config = load_model(args.checkpoint, device=device)
    size = config["img_size"] if args.img_size is None else args.img_size
    split = default_split(args.dataset) if args.split == "auto" else args.split
    dataset = build_dataset(args.dataset, args.data, split, img_size=size, train=False, **dataset_options(args))
    check_classes(dataset.class_names, config, args.data, args.checkpoint)
    indices = args.indices if args.indices is not None else list(range(min(args.num_images, len(dataset))))
    bad = [i for i in indices if i >= len(dataset)]
    if bad:
        raise UserError(f"--indices {bad}: {args.dataset} {split} has {len(dataset)} images (0..{len(dataset) - 1})")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    epoch = ckpt.get("epoch")
    draw_panels(model, dataset, indices, args.out, args.cam_threshold, args.panel_size,
                epoch if isinstance(epoch, int) else None, device)
    print(f"wrote {len(indices)} panels of {config['arch']}/{config['method']} to {args.out}")
    return 0
