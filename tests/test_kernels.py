"""The cpp (C++/OpenMP on CPU) and triton (interpreter on CPU) backends of the DBC head's ops against float64 eager.

Every test draws fresh random inputs (a new seed each run, printed in the failure message), covers odd sizes
(n = 1, 3, 67; C not a multiple of any block; h*w = 49, 196, 784 for the C++ kernels, smaller ones for the
interpreter), fp32/bf16/fp16 inputs, channels_last, cross/within negatives and both clamps of the cosines.
Also: torch.library.opcheck of every custom op, torch.compile(fullgraph=True) over the ops, and backend
selection (auto / forced / unavailable). The CUDA kernels are not exercised here (no GPU in CI).
"""
import os
import random
import subprocess
import sys

import pytest
import torch

from dbc_fast import ops
from dbc_fast.ops import cpp_backend, triton_backend

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _need(backend):
    ok, why = ops.available_backends("cpu")[backend]
    if not ok:
        pytest.skip(f"{backend} backend unavailable on CPU: {why}")


class _Rng:
    """A torch generator with a fresh seed (``gen``) and the text naming it for failure messages."""

    def __init__(self):
        seed = random.SystemRandom().randrange(2**31)
        self.gen = torch.Generator().manual_seed(seed)
        self.seed_text = f"(seed {seed})"


@pytest.fixture
def rng():
    return _Rng()


def _rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------- masked_pool

def _check_pool(backend, n, C, h, w, dtype, channels_last, rng, masks_dtype=None):
    feat = torch.randn(n, C, h, w, generator=rng.gen).to(dtype)
    if channels_last:
        feat = feat.to(memory_format=torch.channels_last)
    masks = torch.rand(n, 2, h, w, generator=rng.gen).to(masks_dtype or dtype)
    feat.requires_grad_()
    masks.requires_grad_()
    fg, bg = ops.masked_pool(feat, masks, backend=backend)
    assert fg.shape == bg.shape == (n, 2, C) and fg.dtype == bg.dtype == dtype
    # Reference: float64 eager on the very same (rounded) inputs.
    feat64 = feat.detach().double().requires_grad_()
    masks64 = masks.detach().double().requires_grad_()
    rfg, rbg = ops.masked_pool(feat64, masks64, backend="eager")
    tol = TOL[dtype]
    assert _rel_err(fg, rfg) < tol, f"fg {backend} {dtype} {rng.seed_text}"
    assert _rel_err(bg, rbg) < tol, f"bg {backend} {dtype} {rng.seed_text}"
    wf = torch.randn(n, 2, C, generator=rng.gen)
    wb = torch.randn(n, 2, C, generator=rng.gen)
    gfeat, gmasks = torch.autograd.grad((fg.float() * wf + bg.float() * wb).sum(), (feat, masks))
    rfeat, rmasks = torch.autograd.grad((rfg * wf.double() + rbg * wb.double()).sum(), (feat64, masks64))
    assert gfeat.dtype == feat.dtype and gmasks.dtype == masks.dtype
    assert _rel_err(gfeat, rfeat) < tol, f"grad feat {backend} {dtype} {rng.seed_text}"
    assert _rel_err(gmasks, rmasks) < max(tol, TOL[masks.dtype]), f"grad masks {backend} {dtype} {rng.seed_text}"
    if channels_last:
        assert gfeat.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [1, 3, 67])
