"""DBC vs cls / cam / tscam on Tiny ImageNet under one budget: train, evaluate, one table.

For each method (default: dbc cls cam tscam) this trains Conformer-Ti from scratch with `dbc-fast train`
(same image size, epochs, schedule, seed, batch size, lr for all), evaluates the run's checkpoint on the
validation images with `dbc-fast eval`, and writes OUT/results.md and OUT/results.json: Top-1 Cls,
GT-known Loc, Top-1 Loc and MaxBoxAccV2 for each map the method has (M; M_a and M_c for dbc/cls), each run's
training images/s (from its metrics.jsonl), and the fixed centred-box baseline (a 0.75*S square in the middle
of every image, 48x48 at 64x64) scored by dbc_fast.metrics on the same validation boxes. Runs go to
OUT/<method>/ (train) and OUT/<method>/eval/ (eval); the engine is used only through `python -m dbc_fast`.

GPU run (one H100), from the repository root:

    python benchmarks/tiny_imagenet_compare.py --epochs 1 --out runs/tiny_cmp_probe      # images/s first
    python benchmarks/tiny_imagenet_compare.py --epochs 10 --out runs/tiny_cmp --max-minutes 8
    python benchmarks/tiny_imagenet_compare.py --epochs 10 --out runs/tiny_cmp --max-minutes 8 --resume  # again until done

Budget guidance: keep each command under 8 minutes (`--max-minutes 8`): when the time is up the current
training or evaluation is stopped (its last.pt stays intact: checkpoints are written atomically, and
`--save-every-steps` bounds the work lost inside an epoch) and the script exits with code 75; re-running the
same command with `--resume` continues every unfinished run exactly where its checkpoint left it and skips
finished ones. Choose `--epochs` from the probe's images/s: one epoch = 50,000 images (+ about 6,000
validation images), so epochs ~ (budget_s - 60) * images_per_s / 56,000 per method.

The checkpoint evaluated is last.pt by default (the end of the equal budget); `--checkpoint best` takes
best.pt, which is chosen on the same validation images (optimistic). Training images/s is the mean over all
epochs of the training loop only (validation excluded; loader start-up and the first steps' warm-up included);
results.json also has the last epoch's rate. OUT holds the checkpoints (about 0.3 GB per method): on a machine
whose outputs are fetched from a folder, copy only OUT/results.md, OUT/results.json and OUT/*/metrics.jsonl there. Exit codes: 0 done, 1 a run failed
(its command is printed), 75 stopped by --max-minutes (re-run with --resume).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("dbc", "cls", "cam", "tscam")
MAPS = {"dbc": ("M", "M_a", "M_c"), "cls": ("M", "M_a", "M_c"), "cam": ("M",), "tscam": ("M",)}
EXIT_TIME_UP = 75  # EX_TEMPFAIL: re-run with --resume


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tiny-imagenet-200-wsol.tar.gz",
                   help="Tiny ImageNet folder or archive (default ../shared/data/tiny-imagenet-200-wsol.tar.gz)")
    p.add_argument("--out", default="runs/tiny_imagenet_compare", help="output folder (default runs/tiny_imagenet_compare)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default all four)")
    p.add_argument("--arch", default="conformer_tiny_patch16", help="backbone (default conformer_tiny_patch16)")
    p.add_argument("--img-size", type=int, default=64, help="image size S (default 64)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per method (default 10)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--sched", choices=("cosine", "step", "const"), default="cosine", help="LR schedule (default cosine)")
    p.add_argument("--warmup-epochs", type=float, default=1, help="linear warm-up epochs (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="autocast (default bf16)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device (default cuda)")
    p.add_argument("--num-workers", type=int, default=8, help="data loading workers (default 8)")
    p.add_argument("--cam-threshold", type=float, default=0.2, help="map threshold for GT-known/Top-1 Loc (default 0.2)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="checkpoint to evaluate: last.pt (end of the budget, default) or best.pt (chosen on val)")
    p.add_argument("--limit-train-images", type=int, default=None, help="train on the first N images only")
    p.add_argument("--limit-val-images", type=int, default=None, help="validate/evaluate on the first N images only")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap the optimizer steps per epoch")
    p.add_argument("--save-every-steps", type=int, default=100,
                   help="also checkpoint every N steps inside an epoch, for --max-minutes stops (default 100; 0 = off)")
    p.add_argument("--extra-train-args", default="",
                   help="more `dbc-fast train` options for every run, one string (e.g. '--channels-last --compile')")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished runs in OUT and skip finished ones (else OUT must hold no runs)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop after this many minutes of wall time (exit 75; re-run with --resume); 0 = no limit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars from train/eval")
    args = p.parse_args(argv)
    if args.img_size % 32:
        p.error(f"--img-size must be a multiple of 32, got {args.img_size}")
    return args


def say(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TimeUp(Exception):
    pass


class RunFailed(Exception):
    pass


def run_command(cmd: list[str], deadline: float | None) -> None:
    """Run a dbc_fast command (output shown as it comes); stop its whole process group at the deadline."""
    say("$ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.Popen(cmd, start_new_session=True)  # own group: its loader workers stop with it
    try:
        proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise TimeUp()
    if proc.returncode != 0:
        raise RunFailed(f"exit code {proc.returncode}: " + " ".join(shlex.quote(c) for c in cmd))


def read_train_log(run_dir: Path) -> list[dict]:
    """metrics.jsonl records, one per epoch (the latest line of an epoch wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    by_epoch = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_no}: not a JSON line ({e})")
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def train_speed(records: list[dict]) -> dict:
    """Images/s over all logged epochs: images trained / training time, where each epoch line gives the
    rate and time of the process that finished it (a resumed epoch counts only its own part)."""
    time_s = sum(r["train_time_s"] for r in records)
    images = sum(r["images_per_s"] * r["train_time_s"] for r in records)
    return {"train_images_per_s": images / time_s if time_s > 0 else None, "train_time_s": time_s,
            "last_epoch_images_per_s": records[-1]["images_per_s"] if records else None,
            "epochs_done": records[-1]["epoch"] if records else 0}


