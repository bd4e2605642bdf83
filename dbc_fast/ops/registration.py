"""Fake (meta) kernels and autograd for the DBC head's custom ops, shared by the cpp and Triton backends.

Both backends expose four ops with the same schemas under their own names (``{prefix}masked_pool``,
``{prefix}masked_pool_backward``, ``{prefix}contrastive_losses``, ``{prefix}contrastive_losses_backward``);
``register_pool`` and ``register_loss`` give the forward ops their fakes and autograd formula (the backward ops' own
kernels), so torch.compile traces them without graph breaks.
"""
from __future__ import annotations

import torch


def _fake_masked_pool(feat, masks):
    n, c = feat.shape[0], feat.shape[1]
    k = masks.shape[1]
    return feat.new_empty((n, k, c)), feat.new_empty((n, k, c))


def grad_feat_layout(feat):
    # The kernels walk channels_last tensors as they are and give their grads in that layout; others contiguous.
    if not feat.is_contiguous() and feat.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fake_masked_pool_backward(grad_fg, grad_bg, feat, masks):
    grad_feat = torch.empty_like(feat, memory_format=grad_feat_layout(feat))
    return grad_feat, torch.empty(masks.shape, dtype=masks.dtype, device=masks.device)


def loss_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_contrastive_losses(fc, bc, ft, bt, cross, eps):
    return tuple(fc.new_empty((), dtype=loss_dtype(fc)) for _ in range(3))


def _fake_contrastive_losses_backward(g_neg_c, g_neg_t, g_pos, fc, bc, ft, bt, cross, eps):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (fc, bc, ft, bt))


def _pool_setup_context(ctx, inputs, output):
    feat, masks = inputs
    ctx.save_for_backward(feat, masks)


def _pool_backward(op_backward):
    def backward(ctx, grad_fg, grad_bg):
        feat, masks = ctx.saved_tensors
        shape = (feat.shape[0], masks.shape[1], feat.shape[1])
        if grad_fg is None:
            grad_fg = feat.new_zeros(shape)
        if grad_bg is None:
            grad_bg = feat.new_zeros(shape)
        grad_feat, grad_masks = op_backward(grad_fg, grad_bg, feat, masks)
        return grad_feat, grad_masks

    return backward


def _loss_setup_context(ctx, inputs, output):
    fc, bc, ft, bt, cross, eps = inputs
    ctx.save_for_backward(fc, bc, ft, bt)
    ctx.cross, ctx.eps = cross, eps


def _loss_backward(op_backward):
    def backward(ctx, g_neg_c, g_neg_t, g_pos):
        fc, bc, ft, bt = ctx.saved_tensors
        grads = [g if g is not None else fc.new_zeros((), dtype=loss_dtype(fc)) for g in (g_neg_c, g_neg_t, g_pos)]
        d_fc, d_bc, d_ft, d_bt = op_backward(*grads, fc, bc, ft, bt, ctx.cross, ctx.eps)
        return d_fc, d_bc, d_ft, d_bt, None, None

    return backward


def register_pool(prefix: str, pool_backward):
    """Fakes for ``{prefix}masked_pool`` (+ ``_backward``) and the forward op's autograd (the backward op)."""
    torch.library.register_fake(f"{prefix}masked_pool")(_fake_masked_pool)
    torch.library.register_fake(f"{prefix}masked_pool_backward")(_fake_masked_pool_backward)
    torch.library.register_autograd(f"{prefix}masked_pool", _pool_backward(pool_backward),
                                    setup_context=_pool_setup_context)


def register_loss(prefix: str, loss_backward):
    """Fakes for ``{prefix}contrastive_losses`` (+ ``_backward``) and the forward op's autograd."""
    torch.library.register_fake(f"{prefix}contrastive_losses")(_fake_contrastive_losses)
    torch.library.register_fake(f"{prefix}contrastive_losses_backward")(_fake_contrastive_losses_backward)
    torch.library.register_autograd(f"{prefix}contrastive_losses", _loss_backward(loss_backward),
                                    setup_context=_loss_setup_context)
