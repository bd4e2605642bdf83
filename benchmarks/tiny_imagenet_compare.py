"""DBC vs cls / tscam / cam on Tiny ImageNet under one budget: train, evaluate, one table.

Trains Conformer-Ti from scratch with each method (default order dbc, cls, tscam, cam: the central comparison
first) under the same image size, epochs, batch, schedule and seed, evaluates each on the validation images, and
writes OUT/results.md and OUT/results.json: Top-1 Cls, GT-known Loc, Top-1 Loc and MaxBoxAccV2 of every map the
method has (M; M_a and M_c for dbc/cls), training images/s, and a fixed centred box (a round(0.75*S) square in
the middle of every image) scored on the same boxes.

Built for a short GPU lease: the data is decoded once into uint8 tensors on the GPU (dbc_fast.data.memory:
the torch loader's pixels, the paper's random crop + flip done on the GPU), the step runs under bf16 autocast in
channels_last with fused AdamW, and the box metrics of one method are computed in a separate process while the
next method trains. The figures are those of `dbc-fast eval` (engine.evaluate.MapMetrics: wsolevaluation
conventions, maps asked for the ground-truth class).

    python benchmarks/tiny_imagenet_compare.py --data tiny.tar.gz --out runs/cmp --img-size 128 --train-seconds 70

`--epochs auto` (default) times 20 steps of the first method after a warm-up and picks the epochs that fit
`--train-seconds` of training for it (dbc, the costliest, comes first); every method then trains that many epochs.
`--max-minutes M` stops cleanly before M minutes of wall time (the current run's state is saved to
OUT/<method>/last.pt, exit code 75); the same command with `--resume` continues each unfinished run from its
step with the same batches and skips finished ones. Exit codes: 0 done, 1 a run failed, 75 stopped by
--max-minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

METHODS = ("dbc", "cls", "tscam", "cam")
MAP_KEYS = {"dbc": ("map", "map_a", "map_c"), "cls": ("map", "map_a", "map_c"), "cam": ("map",), "tscam": ("map",)}
EXIT_TIME_UP = 75  # EX_TEMPFAIL: re-run with --resume


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/tiny-imagenet-200-wsol.tar.gz",
                   help="Tiny ImageNet folder or archive (default ../shared/data/tiny-imagenet-200-wsol.tar.gz)")
    p.add_argument("--out", default="runs/tiny_imagenet_compare", help="output folder (default runs/tiny_imagenet_compare)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods, in run order")
    p.add_argument("--arch", default="conformer_tiny_patch16", help="backbone (default conformer_tiny_patch16)")
    p.add_argument("--img-size", type=int, default=128, help="image size S, a multiple of 32 (default 128)")
    p.add_argument("--epochs", default="auto", help="epochs per method, or auto (default; see --train-seconds)")
    p.add_argument("--train-seconds", type=float, default=70,
                   help="with --epochs auto: training seconds the first method may take (default 70)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--eval-batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05, from scratch)")
    p.add_argument("--warmup-epochs", type=float, default=1, help="linear warm-up epochs, then cosine (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation (default 0)")
    p.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="autocast (default bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device (default cuda)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and images (default: on for cuda)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (pays only for long runs)")
    p.add_argument("--ops-backend", default="auto", help="dbc_fast.ops backend for dbc/cls (default auto)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra create_model option for every method, e.g. fstar_block=8 (repeatable)")
    p.add_argument("--cam-threshold", type=float, default=0.2, help="map threshold for GT-known/Top-1 Loc (default 0.2)")
    p.add_argument("--limit-train-images", type=int, default=None, help="train on the first N images only")
    p.add_argument("--limit-val-images", type=int, default=None, help="evaluate on the first N images only")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap the optimizer steps per epoch")
    p.add_argument("--eval-threads", type=int, default=None, help="threads of the metrics process (default: cores - 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished runs in OUT and skip finished ones (else OUT must hold no runs)")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="stop before this many minutes of wall time (exit 75; re-run with --resume); 0 = no limit")
    args = p.parse_args(argv)
    if args.img_size <= 0 or args.img_size % 32:
        p.error(f"--img-size must be a positive multiple of 32, got {args.img_size}")
    if args.epochs != "auto" and not (args.epochs.isdigit() and int(args.epochs) > 0):
        p.error(f"--epochs must be a positive integer or auto, got {args.epochs!r}")
    for name in ("batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.train_seconds <= 0 or args.lr <= 0:
        p.error("--train-seconds and --lr must be positive")
    try:
        args.model_options = {k: _option_value(v) for k, v in (o.split("=", 1) for o in args.model_option)}
    except ValueError:
        p.error(f"--model-option takes KEY=VALUE, got {args.model_option}")
    return args


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def say(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TimeUp(Exception):
    pass


# ------------------------------------------------------------------------------------------------ training


def build_model(args, method: str, device: torch.device):
    import dbc_fast

    torch.manual_seed(args.seed)  # the same initial backbone for every method
    options = dict(args.model_options)
    if method in ("dbc", "cls"):
        options.setdefault("ops_backend", args.ops_backend)
    model = dbc_fast.create_model(args.arch, num_classes=200, method=method, **options).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(args, model, device: torch.device):
    from timm.optim import create_optimizer_v2

    # timm leaves 1-d parameters (biases, norms) out of weight decay; fused AdamW is one kernel per step on CUDA
    extra = {"fused": True} if device.type == "cuda" else {}
    return create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay, **extra)


def lr_at(args, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up over --warmup-epochs, then cosine to 0 at the last step."""
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


