"""Triton DBC contrastive losses (paper Eq. 10-12) for [n, C] foreground/background vectors.

    u = f / max(|f|, 1e-12),  cos_ij = u_i . v_j clamped to [eps, 1 - eps]
    L_neg = -mean log(1 - cos(f_i, b_j)) over all n x n pairs (cross) or i = j (within),  L_pos = -mean_i log cos(fc_i, ft_i)

Forward: one kernel over (tile, branch) computes row norms on the fly from the raw inputs, the cosine tiles
(tl.dot over C), clamp, log and a per-tile partial sum; a second tiny kernel sums the partials into the three
losses in a fixed order (deterministic: no atomics).
Backward: kernel 1 recomputes the cosine tiles and writes W = dL/dcos (zero where clamped), the row/column sums
of W*cos and the row norms; kernel 2 computes every input's gradient tile as W @ V (tl.dot) plus the positive
term, then the normalisation's backward  dx = (du - (du . u) u) / |x|,  using du . u = sum_j W_ij cos_ij.
Registered as ``dbc_fast::triton_contrastive_losses`` (+ ``_backward``). Inputs may be row-strided views
(e.g. fg[:, 0] of masked_pool's output); fp32/fp64/bf16/fp16, arithmetic in fp32 (fp64 for fp64).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dbc_fast.ops import registration

NORM_EPS = tl.constexpr(1e-12)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _pick(sel, x0, x1, x2, x3):
    # sel is a run-time scalar; the four values are pointers or ints of one type.
    if sel == 0:
        r = x0
    elif sel == 1:
        r = x1
    elif sel == 2:
        r = x2
    else:
        r = x3
    return r


@triton.jit
def _cos_tile(a_ptr, sa, b_ptr, sb, offs_m, offs_n, n, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """cos[BM, BN] of rows offs_m of A with rows offs_n of B, and both sets of row norms."""
    m_ok = offs_m < n
    n_ok = offs_n < n
    dots = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    na = tl.zeros([BLOCK_M], ACC)
    nb = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        a = tl.load(a_ptr + offs_m[:, None] * sa + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * sb + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        af = a.to(ACC)
        bf = b.to(ACC)
        if UPCAST:
            dots = tl.dot(af, tl.trans(bf), dots, input_precision="ieee", out_dtype=ACC)
        else:
            dots = tl.dot(a, tl.trans(b), dots, input_precision=PREC, out_dtype=ACC)
        na += tl.sum(af * af, axis=1)
        nb += tl.sum(bf * bf, axis=1)
    na = tl.sqrt(na)
    nb = tl.sqrt(nb)
    cos = dots / tl.maximum(na, NORM_EPS)[:, None] / tl.maximum(nb, NORM_EPS)[None, :]
    return cos, na, nb


@triton.jit
def _cos_rows(a_ptr, sa, b_ptr, sb, offs_m, n, C, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """cos[BM] of row i of A with row i of B (the diagonal), and both row norms."""
    m_ok = offs_m < n
    dots = tl.zeros([BLOCK_M], ACC)
    na = tl.zeros([BLOCK_M], ACC)
    nb = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ok = m_ok[:, None] & (offs_k < C)[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * sa + offs_k[None, :], mask=ok, other=0.0).to(ACC)
        b = tl.load(b_ptr + offs_m[:, None] * sb + offs_k[None, :], mask=ok, other=0.0).to(ACC)
        dots += tl.sum(a * b, axis=1)
        na += tl.sum(a * a, axis=1)
        nb += tl.sum(b * b, axis=1)
    na = tl.sqrt(na)
    nb = tl.sqrt(nb)
    cos = dots / tl.maximum(na, NORM_EPS) / tl.maximum(nb, NORM_EPS)
    return cos, na, nb


@triton.jit
def _tile_loss(a_ptr, sa, b_ptr, sb, t, n, C, eps, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Tile t of the n x n negative pairs: its share of -mean log(1 - cos).
    tiles_n = tl.cdiv(n, BLOCK)
    offs_m = (t // tiles_n) * BLOCK + tl.arange(0, BLOCK)
    offs_n = (t % tiles_n) * BLOCK + tl.arange(0, BLOCK)
    cos, na, nb = _cos_tile(a_ptr, sa, b_ptr, sb, offs_m, offs_n, n, C, BLOCK, BLOCK, BLOCK_K, ACC, PREC, UPCAST)
    cos = tl.minimum(tl.maximum(cos, eps), 1.0 - eps)
    ok = (offs_m < n)[:, None] & (offs_n < n)[None, :]
    return tl.sum(tl.sum(tl.where(ok, -tl.log(1.0 - cos), 0.0), axis=1), axis=0) / n / n


@triton.jit
def _diag_loss(a_ptr, sa, b_ptr, sb, t, n, C, eps, positive, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
               ACC: tl.constexpr):
    # Rows block t of the i = i pairs: share of -mean log(cos) (positive) or -mean log(1 - cos).
    offs_m = t * BLOCK + tl.arange(0, BLOCK)
    cos, na, nb = _cos_rows(a_ptr, sa, b_ptr, sb, offs_m, n, C, BLOCK, BLOCK_K, ACC)
    cos = tl.minimum(tl.maximum(cos, eps), 1.0 - eps)
    term = tl.where(positive, -tl.log(cos), -tl.log(1.0 - cos))
    return tl.sum(tl.where(offs_m < n, term, 0.0), axis=0) / n


@triton.jit(do_not_specialize=["s_fc", "s_bc", "s_ft", "s_bt"])
def _losses_fwd_kernel(fc_ptr, bc_ptr, ft_ptr, bt_ptr, s_fc, s_bc, s_ft, s_bt, partial_ptr, n, C, T, eps_ptr,
                       CROSS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Program (t, branch): branch 0 = (fc, bc) negatives, 1 = (ft, bt) negatives, 2 = (fc, ft) positives.
    t = tl.program_id(0)
    branch = tl.program_id(1)
    eps = tl.load(eps_ptr)
    a_ptr = _pick(branch, fc_ptr, ft_ptr, fc_ptr, fc_ptr)
    sa = _pick(branch, s_fc, s_ft, s_fc, s_fc)
    b_ptr = _pick(branch, bc_ptr, bt_ptr, ft_ptr, ft_ptr)
    sb = _pick(branch, s_bc, s_bt, s_ft, s_ft)
    if CROSS:
        is_tile = branch < 2
    else:
        is_tile = branch < 0
    if is_tile:
        value = _tile_loss(a_ptr, sa, b_ptr, sb, t, n, C, eps, BLOCK, BLOCK_K, ACC, PREC, UPCAST)
    else:
        value = _diag_loss(a_ptr, sa, b_ptr, sb, t, n, C, eps, branch == 2, BLOCK, BLOCK_K, ACC)
    tl.store(partial_ptr + branch * T + t, value)


@triton.jit
def _tile_weights(a_ptr, sa, b_ptr, sb, t, branch, g, w_ptr, r_ptr, norm_ptr, n, C, RT, eps,
                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
    tiles_n = tl.cdiv(n, BLOCK)
    ti = t // tiles_n
    tj = t % tiles_n
    offs_m = ti * BLOCK + tl.arange(0, BLOCK)
    offs_n = tj * BLOCK + tl.arange(0, BLOCK)
    m_ok = offs_m < n
    n_ok = offs_n < n
    cos, na, nb = _cos_tile(a_ptr, sa, b_ptr, sb, offs_m, offs_n, n, C, BLOCK, BLOCK, BLOCK_K, ACC, PREC, UPCAST)
    ok = m_ok[:, None] & n_ok[None, :] & (cos >= eps) & (cos <= 1.0 - eps)
    w = tl.where(ok, g / (n * n) / (1.0 - tl.where(ok, cos, 0.5)), 0.0)
    tl.store(w_ptr + branch * n * n + offs_m[:, None] * n + offs_n[None, :], w, mask=m_ok[:, None] & n_ok[None, :])
    wc = w * cos
    tl.store(r_ptr + ((2 * branch) * RT + tj) * n + offs_m, tl.sum(wc, axis=1), mask=m_ok)
    tl.store(r_ptr + ((2 * branch + 1) * RT + ti) * n + offs_n, tl.sum(wc, axis=0), mask=n_ok)
    if tj == 0:
        tl.store(norm_ptr + (2 * branch) * n + offs_m, na, mask=m_ok)
    if ti == 0:
        tl.store(norm_ptr + (2 * branch + 1) * n + offs_n, nb, mask=n_ok)


@triton.jit
def _diag_weights(a_ptr, sa, b_ptr, sb, t, branch, g, w_ptr, r_ptr, norm_ptr, wpos_ptr, rpos_ptr, n, C, RT, eps,
                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    offs_m = t * BLOCK + tl.arange(0, BLOCK)
    m_ok = offs_m < n
    cos, na, nb = _cos_rows(a_ptr, sa, b_ptr, sb, offs_m, n, C, BLOCK, BLOCK_K, ACC)
    in_range = m_ok & (cos >= eps) & (cos <= 1.0 - eps)
    safe = tl.where(in_range, cos, 0.5)  # keeps masked-out rows from dividing by zero
    if branch == 2:
        w = tl.where(in_range, -g / n / safe, 0.0)
        tl.store(wpos_ptr + offs_m, w, mask=m_ok)
        tl.store(rpos_ptr + offs_m, w * cos, mask=m_ok)
    else:
        w = tl.where(in_range, g / n / (1.0 - safe), 0.0)
        tl.store(w_ptr + branch * n + offs_m, w, mask=m_ok)
        tl.store(r_ptr + (2 * branch) * RT * n + offs_m, w * cos, mask=m_ok)
        tl.store(r_ptr + (2 * branch + 1) * RT * n + offs_m, w * cos, mask=m_ok)
        tl.store(norm_ptr + (2 * branch) * n + offs_m, na, mask=m_ok)
        tl.store(norm_ptr + (2 * branch + 1) * n + offs_m, nb, mask=m_ok)


@triton.jit(do_not_specialize=["s_fc", "s_bc", "s_ft", "s_bt"])
def _losses_bwd_weights_kernel(fc_ptr, bc_ptr, ft_ptr, bt_ptr, s_fc, s_bc, s_ft, s_bt, g0_ptr, g1_ptr, g2_ptr,
                               w_ptr, r_ptr, norm_ptr, wpos_ptr, rpos_ptr, n, C, RT, eps_ptr,
                               CROSS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                               PREC: tl.constexpr, UPCAST: tl.constexpr):
    # Writes, per branch: W = dL/dcos (cross: [n, n]; within: its diagonal [n]), partial row/column sums of
    # W * cos into r [4, RT, n] (matrix order fc, bc, ft, bt), the row norms [4, n], and for the positives
    # wpos = dL/dcos_pos and rpos = wpos * cos_pos [n].
    t = tl.program_id(0)
    branch = tl.program_id(1)
    a_ptr = _pick(branch, fc_ptr, ft_ptr, fc_ptr, fc_ptr)
    sa = _pick(branch, s_fc, s_ft, s_fc, s_fc)
    b_ptr = _pick(branch, bc_ptr, bt_ptr, ft_ptr, ft_ptr)
    sb = _pick(branch, s_bc, s_bt, s_ft, s_ft)
    g = tl.load(_pick(branch, g0_ptr, g1_ptr, g2_ptr, g2_ptr)).to(ACC)
    eps = tl.load(eps_ptr)
    if CROSS:
        is_tile = branch < 2
    else:
        is_tile = branch < 0
    if is_tile:
        _tile_weights(a_ptr, sa, b_ptr, sb, t, branch, g, w_ptr, r_ptr, norm_ptr, n, C, RT, eps, BLOCK, BLOCK_K,
                      ACC, PREC, UPCAST)
    else:
        _diag_weights(a_ptr, sa, b_ptr, sb, t, branch, g, w_ptr, r_ptr, norm_ptr, wpos_ptr, rpos_ptr, n, C, RT,
                      eps, BLOCK, BLOCK_K, ACC)


@triton.jit(do_not_specialize=["s_fc", "s_bc", "s_ft", "s_bt"])
def _losses_bwd_grads_kernel(fc_ptr, bc_ptr, ft_ptr, bt_ptr, s_fc, s_bc, s_ft, s_bt,
                             dfc_ptr, dbc_ptr, dft_ptr, dbt_ptr, w_ptr, r_ptr, norm_ptr, wpos_ptr, rpos_ptr,
                             n, C, RT,
                             CROSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    # Program (row block, channel block, matrix mat): mat 0 = fc, 1 = bc, 2 = ft, 3 = bt. "other" is the matrix
    # it is paired with in its negative term (fc <-> bc, ft <-> bt); fc and ft also get the positive term.
    mat = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < n
    c_ok = offs_c < C
    tile_ok = m_ok[:, None] & c_ok[None, :]
    self_ptr = _pick(mat, fc_ptr, bc_ptr, ft_ptr, bt_ptr)
    s_self = _pick(mat, s_fc, s_bc, s_ft, s_bt)
    other_ptr = _pick(mat, bc_ptr, fc_ptr, bt_ptr, ft_ptr)
    s_other = _pick(mat, s_bc, s_fc, s_bt, s_ft)
    out_ptr = _pick(mat, dfc_ptr, dbc_ptr, dft_ptr, dbt_ptr)
    other = mat + 1 - 2 * (mat % 2)
    branch = mat // 2
    transposed = mat % 2  # bc and bt take W^T
    norm_self = tl.load(norm_ptr + mat * n + offs_m, mask=m_ok, other=1.0)
    inv_self = 1.0 / tl.maximum(norm_self, NORM_EPS)
    acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    if CROSS:
        # W rows of this block (or W^T rows: W columns) times the other matrix's normalised rows.
        w_base = w_ptr + branch * n * n
        s_wr = tl.where(transposed == 1, 1, n)
        s_wc = tl.where(transposed == 1, n, 1)
        for j0 in range(0, n, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            j_ok = offs_j < n
            w = tl.load(w_base + offs_m[:, None] * s_wr + offs_j[None, :] * s_wc, mask=m_ok[:, None] & j_ok[None, :],
                        other=0.0)
            inv_o = 1.0 / tl.maximum(tl.load(norm_ptr + other * n + offs_j, mask=j_ok, other=1.0), NORM_EPS)
            o = tl.load(other_ptr + offs_j[:, None] * s_other + offs_c[None, :], mask=j_ok[:, None] & c_ok[None, :],
                        other=0.0).to(ACC) * inv_o[:, None]
            acc = tl.dot(w, o, acc, input_precision=PREC, out_dtype=ACC)
    else:
        w = tl.load(w_ptr + branch * n + offs_m, mask=m_ok, other=0.0)
        inv_o = 1.0 / tl.maximum(tl.load(norm_ptr + other * n + offs_m, mask=m_ok, other=1.0), NORM_EPS)
        o = tl.load(other_ptr + offs_m[:, None] * s_other + offs_c[None, :], mask=tile_ok, other=0.0).to(ACC)
        acc += (w * inv_o)[:, None] * o
    r = tl.zeros([BLOCK_M], ACC)
    for t in range(0, RT):
        r += tl.load(r_ptr + (mat * RT + t) * n + offs_m, mask=m_ok, other=0.0)
    if transposed == 0:
        # Positive term: fc pairs with ft and ft with fc (matrix index 2 - mat).
        partner_ptr = _pick(mat, ft_ptr, ft_ptr, fc_ptr, fc_ptr)
        s_partner = _pick(mat, s_ft, s_ft, s_fc, s_fc)
        wpos = tl.load(wpos_ptr + offs_m, mask=m_ok, other=0.0)
        inv_p = 1.0 / tl.maximum(tl.load(norm_ptr + (2 - mat) * n + offs_m, mask=m_ok, other=1.0), NORM_EPS)
        p = tl.load(partner_ptr + offs_m[:, None] * s_partner + offs_c[None, :], mask=tile_ok, other=0.0).to(ACC)
        acc += (wpos * inv_p)[:, None] * p
        r += tl.load(rpos_ptr + offs_m, mask=m_ok, other=0.0)
    x = tl.load(self_ptr + offs_m[:, None] * s_self + offs_c[None, :], mask=tile_ok, other=0.0).to(ACC)
    # Rows whose norm was clamped have no projection term (u = x / 1e-12 is linear in x there).
    r = tl.where(norm_self >= NORM_EPS, r, 0.0)
    grad = (acc - r[:, None] * (x * inv_self[:, None])) * inv_self[:, None]
    tl.store(out_ptr + offs_m[:, None] * C + offs_c[None, :], grad.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _sum_partials_kernel(partial_ptr, out0_ptr, out1_ptr, out2_ptr, T, BLOCK_T: tl.constexpr):
    # Program b sums row b of the [3, T] partials in a fixed order (deterministic) into loss b.
    b = tl.program_id(0)
    acc = tl.zeros([BLOCK_T], partial_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        acc += tl.load(partial_ptr + b * T + offs, mask=offs < T, other=0.0)
    tl.store(_pick(b, out0_ptr, out1_ptr, out2_ptr, out2_ptr), tl.sum(acc, axis=0))


def _prepare(xs):
    """One dtype for the four inputs; rows may be strided, channels must be contiguous."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    out = []
    for x in xs:
        x = x.to(dtype)
        if x.stride(1) != 1 and x.shape[1] > 1:
            x = x.contiguous()
        out.append(x)
    return out


