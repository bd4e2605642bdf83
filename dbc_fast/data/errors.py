"""The one exception type for bad dataset input."""
from __future__ import annotations


class DatasetError(ValueError):
    """Bad dataset input: says which file (and line, where there is one) and what is wrong.

    `path` and `line` are kept as attributes so callers (e.g. the trainer's skip logic) can report them.
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
