"""Loading official Conformer ImageNet checkpoints (and a few layouts derived from them) with strict checks.

Accepted files (``torch.load``-able):
* the official release: ``{"model": state_dict}`` or a bare state_dict (keys as pengzhiliang/Conformer);
* the same wrapped as ``{"state_dict": ...}`` / ``{"model_ema": ...}``, or with a DDP ``module.`` prefix;
* the mmpretrain layout (``backbone.*`` with ``ln1``/``ffn.layers`` names, heads under ``head.*``);
* for a DBC model: a full DBC state_dict of the same model (``backbone.*`` plus the DBC head).
Everything else, or a checkpoint of another variant, raises ValueError naming the mismatching keys/shapes.
"""
from __future__ import annotations

import functools
import os
import pickle
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import warn
from .conformer import ARCH_CONFIGS, CLASSIFIER_PREFIXES, Conformer, build_conformer


_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")

# mmpretrain's TransformerEncoderLayer names -> the official Block names
_MM_RENAMES = ((".ln1.", ".norm1."), (".ln2.", ".norm2."), (".ffn.layers.0.0.", ".mlp.fc1."),
               (".ffn.layers.1.", ".mlp.fc2."))


def read_checkpoint_file(path: str, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain types only; a pickled object (which would run
    code to load) is refused, never executed. FileNotFoundError / ValueError name the file and the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file, truncated, or pickled objects weights_only refuses
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        if isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower():
            detail = next(ln for ln in lines if "global" in ln.lower())
            raise ValueError(f"refusing {path}: it holds pickled objects other than tensors and plain types, "
                             f"which would run code to load ({detail[:200]})") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load failed: {type(err).__name__}: "
                         f"{lines[0] if lines else ''})") from err


def extract_state_dict(obj, path: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint object (unwrapping ``model``/``state_dict``/... entries)."""
    for _ in range(3):
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state_dict (got {type(obj).__name__}"
                         f"{' with keys ' + str(sorted(obj)[:8]) if isinstance(obj, dict) else ''})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} does not hold a state_dict: {len(bad)} entries are not tensors, e.g. "
                         f"{bad[:5]}")
    return dict(obj)


def convert_to_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Maps DDP (``module.``) and mmpretrain (``backbone.``/``head.``) layouts to the official key names."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    is_mm = any(k.startswith("backbone.") for k in sd) and any(
        ".ffn.layers." in k or k.startswith("head.") for k in sd)
    if not is_mm:
        return sd
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            k = k[len("backbone."):]
            if k.startswith("trans_1.") or ".trans_block." in k:
                for old, new in _MM_RENAMES:
                    k = k.replace(old, new)
        elif k.startswith("head."):
            k = k[len("head."):]
        out[k] = v
    return out


def _shape(t) -> List[int]:
    return list(t.shape)


def _compare(sd: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], skip_prefixes: Tuple[str, ...] = ()):
    """(missing, unexpected, shape mismatches [(key, ckpt shape, model shape)]) ignoring skip_prefixes."""
    def keep(k):
        return not k.startswith(skip_prefixes) if skip_prefixes else True
    missing = sorted(k for k in ref if k not in sd and keep(k))
    unexpected = sorted(k for k in sd if k not in ref and keep(k))
    shapes = sorted((k, _shape(sd[k]), _shape(ref[k])) for k in sd
                    if k in ref and keep(k) and sd[k].shape != ref[k].shape)
    return missing, unexpected, shapes


@functools.lru_cache(maxsize=None)
def _reference_state(arch: str) -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_conformer(arch, num_classes=1000).state_dict()


def guess_arch(sd: Dict[str, torch.Tensor]) -> Optional[str]:
    """Which registered variant has exactly the checkpoint's keys and (non-classifier) shapes, or None."""
    for arch in ARCH_CONFIGS:
        missing, unexpected, shapes = _compare(sd, _reference_state(arch), CLASSIFIER_PREFIXES)
        head_ok = all(k in sd and sd[k].dim() == 2 and sd[k].shape[1] == v.shape[1]
                      for k, v in _reference_state(arch).items() if k.endswith("cls_head.weight"))
        if not (missing or unexpected or shapes) and head_ok:
            return arch
    return None


def _mismatch_message(path: str, target: str, missing, unexpected, shapes, sd) -> str:
    lines = [f"{path} does not match {target}:"]
    if missing:
        lines.append(f"  {len(missing)} key(s) missing from the checkpoint, e.g. {missing[:4]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s) in the checkpoint, e.g. {unexpected[:4]}")
    if shapes:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in shapes[:4])
        lines.append(f"  {len(shapes)} shape mismatch(es), e.g. {shown}")
    guess = guess_arch(sd)
    if guess is not None:
        lines.append(f"  the checkpoint looks like {guess}")
    return "\n".join(lines)


