"""`dbc-fast` (also `python -m dbc_fast`): train, eval, predict, export, bench-loader, profile, visualize.

Every subcommand lives in its own module of this package (`cli/<command>.py`) with `add_arguments(parser)` and
`main(args) -> int`; the work itself is done by the library below (engine, export, data). A module that cannot be
imported (e.g. an optional part not installed) only fails when its subcommand is used. Exit codes are decided
here only: 0 done, 1 bad input (a `dbc_fast.errors.UserError`, printed as one line), 2 bad command line, 130 Ctrl-C;
`train` adds 3 (non-finite loss) and 143 (SIGTERM).

`--config FILE.yaml` (any subcommand) gives option values: keys are the long option names, with '-' or
'_' (`batch-size: 64` or `batch_size: 64`). Precedence: command line > config file > built-in defaults.
An unknown key stops with the file and key named.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

from .. import distributed as dist_utils
from .. import progress
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, EXIT_USER_ERROR, DBCFastWarning, UserError
from .options import check_device

COMMANDS = {
    "train": ("dbc_fast.cli.train", "train a model (validation every epoch, checkpoints, resume)"),
    "eval": ("dbc_fast.cli.eval", "evaluate a checkpoint: Cls / Loc accuracies and MaxBoxAccV2"),
    "predict": ("dbc_fast.cli.predict", "classes and boxes for image files, optionally drawn"),
    "export": ("dbc_fast.cli.export", "export a checkpoint to TorchScript / torch.export (AOTInductor)"),
    "bench-loader": ("dbc_fast.cli.bench_loader", "measure data loader throughput (torch vs DALI)"),
    "profile": ("dbc_fast.cli.profile", "parameters, MACs, inference memory and epoch time (paper Table 10)"),
    "visualize": ("dbc_fast.cli.visualize", "panels of M_a, M_c and M with boxes for a split's images (Figs. 3-5, 7)"),
}


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage block), exit 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")




def _import(command: str):
    module_name = COMMANDS[command][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"its module {module_name} cannot be imported ({e}). "
                         f"Is this part of dbc_fast installed?") from e


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Option defaults from a YAML mapping, checked against the subcommand's options."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"--config: file not found: {path}")
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML: {e}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise UserError(f"--config {path}: unknown option {key!r} (known: {known})")
        action = actions[dest]
        if action.nargs == "?" and action.const is not None and value is True:
            value = action.const  # `resume: true` = a bare `--resume`
        if action.choices is not None and value is not None:
            items = value if isinstance(value, list) else [value]
            bad = [v for v in items if v not in action.choices]
            if bad:
                raise UserError(f"--config {path}: {key}: {bad[0]!r} is not one of {list(action.choices)}")
        if action.type is not None and value is not None:
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise UserError(f"--config {path}: {key}: {value!r} is not valid ({e})")
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


@contextlib.contextmanager
def warnings_as_lines(command: str):
    """Each DBCFastWarning as one `dbc-fast COMMAND: warning: ...` line (every time, not once per place), on
    the main process only; other warnings as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", DBCFastWarning)
        python_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, DBCFastWarning):
                return python_show(message, category, filename, lineno, file, line)
            if dist_utils.is_main():
                progress.write(f"dbc-fast {command}: warning: {message}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


def main(argv=None) -> int:
    """Runs one subcommand; its return value is the process's exit code. A UserError is printed as one line
    (EXIT_USER_ERROR), Ctrl-C outside a training step gives EXIT_INTERRUPTED, anything else is a bug and keeps
    its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else EXIT_USAGE
    command = argv[0]
    try:
        module, args = parse(argv)
        args.command_line = argv  # e.g. for the exact resume command a stopped training prints
        with warnings_as_lines(command):
            return int(module.main(args) or 0)
    except UserError as e:
        print(f"dbc-fast {command}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C outside a training step (train saves and says how to resume)
        print(f"dbc-fast {command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
