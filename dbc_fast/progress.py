"""Progress of long work (training epochs, evaluation, decoding, loader benchmarks, prediction).

On a terminal: a tqdm bar. Elsewhere (a log file, a pipe, a batch job): a plain line every
DBC_FAST_PROGRESS_SECONDS seconds (default 30) with the count, the rate and the ETA, and a last line at the
end, because a bar's carriage returns fill log files with thousands of overwritten lines.

While a bar is on the screen, Python warnings and `write` go through tqdm.write, which clears the bar, prints
the line and redraws the bar below it, so no message is cut by a bar or a bar by a message.
"""
from __future__ import annotations

import io
import os
import sys
import time
import warnings

DEFAULT_SECONDS = 30.0


def plain_interval() -> float:
    """Seconds between plain progress lines (DBC_FAST_PROGRESS_SECONDS; 0: a line at every update)."""
    value = os.environ.get("DBC_FAST_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def write(message: str, file=None) -> None:
    """Print one line without breaking a progress bar that is on the screen."""
    from tqdm import tqdm

    tqdm.write(message, file=file or sys.stderr)
    (file or sys.stderr).flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`total` units of work named `desc`: update(n) after each piece, set_postfix(...) for figures such as
    the loss, close() at the end (or use it as a context manager). enabled=False shows nothing."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 file=None, every: float | None = None):
        self.file = file or sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self.enabled = enabled
        self.every = plain_interval() if every is None else every
        self._postfix: dict = {}
        self._t0 = time.monotonic()
        self._next_line = self._t0 + self.every
        self._bar = None
        self._showwarning = None
        if enabled and _is_terminal(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.file)
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._warning_through_bar

    def _warning_through_bar(self, message, category, filename, lineno, file=None, line=None):
        """The warning as the display in place would show it (Python's, or the command line's one-liner), written
        on its own line above the bar."""
        text = io.StringIO()
        self._showwarning(message, category, filename, lineno, text, line)
        if text.getvalue().strip():
            write(text.getvalue().rstrip("\n"), file=self.file)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            now = time.monotonic()
            if now >= self._next_line:
                self._next_line = now + self.every
                self._print_line(now)

    def set_postfix(self, **figures) -> None:
        self._postfix = figures
        if self._bar is not None:
            self._bar.set_postfix(**figures)

    def _print_line(self, now: float, final: bool = False) -> None:
        elapsed = now - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit}, {rate:.3g} {self.unit}/s"
        if final:
            text += f", took {_duration(elapsed)}"
        elif self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        if self._postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self._postfix.items())
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if warnings.showwarning == self._warning_through_bar:
                warnings.showwarning = self._showwarning
        elif self.enabled and self.n > self._start:
            self._print_line(time.monotonic(), final=True)
        self.enabled = False  # a second close() prints nothing

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
