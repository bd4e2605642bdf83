"""Models: the Conformer backbone (official layout, timm-registered) and the DBC model with its baselines."""
from .conformer import ARCH_CONFIGS, Conformer, build_conformer
from .dbc import DEFAULT_OPTIONS, METHODS, DBCModel, create_model, minmax_normalize
from .pretrained import load_pretrained
from . import timm_registry  # noqa: F401  (registers the Conformer variants with timm)


def list_models():
    """Names of the supported Conformer variants (each also a timm model name)."""
    return list(ARCH_CONFIGS)


__all__ = ["ARCH_CONFIGS", "Conformer", "build_conformer", "DEFAULT_OPTIONS", "METHODS", "DBCModel",
           "create_model", "minmax_normalize", "load_pretrained", "list_models"]
