"""Checkpoints: written atomically, holding everything needed to resume a run exactly.

File layout (a dict saved with torch.save):
  model        the model's state_dict (never the DDP / torch.compile wrapper's)
  optimizer    optimizer state_dict          scheduler   LR scheduler state_dict
  epoch        epochs fully done before this checkpoint (the epoch a resumed run starts in)
  step         batches already done inside `epoch` (0 at an epoch boundary; >0 for a mid-epoch checkpoint)
  global_step  optimizer steps done since the start of the run
  rng          list with one entry per rank: python, numpy, torch CPU and CUDA generator states, as tensors
  best_metric  best validation Top-1 Loc so far (percent) and its epoch
  config       arch, num_classes, method, model_options, img_size, class_names, dataset, ... (what
               `load_model` needs to rebuild the model without the training command line)
  train_args   the training options, so a resumed run can warn when they differ
  meters       the running sums of the epoch in progress (mid-epoch checkpoints)

Only tensors and plain JSON-able values (dict, list, str, int, float, bool, None) are saved, and every
checkpoint is read with `torch.load(weights_only=True)`: a file that would need to run code to load (a
pickled object, e.g. a malicious payload) is refused with a CheckpointError, never executed.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import atomic_write
from ..models.pretrained import read_checkpoint_file


def rng_state() -> dict:
    """Every RNG state as tensors (int64), so the checkpoint loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": [int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = [int(v) for v in state["python"].tolist()]
    random.setstate((py[0], tuple(py[1:]), state["python_gauss"]))
    pos, has_gauss, cached = state["numpy_extra"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            torch.cuda.set_rng_state(cuda_states[0])


def plain(value):
    """`value` as JSON-able data (tuples become lists, other objects their str): safe to save in a checkpoint."""
    return json.loads(json.dumps(value, default=str))


def save_atomic(obj, path: str) -> None:
    """torch.save through files.atomic_write: a crash never leaves a truncated checkpoint (the previous one stays
    until the new one is complete); a full disk is said in one line."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = os.path.dirname(os.path.abspath(path))
            raise CheckpointError(f"cannot write checkpoint {path}: no space left on the device of {folder} "
                                  f"(the previous {os.path.basename(path)}, if any, is kept)") from e
        raise


def link_or_copy(src: str, dst: str) -> None:
    """Atomically makes `dst` the same content as `src`: a hard link when the file system allows (no copy;
    `save_atomic` later replaces `src` by a new file, so `dst` keeps this content), else a copy."""
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, write)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    try:
        ckpt = read_checkpoint_file(path, map_location=map_location)
    except (FileNotFoundError, ValueError) as e:  # missing, not a torch file, or holding pickled objects
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a dbc_fast checkpoint (expected a dict with 'model' and 'config'; "
                         f"for an official Conformer ImageNet checkpoint use --pretrained)")
    return ckpt


def model_config(model, img_size: int, class_names, dataset: str, **extra) -> dict:
    """The checkpoint's `config`: what `load_model` needs to rebuild `model` for inference."""
    options = dict(getattr(model, "options", {}) or {})
    options.pop("pretrained", None)  # the weights are in the checkpoint itself
    config = {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "method": model.method,
        "model_options": options,
        "img_size": int(img_size),
        "class_names": list(class_names),
        "dataset": dataset,
    }
    config.update(extra)
    return plain(config)


def build_model_from_config(config: dict):
    import dbc_fast

    options = dict(config.get("model_options", {}))
    options.pop("pretrained", None)
    return dbc_fast.create_model(config["arch"], config["num_classes"], method=config["method"], **options)


def load_model(path: str, device="cpu"):
    """(model, config) from a dbc_fast checkpoint; the model is on `device`, in eval mode."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    model = build_model_from_config(config)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match {config['arch']}/{config['method']}: "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    model.to(device).eval()
    return model, config