def _config(dtype, n):
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32/fp64: exact products (no tf32), so the losses match the float64 reference closely.
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    block = 16 if n <= 16 else (32 if n <= 256 or dtype == torch.float64 else 64)
    # The interpreter's tl.dot gives garbage for bf16 operands (Triton 3.9): upcast there; native bf16 on GPUs.
    upcast = _INTERPRET and dtype == torch.bfloat16
    return acc, prec, block, upcast


def _row_stride(x):
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


def _clamp_eps(eps, dtype, device):
    # A Python float reaches a Triton kernel as fp32 (and 1 - eps is then rounded in fp32: 5.8e-7 off in an fp64
    # loss); a one-element tensor of the arithmetic's dtype carries eps exactly. torch.full: no host-device copy.
    return torch.full((1,), eps, dtype=dtype, device=device)


def contrastive_losses_forward(fc, bc, ft, bt, cross: bool, eps: float):
    fc, bc, ft, bt = xs = _prepare([fc, bc, ft, bt])
    n, C = fc.shape
    if n == 0:
        raise ValueError("contrastive_losses: needs at least one row (n = 0)")
    acc, prec, block, upcast = _config(fc.dtype, n)
    tiles = triton.cdiv(n, block)
    T = tiles * tiles if cross else tiles
    partial = torch.empty((3, T), dtype=registration.loss_dtype(fc), device=fc.device)
    _losses_fwd_kernel[(T, 3)](*xs, *(_row_stride(x) for x in xs), partial, n, C, T,
                               _clamp_eps(eps, partial.dtype, fc.device), CROSS=cross,
                               BLOCK=block, BLOCK_K=64, ACC=acc, PREC=prec, UPCAST=upcast)
    losses = tuple(torch.empty((), dtype=partial.dtype, device=fc.device) for _ in range(3))
    _sum_partials_kernel[(3,)](partial, *losses, T, BLOCK_T=max(16, min(1024, triton.next_power_of_2(T))))
    return losses


