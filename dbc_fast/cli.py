"""`dbc-fast` (also `python -m dbc_fast`): train, eval, predict, export, bench-loader, profile, visualize.

Every subcommand lives in its own module with `add_arguments(parser)` and `main(args) -> int`. A module
that cannot be imported (e.g. an optional part not installed) only fails when its subcommand is used.

`--config FILE.yaml` (any subcommand) gives option values: keys are the long option names, with '-' or
'_' (`batch-size: 64` or `batch_size: 64`). Precedence: command line > config file > built-in defaults.
An unknown key stops with the file and key named.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("dbc_fast.engine.train", "train a model (validation every epoch, checkpoints, resume)"),
    "eval": ("dbc_fast.engine.evaluate", "evaluate a checkpoint: Cls / Loc accuracies and MaxBoxAccV2"),
    "predict": ("dbc_fast.engine.predict", "classes and boxes for image files, optionally drawn"),
    "export": ("dbc_fast.export", "export a checkpoint to TorchScript / torch.export (AOTInductor)"),
    "bench-loader": ("dbc_fast.data.bench_loader", "measure data loader throughput (torch vs DALI)"),
    "profile": ("dbc_fast.engine.profile", "parameters, MACs, inference memory and epoch time (paper Table 10)"),
    "visualize": ("dbc_fast.engine.visualize", "panels of M_a, M_c and M with boxes for a split's images (Figs. 3-5, 7)"),
}


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage block), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------ option types: impossible values stop at parse time


def _number(value, kind):
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():  # e.g. `img-size: 64.5` in a YAML file
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def bounded(kind=int, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: an int or float within [low, high] (open ends where said)."""
    def check(value):
        number = _number(value, kind)
        if (low is not None and (number < low or (low_open and number == low))) or \
                (high is not None and (number > high or (high_open and number == high))):
            lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
            hi = "" if high is None else f"{high}" + (")" if high_open else "]")
            where = f"in {lo}, {hi}" if low is not None and high is not None else \
                (f"> {low}" if low_open else f">= {low}") if low is not None else f"<= {high}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {value!r}")
        return number
    check.__name__ = kind.__name__
    return check


def img_size(value) -> int:
    """A square input size: a positive multiple of 32 (the backbone's stride)."""
    size = _number(value, int)
    if size <= 0 or size % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32, got {value!r}")
    return size


def check_device(args, parser) -> None:
    """--device cuda on a machine without CUDA stops at parse time (after the config file and the command line
    are merged, so `--device cpu` overrides a config's cuda)."""
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("argument --device: cuda was asked for but torch sees no CUDA device (use --device cpu)")


def out_dir(value) -> str:
    """An output folder that is, or can be created as, a writable folder (checked before any work)."""
    import os

    path = os.path.abspath(str(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"{value} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: {existing} is not writable")
    return str(value)


def out_file(value) -> str:
    """An output file whose folder is writable (checked before any work)."""
    import os

    if os.path.isdir(str(value)):
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file name")
    out_dir(os.path.dirname(os.path.abspath(str(value))))
    return str(value)


POSITIVE_INT, NON_NEGATIVE_INT = bounded(int, 1), bounded(int, 0)
POSITIVE, NON_NEGATIVE = bounded(float, 0, low_open=True), bounded(float, 0)
FRACTION = bounded(float, 0, 1)  # map thresholds, fractions


def _import(command: str):
    module_name = COMMANDS[command][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"dbc-fast {command}: its module {module_name} cannot be imported ({e}). "
                         f"Is this part of dbc_fast installed?") from e


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Option defaults from a YAML mapping, checked against the subcommand's options."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SystemExit(f"--config: file not found: {path}")
    except yaml.YAMLError as e:
        raise SystemExit(f"--config {path}: not valid YAML: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise SystemExit(f"--config {path}: unknown option {key!r} (known: {known})")
        action = actions[dest]
        if action.nargs == "?" and action.const is not None and value is True:
            value = action.const  # `resume: true` = a bare `--resume`
        if action.choices is not None and value is not None:
            items = value if isinstance(value, list) else [value]
            bad = [v for v in items if v not in action.choices]
            if bad:
                raise SystemExit(f"--config {path}: {key}: {bad[0]!r} is not one of {list(action.choices)}")
        if action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"--config {path}: {key}: {value!r} is not valid ({e})")
        values[dest] = value
    return values


def build_parser(commands=None) -> argparse.ArgumentParser:
    parser = _Parser(prog="dbc-fast", description="DBC weakly supervised object localization")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE", help="YAML file of option values (command line wins)")
        if commands is not None and name in commands:
            commands[name].add_arguments(p)
    return parser


def parse(argv):
    """(subcommand module, parsed args) for argv (without the program name); config files applied."""
    argv = list(argv)
    command = argv[0]
    module = _import(command)
    parser = build_parser({command: module})
    sub = parser._subparsers._group_actions[0].choices[command]
    first = parser.parse_args(argv)
    if first.config:
        values = load_config(first.config, sub)
        for action in sub._actions:  # an option the file gives is no longer required on the command line
            if action.dest in values:
                action.required = False
        sub.set_defaults(**values)
        args = parser.parse_args(argv)
        check_device(args, sub)
        return module, args
    check_device(first, sub)
    return module, first


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    module, args = parse(argv)
    from .data.errors import DatasetError
    from .data.dali import DALIUnavailableError
    from .engine.checkpoint import CheckpointError

    args.command_line = argv  # e.g. for the exact resume command a stopped training prints
    try:
        return int(module.main(args) or 0)
    except (DatasetError, CheckpointError, DALIUnavailableError) as e:  # bad input: the message names the file; no traceback needed
        print(f"dbc-fast {argv[0]}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a training step (train saves and says how to resume)
        print(f"dbc-fast {argv[0]}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
