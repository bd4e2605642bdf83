"""Process-group helpers for torchrun / DistributedDataParallel.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` reads them (nothing to do
when they are absent: a single process). NCCL on CUDA, gloo on CPU. Only rank 0 writes files and logs.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import require_cuda


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> torch.device:
    """Initialises the process group from torchrun's environment (if any); returns this process's device."""
    if device == "cuda":
        require_cuda()
    if env_world_size() > 1 and not is_distributed():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def cleanup() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return t.cuda()
    return t.cpu()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (a copy; `t` itself is left as it is)."""
    if not is_distributed():
        return t.clone()
    out = _comm_device(t.detach().clone())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_max(value: int) -> int:
    if not is_distributed():
        return value
    t = _comm_device(torch.tensor([value], dtype=torch.int64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj) -> list:
    """List of `obj` from every rank, in rank order (every rank gets the list)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
