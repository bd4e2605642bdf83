"""dbc_fast: dual-branch contrastive weakly supervised object localization (DBC) on Conformer."""
__version__ = "0.1.0"

from . import ops  # noqa: F401
from . import models  # noqa: F401  (also registers the Conformer variants with timm)
from .models import create_model, list_models, load_pretrained  # noqa: F401