def train_command(args, method: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "dbc_fast", "train", "--dataset", "tiny-imagenet", "--data", args.data,
           "--out", str(run_dir), "--arch", args.arch, "--method", method, "--img-size", str(args.img_size),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--eval-batch-size", str(args.eval_batch_size), "--lr", str(args.lr), "--sched", args.sched,
           "--warmup-epochs", str(args.warmup_epochs), "--seed", str(args.seed), "--amp", args.amp,
           "--device", args.device, "--num-workers", str(args.num_workers),
           "--cam-threshold", str(args.cam_threshold), "--val-split", "val",
           "--save-every-steps", str(args.save_every_steps), "--resume"]
    if method == "cls":  # DBC with both contrastive losses off (paper Table 6); other weights are an error
        cmd += ["--lambda-pos", "0", "--lambda-neg", "0"]
    for flag, value in (("--limit-train-images", args.limit_train_images),
                        ("--limit-val-images", args.limit_val_images),
                        ("--max-steps-per-epoch", args.max_steps_per_epoch)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.no_progress:
        cmd.append("--no-progress")
    return cmd + shlex.split(args.extra_train_args)


def eval_command(args, method: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "dbc_fast", "eval", "--dataset", "tiny-imagenet", "--data", args.data,
           "--split", "val", "--checkpoint", str(run_dir / f"{args.checkpoint}.pt"),
           "--img-size", str(args.img_size), "--batch-size", str(args.eval_batch_size),
           "--cam-threshold", str(args.cam_threshold), "--device", args.device, "--amp", args.amp,
           "--num-workers", str(args.num_workers), "--out", str(run_dir / "eval")]
    if args.limit_val_images is not None:
        cmd += ["--limit-images", str(args.limit_val_images)]
    if args.no_progress:
        cmd.append("--no-progress")
    return cmd


def centered_box_baseline(data: str, img_size: int, limit: int | None) -> dict:
    """Box accuracies of one fixed box, a round(0.75*S) square in the middle of every S x S validation image
    (pixels x0..x0+side-1, 48x48 at S = 64), against the boxes `dbc-fast eval` uses (the first `limit` val
    images, resized to S x S, truncated to integers as dbc_fast.metrics does), with dbc_fast.metrics.iou_matrix
    (+1 pixel IoU). GT-known Loc = % of images whose best GT box has IoU >= 0.5 with it; MaxBoxAccV2 = the mean
    over IoU 0.3/0.5/0.7 (one box, so no threshold to maximise over). The box is scored directly, not drawn as
    a map: a mask through the contour pipeline would give a 49x49 box (boundingRect x + w convention)."""
    import numpy as np

    from dbc_fast.data import build_dataset
    from dbc_fast.metrics import iou_matrix

    dataset = build_dataset("tiny-imagenet", data, "val", img_size=img_size, train=False)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    side = int(round(0.75 * img_size))
    x0 = (img_size - side) // 2
    box = np.array([[x0, x0, x0 + side - 1, x0 + side - 1]])
    best = np.array([iou_matrix(np.trunc(dataset[i]["boxes"].numpy().astype(np.float64)), box).max()
                     for i in range(n)])
    acc = {t: float((best >= t / 100).sum() * 100 / n) for t in (30, 50, 70)}
    return {"box": box[0].tolist(), "side": side, "img_size": img_size, "count": n, "gt_known_loc": acc[50],
            "MaxBoxAccV2": (acc[30] + acc[50] + acc[70]) / 3,
            **{f"MaxBoxAcc@{t}": acc[t] for t in (30, 50, 70)}}


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def build_table(args, runs: dict, baseline: dict | None) -> tuple[list[dict], str]:
    rows = []
    for method in args.methods:
        run = runs.get(method, {})
        metrics = (run.get("eval") or {}).get("metrics")
        if not metrics:
            rows.append({"method": method, "map": None, "status": run.get("status", "not run")})
            continue
        for map_name in MAPS[method]:
            if map_name not in metrics:
                continue
            m = metrics[map_name]
            rows.append({"method": method, "map": map_name, "status": "done",
                         "top1_cls": m["top1_cls"], "gt_known_loc": m["gt_known_loc"], "top1_loc": m["top1_loc"],
                         "MaxBoxAccV2": m.get("MaxBoxAccV2"), "best_gt_known_loc": m.get("best_gt_known_loc"),
                         **run["speed"]})
    lines = [f"Tiny ImageNet val ({baseline['count'] if baseline else '?'} images), {args.arch}, "
             f"{args.img_size}x{args.img_size}, {args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr} "
             f"({args.sched}, warm-up {args.warmup_epochs}), seed {args.seed}, amp {args.amp}, "
             f"{args.checkpoint}.pt, map threshold {args.cam_threshold} for GT-known/Top-1 Loc.", "",
             "| method | map | Top-1 Cls | GT-known Loc | Top-1 Loc | MaxBoxAccV2 | train images/s | epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['method']} | - | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['map']} | {fmt(r['top1_cls'])} | {fmt(r['gt_known_loc'])} | "
                     f"{fmt(r['top1_loc'])} | {fmt(r['MaxBoxAccV2'])} | {fmt(r['train_images_per_s'], 1)} | "
                     f"{r['epochs_done']} |")
    if baseline:
        lines.append(f"| centred box {baseline['side']}x{baseline['side']} (0.75*S) | - | - | "
                     f"{fmt(baseline['gt_known_loc'])} | - | {fmt(baseline['MaxBoxAccV2'])} | - | - |")
    return rows, "\n".join(lines) + "\n"


def environment(args) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": args.device}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes > 0 else None
    started = [m for m in args.methods if (out / m / "last.pt").exists() or (out / m / "metrics.jsonl").exists()]
    if started and not args.resume:
        raise SystemExit(f"{out} already holds runs ({', '.join(started)}): pass --resume to continue them, "
                         f"or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "max_minutes", "no_progress", "out")}
    settings_path = out / "settings.json"
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        changed = sorted(k for k in settings if k in old and old[k] != settings[k] and k != "methods")
        if changed:
            say(f"WARNING: {', '.join(changed)} differ from the settings {settings_path} was started with")
    settings_path.write_text(json.dumps(settings, indent=2))

    status, runs = 0, {}
    t_all = time.monotonic()
    say(f"methods {' '.join(args.methods)}: {args.epochs} epoch(s) each, out {out}")
    for i, method in enumerate(args.methods, 1):
        run_dir = out / method
        runs[method] = run = {"dir": str(run_dir)}
        try:
            records = read_train_log(run_dir)
            if records and records[-1]["epoch"] >= args.epochs:
                say(f"{method} ({i}/{len(args.methods)}): training already done ({records[-1]['epoch']} epochs)")
            else:
                say(f"{method} ({i}/{len(args.methods)}): training"
                    + (f" (resuming after epoch {records[-1]['epoch']})" if records else ""))
                t0 = time.monotonic()
                run_command(train_command(args, method, run_dir), deadline)
                say(f"{method}: trained in {time.monotonic() - t0:.0f} s")
                records = read_train_log(run_dir)
            run["speed"] = train_speed(records)
            run["last_epoch_log"] = records[-1] if records else None
            eval_json = run_dir / "eval" / "metrics.json"
            ckpt = run_dir / f"{args.checkpoint}.pt"
            if eval_json.is_file() and eval_json.stat().st_mtime >= ckpt.stat().st_mtime:
                say(f"{method}: evaluation already done ({eval_json})")
            else:
                say(f"{method}: evaluating {ckpt}")
                t0 = time.monotonic()
                run_command(eval_command(args, method, run_dir), deadline)
                say(f"{method}: evaluated in {time.monotonic() - t0:.0f} s")
            run["eval"] = json.loads(eval_json.read_text())
            run["status"] = "done"
        except TimeUp:
            run["status"] = "stopped (time up)"
            say(f"{method}: --max-minutes {args.max_minutes} reached; re-run with --resume to continue")
            status = EXIT_TIME_UP
            break
        except RunFailed as e:
            run["status"] = "failed"
            say(f"{method}: FAILED ({e})")
            status = 1
    if status == 0:
        say("centred-box baseline on the same validation boxes")
    baseline = centered_box_baseline(args.data, args.img_size, args.limit_val_images)
    rows, table = build_table(args, runs, baseline)
    report = {"settings": settings, "environment": environment(args), "rows": rows, "baseline": baseline,
              "runs": runs, "complete": status == 0, "wall_s": time.monotonic() - t_all}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(table)
    print(table, flush=True)
    say(f"wrote {out / 'results.md'} and {out / 'results.json'}" + ("" if status == 0 else f" (incomplete, exit {status})"))
    return status


if __name__ == "__main__":
    sys.exit(main())
