"""Compiles every Triton kernel of dbc_fast for a GPU target without needing a GPU (down to cubin via ptxas).

    python -m dbc_fast.kernels.compile_check [--arch 90] [--out DIR] [--quick] [-k NAME]

Catches what the CPU interpreter cannot: code the GPU compiler rejects (types, shapes of tl.dot, layouts).
Prints each kernel's shared memory and, with --out, writes the PTX for inspection. Must run without
TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _variants(quick=False):
    import triton.language as tl

    from dbc_fast.kernels import contrastive as ct
    from dbc_fast.kernels import masked_pool as mp

    out = []
    dtypes = (("bf16", tl.float32), ("fp16", tl.float32), ("fp32", tl.float32), ("fp64", tl.float64))
    for dt, acc in dtypes[:1] if quick else dtypes:
        for block_c, block_p in ((8, 256), (128, 16)):  # NCHW and channels_last shapes
            out.append((f"pool_fwd[{dt},{block_c}x{block_p}]", mp._pool_fwd_kernel,
                        {"feat_ptr": f"*{dt}", "masks_ptr": "*fp32", "fg_ptr": f"*{dt}", "bg_ptr": f"*{dt}",
                         "C": "i32", "P": "i32", "K": "i32", "s_fn": "i32", "s_fc": "i32", "s_fp": "i32"},
                        {"BLOCK_C": block_c, "BLOCK_P": block_p, "BLOCK_K": 2, "ACC": acc}))
            out.append((f"pool_bwd[{dt},{block_c}x{block_p}]", mp._pool_bwd_kernel,
                        {"feat_ptr": f"*{dt}", "masks_ptr": "*fp32", "gfg_ptr": f"*{dt}", "gbg_ptr": f"*{dt}",
                         "dfeat_ptr": f"*{dt}", "dm_ptr": "*fp32" if dt != "fp64" else "*fp64", "n": "i32",
                         "C": "i32", "P": "i32", "K": "i32", "c_per_split": "i32", "s_fn": "i32", "s_fc": "i32",
                         "s_fp": "i32", "s_dn": "i32", "s_dc": "i32", "s_dp": "i32"},
                        {"BLOCK_C": block_c, "BLOCK_P": block_p, "BLOCK_K": 2, "ACC": acc}))
        accs = "fp64" if dt == "fp64" else "fp32"
        prec = "ieee" if dt in ("fp32", "fp64") else "tf32"
        xs = {f"{x}_ptr": f"*{dt}" for x in ("fc", "bc", "ft", "bt")}
        strides = {f"s_{x}": "i32" for x in ("fc", "bc", "ft", "bt")}
        for cross in (True, False):
            for block in ((32,) if quick else (16, 32, 64)):
                const = {"CROSS": cross, "BLOCK": block, "BLOCK_K": 64, "ACC": acc, "PREC": prec, "UPCAST": False}
                out.append((f"loss_fwd[{dt},cross={cross},{block}]", ct._losses_fwd_kernel,
                            {**xs, **strides, "partial_ptr": f"*{accs}", "n": "i32", "C": "i32", "T": "i32",
                             "eps_ptr": f"*{accs}"}, const))
                out.append((f"loss_bwd_weights[{dt},cross={cross},{block}]", ct._losses_bwd_weights_kernel,
                            {**xs, **strides, "g0_ptr": f"*{accs}", "g1_ptr": f"*{accs}", "g2_ptr": f"*{accs}",
                             "w_ptr": f"*{accs}", "r_ptr": f"*{accs}", "norm_ptr": f"*{accs}",
                             "wpos_ptr": f"*{accs}", "rpos_ptr": f"*{accs}", "n": "i32", "C": "i32", "RT": "i32",
                             "eps_ptr": f"*{accs}"}, const))
                out.append((f"loss_bwd_grads[{dt},cross={cross},{block}]", ct._losses_bwd_grads_kernel,
                            {**xs, **strides, **{f"d{x}_ptr": f"*{dt}" for x in ("fc", "bc", "ft", "bt")},
                             "w_ptr": f"*{accs}", "r_ptr": f"*{accs}", "norm_ptr": f"*{accs}",
                             "wpos_ptr": f"*{accs}", "rpos_ptr": f"*{accs}", "n": "i32", "C": "i32", "RT": "i32"},
                            {"CROSS": cross, "BLOCK_M": block, "BLOCK_N": block, "BLOCK_C": 64, "ACC": acc,
                             "PREC": "ieee"}))
        out.append((f"sum_partials[{accs}]", ct._sum_partials_kernel,
                    {"partial_ptr": f"*{accs}", "out0_ptr": f"*{accs}", "out1_ptr": f"*{accs}",
                     "out2_ptr": f"*{accs}", "T": "i32"}, {"BLOCK_T": 1024}))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = sm_90)")
    parser.add_argument("--out", help="folder for the PTX of each kernel")
    parser.add_argument("-k", dest="pattern", default="", help="only kernels whose name contains this")
    parser.add_argument("--quick", action="store_true", help="bf16 and one block size only (the tests' check)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, fn, signature, constexprs in _variants(args.quick):
        if args.pattern not in name:
            continue
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        start = time.time()
        try:
            kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=target)
        except Exception as err:  # report every failing variant, not just the first
            failed += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err)[:2000]}")
            continue
        meta = kernel.metadata
        print(f"ok   {name}: shared {meta.shared} B, {meta.num_warps} warps, {time.time() - start:.1f}s")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            safe = "".join(c if c.isalnum() else "_" for c in name)
            with open(os.path.join(args.out, f"{safe}.ptx"), "w") as f:
                f.write(kernel.asm["ptx"])
    print(f"{'FAILED' if failed else 'all compiled'} for sm_{args.arch} ({failed} failures)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
