"""Eager PyTorch reference for the DBC head's ops (paper Eq. 8-12).

Every faster backend is tested against these functions evaluated in float64.
"""
import torch
import torch.nn.functional as F

# Row norms are clamped here before dividing (as F.normalize does), so an all-zero vector has cosine 0.
NORM_EPS = 1e-12


def _without_autocast(fn):
    """Run ``fn`` with autocast off: these functions choose their own precision (fp32 accumulation). Under
    autocast the matrix products would come out in bf16/fp16, where 1 - eps rounds to 1 and log(1 - cos) is
    -inf for nearly parallel vectors."""
    def wrapper(*args, **kwargs):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        if not torch.amp.is_autocast_available(device):  # e.g. meta tensors: nothing to turn off
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fn.__name__, fn.__doc__, fn
    return wrapper


@_without_autocast
def masked_pool(feat: torch.Tensor, masks: torch.Tensor):
    """Foreground/background GAP of ``feat`` [n,C,h,w] under each of ``masks`` [n,K,h,w].

    fg[n,k,c] = sum_hw feat[n,c] * masks[n,k] / (h*w);  bg = GAP(feat) - fg = GAP(feat * (1 - mask)).
    GAP divides by h*w, never by the mask's sum (Eq. 8-9). Accumulates in fp32 at least.
    """
    n, c, h, w = feat.shape
    acc = torch.promote_types(feat.dtype, torch.float32)
    f = feat.reshape(n, c, h * w).to(acc)
    m = masks.reshape(n, masks.shape[1], h * w).to(acc)
    fg = torch.bmm(m, f.transpose(1, 2)) / (h * w)  # [n,K,C]
    gap = f.mean(dim=2)  # [n,C]
    bg = gap.unsqueeze(1) - fg
    return fg.to(feat.dtype), bg.to(feat.dtype)


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1, eps=NORM_EPS) @ F.normalize(b, dim=1, eps=NORM_EPS).t()


@_without_autocast
def contrastive_losses(fc, bc, ft, bt, negatives: str = "cross", eps: float = 5e-4):
    """(L_neg^c, L_neg^t, L_pos) of Eq. 11-12, cosines clamped to [eps, 1 - eps].

    negatives="cross": mean over all n x n (i, j) pairs (Eq. 11); "within": the i = j pairs only.
    Inputs are [n, C]; the losses are fp32 scalars (fp64 for fp64 inputs).
    """
    if negatives not in ("cross", "within"):
        raise ValueError(f"negatives must be 'cross' or 'within', got {negatives!r}")
    acc = torch.promote_types(fc.dtype, torch.float32)
    fc, bc, ft, bt = (x.to(acc) for x in (fc, bc, ft, bt))

    def neg(f, b):
        if negatives == "cross":
            cos = _cosine_matrix(f, b)
        else:
            cos = (F.normalize(f, dim=1, eps=NORM_EPS) * F.normalize(b, dim=1, eps=NORM_EPS)).sum(1)
        return -torch.log(1 - cos.clamp(eps, 1 - eps)).mean()

    pos_cos = (F.normalize(fc, dim=1, eps=NORM_EPS) * F.normalize(ft, dim=1, eps=NORM_EPS)).sum(1)
    loss_pos = -torch.log(pos_cos.clamp(eps, 1 - eps)).mean()
    return neg(fc, bc), neg(ft, bt), loss_pos