def _arch_name(backbone: Conformer) -> str:
    for arch, cfg in ARCH_CONFIGS.items():
        if (backbone.patch_size == cfg["patch_size"] and backbone.embed_dim == cfg["embed_dim"]
                and backbone.conv_cls_head.in_features == 256 * cfg["channel_ratio"]):
            return arch
    return "this Conformer"


def load_backbone_state(backbone: Conformer, sd: Dict[str, torch.Tensor], path: str = "<checkpoint>") -> List[str]:
    """Strictly loads official-layout weights into ``backbone``; returns the re-initialised head names.

    The classifier heads are kept at their fresh initialisation when the checkpoint's class count differs
    from the model's (a warning says so); every other key and shape must match exactly.
    """
    sd = convert_to_official(sd)
    ref = backbone.state_dict()
    target = _arch_name(backbone)
    missing, unexpected, shapes = _compare(sd, ref, CLASSIFIER_PREFIXES)
    if missing or unexpected or shapes:
        raise ValueError(_mismatch_message(path, target, missing, unexpected, shapes, sd))
    head_keys = [k for k in ref if k.startswith(CLASSIFIER_PREFIXES)]
    missing_h, unexpected_h, _ = _compare({k: v for k, v in sd.items() if k.startswith(CLASSIFIER_PREFIXES)},
                                          {k: ref[k] for k in head_keys})
    if missing_h or unexpected_h:
        raise ValueError(_mismatch_message(path, target, missing_h, unexpected_h, [], sd))
    # A head is re-initialised when the checkpoint's differs only in the class count (fine-tuning on another
    # label set) or when the model replaced it by a TS-CAM conv head; any other difference is an error.
    reinit: List[str] = []
    to_load = dict(sd)
    for head in CLASSIFIER_PREFIXES:
        keys = [k for k in head_keys if k.startswith(head + ".")]
        if all(sd[k].shape == ref[k].shape for k in keys):
            continue
        conv_head = isinstance(getattr(backbone, head), nn.Conv2d)
        class_count_only = all(sd[k].dim() == ref[k].dim() and sd[k].shape[1:] == ref[k].shape[1:] for k in keys)
        if not (conv_head or class_count_only):
            shapes = [(k, _shape(sd[k]), _shape(ref[k])) for k in keys if sd[k].shape != ref[k].shape]
            raise ValueError(_mismatch_message(path, target, [], [], shapes, sd))
        for k in keys:
            del to_load[k]
        reinit.append(f"{head} (checkpoint {_shape(sd[keys[0]])}, model {_shape(ref[keys[0]])})")
    if reinit:
        msg = (f"{path}: the model has {backbone.num_classes} classes; re-initialised {', '.join(reinit)}; "
               f"all other weights loaded")
        warn(msg, stacklevel=3)
    result = backbone.load_state_dict(to_load, strict=False)
    if set(result.missing_keys) - (set(sd) - set(to_load)) or result.unexpected_keys:  # cannot happen after the checks above; kept as a guard
        raise ValueError(f"{path}: unexpected load result {result}")
    return reinit


def load_pretrained(model: nn.Module, path: str) -> nn.Module:
    """Loads an official Conformer ImageNet checkpoint into a Conformer backbone or a DBC model.

    ``path``: a file with ``{"model": state_dict}`` or a bare state_dict in the official layout (also the
    mmpretrain layout, DDP ``module.`` prefixes, and, for a DBC model, its own full state_dict). Keys and
    shapes are checked strictly; the two classifier heads are re-initialised (with a warning) when the class
    count differs. Raises ValueError naming the mismatching keys/shapes for any other file. Returns model.
    """
    path = os.fspath(path)
    sd = extract_state_dict(read_checkpoint_file(path), path)
    backbone = model if isinstance(model, Conformer) else getattr(model, "backbone", None)
    if not isinstance(backbone, Conformer):
        raise TypeError(f"load_pretrained wants a Conformer or a DBC model, got {type(model).__name__}")
    if backbone is not model:
        own = model.state_dict()
        plain = {k[len("module."):]: v for k, v in sd.items()} if all(k.startswith("module.") for k in sd) else sd
        if set(plain) == set(own):  # the DBC model's own full state_dict (e.g. from training)
            _, _, shapes = _compare(plain, own)
            if shapes:
                raise ValueError(_mismatch_message(path, f"this {type(model).__name__}", [], [], shapes, {}))
            model.load_state_dict(plain, strict=True)
            return model
    load_backbone_state(backbone, sd, path)
    return model


def checkpoint_filter_fn(state_dict, model: Conformer) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: unwraps and converts a checkpoint to the official layout."""
    return convert_to_official(extract_state_dict(state_dict))
