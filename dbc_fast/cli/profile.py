"""`dbc-fast profile`: the paper's Table 10 for a model (parameters, MACs, inference memory, epoch time); see
dbc_fast.engine.profile for how each figure is measured."""
from __future__ import annotations

import argparse

from ..engine.profile import CUB_TRAIN_IMAGES, format_report, profile
from ..files import write_json_atomic
from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=options.ARCHS, default="conformer_tiny_patch16",
                   help="backbone (default conformer_tiny_patch16)")
    p.add_argument("--num-classes", type=options.POSITIVE_INT, default=200, help="classes of the heads (default 200, CUB)")
    p.add_argument("--img-size", type=options.img_size, default=224, help="square input size, a multiple of 32 (default 224)")
    p.add_argument("--method", choices=options.METHODS, default="dbc", help="WSOL method (default dbc)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=options.DEFAULT_DEVICE,
                   help="device (default cuda if available); memory and epoch time are measured on cuda only")
    p.add_argument("--batch-size", type=options.POSITIVE_INT, default=64, help="training batch for the epoch time (default 64)")
    p.add_argument("--epoch-images", type=options.POSITIVE_INT, default=CUB_TRAIN_IMAGES,
                   help=f"training images per epoch (default {CUB_TRAIN_IMAGES}, CUB-200-2011 train)")
    p.add_argument("--steps", type=options.POSITIVE_INT, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup-steps", type=options.NON_NEGATIVE_INT, default=5, help="untimed training steps first (default 5)")
    p.add_argument("--amp", choices=("bf16", "none"), default="none",
                   help="bf16 autocast for the timed training steps (default none, float32)")
    p.add_argument("--ops-backend", choices=("auto", "eager", "triton", "cpp"), default="auto",
                   help="implementation of the DBC head ops (default auto, as training)")
    p.add_argument("--json", metavar="FILE", type=options.out_file, help="also write the figures to FILE (JSON)")


def main(args) -> int:
    report = profile(args)
    for line in format_report(report):
        print(line)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0
