"""Training, evaluation and prediction: the engine behind `dbc-fast train | eval | predict`."""
from .checkpoint import load_checkpoint, load_model, save_atomic  # noqa: F401
