"""Option types and the option groups several commands share.

Types stop impossible values at parse time with argparse's one-line error; the names of architectures, methods
and dataset layouts come from their homes (models.ARCH_CONFIGS, models.METHODS, data.DATASET_NAMES).
"""
from __future__ import annotations

import argparse
import os

import torch

from ..data import DATASET_NAMES
from ..data.transforms import check_img_size
from ..errors import DeviceUnavailableError, UserError, require_cuda
from ..models import ARCH_CONFIGS, METHODS

ARCHS = tuple(ARCH_CONFIGS)
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    """A square input size: a positive multiple of the backbone's stride (32)."""
    try:
        return check_img_size(_number(value, int), name="")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_device(args, parser) -> None:
    """--device cuda on a machine without CUDA stops at parse time (after the config file and the command line
    are merged, so `--device cpu` overrides a config's cuda)."""
    if getattr(args, "device", None) == "cuda":
        try:
            require_cuda("argument --device")
        except DeviceUnavailableError as e:
            parser.error(str(e))


def out_dir(value) -> str:
    """An output folder that is, or can be created as, a writable folder (checked before any work)."""
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
    if os.path.isdir(str(value)):
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file name")
    out_dir(os.path.dirname(os.path.abspath(str(value))))
    return str(value)


POSITIVE_INT, NON_NEGATIVE_INT = bounded(int, 1), bounded(int, 0)


POSITIVE, NON_NEGATIVE = bounded(float, 0, low_open=True), bounded(float, 0)


FRACTION = bounded(float, 0, 1)  # map thresholds, fractions


def require_options(args, *names: str) -> None:
    """Options a command needs but argparse cannot mark required (a --config file may give them): missing ones
    stop with one line naming them."""
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name, None) in (None, "", [])]
    if missing:
        raise UserError(f"missing required option(s) {', '.join(missing)}")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_NAMES, help="dataset layout (required)")
    g.add_argument("--data", help="dataset folder or .tar/.tar.gz archive (required)")
    g.add_argument("--metadata", default=None,
                   help="wsolevaluation metadata folder or archive (cub: train/val(CUBV2)/test; ilsvrc: val/test)")
    g.add_argument("--class-list", default=None, help="class order file (ilsvrc, folder)")
    g.add_argument("--boxes", default=None,
                   help="boxes file/folder (ilsvrc val: LOC_val_solution.csv or XML folder; folder: CSV or XML)")
    g.add_argument("--img-size", type=img_size, default=224, help="square input size S, a multiple of 32 (default 224)")
    g.add_argument("--num-workers", type=NON_NEGATIVE_INT, default=4, help="data loading worker processes (default 4)")
    g.add_argument("--loader", choices=("torch", "dali", "auto"), default="torch",
                   help="data loader: torch DataLoader + PIL, or NVIDIA DALI (default torch)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=DEFAULT_DEVICE,
                   help="device (default cuda if available, else cpu)")
    g.add_argument("--amp", choices=("bf16", "none"), default="none",
                   help="bf16 autocast for forward passes (default none)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for model and images (train: default on for cuda, off for "
                        "cpu; --no-channels-last turns it off)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="conformer_tiny_patch16", help="backbone (default conformer_tiny_patch16)")
    g.add_argument("--method", choices=METHODS, default="dbc", help="WSOL method (default dbc)")
    g.add_argument("--pretrained", default=None, help="official Conformer ImageNet checkpoint to start from")
    g.add_argument("--fstar-block", type=NON_NEGATIVE_INT, default=11, help="CNN block whose feature map is F* (default 11)")
    g.add_argument("--mc-kernel-size", type=POSITIVE_INT, default=3, help="kernel size of the M_c convolution (default 3)")
    g.add_argument("--norm", default="minmax", help="map normalisation (default minmax)")
    g.add_argument("--lambda-pos", type=NON_NEGATIVE, default=1.0, help="weight of L_pos (default 1.0)")
    g.add_argument("--lambda-neg", type=NON_NEGATIVE, default=0.1, help="weight of L_neg (default 0.1)")
    g.add_argument("--negatives", choices=("cross", "within"), default="cross",
                   help="negative pairs of L_neg: all n x n pairs of the batch, or within-image only (default cross)")
    g.add_argument("--gather-negatives", action="store_true",
                   help="under torchrun: the n x n pairs span every rank's images (the global batch), not the "
                        "rank's own batch")
    g.add_argument("--cls-loss", choices=("auto", "prob_mean", "ce_mean", "logit_sum"), default="auto",
                   help="L_cla: NLL of the mean of both branches' probabilities (Eq. 3, prob_mean), the mean "
                        "of the two CEs (ce_mean, official Conformer) or CE of the summed logits (logit_sum, TS-CAM); "
                        "auto = logit_sum for tscam, prob_mean otherwise (default auto)")
    g.add_argument("--ops-backend", choices=("auto", "eager", "triton", "cpp"), default="auto",
                   help="implementation of the DBC head ops (default auto)")
    g.add_argument("--map-source", choices=("auto", "sum", "a", "c"), default="auto",
                   help="dbc/cls map M: M_a + M_c (sum, Eq. 7), M_a (a) or M_c (c); auto = sum for dbc, a for cls")
    g.add_argument("--drop-path", type=bounded(float, 0, 1, high_open=True), default=0.1, help="stochastic depth rate (default 0.1)")


def default_split(dataset: str) -> str:
    # the split the paper reports: CUB test, ILSVRC val (called "test" in wsolevaluation's metadata);
    # Tiny ImageNet only has val; VOC's segmentation test masks are not public, so val.
    return "val" if dataset in ("tiny-imagenet", "voc-seg") else "test"


def check_classes(data_names, config: dict, data: str, checkpoint: str) -> None:
    """The data's classes must be the checkpoint's, in the same order (by name, not only by count): class i
    of the model is class i of the labels, or every metric is silently wrong."""
    data_names = list(data_names)
    if len(data_names) != config["num_classes"]:
        raise UserError(f"{data} has {len(data_names)} classes but {checkpoint} was trained for "
                         f"{config['num_classes']}")
    trained = config.get("class_names")
    if trained is None:  # a checkpoint without names: only the count can be checked
        return
    if list(trained) != data_names:
        i = next(i for i, (a, b) in enumerate(zip(trained, data_names)) if a != b)
        how = "in another order" if sorted(trained) == sorted(data_names) else "with other names"
        raise UserError(f"{data} has the classes of {checkpoint} {how}: class {i} is {data_names[i]!r} in the "
                         f"data but {trained[i]!r} in the checkpoint")
