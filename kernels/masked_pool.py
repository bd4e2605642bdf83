"""Triton masked pooling (paper Eq. 8-9): fg/bg GAP vectors of a feature map under K masks, in one pass.

    fg[n,k,c] = sum_p feat[n,c,p] masks[n,k,p] / P,    bg[n,k,c] = sum_p feat[n,c,p] / P - fg[n,k,c]   (P = h*w)

Backward, with G = (grad_fg - grad_bg) / P and S = sum_k grad_bg / P:
    grad_feat[n,c,p] = S[n,c] + sum_k G[n,k,c] masks[n,k,p],    grad_masks[n,k,p] = sum_c G[n,k,c] feat[n,c,p]
also in one pass over feat. Registered as the custom ops ``dbc_fast::triton_masked_pool`` and
``dbc_fast::triton_masked_pool_backward`` (fake kernels and autograd from dbc_fast.ops.registration).

feat may be NCHW-contiguous or channels_last (the kernels take its strides; other layouts are made
contiguous); fp32/fp64/bf16/fp16 with fp32 accumulation (fp64 for fp64). On CPU tensors the kernels run under
the Triton interpreter (TRITON_INTERPRET=1 set before this module is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dbc_fast.ops import registration


@triton.jit
def _pool_fwd_kernel(feat_ptr, masks_ptr, fg_ptr, bg_ptr, C, P, K, s_fn, s_fc, s_fp,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    # One program: image i, a block of channels; walks all positions once for all K masks.
    i = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    c_ok = offs_c < C
    k_ok = offs_k < K
    f_base = feat_ptr + i * s_fn
    m_base = masks_ptr + i * K * P
    acc = tl.zeros([BLOCK_K, BLOCK_C], ACC)
    total = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        f = tl.load(f_base + offs_c[:, None] * s_fc + offs_p[None, :] * s_fp,
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(ACC)
        m = tl.load(m_base + offs_k[:, None] * P + offs_p[None, :], mask=k_ok[:, None] & p_ok[None, :],
                    other=0.0).to(ACC)
        total += tl.sum(f, axis=1)
        acc += tl.sum(f[None, :, :] * m[:, None, :], axis=2)
    fg = acc / P
    bg = total[None, :] / P - fg
    out = i * K * C + offs_k[:, None] * C + offs_c[None, :]
    ok = k_ok[:, None] & c_ok[None, :]
    tl.store(fg_ptr + out, fg.to(fg_ptr.dtype.element_ty), mask=ok)
    tl.store(bg_ptr + out, bg.to(bg_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pool_bwd_kernel(feat_ptr, masks_ptr, gfg_ptr, gbg_ptr, dfeat_ptr, dm_ptr, n, C, P, K, c_per_split,
                     s_fn, s_fc, s_fp, s_dn, s_dc, s_dp,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    # One program: image i, a block of positions, one slice of the channels (split); writes its grad_feat tile
    # and a partial grad_masks (summed over the splits by the caller when there are several).
    i = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    p_ok = offs_p < P
    k_ok = offs_k < K
    m = tl.load(masks_ptr + i * K * P + offs_k[:, None] * P + offs_p[None, :], mask=k_ok[:, None] & p_ok[None, :],
                other=0.0).to(ACC)
    dm = tl.zeros([BLOCK_K, BLOCK_P], ACC)
    c_start = split * c_per_split
    for c0 in range(c_start, c_start + c_per_split, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        g_off = i * K * C + offs_k[:, None] * C + offs_c[None, :]
        g_ok = k_ok[:, None] & c_ok[None, :]
        gf = tl.load(gfg_ptr + g_off, mask=g_ok, other=0.0).to(ACC)
        gb = tl.load(gbg_ptr + g_off, mask=g_ok, other=0.0).to(ACC)
        G = (gf - gb) / P
        S = tl.sum(gb, axis=0) / P
        fc_ok = c_ok[:, None] & p_ok[None, :]
        f = tl.load(feat_ptr + i * s_fn + offs_c[:, None] * s_fc + offs_p[None, :] * s_fp, mask=fc_ok,
                    other=0.0).to(ACC)
        df = tl.sum(G[:, :, None] * m[:, None, :], axis=0) + S[:, None]
        tl.store(dfeat_ptr + i * s_dn + offs_c[:, None] * s_dc + offs_p[None, :] * s_dp,
                 df.to(dfeat_ptr.dtype.element_ty), mask=fc_ok)
        dm += tl.sum(G[:, :, None] * f[None, :, :], axis=1)
    out = ((split * n + i) * K + offs_k[:, None]) * P + offs_p[None, :]
    tl.store(dm_ptr + out, dm, mask=k_ok[:, None] & p_ok[None, :])


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prepare(feat, masks):
    """feat in a layout the kernels walk (NCHW or channels_last), masks contiguous [n,K,P]."""
    if not (feat.is_contiguous() or feat.is_contiguous(memory_format=torch.channels_last)):
        feat = feat.contiguous()
    n, c, h, w = feat.shape
    return feat, masks.contiguous(), (n, c, h * w, masks.shape[1]), (feat.stride(0), feat.stride(1),
                                                                     _position_stride(feat))


def _position_stride(t):
    """Stride of the flat position p = y*w + x of a NCHW- or channels_last-contiguous tensor.

    In both layouts stride_h == w * stride_w, so one stride walks all positions. PyTorch ignores the strides
    of size-1 dims when it calls a tensor contiguous, so for w == 1 stride_w may be anything (e.g.
    ``torch.randn(2, 3, 1, 5).permute(0, 1, 3, 2)``) and stride_h is the one that holds.
    """
    return t.stride(3) if t.shape[3] > 1 else t.stride(2)


def _blocks(C, P, K, channels_inner):
    block_k = triton.next_power_of_2(max(K, 1))
    if channels_inner:  # C is contiguous: wide along channels, a few positions at a time
        block_c = min(128, triton.next_power_of_2(C))
        block_p = 16
    else:  # positions contiguous: whole rows of P, a few channels at a time
        block_p = min(256, triton.next_power_of_2(P))
        block_c = max(1, min(triton.next_power_of_2(C), 2048 // block_p))
    return block_c, block_p, block_k


def masked_pool_forward(feat: torch.Tensor, masks: torch.Tensor):
    feat, masks, (n, C, P, K), (s_fn, s_fc, s_fp) = _prepare(feat, masks)
    fg = torch.empty((n, K, C), dtype=feat.dtype, device=feat.device)
    bg = torch.empty_like(fg)
    if fg.numel() == 0:
        return fg, bg
    if P == 0:
        return fg.zero_(), bg.zero_()
    block_c, block_p, block_k = _blocks(C, P, K, s_fc == 1 and C > 1)
    grid = (n, triton.cdiv(C, block_c))
    _pool_fwd_kernel[grid](feat, masks, fg, bg, C, P, K, s_fn, s_fc, s_fp, BLOCK_C=block_c, BLOCK_P=block_p,
                           BLOCK_K=block_k, ACC=_tl_acc(feat.dtype))
    return fg, bg


def _default_split(n, pblocks, cblocks, device):
    # Enough programs to fill the GPU (a few per multiprocessor); on the interpreter one slice is fastest.
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cblocks, triton.cdiv(target, n * pblocks)))


def masked_pool_backward(grad_fg, grad_bg, feat, masks, split: int | None = None):
    """grad_feat (feat's layout when NCHW or channels_last), grad_masks (masks' dtype, contiguous)."""
    feat, masks_c, (n, C, P, K), (s_fn, s_fc, s_fp) = _prepare(feat, masks)
    grad_feat = torch.empty_like(feat, memory_format=registration.grad_feat_layout(feat))
    acc = _acc_dtype(feat.dtype)
    if feat.numel() == 0 or K == 0:
        return grad_feat.zero_(), torch.zeros(masks.shape, dtype=masks.dtype, device=masks.device)
    channels_inner = s_fc == 1 and C > 1
    block_c, block_p, block_k = _blocks(C, P, K, channels_inner)
    pblocks, cblocks = triton.cdiv(P, block_p), triton.cdiv(C, block_c)
    split = split or _default_split(n, pblocks, cblocks, feat.device)
    blocks_per_split = triton.cdiv(cblocks, min(split, cblocks))
    split = triton.cdiv(cblocks, blocks_per_split)
    # Partial grad_masks per channel slice (no view of a larger buffer is returned when there is one slice).
    dm = torch.empty(((split,) if split > 1 else ()) + tuple(masks.shape), dtype=acc, device=feat.device)
    s_dn, s_dc, s_dp = grad_feat.stride(0), grad_feat.stride(1), _position_stride(grad_feat)
    _pool_bwd_kernel[(n, pblocks, split)](
        feat, masks_c, grad_fg.contiguous(), grad_bg.contiguous(), grad_feat, dm, n, C, P, K,
        blocks_per_split * block_c, s_fn, s_fc, s_fp, s_dn, s_dc, s_dp,
        BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_K=block_k, ACC=_tl_acc(feat.dtype))
    grad_masks = dm if split == 1 else dm.sum(0)
    return grad_feat, grad_masks.to(masks.dtype)


@torch.library.custom_op("dbc_fast::triton_masked_pool", mutates_args=())
def triton_masked_pool(feat: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_pool_forward(feat, masks)


@torch.library.custom_op("dbc_fast::triton_masked_pool_backward", mutates_args=())
def triton_masked_pool_backward(grad_fg: torch.Tensor, grad_bg: torch.Tensor, feat: torch.Tensor,
                                masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return masked_pool_backward(grad_fg, grad_bg, feat, masks)


registration.register_pool("dbc_fast::triton_", triton_masked_pool_backward)
