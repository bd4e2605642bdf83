"""`dbc-fast export`: a checkpoint as an inference module for C++ (AOTInductor .pt2, or TorchScript); see
dbc_fast.export for the module's contract and docs/export.md for deployment."""
from __future__ import annotations

import argparse
import time

import torch

from ..errors import ExportError
from ..export import (FORMATS, INPUT_DTYPES, META_PREFIX, ExportedModel, compare_outputs, example_inputs,
                      export_checkpoint, load_op_library, parse_img_size)
from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="dbc_fast checkpoint (.pt from `dbc-fast train`)")
    p.add_argument("--out", required=True, type=options.out_file,
                   help="output file: .pt2 = AOTInductor package (torch.export; the way forward), any other name "
                        "(.ts, .pt) = TorchScript (deprecated upstream, still loads in every libtorch)")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                   help="aoti or torchscript; auto (default) = aoti for a .pt2 --out, else torchscript")
    p.add_argument("--img-size", type=img_size_option, default=None,
                   help="input size S or HxW, multiples of 32 (default: the checkpoint's img_size)")
    p.add_argument("--cam-threshold", type=options.FRACTION, default=0.2,
                   help="box threshold, a fraction of the map's max (default 0.2, as dbc-fast eval)")
    p.add_argument("--topk", type=options.POSITIVE_INT, default=5, help="how many top classes the module returns (default 5)")
    p.add_argument("--input-dtype", choices=sorted(INPUT_DTYPES), default="uint8",
                   help="pixel dtype of the images input (default uint8; a TorchScript file accepts both)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device to export for (an AOTInductor package runs only there; default cpu)")
    p.add_argument("--batch", type=options.POSITIVE_INT, default=2, help="example batch size used for tracing/export (default 2)")
    p.add_argument("--max-batch", type=options.POSITIVE_INT, default=256,
                   help="largest batch an aoti package accepts (dynamic batch 1..max; default 256)")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the written file and comparing it with the eager module")



def img_size_option(value):
    try:
        return parse_img_size(value)
    except ExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(args) -> int:
    start = time.time()
    fmt = args.format if args.format != "auto" else ("aoti" if args.out.endswith(".pt2") else "torchscript")
    module, metadata = export_checkpoint(
        args.checkpoint, args.out, fmt=fmt, img_size=args.img_size, cam_threshold=args.cam_threshold,
        topk=args.topk, input_dtype=args.input_dtype, device=args.device, batch=args.batch,
        max_batch=args.max_batch)
    print(f"wrote {args.out} ({fmt}, {metadata[META_PREFIX + 'img_h']}x{metadata[META_PREFIX + 'img_w']}, "
          f"{args.input_dtype} input, {args.device}) in {time.time() - start:.1f}s")
    if not args.no_check:
        exported = ExportedModel(args.out)
        images, classes = example_inputs(module, 1, args.input_dtype, args.device, seed=1)
        with torch.no_grad():
            expected = module(images, classes)
        diffs = compare_outputs(expected, exported(images, classes))
        print("check against eager: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
        if diffs["boxes"] or diffs["top_classes"] or diffs["logits"] > 1e-3:
            raise ExportError(f"{args.out} does not reproduce the eager module (see the differences above)")
    print(f"run it: dbc_infer {args.out} IMAGE --ops {load_op_library()}  (see docs/export.md)")
    return 0
