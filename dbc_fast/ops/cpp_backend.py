"""The "cpp" backend: the compiled op library (csrc/), CUDA kernels on CUDA tensors and C++ kernels on CPU.

The ops are defined in C++ (``dbc_fast::masked_pool``, ``dbc_fast::masked_pool_backward``,
``dbc_fast::contrastive_losses``, ``dbc_fast::contrastive_losses_backward``); this module registers their
fake (meta) kernels and their autograd formula, so torch.compile traces them without graph breaks.
"""
from __future__ import annotations

import torch

from . import registration

_STATE = {"loaded": None, "reason": ""}


def _load():
    """Loads the library and registers fakes/autograd once; returns (ok, reason)."""
    if _STATE["loaded"] is None:
        from . import library_path, load_library

        try:
            if not load_library():
                _STATE["loaded"], _STATE["reason"] = False, (
                    "the op library dbc_fast/_C.so was not built (reinstall with a C++ compiler: "
                    "pip install --no-build-isolation -e .)")
            elif not hasattr(torch.ops.dbc_fast, "masked_pool") or not hasattr(torch.ops.dbc_fast,
                                                                             "contrastive_losses"):
                _STATE["loaded"], _STATE["reason"] = False, (
                    f"the op library {library_path()} has no masked_pool/contrastive_losses ops (stale build?)")
            else:
                ops = torch.ops.dbc_fast
                registration.register_pool("dbc_fast::", ops.masked_pool_backward.default)
                registration.register_loss("dbc_fast::", ops.contrastive_losses_backward.default)
                _STATE["loaded"] = True
        except (OSError, RuntimeError) as err:  # a broken or ABI-mismatched library
            _STATE["loaded"], _STATE["reason"] = False, f"loading the op library failed: {err}"
    return _STATE["loaded"], _STATE["reason"]


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("dbc_fast::masked_pool", "CUDA")


class CppBackend:
    @staticmethod
    def available(device: torch.device):
        ok, why = _load()
        if not ok:
            return False, why
        if device.type == "cpu":
            return True, ""
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "CUDA is not available"
            if not _has_cuda_kernels():
                return False, ("the op library was built without CUDA kernels (no nvcc matching torch's CUDA "
                               "at build time; see install.sh)")
            return True, ""
        return False, f"no kernels for {device.type} tensors (only cpu and cuda)"

    @staticmethod
    def masked_pool(feat, masks):
        return torch.ops.dbc_fast.masked_pool(feat, masks)

    @staticmethod
    def contrastive_losses(fc, bc, ft, bt, negatives="cross", eps=5e-4):
        dtype = fc.dtype
        for x in (bc, ft, bt):
            dtype = torch.promote_types(dtype, x.dtype)
        fc, bc, ft, bt = (x.to(dtype) for x in (fc, bc, ft, bt))
        return torch.ops.dbc_fast.contrastive_losses(fc, bc, ft, bt, negatives == "cross", float(eps))
