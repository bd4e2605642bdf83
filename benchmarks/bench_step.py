"""Training-step throughput: the plain Conformer step against the DBC step, on one device.

    python benchmarks/bench_step.py [--archs Ti,S] [--variants plain,dbc-auto] [--compile none,default]
        [--opt fused,timm] [--batch 64] [--img-size 224] [--steps 20] [--out step.json]

Variants (each with a fresh model, seed 0, 1000 classes):
  plain       the Conformer classification step: the backbone alone, cross-entropy on both heads (the mean,
              as the DBC model's ce_mean classification loss) - the baseline of the DBC overhead;
  dbc-<ops>   the DBC step (dbc_fast.create_model(..., method="dbc")) with ops_backend auto, cpp, triton or eager.
Each step is what the trainer does: forward under bf16 autocast (--amp), zero_grad, backward, AdamW step.
Optimizers: fused = timm's AdamW with fused=True (the trainer's on CUDA); timm = timm's AdamW as it comes
(foreach). Both keep timm's parameter groups (no weight decay on biases and norm weights).
Compile modes: none (eager), default, reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs; the model is
compiled after the ops backends are resolved (no graph break), the optimizer step stays eager.

Timing: --warmup steps (compilation, cuDNN autotuning, optimizer state), then --steps back-to-back steps
between two CUDA events with no sync in between (the host runs ahead as in training). ms_per_step is that
window / steps; host_ms_per_step is the host's own time to issue a step (close to ms_per_step: the step is
bound by the CPU, not the GPU); img_s = batch / ms_per_step; peak_mem_gib is the peak allocated memory of the
timed steps. dbc_overhead is ms(dbc) / ms(plain) - 1 at the same arch, compile mode and optimizer.
--sync-audit also counts the host syncs of the trainer's own step (dbc_fast.engine.train.count_step_syncs,
where this install has it). Rows are written to --out as they are measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ARCHS = {"Ti": "conformer_tiny_patch16", "S": "conformer_small_patch16"}
VARIANTS = ("plain", "dbc-auto", "dbc-cpp", "dbc-triton", "dbc-eager")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
OPTIMIZERS = ("fused", "timm")
NUM_CLASSES = 1000


def build_optimizer(model, opt_kind: str, device: torch.device):
    from timm.optim import create_optimizer_v2

    fused = {"fused": True} if opt_kind == "fused" and device.type == "cuda" else {}
    return create_optimizer_v2(model, opt="adamw", lr=1e-5, weight_decay=5e-4, eps=1e-8, betas=(0.9, 0.99),
                               **fused)


def resolved_backends(variant: str, device: torch.device, channels_last: bool, fstar_channels: int) -> dict:
    """Which implementation the DBC head's ops run with for this variant (auto decides by device and layout)."""
    if variant == "plain":
        return {}
    from dbc_fast import ops

    backend = variant.partition("-")[2]
    feat = torch.empty(2, fstar_channels, 14, 14, device="meta")
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    out = {}
    for op, extra in (("pool", (feat,)), ("losses", ())):
        try:  # ops' own resolution (private: a report, never a reason to stop the measurement)
            names = {impl: name for name, impl in ops._BACKENDS.items()}
            out[op] = names.get(ops._resolve(backend, device, *extra), "?")
        except Exception as err:
            out[op] = f"unknown ({type(err).__name__}: {str(err)[:120]})"
    return out


