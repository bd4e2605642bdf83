"""The user's mistakes and the product's warnings: one error type and one warning channel for the whole package.

A `UserError` is bad input that its message fully explains (which option, file or line, and what is wrong): the
command line prints it on one line, without a traceback, and exits with `EXIT_USER_ERROR` (see `dbc_fast.cli`).
Anything else that escapes is a bug and keeps its traceback.

`warn(message)` is the one way to warn: a standard `warnings.warn` of category `DBCFastWarning`, so library users
filter or catch it as usual; the command line shows it as one `dbc-fast: warning: ...` line on the main process.
"""
from __future__ import annotations

import warnings

EXIT_USER_ERROR = 1  # bad input (a UserError)
EXIT_USAGE = 2  # a bad command line (argparse's code)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class UserError(Exception):
    """Bad input; the message says what is wrong and where."""


class DatasetError(UserError, ValueError):
    """Bad dataset input: says which file (and line, where there is one) and what is wrong.

    `path`, `line` and `reason` are kept as attributes so callers (e.g. the trainer's skip logic) can report them.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}, line {line}"
            where += ": "
        super().__init__(where + message)


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or not a dbc_fast checkpoint (the message names the file)."""


class ExportError(UserError, ValueError):
    """Export options that cannot work, or a file that is not a dbc_fast export."""


class DALIUnavailableError(UserError, ImportError):
    """`--loader dali` asked for but DALI is not installed; the message says how to install it."""


class DeviceUnavailableError(UserError):
    """`--device cuda` on a machine where torch sees no CUDA device."""


class DBCFastWarning(UserWarning):
    """Something the user should know that does not stop the work (skipped images, clipped boxes, ...)."""


def warn(message: str, stacklevel: int = 2) -> None:
    warnings.warn(message, DBCFastWarning, stacklevel=stacklevel + 1)


def require_cuda(what: str = "--device cuda") -> None:
    """Stop with a DeviceUnavailableError when torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{what}: cuda was asked for but torch sees no CUDA device (use --device cpu)")
