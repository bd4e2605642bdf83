"""The run folder (--out, RUN_DIR) of `dbc-fast train`.

One training at a time per folder (an flock held while a run writes to it); a folder that holds a run is
reused only to continue it (--resume) or to replace it (--overwrite); the checkpoint a run resumes from;
metrics of epochs a resumed run redoes; the command line that resumes a stopped run.
"""
from __future__ import annotations

import json
import os
import shlex

from .. import distributed as dist_utils
from ..errors import UserError
from ..files import write_text_atomic

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what a run leaves in RUN_DIR (config.json aside)


def lock_run_dir(out: str) -> int:
    """An exclusive lock on the folder itself (flock on its descriptor, released when the process ends):
    a second training into the same --out stops at once instead of interleaving checkpoints and metrics."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"--out {out}: another training is writing to this folder; wait for it to end or "
                         f"choose another --out")
    return fd


def find_resume_path(out: str, resume: str | None) -> str | None:
    """The checkpoint --resume continues from: FILE as given, or (a bare --resume, "auto") RUN_DIR/last.pt
    if it exists. None: a new run. A folder holding a run without last.pt cannot be resumed automatically."""
    if resume != "auto":
        return resume or None
    candidate = os.path.join(out, "last.pt")
    if os.path.isfile(candidate):
        return candidate
    if any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES):
        raise UserError(f"--resume: {out} holds a run but no last.pt to resume from; pass --resume FILE, "
                         f"or --overwrite (without --resume) to replace the run")
    return None


def claim_run_dir(out: str, resuming: bool, overwrite: bool) -> list:
    """A folder holding a run is only reused to continue it (--resume) or on purpose (--overwrite, which
    deletes the previous run's checkpoints and metrics so nothing of it is mixed into the new run).
    Returns the names of the files it deleted."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if not found or resuming:
        return []
    if not overwrite:
        raise UserError(f"--out {out} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out")
    for name in found:
        os.remove(os.path.join(out, name))
    return found


def trim_metrics(path: str, epochs_done: int) -> None:
    """Drops metrics.jsonl lines of epochs after the checkpoint a run resumes from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epochs_done]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def resume_command(args) -> str:
    """The command line that continues this run from RUN_DIR/last.pt: the same options, with a bare
    --resume (and without --overwrite or the test hooks)."""
    argv = list(getattr(args, "command_line", None) or [])
    if not argv:
        return "the same command with --resume"
    kept, i = [], 0
    drop_value = {"--debug-kill-after-steps", "--debug-signal-after-steps"}
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in ("--overwrite",) or (name in drop_value | {"--resume"} and "=" in token):
            i += 1
            continue
        if token in drop_value or (token == "--resume" and args.resume not in (None, "auto")
                                   and i + 1 < len(argv) and argv[i + 1] == args.resume):
            i += 2
            continue
        if token == "--resume":
            i += 1
            continue
        kept.append(token)
        i += 1
    launcher = "torchrun ... -m dbc_fast" if dist_utils.world_size() > 1 else "dbc-fast"
    return f"{launcher} {shlex.join(kept + ['--resume'])}"
