"""The "triton" backend: the Triton kernels of dbc_fast.kernels (CUDA tensors; CPU tensors under the interpreter).

Triton is optional: when it cannot be imported the backend reports itself unavailable with the reason.
TRITON_INTERPRET=1 must be set before the kernels are imported for CPU tensors to be served.
"""
from __future__ import annotations

import os

import torch

_STATE = {"loaded": None, "reason": "", "interpret": False}


def _load():
    if _STATE["loaded"] is None:
        try:
            import triton  # noqa: F401

            from dbc_fast.kernels import contrastive, masked_pool  # noqa: F401  (registers the ops)

            _STATE["loaded"] = True
            _STATE["interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
        except ImportError as err:
            _STATE["loaded"], _STATE["reason"] = False, f"triton cannot be imported ({err})"
    return _STATE["loaded"], _STATE["reason"]


class TritonBackend:
    @staticmethod
    def available(device: torch.device):
        ok, why = _load()
        if not ok:
            return False, why
        if _STATE["interpret"]:
            if device.type == "cpu":
                return True, ""
            return False, "TRITON_INTERPRET=1 was set when the kernels were imported: only CPU tensors are served"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "CUDA is not available"
            return True, ""
        if device.type == "cpu":
            return False, ("Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before "
                           "importing dbc_fast")
        return False, f"no Triton kernels for {device.type} tensors"

    @staticmethod
    def masked_pool(feat, masks):
        return torch.ops.dbc_fast.triton_masked_pool(feat, masks)

    @staticmethod
    def contrastive_losses(fc, bc, ft, bt, negatives="cross", eps=5e-4):
        return torch.ops.dbc_fast.triton_contrastive_losses(fc, bc, ft, bt, negatives == "cross", float(eps))
