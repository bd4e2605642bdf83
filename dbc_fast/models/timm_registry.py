"""The Conformer variants as timm models: ``import dbc_fast`` makes ``timm.create_model("conformer_tiny_patch16")``
work, with the official checkpoints' key layout accepted by timm's pretrained loading (checkpoint_filter_fn)."""
from __future__ import annotations

import sys
from typing import List

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import warn
from .conformer import ARCH_CONFIGS, CLASSIFIER_PREFIXES, Conformer
from .pretrained import checkpoint_filter_fn


def _timm_cfg(**kwargs):
    # eval preprocessing of the official repo: resize 256 (bicubic), center crop 224, ImageNet mean/std
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                first_conv="conv1", classifier=CLASSIFIER_PREFIXES, paper_ids="arXiv:2105.03889",
                paper_name="Conformer: Local Features Coupling Global Representations for Visual Recognition",
                origin_url="https://github.com/pengzhiliang/Conformer", **kwargs)


def register_timm_models() -> List[str]:
    """Registers the variants with timm unless another package already owns a name (then warns, keeps it)."""
    from timm.models import build_model_with_cfg, register_model
    from timm.models._registry import generate_default_cfgs, is_model, model_entrypoint

    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs({f"{arch}.in1k": _timm_cfg() for arch in ARCH_CONFIGS})
    registered = []
    for arch in ARCH_CONFIGS:
        if is_model(arch):
            if getattr(model_entrypoint(arch), "__module__", None) != __name__:
                warn(f"timm already has a model named {arch!r} (from "
                              f"{model_entrypoint(arch).__module__}); leaving it in place. Use "
                              f"dbc_fast.create_model or dbc_fast.models.build_conformer for dbc_fast's version.")
            else:  # registered by an earlier import of this module (e.g. a reload)
                setattr(module, arch, model_entrypoint(arch))
            continue

        def entrypoint(pretrained: bool = False, _arch: str = arch, **kwargs) -> Conformer:
            args = dict(ARCH_CONFIGS[_arch], mlp_ratio=4.0, qkv_bias=True)
            args.update(kwargs)
            return build_model_with_cfg(Conformer, _arch, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                        **args)

        entrypoint.__name__ = entrypoint.__qualname__ = arch
        entrypoint.__module__ = __name__
        entrypoint.__doc__ = f"{arch} (official Conformer layout) as a timm model; returns (conv_logits, trans_logits)."
        setattr(module, arch, register_model(entrypoint))
        registered.append(arch)
    return registered


register_timm_models()
