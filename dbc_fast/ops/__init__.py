"""The DBC head's ops behind one API, with selectable backends.

``masked_pool`` and ``contrastive_losses`` take ``backend`` in ``eager | triton | cpp | auto``.
``auto`` picks cpp > triton > eager by what is available for the tensors' device. A forced backend that
is unavailable raises a clear error. Backends register themselves in ``_BACKENDS``.
"""
from __future__ import annotations

import torch

from . import eager

BACKEND_NAMES = ("eager", "triton", "cpp", "auto")

# name -> object with masked_pool(feat, masks), contrastive_losses(fc, bc, ft, bt, negatives, eps),
# and available(device) -> (bool, reason). Filled by dbc_fast.ops.backends.
_BACKENDS: dict = {}


class _EagerBackend:
    masked_pool = staticmethod(eager.masked_pool)
    contrastive_losses = staticmethod(eager.contrastive_losses)

    @staticmethod
    def available(device: torch.device):
        return True, ""


_BACKENDS["eager"] = _EagerBackend


def _resolve(backend: str, device: torch.device):
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if backend == "auto":
        for name in ("cpp", "triton", "eager"):
            impl = _BACKENDS.get(name)
            if impl is not None and impl.available(device)[0]:
                return impl
    impl = _BACKENDS.get(backend)
    if impl is None:
        raise RuntimeError(f"backend {backend!r} is not built into this install of dbc_fast")
    ok, why = impl.available(device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device.type} tensors: {why}")
    return impl


def masked_pool(feat: torch.Tensor, masks: torch.Tensor, backend: str = "eager"):
    """fg, bg [n,K,C] = GAP(feat * mask), GAP(feat * (1 - mask)) for feat [n,C,h,w], masks [n,K,h,w]."""
    if feat.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"masked_pool wants feat [n,C,h,w] and masks [n,K,h,w], got {tuple(feat.shape)} "
                         f"and {tuple(masks.shape)}")
    if feat.shape[0] != masks.shape[0] or feat.shape[2:] != masks.shape[2:]:
        raise ValueError(f"masked_pool: feat {tuple(feat.shape)} and masks {tuple(masks.shape)} differ in "
                         "batch or spatial size")
    return _resolve(backend, feat.device).masked_pool(feat, masks)


def contrastive_losses(fc, bc, ft, bt, negatives: str = "cross", eps: float = 5e-4, backend: str = "eager"):
    """(L_neg^c, L_neg^t, L_pos) of paper Eq. 11-12 for [n, C] foreground/background vectors."""
    shapes = {tuple(x.shape) for x in (fc, bc, ft, bt)}
    if len(shapes) != 1 or fc.dim() != 2:
        raise ValueError(f"contrastive_losses wants four [n, C] tensors of one shape, got {sorted(shapes)}")
    return _resolve(backend, fc.device).contrastive_losses(fc, bc, ft, bt, negatives=negatives, eps=eps)


def library_path():
    """Path of the compiled op library (``dbc_fast/_C*.so``), or None when it was not built.

    Load it with ``torch.ops.load_library(path)`` in Python, or dlopen it next to libtorch in C++.
    """
    import glob
    import os

    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C*.so")))
    return found[0] if found else None


_LIBRARY_LOADED = False


def load_library() -> bool:
    """Loads the op library once; returns False when it was not built."""
    global _LIBRARY_LOADED
    if not _LIBRARY_LOADED:
        path = library_path()
        if path is None:
            return False
        torch.ops.load_library(path)
        _LIBRARY_LOADED = True
    return True
