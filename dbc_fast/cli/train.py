"""`dbc-fast train`: fine-tune a DBC (or baseline) Conformer for WSOL, validating every epoch (see dbc_fast.engine.train)."""
from __future__ import annotations

import argparse
import sys

from ..engine.train import NonFiniteLoss, train
from . import options
from .options import add_data_arguments, add_model_arguments

REQUIRED = ("dataset", "data", "out")
EXIT_NONFINITE_LOSS = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    g = p.add_argument_group("splits")
    g.add_argument("--val-split", choices=("auto", "val", "test", "none"), default="auto",
                   help="split for per-epoch validation and best-checkpoint selection; auto = val where the "
                        "dataset has one, else test with a warning (default auto)")
    g.add_argument("--select-on-test", action="store_true",
                   help="select the best checkpoint on the test split on purpose (no warning)")
    g.add_argument("--limit-train-images", type=options.POSITIVE_INT, default=None, help="use only the first N training images")
    g.add_argument("--limit-val-images", type=options.POSITIVE_INT, default=None, help="validate on the first N images only")
    g.add_argument("--max-skipped-fraction", type=options.FRACTION, default=0.01,
                   help="stop when more than this fraction of training images are unreadable (default 0.01)")
    add_model_arguments(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=options.POSITIVE_INT, default=64, help="images per optimizer step per process (default 64)")
    g.add_argument("--eval-batch-size", type=options.POSITIVE_INT, default=None, help="validation batch size (default: --batch-size)")
    g.add_argument("--epochs", type=options.POSITIVE_INT, default=60, help="epochs (default 60)")
    g.add_argument("--lr", type=options.POSITIVE, default=5e-4, help="peak learning rate (default 5e-4, the paper's CUB value)")
    g.add_argument("--min-lr", type=options.NON_NEGATIVE, default=1e-6, help="final LR of the cosine schedule (default 1e-6)")
    g.add_argument("--sched", choices=("cosine", "step", "const"), default="cosine",
                   help="LR schedule after warm-up, updated every iteration (default cosine)")
    g.add_argument("--decay-epochs", type=options.POSITIVE, default=30, help="step schedule: epochs between decays (default 30)")
    g.add_argument("--decay-rate", type=options.POSITIVE, default=0.1, help="step schedule: LR factor per decay (default 0.1)")
    g.add_argument("--warmup-epochs", type=options.NON_NEGATIVE, default=0, help="linear warm-up epochs (default 0)")
    g.add_argument("--warmup-lr", type=options.NON_NEGATIVE, default=1e-6, help="LR at the start of warm-up (default 1e-6)")
    g.add_argument("--weight-decay", type=options.NON_NEGATIVE, default=5e-4, help="AdamW weight decay (default 5e-4)")
    g.add_argument("--opt-eps", type=options.POSITIVE, default=1e-8, help="AdamW eps (default 1e-8)")
    g.add_argument("--betas", type=options.bounded(float, 0, 1, high_open=True), nargs=2, default=(0.9, 0.99), help="AdamW betas (default 0.9 0.99)")
    g.add_argument("--clip-grad", type=options.POSITIVE, default=None, help="clip the gradient norm to this value (default off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log-every", type=options.POSITIVE_INT, default=20,
                   help="check the losses for NaN/inf and update the progress bar every N steps; the steps in "
                        "between run without waiting for the GPU (default 20; 1 = check before every update)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights init, data order and augmentation (default 0)")
    g.add_argument("--max-steps-per-epoch", type=options.POSITIVE_INT, default=None, help="cap the optimizer steps of each epoch")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=options.out_dir, help="run directory for checkpoints and logs (required)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="FILE",
                   help="resume from FILE, or (no value) from RUN_DIR/last.pt if it exists; a changed --epochs, "
                        "--lr or other schedule option gives the new schedule, continued from the restored step")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that already holds one, deleting its checkpoints and metrics")
    g.add_argument("--save-every-steps", type=options.NON_NEGATIVE_INT, default=0,
                   help="also write last.pt every N steps inside an epoch (0 = only at epoch ends)")
    g.add_argument("--cam-threshold", type=options.FRACTION, default=0.2,
                   help="map threshold for boxes in validation Top-1/GT-known Loc (default 0.2)")
    g.add_argument("--visualize", type=options.NON_NEGATIVE_INT, default=0, metavar="N",
                   help="after every epoch, draw the maps of the first N validation images into RUN_DIR/panels/ "
                        "(<index>_<name>_epoch<E>.png, as `dbc-fast visualize`), to watch them form (default 0: off)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--ddp-find-unused", action="store_true",
                   help="DistributedDataParallel(find_unused_parameters=True), for methods with unused parameters")
    # Test hook: hard-exit (as if killed) right after this many optimizer steps and the checkpoint they write.
    g.add_argument("--debug-kill-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    # Test hook: send this process --debug-signal (SIGINT, the Ctrl-C path) right after this many optimizer steps.
    g.add_argument("--debug-signal-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-signal", choices=("SIGINT", "SIGTERM"), default="SIGINT", help=argparse.SUPPRESS)


def train_options(*argv: str) -> argparse.Namespace:
    """The training options `dbc-fast train` would use for `argv` (its defaults for the rest); for code that runs
    the trainer's pieces outside a run, e.g. engine.train.count_step_syncs."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def main(args) -> int:
    options.require_options(args, *REQUIRED)
    try:
        return train(args)
    except NonFiniteLoss as e:
        print(f"dbc-fast train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE_LOSS