def steps_per_epoch(args, train_set) -> int:
    steps = train_set.train_steps()
    return min(steps, args.max_steps_per_epoch) if args.max_steps_per_epoch else steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_rate(args, method: str, train_set, device: torch.device, warmup: int = 8, timed: int = 20) -> float:
    """Training images/s of `method` (a throwaway model): `timed` steps after `warmup`."""
    model = build_model(args, method, device)
    step_fn = make_step(args, model, build_optimizer(args, model, device), device)
    batches = train_set.train_batches(epoch=10**6, seed=args.seed)
    for _ in range(warmup):
        step_fn(next(batches))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        step_fn(next(batches))
    sync(device)
    return timed * train_set.batch_size / (time.perf_counter() - t0)


def make_step(args, model, optimizer, device: torch.device):
    train_model = torch.compile(model) if args.compile else model

    def step(batch) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            outputs = train_model(batch["image"], labels=batch["label"])
        optimizer.zero_grad(set_to_none=True)
        outputs["loss"].backward()
        optimizer.step()
        return torch.stack([outputs[k].detach().float() for k in ("loss", "loss_cla", "loss_neg", "loss_pos")])

    return step


def train_method(args, method: str, run_dir: Path, train_set, epochs: int, device: torch.device,
                 deadline: float | None) -> dict:
    """Train (or resume) one method; returns its training record. Raises TimeUp after saving last.pt."""
    model = build_model(args, method, device)
    optimizer = build_optimizer(args, model, device)
    step_fn = make_step(args, model, optimizer, device)
    per_epoch = steps_per_epoch(args, train_set)
    total = epochs * per_epoch
    state_path = run_dir / "last.pt"
    epoch, step, history, train_time = 0, 0, [], 0.0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step = int(state["epoch"]), int(state["step"])
        history = json.loads(state["history"])
        train_time = float(state["train_time"])
        say(f"{method}: resuming at epoch {epoch + 1}, step {step}")

    def save() -> None:
        tmp = state_path.with_name("last.pt.partial")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "step": step, "history": json.dumps(history), "train_time": train_time}, tmp)
        tmp.replace(state_path)

    model.train()
    while epoch < epochs:
        sums = torch.zeros(4, device=device)
        images = 0
        sync(device)
        t0 = time.perf_counter()
        for batch in train_set.train_batches(epoch, seed=args.seed, start_step=step):
            if step >= per_epoch:
                break
            if deadline is not None and time.monotonic() > deadline:
                sync(device)
                train_time += time.perf_counter() - t0
                save()
                raise TimeUp()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(args, epoch * per_epoch + step, total, per_epoch)
            sums += step_fn(batch) * len(batch["label"])
            images += len(batch["label"])
            step += 1
        sync(device)
        seconds = time.perf_counter() - t0
        train_time += seconds
        means = (sums / max(1, images)).tolist()  # one sync per epoch
        if not all(math.isfinite(v) for v in means):
            raise RuntimeError(f"{method}: non-finite loss in epoch {epoch + 1}: {means}")
        epoch, step = epoch + 1, 0
        record = {"epoch": epoch, "loss": means[0], "loss_cla": means[1], "loss_neg": means[2], "loss_pos": means[3],
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": images / seconds, "seconds": seconds}
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        say(f"{method} epoch {epoch}/{epochs}: loss {means[0]:.4f} (cla {means[1]:.4f}, neg {means[2]:.4f}, "
            f"pos {means[3]:.4f}), {images / seconds:.0f} images/s, {seconds:.1f} s")
    save()
    images_done = sum(r["images_per_s"] * r["seconds"] for r in history)
    return {"model": model, "epochs_done": epoch, "train_time_s": train_time, "history": history,
            "train_images_per_s": images_done / max(train_time, 1e-9),
            "last_epoch_images_per_s": history[-1]["images_per_s"] if history else None}


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_maps(args, model, method: str, val_set, device: torch.device) -> dict:
    """Logits, labels, boxes and the model's low-resolution maps of the whole validation set, on the host."""
    model.eval()
    logits, labels, maps = [], [], {k: [] for k in MAP_KEYS[method]}
    for batch in val_set:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            out = model(batch["image"], map_classes=batch["label"])
        logits.append(out["logits"].float().cpu())
        labels.append(batch["label"].cpu())
        for k in maps:
            maps[k].append(out[k].float().cpu())
    return {"logits": torch.cat(logits), "labels": torch.cat(labels), "boxes": list(val_set.boxes),
            "maps": {k: torch.cat(v) for k, v in maps.items()}, "image_size": (val_set.img_size,) * 2}


def score_maps(prediction: dict, cam_threshold: float, threads: int) -> dict:
    """`dbc-fast eval`'s figures of each map (runs in the metrics process)."""
    os.environ["DBC_FAST_EVAL_THREADS"] = str(threads)
    from dbc_fast.engine.evaluate import DEFAULT_SWEEP, MAP_NAMES, MapMetrics

    results = {}
    for key, maps in prediction["maps"].items():
        metrics = MapMetrics(cam_threshold, DEFAULT_SWEEP, box_eval=True)
        metrics.accumulate(prediction["logits"], prediction["labels"], maps, prediction["boxes"],
                           prediction["image_size"])
        results[MAP_NAMES[key]] = metrics.compute()
    return results


def centered_box_baseline(boxes: list, img_size: int) -> dict:
    """Box accuracies of one fixed round(0.75*S) square in the middle of every S x S image (48x48 at 64) against
    the validation boxes (scaled to S, truncated to integers as dbc_fast.metrics does), +1 pixel IoU. GT-known
    Loc = % of images whose best box has IoU >= 0.5 with it; MaxBoxAccV2 = mean over IoU 0.3/0.5/0.7."""
    from dbc_fast.metrics import iou_matrix

    side = int(round(0.75 * img_size))
    x0 = (img_size - side) // 2
    box = np.array([[x0, x0, x0 + side - 1, x0 + side - 1]])
    best = np.array([iou_matrix(np.trunc(b.numpy().astype(np.float64)), box).max() for b in boxes])
    acc = {t: float((best >= t / 100).sum() * 100 / len(best)) for t in (30, 50, 70)}
    return {"box": box[0].tolist(), "side": side, "img_size": img_size, "count": len(best), "gt_known_loc": acc[50],
            "MaxBoxAccV2": (acc[30] + acc[50] + acc[70]) / 3, **{f"MaxBoxAcc@{t}": acc[t] for t in (30, 50, 70)}}


# ------------------------------------------------------------------------------------------------- report


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def build_table(args, runs: dict, baseline: dict, epochs, n_train: int) -> tuple[list[dict], str]:
    rows = []
    for method in args.methods:
        run = runs.get(method, {})
        if not run.get("metrics"):
            rows.append({"method": method, "map": None, "status": run.get("status", "not run")})
            continue
        for name, m in run["metrics"].items():
            rows.append({"method": method, "map": name, "status": "done", "top1_cls": m["top1_cls"],
                         "gt_known_loc": m["gt_known_loc"], "top1_loc": m["top1_loc"],
                         "MaxBoxAccV2": m["MaxBoxAccV2"], "best_gt_known_loc": m.get("best_gt_known_loc"),
                         "best_threshold": m.get("best_threshold"),
                         "train_images_per_s": run["train_images_per_s"], "epochs_done": run["epochs_done"]})
    lines = [f"Tiny ImageNet val ({baseline['count']} images; {n_train} training images), {args.arch} from scratch, "
             f"{args.img_size}x{args.img_size}, {epochs} epoch(s), batch {args.batch_size}, AdamW lr {args.lr} "
             f"wd {args.weight_decay} (warm-up {args.warmup_epochs} epoch, cosine), seed {args.seed}, amp {args.amp}, "
             f"map threshold {args.cam_threshold} for GT-known/Top-1 Loc"
             + (f", model options {args.model_options}" if args.model_options else "") + ".", "",
             "| method | map | Top-1 Cls | GT-known Loc | Top-1 Loc | MaxBoxAccV2 | GT-known Loc, best thr. (thr.) "
             "| train images/s | epochs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['method']} | - | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['map']} | {fmt(r['top1_cls'])} | {fmt(r['gt_known_loc'])} | "
                     f"{fmt(r['top1_loc'])} | {fmt(r['MaxBoxAccV2'])} | {fmt(r['best_gt_known_loc'])} "
                     f"({fmt(r['best_threshold'])}) | {fmt(r['train_images_per_s'], 0)} | {r['epochs_done']} |")
    lines.append(f"| centred box {baseline['side']}x{baseline['side']} (0.75*S) | - | - | "
                 f"{fmt(baseline['gt_known_loc'])} | - | {fmt(baseline['MaxBoxAccV2'])} | - | - | - |")
    return rows, "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device),
           "cuda": torch.version.cuda}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return env


