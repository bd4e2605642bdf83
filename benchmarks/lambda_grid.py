"""Paper Fig. 6: DBC's localization over a lambda_pos x lambda_neg grid, on Tiny ImageNet, under one budget.

Every cell trains DBC on Conformer-Ti from the same initial weights with the same data order, schedule and
epochs as benchmarks/tiny_imagenet_compare.py does for one method (its training, map prediction and scoring
are reused: only the model options lambda_pos and lambda_neg change per cell), then writes
OUT/results.md (one table per figure: Top-1 Loc, GT-known Loc, MaxBoxAccV2 and Top-1 Cls of M; rows
lambda_pos, columns lambda_neg), OUT/results.json and OUT/heatmap.png (Top-1 Loc of M, or --figure).

    python benchmarks/lambda_grid.py --data tiny.tar.gz --out runs/lambda_grid \
        --lambda-pos 0.1 0.5 1 2 --lambda-neg 0.01 0.05 0.1 0.5 --img-size 64 --epochs 2

Every option of tiny_imagenet_compare.py but --methods applies (budget: --epochs or --train-seconds per cell,
--max-minutes / --resume, --limit-*-images, --device, --amp, ...). A finished cell (OUT/<cell>/result.json)
is skipped when the same command runs again with --resume.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_imagenet_compare as compare  # noqa: E402

FIGURES = (("top1_loc", "Top-1 Loc"), ("gt_known_loc", "GT-known Loc"), ("MaxBoxAccV2", "MaxBoxAccV2"),
           ("top1_cls", "Top-1 Cls"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--lambda-pos", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0],
                   help="lambda_pos values, the grid's rows (default 0.1 0.5 1 2)")
    p.add_argument("--lambda-neg", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.5],
                   help="lambda_neg values, the grid's columns (default 0.01 0.05 0.1 0.5)")
    p.add_argument("--figure", choices=[k for k, _ in FIGURES], default="top1_loc",
                   help="figure of M drawn in heatmap.png (default top1_loc)")
    grid, rest = p.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
        print("\nand every option of tiny_imagenet_compare.py but --methods:")
        compare.parse_args(["--help"])
    if "--methods" in rest:
        p.error("--methods: the grid trains dbc only")
    for value in grid.lambda_pos + grid.lambda_neg:
        if not (math.isfinite(value) and value >= 0):
            p.error(f"lambda values must be finite and >= 0, got {value}")
    if "--out" not in rest:
        rest += ["--out", "runs/lambda_grid"]
    args = compare.parse_args(rest + ["--methods", "dbc"])
    args.lambda_pos, args.lambda_neg, args.figure = grid.lambda_pos, grid.lambda_neg, grid.figure
    return args


def cell_name(lambda_pos: float, lambda_neg: float) -> str:
    return f"pos{lambda_pos:g}_neg{lambda_neg:g}"


def cell_args(args, lambda_pos: float, lambda_neg: float):
    """The compare script's settings with this cell's lambdas as model options."""
    cell = argparse.Namespace(**vars(args))
    cell.model_options = {**args.model_options, "lambda_pos": lambda_pos, "lambda_neg": lambda_neg}
    return cell


def grid_tables(args, cells: dict) -> str:
    lines = [f"# DBC lambda_pos x lambda_neg (paper Fig. 6) on Tiny ImageNet", "",
             f"{args.arch}, {args.img_size} px, {args.epochs_chosen} epoch(s) per cell, batch {args.batch_size}, "
             f"lr {args.lr}, seed {args.seed}; figures of M on {args.val_count} validation images.", ""]
    for key, name in FIGURES:
        lines += [f"## {name} (M)", "", "| lambda_pos \\ lambda_neg | " + " | ".join(f"{v:g}" for v in args.lambda_neg) + " |",
                  "|---|" + "---|" * len(args.lambda_neg)]
        for lp in args.lambda_pos:
            row = []
            for ln in args.lambda_neg:
                metrics = cells[cell_name(lp, ln)].get("metrics")
                row.append(compare.fmt(metrics["M"][key]) if metrics else cells[cell_name(lp, ln)]["status"])
            lines.append(f"| {lp:g} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def heatmap(values: np.ndarray, rows, cols, title: str, path: Path, cell: int = 96) -> None:
    """values [len(rows), len(cols)] (NaN = no result) as a coloured grid with the numbers, axes labelled."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=16)
    left, top = 120, 84
    canvas = Image.new("RGB", (left + cell * len(cols) + 20, top + cell * len(rows) + 50), "white")
    draw = ImageDraw.Draw(canvas)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for i in range(len(rows)):
        for j in range(len(cols)):
            x, y = left + j * cell, top + i * cell
            v = values[i, j]
            if np.isfinite(v):
                level = np.uint8([[255 * (v - lo) / (hi - lo) if hi > lo else 128]])
                colour = tuple(int(c) for c in cv2.applyColorMap(level, cv2.COLORMAP_VIRIDIS)[0, 0, ::-1])
                text = f"{v:.1f}"
            else:
                colour, text = (220, 220, 220), "-"
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
            ink = "black" if sum(colour) > 380 else "white"
            draw.text((x + cell // 2, y + cell // 2), text, fill=ink, font=font, anchor="mm")
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((left + cell * len(cols) // 2, top - 30), "lambda_neg", fill="black", font=font, anchor="mb")
    for j, c in enumerate(cols):
        draw.text((left + j * cell + cell // 2, top - 8), f"{c:g}", fill="black", font=font, anchor="mb")
    draw.text((10, top + cell * len(rows) + 20), "rows: lambda_pos", fill="black", font=font)
    for i, r in enumerate(rows):
        draw.text((left - 10, top + i * cell + cell // 2), f"{r:g}", fill="black", font=font, anchor="rm")
    canvas.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    out = Path(args.out)
    names = [cell_name(lp, ln) for lp in args.lambda_pos for ln in args.lambda_neg]
    started = [n for n in names if (out / n).is_dir()]
    if started and not args.resume:
        raise SystemExit(f"{out} already holds cells ({', '.join(started)}): pass --resume, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60 - 20 if args.max_minutes > 0 else None
    train_set, val_set = compare.load_data(args, device)
    args.val_count = len(val_set.boxes)
    if args.epochs == "auto":
        rate = compare.measure_rate(cell_args(args, args.lambda_pos[0], args.lambda_neg[0]), "dbc", train_set, device)
        epoch_s = compare.steps_per_epoch(args, train_set) * args.batch_size / rate
        args.epochs_chosen = max(1, int(args.train_seconds / epoch_s))
    else:
        args.epochs_chosen = int(args.epochs)
    threads = args.eval_threads or max(1, (os.cpu_count() or 2) - 2)
    scorer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    cells, pending, status = {}, {}, 0
    for i, (lp, ln) in enumerate([(lp, ln) for lp in args.lambda_pos for ln in args.lambda_neg], 1):
        name = cell_name(lp, ln)
        run_dir = out / name
        run_dir.mkdir(exist_ok=True)
        if (run_dir / "result.json").is_file():
            cells[name] = json.loads((run_dir / "result.json").read_text())
            compare.say(f"{name} ({i}/{len(names)}): already done")
            continue
        compare.say(f"{name} ({i}/{len(names)}): training dbc with lambda_pos {lp:g}, lambda_neg {ln:g}")
        cell = cell_args(args, lp, ln)
        try:
            trained = compare.train_method(cell, "dbc", run_dir, train_set, args.epochs_chosen, device, deadline)
        except compare.TimeUp:
            cells[name] = {"status": "stopped (time up)"}
            status = compare.EXIT_TIME_UP
            break
        except Exception as e:  # one failed cell must not cost the others
            cells[name] = {"status": f"failed: {type(e).__name__}: {e}"}
            compare.say(f"{name}: FAILED ({type(e).__name__}: {e})")
            status = 1
            continue
        model = trained.pop("model")
        cells[name] = {"status": "scoring", "lambda_pos": lp, "lambda_neg": ln,
                       **{k: v for k, v in trained.items() if k != "history"}}
        prediction = compare.predict_maps(cell, model, "dbc", val_set, device)
        del model
        pending[name] = scorer.submit(compare.score_maps, prediction, args.cam_threshold, threads)
    for name, future in pending.items():
        try:
            cells[name]["metrics"] = future.result()
            cells[name]["status"] = "done"
            (out / name / "result.json").write_text(json.dumps(cells[name], indent=2))
        except Exception as e:
            cells[name]["status"] = f"scoring failed: {type(e).__name__}: {e}"
            status = status or 1
    scorer.shutdown()
    for name in names:
        cells.setdefault(name, {"status": "not run"})
    table = grid_tables(args, cells)
    values = np.array([[cells[cell_name(lp, ln)]["metrics"]["M"][args.figure] if "metrics" in cells[cell_name(lp, ln)]
                        else np.nan for ln in args.lambda_neg] for lp in args.lambda_pos])
    label = dict(FIGURES)[args.figure]
    heatmap(values, args.lambda_pos, args.lambda_neg, f"DBC {label} (M), Tiny ImageNet", out / "heatmap.png")
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "max_minutes", "out", "model_option")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "cells": cells,
                                                  "complete": status == 0}, indent=2))
    (out / "results.md").write_text(table)
    print(table, flush=True)
    compare.say(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'heatmap.png'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