def build_step(arch: str, variant: str, opt_kind: str, compile_mode: str, compile_backend: str,
               device: torch.device, channels_last: bool, amp: bool):
    """(model, step(images, labels) -> loss tensor, fstar channels) for one configuration."""
    import dbc_fast
    from dbc_fast import ops
    from dbc_fast.models.conformer import build_conformer

    torch.manual_seed(0)
    kind, _, backend = variant.partition("-")
    if kind == "plain":
        model = build_conformer(arch, num_classes=NUM_CLASSES, drop_path_rate=0.1)
        fstar_channels = 0
    else:
        model = dbc_fast.create_model(arch, NUM_CLASSES, method="dbc", ops_backend=backend)
        fstar_channels = model.mc_conv.in_channels
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, opt_kind, device)
    forward = model
    if compile_mode != "none":
        ops.available_backends(device)  # resolved outside the traced region: no graph break
        forward = torch.compile(model, mode=None if compile_mode == "default" else compile_mode,
                                backend=compile_backend)

    def step(images, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if kind == "plain":
                conv_logits, trans_logits = forward(images)
                loss = 0.5 * (F.cross_entropy(conv_logits.float(), labels) +
                              F.cross_entropy(trans_logits.float(), labels))
            else:
                loss = forward(images, labels=labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return model, step, fstar_channels


def time_steps(step, images, labels, warmup: int, steps: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    t = time.perf_counter()
    for _ in range(warmup):
        loss = step(images, labels)
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t
    warm_loss = float(loss.detach().float()) if warmup else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step(images, labels)
    host_ms = (time.perf_counter() - t) * 1e3 / steps
    if cuda:
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        ms, peak = (time.perf_counter() - t) * 1e3 / steps, None
    final_loss = float(loss.detach().float())
    return {"ms_per_step": ms, "img_s": images.shape[0] * 1e3 / ms, "host_ms_per_step": host_ms,
            "peak_mem_gib": peak, "warmup_s": warmup_s, "loss_after_warmup": warm_loss, "loss_last": final_loss}


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return sum(counters["graph_break"].values())


def sync_audit(batch: int, img_size: int, device: torch.device) -> dict:
    """Host syncs of the trainer's own step between two log points (0 expected), where the trainer has the probe."""
    from dbc_fast.cli.train import train_options
    from dbc_fast.engine import train

    probe = getattr(train, "count_step_syncs", None)
    if probe is None:
        return {"status": "unavailable", "why": "dbc_fast.engine.train has no count_step_syncs in this install"}
    if device.type != "cuda":
        return {"status": "unavailable", "why": "sync debug mode needs a CUDA device"}
    out = {"status": "ok", "arch": ARCHS["Ti"], "batch": batch, "img_size": img_size, "steps": 3}
    try:
        options = train_options("--arch", ARCHS["Ti"], "--amp", "bf16", "--device", "cuda")
        out["syncs"] = probe(options, batch_size=batch, img_size=img_size, steps=3, device=str(device))
    except Exception as err:  # report it; the step timings stand on their own
        out.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
    return out


def add_overheads(rows: list) -> None:
    for r in rows:
        base = [b for b in rows if b["variant"] == "plain" and "ms_per_step" in b and
                all(b[k] == r[k] for k in ("arch", "compile", "opt"))]
        if base and "ms_per_step" in r and r["variant"] != "plain":
            r["dbc_overhead"] = r["ms_per_step"] / base[0]["ms_per_step"] - 1


def table(rows: list) -> str:
    lines = [f"{'arch':24s} {'variant':11s} {'compile':15s} {'opt':5s} {'ms/step':>8s} {'img/s':>7s} "
             f"{'host ms':>7s} {'GiB':>5s} {'vs plain':>8s}"]
    for r in rows:
        head = f"{r['arch']:24s} {r['variant']:11s} {r['compile']:15s} {r['opt']:5s}"
        if "ms_per_step" not in r:
            lines.append(f"{head} ERROR {r.get('error', '')[:100]}")
            continue
        mem = f"{r['peak_mem_gib']:5.1f}" if r["peak_mem_gib"] is not None else "    -"
        over = f"{100 * r['dbc_overhead']:+7.1f}%" if "dbc_overhead" in r else "       -"
        lines.append(f"{head} {r['ms_per_step']:8.2f} {r['img_s']:7.0f} {r['host_ms_per_step']:7.2f} {mem} {over}")
    return "\n".join(lines)


def _check_list(name, value, allowed):
    items = value.split(",")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"bench_step: unknown {name} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="Ti,S", help="comma list of Ti, S (default Ti,S)")
    p.add_argument("--variants", default="plain,dbc-auto",
                   help=f"comma list of {', '.join(VARIANTS)} (default plain,dbc-auto; empty: none)")
    p.add_argument("--compile", default="none", help=f"comma list of {', '.join(COMPILE_MODES)} (default none)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--opt", default="fused", help="comma list of fused, timm (default fused)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=20, help="timed back-to-back steps (default 20)")
    p.add_argument("--amp", choices=("bf16", "none"), default=None, help="autocast (default bf16 on cuda, none on cpu)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW images and model (default channels_last)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sync-audit", action="store_true", help="also count the trainer step's host syncs")
    p.add_argument("--out", default=None, help="write the results as JSON here (rewritten after every row)")
    args = p.parse_args(argv)
    archs = _check_list("archs", args.archs, ARCHS)
    variants = _check_list("variants", args.variants, VARIANTS) if args.variants else []  # "": only --sync-audit
    modes = _check_list("compile modes", args.compile, COMPILE_MODES)
    opts = _check_list("optimizers", args.opt, OPTIMIZERS)
    if args.img_size % 32:
        raise SystemExit(f"bench_step: --img-size must be a multiple of 32, got {args.img_size}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_step: --device cuda but no CUDA GPU is visible")
    amp = (args.amp or ("bf16" if device.type == "cuda" else "none")) == "bf16"
    channels_last = not args.no_channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from dbc_fast import ops

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch": args.batch, "img_size": args.img_size, "amp": amp and "bf16",
              "channels_last": channels_last, "warmup": args.warmup, "steps": args.steps,
              "compile_backend": args.compile_backend,
              "backends_available": {k: list(v) for k, v in ops.available_backends(device).items()},
              "rows": [], "sync_audit": None}

    def save():
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.out)

    for a in archs:
        arch = ARCHS[a]
        for mode in modes:
            for opt_kind in opts:
                for variant in variants:
                    row = {"arch": arch, "variant": variant, "compile": mode, "opt": opt_kind}
                    t = time.perf_counter()
                    try:
                        breaks = graph_breaks()
                        model, step, fstar_channels = build_step(arch, variant, opt_kind, mode, args.compile_backend,
                                                                 device, channels_last, amp)
                        row["ops"] = resolved_backends(variant, device, channels_last, fstar_channels)
                        row.update(time_steps(step, images, labels, args.warmup, args.steps, device))
                        if mode != "none":
                            row["graph_breaks"] = graph_breaks() - breaks
                        del model, step
                    except Exception as err:  # report it and go on with the other configurations
                        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
                    row["seconds"] = time.perf_counter() - t
                    result["rows"].append(row)
                    add_overheads(result["rows"])
                    print(json.dumps(row), flush=True)
                    save()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if args.sync_audit:
        result["sync_audit"] = sync_audit(args.batch, args.img_size, device)
        print("sync audit:", json.dumps(result["sync_audit"]), flush=True)
        save()
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