def contrastive_losses_backward(g_neg_c, g_neg_t, g_pos, fc, bc, ft, bt, cross: bool, eps: float):
    dtypes = [x.dtype for x in (fc, bc, ft, bt)]
    fc, bc, ft, bt = xs = _prepare([fc, bc, ft, bt])
    n, C = fc.shape
    acc, prec, block, upcast = _config(fc.dtype, n)
    acc_t = registration.loss_dtype(fc)
    dev = fc.device
    tiles = triton.cdiv(n, block)
    T = tiles * tiles if cross else tiles
    RT = tiles if cross else 1
    w = torch.empty((2, n, n) if cross else (2, n), dtype=acc_t, device=dev)
    r = torch.empty((4, RT, n), dtype=acc_t, device=dev)
    norms = torch.empty((4, n), dtype=acc_t, device=dev)
    wpos = torch.empty((n,), dtype=acc_t, device=dev)
    rpos = torch.empty((n,), dtype=acc_t, device=dev)
    grads_in = [g.reshape(()).to(acc_t) for g in (g_neg_c, g_neg_t, g_pos)]
    strides = [_row_stride(x) for x in xs]
    _losses_bwd_weights_kernel[(T, 3)](*xs, *strides, *grads_in, w, r, norms, wpos, rpos, n, C, RT,
                                       _clamp_eps(eps, acc_t, dev),
                                       CROSS=cross, BLOCK=block, BLOCK_K=64, ACC=acc, PREC=prec, UPCAST=upcast)
    outs = [torch.empty((n, C), dtype=fc.dtype, device=dev) for _ in range(4)]
    block_c = min(64, max(16, triton.next_power_of_2(C)))
    grid = (tiles, triton.cdiv(C, block_c), 4)
    _losses_bwd_grads_kernel[grid](*xs, *strides, *outs, w, r, norms, wpos, rpos, n, C, RT, CROSS=cross,
                                   BLOCK_M=block, BLOCK_N=block, BLOCK_C=block_c, ACC=acc, PREC="ieee")
    return tuple(o.to(d) for o, d in zip(outs, dtypes))


@torch.library.custom_op("dbc_fast::triton_contrastive_losses", mutates_args=())
def triton_contrastive_losses(fc: torch.Tensor, bc: torch.Tensor, ft: torch.Tensor, bt: torch.Tensor, cross: bool,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return contrastive_losses_forward(fc, bc, ft, bt, cross, eps)


@torch.library.custom_op("dbc_fast::triton_contrastive_losses_backward", mutates_args=())
def triton_contrastive_losses_backward(grad_neg_c: torch.Tensor, grad_neg_t: torch.Tensor, grad_pos: torch.Tensor,
                                       fc: torch.Tensor, bc: torch.Tensor, ft: torch.Tensor, bt: torch.Tensor,
                                       cross: bool, eps: float
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return contrastive_losses_backward(grad_neg_c, grad_neg_t, grad_pos, fc, bc, ft, bt, cross, eps)


registration.register_loss("dbc_fast::triton_", triton_contrastive_losses_backward)
