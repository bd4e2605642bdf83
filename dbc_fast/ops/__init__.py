"""The DBC head's ops behind one API, with selectable backends.

``masked_pool`` and ``contrastive_losses`` take ``backend`` in ``eager | triton | cpp | auto``:
- ``eager``: the PyTorch reference (dbc_fast.ops.eager), any device and dtype;
- ``cpp``: the compiled op library (csrc/): CUDA kernels for CUDA tensors, C++/OpenMP kernels for CPU tensors;
- ``triton``: the Triton kernels (kernels/, dbc_fast.kernels): CUDA tensors, or CPU tensors under
  TRITON_INTERPRET=1;
- ``auto`` picks by what is available for the tensors' device, in this order of preference:
  masked_pool on CUDA with a channels_last feature map: triton > cpp > eager (Triton's 16-byte loads along
  contiguous channels); every other case (NCHW maps on CUDA, the losses, CPU tensors): cpp > triton > eager.
A forced backend that is unavailable raises a RuntimeError that says why. ``available_backends(device)``
lists them with the reasons. cpp and triton are torch.library custom ops (``dbc_fast::masked_pool``,
``dbc_fast::contrastive_losses``, ``dbc_fast::triton_masked_pool``, ``dbc_fast::triton_contrastive_losses``,
each with a ``_backward`` op) with fake kernels and autograd, so torch.compile traces them without graph breaks.
"""
from __future__ import annotations

import torch

from . import eager

BACKEND_NAMES = ("eager", "triton", "cpp", "auto")

# name -> object with masked_pool(feat, masks), contrastive_losses(fc, bc, ft, bt, negatives, eps),
# and available(device) -> (bool, reason). Filled at the end of this module.
_BACKENDS: dict = {}
# (backend name, device type) -> (bool, reason); availability does not change within a process, and a dict
# lookup keeps torch.compile from tracing into library loading.
_AVAILABLE: dict = {}


class _EagerBackend:
    masked_pool = staticmethod(eager.masked_pool)
    contrastive_losses = staticmethod(eager.contrastive_losses)

    @staticmethod
    def available(device: torch.device):
        return True, ""


_BACKENDS["eager"] = _EagerBackend


def _availability(name: str, device: torch.device):
    key = (name, device.type)
    if key not in _AVAILABLE:
        impl = _BACKENDS.get(name)
        _AVAILABLE[key] = (False, "not built into this install of dbc_fast") if impl is None else \
            impl.available(device)
    return _AVAILABLE[key]


def available_backends(device="cpu") -> dict:
    """{name: (available, reason)} of the concrete backends for tensors on ``device``."""
    device = torch.device(device)
    return {name: _availability(name, device) for name in ("eager", "triton", "cpp")}


_DEFAULT_ORDER = ("cpp", "triton", "eager")
_CHANNELS_LAST_CUDA_ORDER = ("triton", "cpp", "eager")


def auto_order(device, feat: torch.Tensor | None = None) -> tuple:
    """The order in which ``auto`` tries the backends: for masked_pool on a channels_last CUDA feature map
    Triton first, else the compiled library first."""
    device = torch.device(device)
    if device.type == "cuda" and feat is not None and feat.dim() == 4 and not feat.is_contiguous() \
            and feat.is_contiguous(memory_format=torch.channels_last):
        return _CHANNELS_LAST_CUDA_ORDER
    return _DEFAULT_ORDER


def _resolve(backend: str, device: torch.device, feat: torch.Tensor | None = None):
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if backend == "auto":
        for name in auto_order(device, feat):
            if _availability(name, device)[0]:
                return _BACKENDS[name]
    ok, why = _availability(backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device.type} tensors: {why}")
    return _BACKENDS[backend]


def masked_pool(feat: torch.Tensor, masks: torch.Tensor, backend: str = "eager"):
    """fg, bg [n,K,C] = GAP(feat * mask), GAP(feat * (1 - mask)) for feat [n,C,h,w], masks [n,K,h,w]."""
    if feat.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"masked_pool wants feat [n,C,h,w] and masks [n,K,h,w], got {tuple(feat.shape)} "
                         f"and {tuple(masks.shape)}")
    if feat.shape[0] != masks.shape[0] or feat.shape[2:] != masks.shape[2:]:
        raise ValueError(f"masked_pool: feat {tuple(feat.shape)} and masks {tuple(masks.shape)} differ in "
                         "batch or spatial size")
    return _resolve(backend, feat.device, feat).masked_pool(feat, masks)


def contrastive_losses(fc, bc, ft, bt, negatives: str = "cross", eps: float = 5e-4, backend: str = "eager"):
    """(L_neg^c, L_neg^t, L_pos) of paper Eq. 11-12 for [n, C] foreground/background vectors."""
    shapes = {tuple(x.shape) for x in (fc, bc, ft, bt)}
    if len(shapes) != 1 or fc.dim() != 2:
        raise ValueError(f"contrastive_losses wants four [n, C] tensors of one shape, got {sorted(shapes)}")
    if negatives not in ("cross", "within"):
        raise ValueError(f"contrastive_losses: negatives must be 'cross' or 'within', got {negatives!r}")
    if not 0 < eps < 0.5:
        raise ValueError(f"contrastive_losses: eps must be in (0, 0.5), got {eps}")
    if fc.shape[0] == 0:
        raise ValueError("contrastive_losses: needs at least one row (n = 0)")
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


def _register_backends():
    from .cpp_backend import CppBackend, _load
    from .triton_backend import TritonBackend

    _load()  # so torch.ops.dbc_fast.* exist (with fakes and autograd) as soon as dbc_fast.ops is imported

    _BACKENDS["cpp"] = CppBackend
    _BACKENDS["triton"] = TritonBackend


_register_backends()