@pytest.mark.parametrize("C,h,w", [(37, 7, 7), (130, 14, 14), (19, 28, 28)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_masked_pool_fp32_odd_sizes(n, C, h, w, channels_last, rng):
    _need("cpp")
    _check_pool("cpp", n, C, h, w, torch.float32, channels_last, rng)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_masked_pool_dtypes(dtype, channels_last, rng):
    _need("cpp")
    _check_pool("cpp", 3, 45, 14, 14, dtype, channels_last, rng)


@pytest.mark.parametrize("n,C,h,w", [(1, 5, 7, 7), (3, 37, 7, 7), (2, 19, 14, 14), (1, 5, 28, 28)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_masked_pool_fp32(n, C, h, w, channels_last, rng):
    _need("triton")
    _check_pool("triton", n, C, h, w, torch.float32, channels_last, rng)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_triton_masked_pool_dtypes(dtype, rng):
    _need("triton")
    _check_pool("triton", 3, 21, 7, 7, dtype, True, rng)
    _check_pool("triton", 2, 21, 7, 7, dtype, False, rng)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_masked_pool_bf16_feat_fp32_masks(backend, rng):
    # Under autocast the feature map is bf16 while the maps may stay fp32: grads keep each input's dtype.
    _need(backend)
    _check_pool(backend, 3, 23, 7, 7, torch.bfloat16, False, rng, masks_dtype=torch.float32)


@pytest.mark.parametrize("split", [2, 3])
def test_triton_masked_pool_backward_split_channels(split, rng):
    # On a GPU the backward splits the channels over programs and sums partial mask grads; check that path.
    _need("triton")
    from dbc_fast.kernels import masked_pool as tk

    feat = torch.randn(2, 70, 7, 7, generator=rng.gen, dtype=torch.float64)
    masks = torch.rand(2, 2, 7, 7, generator=rng.gen, dtype=torch.float64)
    gfg, gbg = torch.randn(2, 2, 70, generator=rng.gen, dtype=torch.float64), torch.randn(2, 2, 70, generator=rng.gen,
                                                                                        dtype=torch.float64)
    got = tk.masked_pool_backward(gfg, gbg, feat, masks, split=split)
    f, m = feat.clone().requires_grad_(), masks.clone().requires_grad_()
    fg, bg = ops.masked_pool(f, m, backend="eager")
    want = torch.autograd.grad((fg * gfg + bg * gbg).sum(), (f, m))
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-12, rng.seed_text


def test_masked_pool_other_layouts_are_accepted(rng):
    # A permuted (neither NCHW nor NHWC) view is made contiguous by the backends, with the same result.
    _need("cpp")
    base = torch.randn(3, 7, 7, 11, generator=rng.gen).permute(0, 3, 2, 1)  # [3, 11, 7, 7], odd strides
    masks = torch.rand(3, 2, 7, 7, generator=rng.gen)
    want = ops.masked_pool(base.double(), masks.double())
    for backend in ("cpp", "triton"):
        if ops.available_backends("cpu")[backend][0]:
            got = ops.masked_pool(base, masks, backend=backend)
            assert all(_rel_err(a, b) < 1e-5 for a, b in zip(got, want)), f"{backend} {rng.seed_text}"


# --------------------------------------------------------------------------------------------- contrastive losses

def _loss_inputs(n, C, rng, dtype):
    """fc, bc, ft, bt with cosines on both sides of the clamp range: some pairs with cos = 1 (clamped at
    1 - eps), some far below eps (clamped at eps), the rest around 0.5; plus a zero row (norm clamped).

    A shared component keeps the bulk of the cosines near 0.5, far from the clamp edges: a cosine within
    rounding of eps falls on one side of the clamp in fp32 and the other in fp64, switching its gradient on
    or off, and with ~1e6 random pairs centred on 0 that happened in about one run in five.
    """
    shared = torch.randn(C, generator=rng.gen, dtype=torch.float64)
    fc = shared + torch.randn(n, C, generator=rng.gen, dtype=torch.float64)
    bc = shared + torch.randn(n, C, generator=rng.gen, dtype=torch.float64)
    ft = fc + 0.7 * torch.randn(n, C, generator=rng.gen, dtype=torch.float64)
    bt = shared + torch.randn(n, C, generator=rng.gen, dtype=torch.float64)
    if n >= 3:
        bc[1] = fc[1]  # cos = 1: clamped at 1 - eps
        bt[0] = 3.0 * ft[0]
        ft[2] = -fc[2]  # positive pair below eps: clamped
    if n >= 4:
        bc[3] = -fc[3]  # a background opposite to every foreground: a column of cross pairs clamped at eps
    if n >= 5:
        bt[4] = 0.0  # a zero vector: its norm is clamped at 1e-12 (cosines 0, clamped at eps)
    return [x.to(dtype) for x in (fc, bc, ft, bt)]


def _check_losses(backend, n, C, negatives, dtype, rng):
    xs = [x.requires_grad_() for x in _loss_inputs(n, C, rng, dtype)]
    out = ops.contrastive_losses(*xs, negatives=negatives, backend=backend)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(o.shape == () and o.dtype == want_dtype for o in out)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    ref = ops.contrastive_losses(*xs64, negatives=negatives, backend="eager")
    # fp32 arithmetic on the same rounded inputs; absolute near 0 (log(1 - eps) cancels in fp32).
    loss_tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, o, r in zip(("neg_c", "neg_t", "pos"), out, ref):
        err = abs(o.item() - r.item())
        assert err <= loss_tol * max(1.0, abs(r.item())), f"{name} {backend} {negatives} {dtype} {rng.seed_text}"
    weights = torch.randn(3, generator=rng.gen, dtype=torch.float64)
    grads = torch.autograd.grad(sum(w * o for w, o in zip(weights.to(want_dtype), out)), xs)
    refs = torch.autograd.grad(sum(w * r for w, r in zip(weights, ref)), xs64)
    for name, g, r, x in zip(("fc", "bc", "ft", "bt"), grads, refs, xs):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert _rel_err(g, r) < TOL[dtype], f"grad {name} {backend} {negatives} {dtype} {rng.seed_text}"


@pytest.mark.parametrize("negatives", ["cross", "within"])
@pytest.mark.parametrize("n,C", [(1, 37), (3, 130), (67, 200), (67, 2051)])
def test_cpp_contrastive_losses_fp32(n, C, negatives, rng):
    _need("cpp")
    _check_losses("cpp", n, C, negatives, torch.float32, rng)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("negatives", ["cross", "within"])
def test_cpp_contrastive_losses_dtypes(dtype, negatives, rng):
    _need("cpp")
    _check_losses("cpp", 9, 45, negatives, dtype, rng)


def test_cpp_contrastive_losses_large_batch(rng):
    # n >= 1024 with C >= 2048, as the op must support (fp32).
    _need("cpp")
    _check_losses("cpp", 1030, 2050, "cross", torch.float32, rng)


@pytest.mark.parametrize("negatives", ["cross", "within"])
@pytest.mark.parametrize("n,C", [(1, 5), (3, 37), (67, 21)])
def test_triton_contrastive_losses_fp32(n, C, negatives, rng):
    _need("triton")
    _check_losses("triton", n, C, negatives, torch.float32, rng)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_triton_contrastive_losses_dtypes(dtype, rng):
    _need("triton")
    _check_losses("triton", 9, 21, "cross", dtype, rng)
    _check_losses("triton", 9, 21, "within", dtype, rng)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_contrastive_losses_take_strided_views(backend, rng):
    # The model feeds fg[:, 0], bg[:, 0], fg[:, 1], bg[:, 1] of masked_pool's [n, 2, C] outputs: row-strided views.
    _need(backend)
    fg = torch.randn(5, 2, 19, generator=rng.gen, dtype=torch.float64)
    bg = torch.randn(5, 2, 19, generator=rng.gen, dtype=torch.float64)
    args = (fg[:, 0], bg[:, 0], fg[:, 1], bg[:, 1])
    got = ops.contrastive_losses(*args, backend=backend)
    want = ops.contrastive_losses(*(a.contiguous() for a in args), backend="eager")
    assert all(_rel_err(a, b) < 1e-12 for a, b in zip(got, want)), rng.seed_text


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gradcheck_float64(backend, rng):
    _need(backend)
    feat = torch.randn(2, 3, 3, 3, generator=rng.gen, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(2, 2, 3, 3, generator=rng.gen, dtype=torch.float64, requires_grad=True)
    fast = backend == "triton"  # the interpreter is slow: gradcheck along random directions only
    assert torch.autograd.gradcheck(lambda f, m: ops.masked_pool(f, m, backend=backend), (feat, masks),
                                    fast_mode=fast)
    xs = [x.requires_grad_() for x in _loss_inputs(3, 4, rng, torch.float64)]
    xs[1] = xs[1].detach().add(0.1).requires_grad_()  # keep cosines off the clamp edges (no kinks)
    assert torch.autograd.gradcheck(lambda *a: ops.contrastive_losses(*a, backend=backend), xs, fast_mode=fast)


# ------------------------------------------------------------------------------------- custom ops and compilation

def _op_names(backend):
    prefix = "" if backend == "cpp" else "triton_"
    return [f"{prefix}masked_pool", f"{prefix}masked_pool_backward", f"{prefix}contrastive_losses",
            f"{prefix}contrastive_losses_backward"]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_opcheck(backend, rng):
    _need(backend)
    pool, pool_bwd, loss, loss_bwd = (getattr(torch.ops.dbc_fast, name) for name in _op_names(backend))
    feat = torch.randn(2, 5, 3, 3, generator=rng.gen, requires_grad=True)
    masks = torch.rand(2, 2, 3, 3, generator=rng.gen, requires_grad=True)
    torch.library.opcheck(pool, (feat, masks))
    torch.library.opcheck(pool, (feat.detach().to(memory_format=torch.channels_last).requires_grad_(), masks))
    g = torch.randn(2, 2, 5, generator=rng.gen)
    torch.library.opcheck(pool_bwd, (g, g.flip(0), feat.detach(), masks.detach()))
    xs = [x.requires_grad_() for x in _loss_inputs(3, 6, rng, torch.float32)]
    for cross in (True, False):
        torch.library.opcheck(loss, (*xs, cross, 5e-4))
        scalars = [torch.randn((), generator=rng.gen) for _ in range(3)]
        torch.library.opcheck(loss_bwd, (*scalars, *(x.detach() for x in xs), cross, 5e-4))


def test_torch_compile_fullgraph_inductor(rng):
    """One small inductor compile (CPU inductor compiles are slow) over both compiled backends and autograd."""
    _need("cpp")
    _need("triton")

    def head(feat, masks):
        fg, bg = ops.masked_pool(feat, masks, backend="cpp")
        fg2, bg2 = ops.masked_pool(feat, masks, backend="triton")
        a = ops.contrastive_losses(fg[:, 0], bg[:, 0], fg[:, 1], bg[:, 1], backend="cpp")
        b = ops.contrastive_losses(fg2[:, 0], bg2[:, 0], fg2[:, 1], bg2[:, 1], negatives="within", backend="triton")
        return sum(a) + sum(b)

    def reference(feat, masks):
        fg, bg = ops.masked_pool(feat, masks)
        a = ops.contrastive_losses(fg[:, 0], bg[:, 0], fg[:, 1], bg[:, 1])
        b = ops.contrastive_losses(fg[:, 0], bg[:, 0], fg[:, 1], bg[:, 1], negatives="within")
        return sum(a) + sum(b)

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    feat = torch.randn(3, 6, 4, 4, generator=rng.gen, requires_grad=True)
    masks = torch.rand(3, 2, 4, 4, generator=rng.gen, requires_grad=True)
    out = compiled(feat, masks)
    grads = torch.autograd.grad(out, (feat, masks))
    want = reference(feat, masks)
    want_grads = torch.autograd.grad(want, (feat, masks))
    assert _rel_err(out, want) < 1e-5, rng.seed_text
    assert all(_rel_err(a, b) < 1e-4 for a, b in zip(grads, want_grads)), rng.seed_text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_backends_match_float64_eager(backend, dtype, rng):
    """On a GPU machine: the CUDA and Triton kernels on CUDA tensors, at odd and at the training sizes."""
    ok, why = ops.available_backends("cuda")[backend]
    if not ok:
        pytest.skip(f"{backend} unavailable on cuda: {why}")
    for n, C, side, cl in ((3, 37, 7, False), (67, 130, 14, True), (64, 256, 14, False), (256, 1024, 14, True),
                           (5, 19, 28, False)):
        feat = torch.randn(n, C, side, side, generator=rng.gen).to(dtype).cuda()
        if cl:
            feat = feat.to(memory_format=torch.channels_last)
        masks = torch.rand(n, 2, side, side, generator=rng.gen).cuda()
        feat.requires_grad_()
        masks.requires_grad_()
        fg, bg = ops.masked_pool(feat, masks, backend=backend)
        f64, m64 = feat.detach().double().requires_grad_(), masks.detach().double().requires_grad_()
        rfg, rbg = ops.masked_pool(f64, m64)
        w = torch.randn(2, n, 2, C, generator=rng.gen).cuda()
        got = torch.autograd.grad((fg.float() * w[0] + bg.float() * w[1]).sum(), (feat, masks))
        want = torch.autograd.grad((rfg * w[0].double() + rbg * w[1].double()).sum(), (f64, m64))
        for name, a, b in (("fg", fg, rfg), ("bg", bg, rbg), ("grad feat", got[0], want[0]),
                           ("grad masks", got[1], want[1])):
            assert _rel_err(a, b) < TOL[dtype], f"{name} {backend} {dtype} n={n} C={C} {rng.seed_text}"
    for n, C in ((1, 37), (67, 130), (256, 1024), (1030, 2050)):
        for negatives in ("cross", "within"):
            xs = [x.cuda().requires_grad_() for x in _loss_inputs(n, C, rng, dtype)]
            out = ops.contrastive_losses(*xs, negatives=negatives, backend=backend)
            xs64 = [x.detach().double().requires_grad_() for x in xs]
            ref = ops.contrastive_losses(*xs64, negatives=negatives)
            for o, r in zip(out, ref):
                assert abs(o.item() - r.item()) <= 1e-5 * max(1.0, abs(r.item())), \
                    f"loss {backend} {negatives} {dtype} n={n} C={C} {rng.seed_text}"
            got = torch.autograd.grad(sum(out), xs)
            want = torch.autograd.grad(sum(ref), xs64)
            for a, b in zip(got, want):
                assert _rel_err(a, b) < TOL[dtype], f"grads {backend} {negatives} {dtype} n={n} {rng.seed_text}"


def test_triton_kernels_compile_for_hopper():
    """The interpreter runs the kernels as Python; the GPU compiler is stricter. Compile each kernel (bf16) for
    sm_90 down to cubin, in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "dbc_fast.kernels.compile_check", "--quick", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all compiled" in proc.stdout


# ------------------------------------------------------------------------------------------------ backend choice

@pytest.fixture
def fresh_availability(monkeypatch):
    """Lets a test change what the backends report; restores the cached answers afterwards."""
    monkeypatch.setattr(ops, "_AVAILABLE", {})
    return monkeypatch


def test_auto_prefers_cpp_then_triton_then_eager(fresh_availability):
    feat, masks = torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 4)
    calls = []
    for name in ("cpp", "triton", "eager"):
        impl = ops._BACKENDS[name]
        fresh_availability.setattr(impl, "masked_pool", staticmethod(lambda f, m, name=name: calls.append(name)))
    avail = {"cpp": (True, ""), "triton": (True, ""), "eager": (True, "")}
    for name in ("cpp", "triton"):
        fresh_availability.setattr(ops._BACKENDS[name], "available", staticmethod(lambda d, name=name: avail[name]))
    ops.masked_pool(feat, masks, backend="auto")
    avail["cpp"] = (False, "no library")
    ops._AVAILABLE.clear()
    ops.masked_pool(feat, masks, backend="auto")
    avail["triton"] = (False, "no triton")
    ops._AVAILABLE.clear()
    ops.masked_pool(feat, masks, backend="auto")
    assert calls == ["cpp", "triton", "eager"]


def test_forced_cpp_without_library_is_a_clear_error(fresh_availability):
    fresh_availability.setattr(cpp_backend, "_STATE", {"loaded": False, "reason": "the op library was not built"})
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable for cpu tensors: the op library was not"):
        ops.masked_pool(torch.randn(1, 2, 3, 3), torch.rand(1, 2, 3, 3), backend="cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable"):
        ops.contrastive_losses(*(torch.randn(2, 3) for _ in range(4)), backend="cpp")
    # auto then falls back to triton or eager and still gives the right answer
    feat, masks = torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 4)
    got = ops.masked_pool(feat, masks, backend="auto")
    want = ops.masked_pool(feat, masks, backend="eager")
    assert all(_rel_err(a, b) < 1e-5 for a, b in zip(got, want))


def test_forced_triton_without_triton_is_a_clear_error(fresh_availability):
    fresh_availability.setattr(triton_backend, "_STATE",
                               {"loaded": False, "reason": "triton cannot be imported (No module named 'triton')",
                                "interpret": False})
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable for cpu tensors: triton cannot be"):
        ops.masked_pool(torch.randn(1, 2, 3, 3), torch.rand(1, 2, 3, 3), backend="triton")


def test_unavailable_devices_say_why():
    # No GPU here: CUDA tensors are refused with a reason by a backend that has no kernels for them.
    reasons = ops.available_backends("cuda")
    assert reasons["eager"] == (True, "")
    for name in ("cpp", "triton"):
        ok, why = reasons[name]
        assert (ok and not why) or (not ok and why)
        if not torch.cuda.is_available():
            assert not ok and why
    ok, why = ops.available_backends("meta")["cpp"]
    assert not ok and "meta" in why


def test_bad_inputs_name_the_op():
    _need("cpp")
    with pytest.raises(RuntimeError, match="dbc_fast::masked_pool: feat .* differ"):
        torch.ops.dbc_fast.masked_pool(torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 5))
    with pytest.raises(RuntimeError, match="dbc_fast::contrastive_losses: fc, bc, ft, bt must have one shape"):
        torch.ops.dbc_fast.contrastive_losses(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 4),
                                              torch.randn(2, 3), True, 5e-4)
    with pytest.raises(ValueError, match="negatives must be"):
        ops.contrastive_losses(*(torch.randn(2, 3) for _ in range(4)), negatives="both", backend="cpp")


# ------------------------------------------------------------------------------------ odd strides of "contiguous" views

def _odd_stride_views(rng):
    """Feature maps PyTorch calls NCHW- or channels_last-contiguous although a size-1 dim has a stray stride."""
    yield "w=1 from permute", torch.randn(2, 3, 1, 5, generator=rng.gen).permute(0, 1, 3, 2)  # strides (15,5,1,5)
    yield "w=1 channels_last, stray w stride", torch.randn(2, 1, 4, 7, generator=rng.gen).permute(0, 3, 2, 1)
    yield "h=1 from permute", torch.randn(2, 3, 6, 1, generator=rng.gen).permute(0, 1, 3, 2)
    yield "h=w=1", torch.randn(3, 4, 1, 1, generator=rng.gen).permute(0, 1, 3, 2)
    yield "n=1 channels_last w=1", torch.randn(1, 6, 1, 5, generator=rng.gen).permute(2, 3, 1, 0)[..., :1]
    yield "C=1 and w=1 stray strides", torch.randn(2, 5, 1, 1, generator=rng.gen).permute(0, 2, 1, 3)
    yield "sliced channels (not contiguous)", torch.randn(2, 8, 5, 3, generator=rng.gen)[:, ::2]
    yield "transposed h/w (not contiguous)", torch.randn(2, 3, 5, 4, generator=rng.gen).transpose(2, 3)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_masked_pool_odd_stride_views_match_eager(backend, rng):
    """Kernels that walk strides must not trust the strides of size-1 dims (wrong sums / out-of-bounds reads)."""
    _need(backend)
    for name, view in _odd_stride_views(rng):
        assert view.shape[0] >= 1 and view.dim() == 4
        n, C, h, w = view.shape
        feat = view.detach().requires_grad_()
        masks = torch.rand(n, 2, w, h, generator=rng.gen).transpose(2, 3).requires_grad_()  # a view too
        fg, bg = ops.masked_pool(feat, masks, backend=backend)
        f64 = feat.detach().double().requires_grad_()
        m64 = masks.detach().double().requires_grad_()
        rfg, rbg = ops.masked_pool(f64, m64, backend="eager")
        wf, wb = torch.randn(2, n, 2, C, generator=rng.gen)
        got = torch.autograd.grad((fg * wf + bg * wb).sum(), (feat, masks))
        want = torch.autograd.grad((rfg * wf.double() + rbg * wb.double()).sum(), (f64, m64))
        for what, a, b in (("fg", fg, rfg), ("bg", bg, rbg), ("grad feat", got[0], want[0]),
                           ("grad masks", got[1], want[1])):
            assert a.shape == b.shape and _rel_err(a, b) < 1e-5, f"{what} {backend} {name} {rng.seed_text}"


def test_auto_order_follows_the_feature_map_layout(fresh_availability):
    """auto: channels_last maps on CUDA go to Triton first, NCHW maps and CPU tensors to the compiled library."""
    nchw = torch.empty(2, 8, 4, 4, device="meta")
    cl = nchw.to(memory_format=torch.channels_last)
    assert ops.auto_order("cuda", cl) == ("triton", "cpp", "eager")
    assert ops.auto_order("cuda", nchw) == ("cpp", "triton", "eager")
    assert ops.auto_order("cuda", None) == ("cpp", "triton", "eager")  # the losses
    assert ops.auto_order("cpu", cl) == ("cpp", "triton", "eager")
    # A map that is both (C == 1 or h == w == 1) counts as NCHW.
    assert ops.auto_order("cuda", torch.empty(2, 8, 1, 1, device="meta")) == ("cpp", "triton", "eager")
    # masked_pool dispatches through that order: pretend every backend serves CUDA and record which one runs.
    calls = []
    for name in ("cpp", "triton"):
        impl = ops._BACKENDS[name]
        fresh_availability.setattr(impl, "available", staticmethod(lambda d: (True, "")))
        fresh_availability.setattr(impl, "masked_pool", staticmethod(lambda f, m, name=name: calls.append(name)))
    fresh_availability.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))
    ops.masked_pool(cl, torch.empty(2, 2, 4, 4, device="meta"), backend="auto")
    ops.masked_pool(nchw, torch.empty(2, 2, 4, 4, device="meta"), backend="auto")
    assert calls == ["triton", "cpp"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_masked_pool_mask_dtypes_mask_counts_and_layouts(backend, rng):
    """On a GPU: bf16 masks with bf16 features (what the model feeds under autocast), K = 1, 2, 3, 8 (both register
    sizes of the CUDA kernels), channels_last with C a multiple of the 16-byte pack and not, odd-stride views."""
    ok, why = ops.available_backends("cuda")[backend]
    if not ok:
        pytest.skip(f"{backend} unavailable on cuda: {why}")
    cases = [(torch.bfloat16, torch.bfloat16, 2, 64, True), (torch.bfloat16, torch.bfloat16, 2, 60, True),
             (torch.bfloat16, torch.bfloat16, 3, 64, False), (torch.float16, torch.float16, 8, 64, True),
             (torch.bfloat16, torch.float32, 1, 64, True), (torch.float32, torch.bfloat16, 2, 36, True),
             (torch.float32, torch.float32, 8, 37, False)]
    for dtype, mdtype, K, C, cl in cases:
        feat = torch.randn(5, C, 14, 14, generator=rng.gen).to(dtype).cuda()
        if cl:
            feat = feat.to(memory_format=torch.channels_last)
        masks = torch.rand(5, K, 14, 14, generator=rng.gen).to(mdtype).cuda()
        feat.requires_grad_()
        masks.requires_grad_()
        fg, bg = ops.masked_pool(feat, masks, backend=backend)
        f64, m64 = feat.detach().double().requires_grad_(), masks.detach().double().requires_grad_()
        rfg, rbg = ops.masked_pool(f64, m64)
        w = torch.randn(2, 5, K, C, generator=rng.gen).cuda()
        got = torch.autograd.grad((fg.float() * w[0] + bg.float() * w[1]).sum(), (feat, masks))
        want = torch.autograd.grad((rfg * w[0].double() + rbg * w[1].double()).sum(), (f64, m64))
        assert got[0].dtype == dtype and got[1].dtype == mdtype
        assert got[0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        tol = max(TOL[dtype], TOL[mdtype])
        for name, a, b in (("fg", fg, rfg), ("bg", bg, rbg), ("grad feat", got[0], want[0]),
                           ("grad masks", got[1], want[1])):
            assert _rel_err(a, b) < tol, f"{name} {backend} {dtype}/{mdtype} K={K} C={C} cl={cl} {rng.seed_text}"
    for name, view in _odd_stride_views(rng):
        feat = view.cuda()
        masks = torch.rand(feat.shape[0], 2, *feat.shape[2:], generator=rng.gen).cuda()
        got, want = ops.masked_pool(feat, masks, backend=backend), ops.masked_pool(feat.double(), masks.double())
        assert all(_rel_err(a, b) < 1e-5 for a, b in zip(got, want)), f"{backend} {name} {rng.seed_text}"
