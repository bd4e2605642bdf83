"""pytest-benchmark suite of the DBC head's ops: eager vs torch.compile(eager) vs Triton vs the compiled library.

    python -m pytest benchmarks/bench_ops.py --benchmark-only --benchmark-columns=median,iqr,min,rounds \
        --benchmark-sort=fullname [-k pool|losses|train_step] [--benchmark-json out.json]

Shapes are the DBC training shapes of Conformer-Ti and -S at 224x224 input: F* [n, C, 14, 14] with
Ti: n = 64, C = 256 and S: n = 256, C = 1024 (C is the CNN branch width of block 11: 64 * 4 for Ti, 256 * 4 for S),
two masks (M_c, M_a). On a CUDA machine: bf16 inputs; on CPU: fp32 (Triton is skipped on CPU: the interpreter
is a correctness tool, not a fast path). "fwd" runs the op without autograd, "fwdbwd" the op and its backward
(torch.autograd.grad: no .grad accumulation). On CUDA one benchmark round is CALLS_PER_ROUND (20) back-to-back
calls and one sync, so the reported times are per 20 calls there; on CPU a round is one call.
benchmarks/bench_kernels.py gives per-call figures, bandwidth and ratios on a GPU (the GPU suite uses it).
``test_train_step`` times one whole DBC training step (forward, backward, SGD) with each ops backend.
Every impl runs in the same session on fresh random inputs; record results in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from dbc_fast import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import _op_fn  # noqa: E402  (a sibling script, not a package)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = {"Ti": (64, 256), "S": (256, 1024)}  # name -> (n, C); F* is 14 x 14
IMPLS = ("eager", "compile", "triton", "cpp")
# On CUDA a round is this many back-to-back calls and one sync: divide the round's time by it for a call's.
CALLS_PER_ROUND = 20 if DEVICE.type == "cuda" else 1


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _need(impl):
    if impl == "compile":
        return
    if impl == "triton" and DEVICE.type != "cuda":
        pytest.skip("triton benchmarks need a CUDA device (the CPU interpreter is not a fast path)")
    ok, why = ops.available_backends(DEVICE)[impl]
    if not ok:
        pytest.skip(f"{impl} unavailable on {DEVICE.type}: {why}")


_COMPILED = {}


def _op(name, impl):
    """The op as a function of tensors, for one impl (torch.compile of the eager reference for "compile", compiled
    once per op): bench_kernels' definition."""
    if impl != "compile":
        return _op_fn(ops, name, impl, "inductor")
    if name not in _COMPILED:
        _COMPILED[name] = _op_fn(ops, name, impl, "inductor")
    return _COMPILED[name]


def _pool_inputs(n, C, grad):
    feat = torch.randn(n, C, 14, 14, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    masks = torch.rand(n, 2, 14, 14, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    return feat, masks


def _loss_inputs(n, C, grad):
    return [torch.randn(n, C, device=DEVICE, dtype=DTYPE, requires_grad=grad) for _ in range(4)]


def _run(benchmark, fn, args, backward):
    """Times one round of CALLS_PER_ROUND back-to-back calls and one sync (on CUDA, so launch latency overlaps as
    in training); the backward goes through torch.autograd.grad, so nothing accumulates into the inputs' .grad."""
    outs = fn(*args)  # warm-up: compiles, autotunes, loads
    grads = [torch.randn_like(o) for o in outs] if backward else None

    def call():
        if backward:
            torch.autograd.grad(fn(*args), args, grads)
        else:
            with torch.no_grad():
                fn(*args)

    def step():
        for _ in range(CALLS_PER_ROUND):
            call()
        _sync()

    step()
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).replace("torch.", ""),
                                torch=torch.__version__, calls_per_round=CALLS_PER_ROUND)
    benchmark(step)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pool(benchmark, impl, mode, shape):
    _need(impl)
    n, C = SHAPES[shape]
    backward = mode == "fwdbwd"
    _run(benchmark, _op("pool", impl), _pool_inputs(n, C, backward), backward)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_losses(benchmark, impl, mode, shape):
    _need(impl)
    n, C = SHAPES[shape]
    backward = mode == "fwdbwd"
    _run(benchmark, _op("losses", impl), _loss_inputs(n, C, backward), backward)


@pytest.mark.parametrize("impl", ["eager", "triton", "cpp"])
def test_train_step(benchmark, impl):
    """One DBC training step of Conformer-Ti (forward, backward, SGD step) with each ops backend.

    CUDA: batch 64 at 224x224 under bf16 autocast (the training setting). CPU: batch 8, fp32 (a smoke-size
    comparison: the backbone dominates there).
    """
    _need(impl)
    try:
        from dbc_fast import create_model
    except ImportError as err:
        pytest.skip(f"model not available: {err}")
    batch = 64 if DEVICE.type == "cuda" else 8
    model = create_model("conformer_tiny_patch16", 200, method="dbc", ops_backend=impl).to(DEVICE).train()
    if DEVICE.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, 224, 224, device=DEVICE)
    labels = torch.randint(0, 200, (batch,), device=DEVICE)

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda"):
            out = model(images, labels)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    step()
    benchmark.extra_info.update(device=str(DEVICE), batch=batch, torch=torch.__version__)
    if DEVICE.type == "cuda":
        benchmark(step)
    else:
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