# --------------------------------------------------------------------------------------------------- main


def load_data(args, device: torch.device):
    from dbc_fast.data import build_dataset
    from dbc_fast.data.memory import DeviceDataset

    # missing_images="skip": a partial copy of the set (e.g. only the core archive of tiny_imagenet_pack.py)
    # trains on what is there, and the count is reported
    train = build_dataset("tiny-imagenet", args.data, "train", img_size=args.img_size, train=True,
                          missing_images="skip")
    val = build_dataset("tiny-imagenet", args.data, "val", img_size=args.img_size, train=False)
    train.samples = train.samples[:args.limit_train_images]  # [:None] keeps all
    val.samples = val.samples[:args.limit_val_images]
    t0 = time.monotonic()
    train_set = DeviceDataset(train, device, train=True, batch_size=args.batch_size, channels_last=args.channels_last)
    val_set = DeviceDataset(val, device, train=False, batch_size=args.eval_batch_size, channels_last=args.channels_last)
    say(f"decoded {len(train)} training and {len(val)} validation images onto {device} in "
        f"{time.monotonic() - t0:.1f} s")
    if train_set.train_steps() < 1:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train)} training images")
    return train_set, val_set


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    deadline = time.monotonic() + args.max_minutes * 60 - 20 if args.max_minutes > 0 else None
    started = [m for m in args.methods if (out / m).is_dir()]
    if started and not args.resume:
        raise SystemExit(f"{out} already holds runs ({', '.join(started)}): pass --resume to continue them, "
                         f"or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    train_set, val_set = load_data(args, device)
    settings_path = out / "settings.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "max_minutes", "out", "model_option")}
    if settings_path.is_file():  # a resumed comparison keeps the epochs it chose
        old = json.loads(settings_path.read_text())
        settings["epochs_chosen"] = old.get("epochs_chosen")
    if not settings.get("epochs_chosen"):
        if args.epochs == "auto":
            rate = measure_rate(args, args.methods[0], train_set, device)
            epoch_s = steps_per_epoch(args, train_set) * args.batch_size / rate
            settings["epochs_chosen"] = max(1, int(args.train_seconds / epoch_s))
            say(f"{args.methods[0]} trains at {rate:.0f} images/s ({epoch_s:.1f} s per epoch): "
                f"{settings['epochs_chosen']} epoch(s) fit {args.train_seconds:.0f} s")
        else:
            settings["epochs_chosen"] = int(args.epochs)
    settings_path.write_text(json.dumps(settings, indent=2))
    epochs = settings["epochs_chosen"]

    threads = args.eval_threads or max(1, (os.cpu_count() or 2) - 2)
    scorer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    status, runs, pending = 0, {}, {}
    say(f"methods {' '.join(args.methods)}: {epochs} epoch(s) each, out {out}")
    for i, method in enumerate(args.methods, 1):
        run_dir = out / method
        run_dir.mkdir(exist_ok=True)
        result_path = run_dir / "result.json"
        if result_path.is_file():
            runs[method] = json.loads(result_path.read_text())
            say(f"{method} ({i}/{len(args.methods)}): already done")
            continue
        say(f"{method} ({i}/{len(args.methods)}): training")
        try:
            trained = train_method(args, method, run_dir, train_set, epochs, device, deadline)
        except TimeUp:
            runs[method] = {"status": "stopped (time up)"}
            say(f"{method}: --max-minutes {args.max_minutes} reached; state saved, re-run with --resume")
            status = EXIT_TIME_UP
            break
        except Exception as e:  # one failed method must not cost the others
            runs[method] = {"status": f"failed: {type(e).__name__}: {e}"}
            say(f"{method}: FAILED ({type(e).__name__}: {e})")
            status = 1
            continue
        model = trained.pop("model")
        runs[method] = {"status": "scoring", **{k: v for k, v in trained.items() if k != "history"}}
        prediction = predict_maps(args, model, method, val_set, device)
        del model
        pending[method] = scorer.submit(score_maps, prediction, args.cam_threshold, threads)
        say(f"{method}: trained {trained['epochs_done']} epoch(s) in {trained['train_time_s']:.0f} s "
            f"({trained['train_images_per_s']:.0f} images/s); scoring its maps in the background")
    for method, future in pending.items():
        try:
            runs[method]["metrics"] = future.result()
            runs[method]["status"] = "done"
            (out / method / "result.json").write_text(json.dumps(runs[method], indent=2))
            m = runs[method]["metrics"]["M"]
            say(f"{method}: Top-1 Cls {m['top1_cls']:.2f}, GT-known Loc (M) {m['gt_known_loc']:.2f}, "
                f"MaxBoxAccV2 (M) {m['MaxBoxAccV2']:.2f}")
        except Exception as e:
            runs[method]["status"] = f"scoring failed: {type(e).__name__}: {e}"
            status = status or 1
    scorer.shutdown()
    baseline = centered_box_baseline(val_set.boxes, args.img_size)
    rows, table = build_table(args, runs, baseline, epochs, len(train_set.labels))
    report = {"settings": settings, "environment": environment(device), "rows": rows, "baseline": baseline,
              "runs": runs, "complete": status == 0, "wall_s": time.monotonic() - t_all}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(table)
    print(table, flush=True)
    say(f"wrote {out / 'results.md'} and {out / 'results.json'}" + ("" if status == 0 else f" (incomplete, exit {status})"))
    return status


if __name__ == "__main__":
    sys.exit(main())
