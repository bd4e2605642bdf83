"""The DBC head's two ops on one device: masked_pool and contrastive_losses, each backend against eager.

    python benchmarks/bench_kernels.py [--ops pool,losses] [--shapes Ti,S] [--dtypes bf16,fp32]
        [--layouts channels_last,nchw] [--impls eager,compile,triton,cpp] [--out kernels.json]

For every configuration (op, shape, dtype, layout) and implementation:
  eager    the PyTorch reference (dbc_fast.ops.eager);
  compile  torch.compile(eager) (--compile-backend, default inductor);
  triton   the Triton kernels;  cpp   the op library (CUDA kernels on a GPU, C++ on CPU);
it times the forward alone (no autograd) and forward + backward (torch.autograd.grad into fresh tensors:
nothing accumulates into .grad). Timing: --calls back-to-back calls between one pair of CUDA events (no sync
in between, so launch latency overlaps as in training), repeated --reps times; the figure is the median of the
per-call times. Pooling inputs rotate over enough sets that they do not fit in L2 (DRAM bandwidth is measured,
not the cache). For pooling it also reports the achieved bandwidth: the fewest bytes the op must move,
  forward:  read F [n,C,h,w] and the masks [n,K,h,w], write fg, bg [n,K,C];
  backward: read F, the masks and the two grads [n,K,C], write grad F and grad masks;
divided by the time, and its share of a measured device-to-device copy (bytes read + written).
Each row also has the forward's largest difference from eager on the same inputs (a fast wrong kernel
shows there). Rows are written to --out as they are measured, so a run cut short keeps what it measured.
Shapes: Ti n=64, C=256; S n=256, C=1024 (F* of block 11, 14x14, K=2 masks); --tiny for a CPU smoke run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

SHAPES = {"Ti": (64, 256, 14), "S": (256, 1024, 14), "L": (256, 1024, 28)}  # name -> (n, C, side)
TINY_SHAPES = {"Ti": (4, 8, 7), "S": (4, 16, 7), "L": (4, 16, 14)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "nchw")
IMPLS = ("eager", "compile", "triton", "cpp")
K = 2


class Timer:
    """Per-call milliseconds of fn: `calls` back-to-back calls between two events (CUDA) or host clocks (CPU)."""

    def __init__(self, device: torch.device, calls: int, reps: int, warmup: int = 3):
        self.cuda = device.type == "cuda"
        self.calls, self.reps, self.warmup = calls, reps, warmup

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        self.sync()
        per_call = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.calls):
                    fn()
                end.record()
                end.synchronize()
                per_call.append(start.elapsed_time(end) / self.calls)
            else:
                t = time.perf_counter()
                for _ in range(self.calls):
                    fn()
                per_call.append((time.perf_counter() - t) * 1e3 / self.calls)
        return {"ms": statistics.median(per_call), "min_ms": min(per_call)}


def copy_bandwidth_gbs(device: torch.device, nbytes: int, timer: Timer) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src))["ms"] / 1e6


def _set_recompile_limit(n: int):
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, n)


def _op_fn(ops, op: str, impl: str, compile_backend: str):
    backend = "eager" if impl == "compile" else impl
    if op == "pool":
        def fn(feat, masks):
            return ops.masked_pool(feat, masks, backend=backend)
    else:
        def fn(fc, bc, ft, bt):
            return ops.contrastive_losses(fc, bc, ft, bt, backend=backend)
    if impl == "compile":
        return torch.compile(fn, dynamic=False, backend=compile_backend)
    return fn


def _inputs(op, shape, dtype, layout, device, sets):
    n, C, side = shape
    out = []
    for _ in range(sets):
        if op == "pool":
            feat = torch.randn(n, C, side, side, device=device, dtype=dtype)
            if layout == "channels_last":
                feat = feat.contiguous(memory_format=torch.channels_last)
            masks = torch.rand(n, K, side, side, device=device, dtype=dtype)
            xs = (feat.requires_grad_(), masks.requires_grad_())
            grads = tuple(torch.randn(n, K, C, device=device, dtype=dtype) for _ in range(2))
        else:
            xs = tuple(torch.randn(n, C, device=device, dtype=dtype).requires_grad_() for _ in range(4))
            grads = tuple(torch.ones((), device=device, dtype=dtype) for _ in range(3))
        out.append((xs, grads))
    return out


def _max_err(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b))


def pool_bytes(n, C, P, elt):
    fwd = n * C * P * elt + n * K * P * elt + 2 * n * K * C * elt
    bwd = 2 * n * C * P * elt + 2 * n * K * P * elt + 2 * n * K * C * elt
    return fwd, fwd + bwd


def measure_config(ops, op, shape_name, shape, dtype_name, layout, impls, device, timer, copy_gbs, l2_bytes,
                   compile_backend):
    """Rows for one configuration, one per available impl, with ratios to eager and to compile."""
    dtype = DTYPES[dtype_name]
    n, C, side = shape
    elt = torch.finfo(dtype).bits // 8
    sets = max(2, math.ceil(3 * l2_bytes / (n * C * side * side * elt))) if op == "pool" else 1
    inputs = _inputs(op, shape, dtype, layout, device, sets)
    rows = []
    reference = None
    for impl in impls:
        row = {"op": op, "shape": shape_name, "n": n, "C": C, "hw": side * side if op == "pool" else None,
               "dtype": dtype_name, "layout": layout if op == "pool" else None, "impl": impl}
        try:
            fn = _op_fn(ops, op, impl, compile_backend)
            state = {"i": 0}

            def fwd():
                xs, _ = inputs[state["i"] % sets]
                state["i"] += 1
                with torch.no_grad():
                    fn(*xs)

            def fwdbwd():
                xs, grads = inputs[state["i"] % sets]
                state["i"] += 1
                outs = fn(*xs)
                torch.autograd.grad(outs, xs, grads)

            with torch.no_grad():
                first = fn(*inputs[0][0])
            if impl == "eager":
                reference = first
            row["max_err_vs_eager"] = _max_err(first, reference) if reference is not None else None
            f, fb = timer(fwd), timer(fwdbwd)
            row.update(fwd_ms=f["ms"], fwd_min_ms=f["min_ms"], fwdbwd_ms=fb["ms"], fwdbwd_min_ms=fb["min_ms"])
            if op == "pool":
                fwd_b, all_b = pool_bytes(n, C, side * side, elt)
                row["fwd_gbs"] = fwd_b / f["ms"] / 1e6
                row["fwdbwd_gbs"] = all_b / fb["ms"] / 1e6
                if copy_gbs:
                    row["fwd_copy_share"] = row["fwd_gbs"] / copy_gbs
                    row["fwdbwd_copy_share"] = row["fwdbwd_gbs"] / copy_gbs
        except Exception as err:  # one failing impl must not hide the others
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        rows.append(row)
    base = {r["impl"]: r for r in rows if "fwdbwd_ms" in r}
    for r in rows:
        for ref in ("eager", "compile"):
            if "fwdbwd_ms" in r and ref in base:
                r[f"fwd_x_{ref}"] = base[ref]["fwd_ms"] / r["fwd_ms"]
                r[f"fwdbwd_x_{ref}"] = base[ref]["fwdbwd_ms"] / r["fwdbwd_ms"]
    return rows


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}; torch {result['torch']}; copy {result['copy_gbs']:.0f} GB/s; "
             f"{result['calls']} calls x {result['reps']} reps per figure",
             "| op | shape | dtype | layout | impl | fwd ms | fwd+bwd ms | fwd+bwd GB/s (% copy) | x eager | x compile |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['layout'] or '-'} | {r['impl']} | "
                         f"error: {r['error'][:60]} | | | | |")
            continue
        bw = f"{r['fwdbwd_gbs']:.0f} ({100 * r.get('fwdbwd_copy_share', 0):.0f}%)" if "fwdbwd_gbs" in r else "-"
        xe = f"{r['fwdbwd_x_eager']:.2f}" if "fwdbwd_x_eager" in r else "-"
        xc = f"{r['fwdbwd_x_compile']:.2f}" if "fwdbwd_x_compile" in r else "-"
        lines.append(f"| {r['op']} | {r['shape']} (n={r['n']}, C={r['C']}) | {r['dtype']} | {r['layout'] or '-'} | "
                     f"{r['impl']} | {r['fwd_ms']:.4f} | {r['fwdbwd_ms']:.4f} | {bw} | {xe} | {xc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="pool,losses", help="comma list of pool, losses (default both)")
    p.add_argument("--shapes", default="Ti,S", help=f"comma list of {', '.join(SHAPES)} (default Ti,S)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32 (default bf16,fp32)")
    p.add_argument("--layouts", default="channels_last,nchw", help="pooling layouts, in this order (default both)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of eager, compile, triton, cpp")
    p.add_argument("--calls", type=int, default=30, help="back-to-back calls per timed window (default 30)")
    p.add_argument("--reps", type=int, default=7, help="timed windows per figure; the median counts (default 7)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compile' (default inductor)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy shapes (a CPU smoke run of the script)")
    p.add_argument("--out", help="write the results as JSON here (rewritten after every configuration)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    from dbc_fast import ops

    shapes = TINY_SHAPES if args.tiny else SHAPES
    for name, values, allowed in (("shapes", args.shapes, shapes), ("dtypes", args.dtypes, DTYPES),
                                  ("layouts", args.layouts, LAYOUTS), ("impls", args.impls, IMPLS),
                                  ("ops", args.ops, ("pool", "losses"))):
        bad = [v for v in values.split(",") if v not in allowed]
        if bad:
            print(f"bench_kernels: unknown {name} {bad}; choose from {', '.join(allowed)}", file=sys.stderr)
            return 2
    _set_recompile_limit(256)
    available = ops.available_backends(device)
    impls, skipped = [], {}
    for impl in args.impls.split(","):
        ok, why = (True, "") if impl in ("eager", "compile") else available[impl]
        (impls.append(impl) if ok else skipped.__setitem__(impl, why))
    timer = Timer(device, args.calls, args.reps)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    copy_gbs = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (1 << 24), timer)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "copy_gbs": copy_gbs, "l2_bytes": l2, "calls": args.calls,
              "reps": args.reps, "compile_backend": args.compile_backend, "impls": impls,
              "unavailable": skipped, "rows": []}
    print(f"bench_kernels on {result['device']}: copy {copy_gbs:.0f} GB/s; impls {impls}; unavailable {skipped}",
          flush=True)
    configs = []  # dtype-major, then layout (the training layout first), then shape; losses have no layout
    for dtype_name in args.dtypes.split(","):
        for layout in args.layouts.split(","):
            for shape_name in args.shapes.split(","):
                if "pool" in args.ops.split(","):
                    configs.append(("pool", shape_name, dtype_name, layout))
        for shape_name in args.shapes.split(","):
            if "losses" in args.ops.split(","):
                configs.append(("losses", shape_name, dtype_name, None))
    for op, shape_name, dtype_name, layout in configs:
        t = time.perf_counter()
        rows = measure_config(ops, op, shape_name, shapes[shape_name], dtype_name, layout, impls, device, timer,
                              copy_gbs, l2, args.compile_backend)
        result["rows"].extend(rows)
        for r in rows:
            print(json.dumps(r), flush=True)
        print(f"-- {op} {shape_name} {dtype_name} {layout or ''}: {time.perf_counter() - t:.1f} s", flush=True)
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
