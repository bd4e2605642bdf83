"""dbc_fast: dual-branch contrastive weakly supervised object localization (DBC) on Conformer."""
__version__ = "0.1.0"

from . import ops  # noqa: F401
