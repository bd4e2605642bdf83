"""The eager reference of the DBC head's ops against a float64 hand computation of Eq. 8-12."""
import math

import pytest
import torch

from dbc_fast import ops


def test_masked_pool_matches_definition():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    masks = torch.rand(3, 2, 4, 6, generator=g, dtype=torch.float64)
    fg, bg = ops.masked_pool(feat, masks)
    for i in range(3):
        for k in range(2):
            for c in range(5):
                want_fg = sum(feat[i, c, y, x] * masks[i, k, y, x] for y in range(4) for x in range(6)) / 24
                want_bg = sum(feat[i, c, y, x] * (1 - masks[i, k, y, x]) for y in range(4) for x in range(6)) / 24
                assert math.isclose(fg[i, k, c].item(), want_fg.item(), rel_tol=1e-12, abs_tol=1e-12)
                assert math.isclose(bg[i, k, c].item(), want_bg.item(), rel_tol=1e-12, abs_tol=1e-12)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("negatives", ["cross", "within"])
def test_contrastive_losses_match_equations(negatives):
    g = torch.Generator().manual_seed(1)
    n, c, eps = 4, 7, 5e-4
    fc, bc, ft, bt = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(4))
    neg_c, neg_t, pos = ops.contrastive_losses(fc, bc, ft, bt, negatives=negatives, eps=eps)

    def clamp(v):
        return min(max(v, eps), 1 - eps)

    def neg(f, b):
        pairs = [(i, j) for i in range(n) for j in range(n)] if negatives == "cross" else [(i, i) for i in range(n)]
        return -sum(math.log(1 - clamp(_cos(f[i].tolist(), b[j].tolist()))) for i, j in pairs) / len(pairs)

    want_pos = -sum(math.log(clamp(_cos(fc[i].tolist(), ft[i].tolist()))) for i in range(n)) / n
    assert math.isclose(neg_c.item(), neg(fc, bc), rel_tol=1e-10)
    assert math.isclose(neg_t.item(), neg(ft, bt), rel_tol=1e-10)
    assert math.isclose(pos.item(), want_pos, rel_tol=1e-10)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="masked_pool"):
        ops.masked_pool(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 5, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        ops.masked_pool(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 4, 4), backend="nope")
    with pytest.raises(ValueError, match="one shape"):
        ops.contrastive_losses(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
def test_ops_keep_their_precision_under_autocast(backend):
    """Under bf16 autocast the matrix products inside the ops must not drop to bf16: there 1 - eps rounds to 1
    and nearly parallel fg/bg vectors gave log(1 - 1) = -inf, an infinite L_neg and NaN weights after one step
    (seen when training on a GPU). Every backend gives its fp32 result, finite, and fp32 gradients."""
    if not ops.available_backends("cpu")[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {ops.available_backends('cpu')[backend][1]}")
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 256, generator=g)
    fc, bc, ft, bt = (base + 1e-3 * torch.randn(8, 256, generator=g) for _ in range(4))  # cosines ~ 1 - 1e-6
    leaves = [x.clone().requires_grad_() for x in (fc, bc, ft, bt)]
    want = ops.contrastive_losses(fc, bc, ft, bt, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.contrastive_losses(*leaves, backend=backend)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sum(got).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)

    feat = torch.randn(4, 16, 8, 8, generator=g)
    masks = torch.rand(4, 2, 8, 8, generator=g)
    want_fg, want_bg = ops.masked_pool(feat, masks, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fg, bg = ops.masked_pool(feat, masks, backend=backend)
    assert fg.dtype == bg.dtype == torch.float32
    torch.testing.assert_close(fg, want_fg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bg, want_bg, rtol=1e-5, atol=1e-6)
