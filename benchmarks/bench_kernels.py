"""Achieved memory bandwidth of masked_pool (forward, and forward+backward) against the measured copy bandwidth.

    python benchmarks/pool_bandwidth.py [--shapes Ti,S,L] [--dtype bf16] [--out results.json]

Needs a CUDA GPU. The copy ceiling is a large device-to-device copy (bytes read + bytes written). Each pooling
variant is timed with CUDA events (median of many runs, after warm-up), rotating over enough input sets that
they do not fit in L2, and its bytes are the fewest it must move:
  forward:  read F [n,C,h,w] and the masks [n,2,h,w], write fg, bg [n,2,C];
  backward: read F, the masks and the two grads [n,2,C], write grad F and grad masks.
Prints a Markdown table (for benchmarks/RESULTS.md) with the time, GB/s, percent of copy bandwidth and speed-up
over eager and torch.compile(eager) for each backend. The target on an H100: fwd+bwd >= 3x eager, >= 1.5x
torch.compile(eager), >= 70% of copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

SHAPES = {"Ti": (64, 256, 14), "S": (256, 1024, 14), "L": (256, 1024, 28)}  # name -> (n, C, side)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn, reps=100, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes=1 << 30):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=50)
    return 2 * nbytes / ms / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="Ti,S,L")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--channels-last", action="store_true", help="F* in channels_last layout")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("pool_bandwidth: needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    from dbc_fast import ops

    dtype = DTYPES[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    impls = ["eager", "compile"] + [b for b in ("triton", "cpp") if ops.available_backends("cuda")[b][0]]
    compiled = torch.compile(lambda f, m: ops.masked_pool(f, m, backend="eager"), dynamic=False)
    for name in args.shapes.split(","):
        n, C, side = SHAPES[name]
        P = side * side
        fwd_bytes = n * C * P * elt + n * 2 * P * elt + 2 * n * 2 * C * elt
        bwd_bytes = 2 * n * C * P * elt + 2 * n * 2 * P * elt + 2 * n * 2 * C * elt
        sets = max(2, math.ceil(3 * l2 / (n * C * P * elt)))
        inputs = []
        for _ in range(sets):
            feat = torch.randn(n, C, side, side, device="cuda", dtype=dtype)
            if args.channels_last:
                feat = feat.to(memory_format=torch.channels_last)
            masks = torch.rand(n, 2, side, side, device="cuda", dtype=dtype)
            grads = (torch.randn(n, 2, C, device="cuda", dtype=dtype), torch.randn(n, 2, C, device="cuda",
                                                                                    dtype=dtype))
            inputs.append((feat.requires_grad_(), masks.requires_grad_(), grads))
        result = {}
        for impl in impls:
            fn = compiled if impl == "compile" else (lambda f, m, impl=impl: ops.masked_pool(f, m, backend=impl))
            state = {"i": 0}

            def fwd():
                f, m, _ = inputs[state["i"] % sets]
                state["i"] += 1
                with torch.no_grad():
                    fn(f, m)

            def fwdbwd():
                f, m, g = inputs[state["i"] % sets]
                state["i"] += 1
                torch.autograd.backward(fn(f, m), g)

            t_fwd, t_all = time_ms(fwd), time_ms(fwdbwd)
            result[impl] = (t_fwd, t_all)
            rows.append({"shape": name, "impl": impl, "n": n, "C": C, "hw": P, "dtype": args.dtype,
                         "channels_last": args.channels_last, "fwd_ms": t_fwd, "fwdbwd_ms": t_all,
                         "fwd_gbs": fwd_bytes / t_fwd / 1e6, "fwdbwd_gbs": (fwd_bytes + bwd_bytes) / t_all / 1e6})
        for row in rows:
            if row["shape"] == name:
                row["speedup_vs_eager"] = result["eager"][1] / row["fwdbwd_ms"]
                row["speedup_vs_compile"] = result["compile"][1] / row["fwdbwd_ms"]
    dev = torch.cuda.get_device_name(0)
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s; dtype {args.dtype}"
          f"{'; channels_last' if args.channels_last else ''}")
    print("| shape | impl | fwd ms | fwd GB/s (% copy) | fwd+bwd ms | fwd+bwd GB/s (% copy) | x eager | x compile |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} (n={r['n']}, C={r['C']}, hw={r['hw']}) | {r['impl']} | {r['fwd_ms']:.4f} | "
              f"{r['fwd_gbs']:.0f} ({100 * r['fwd_gbs'] / copy_gbs:.0f}%) | {r['fwdbwd_ms']:.4f} | "
              f"{r['fwdbwd_gbs']:.0f} ({100 * r['fwdbwd_gbs'] / copy_gbs:.0f}%) | {r['speedup_vs_eager']:.2f} | "
              f"{r['speedup_vs_compile']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "copy_gbs": copy_gbs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
