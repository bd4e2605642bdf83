"""`dbc-fast train`: fine-tune a DBC (or baseline) Conformer for WSOL, validating every epoch.

A plain loop in the style of the torchvision reference scripts. Settings default to the paper's (4.1):
AdamW (eps 1e-8, betas 0.9/0.99, weight decay 5e-4), per-iteration LR schedule with optional warm-up.
Files in --out (RUN_DIR), written by rank 0 only:
  last.pt        after every epoch (and every --save-every-steps steps inside an epoch)
  best.pt        the epoch with the best validation Top-1 Loc (of the final map M)
  metrics.jsonl  one JSON line per epoch (train losses, LR, images/s, skipped images, validation metrics)
  config.json    the resolved options of the run

One training at a time per RUN_DIR: the folder is locked (flock) while a run writes to it, and a new run
into a folder that already holds a run's checkpoints or metrics is refused unless --resume continues it or
--overwrite replaces it. SIGINT (Ctrl-C) / SIGTERM stop at the next step with a resumable last.pt at the
step reached and print the exact command that resumes it (exit 130 / 143).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import distributed as dist_utils
from .. import progress
from ..data import SkippedImages, build_dataset, resolve_root
from ..data.datasets import first_samples
from ..data.loader import build_loader, check_images_open
from ..data.transforms import check_img_size
from ..errors import UserError, warn
from ..files import write_json_atomic
from . import checkpoint as ckpt_lib
from .evaluate import evaluate_model, headline
from .run_dir import claim_run_dir, find_resume_path, lock_run_dir, resume_command, trim_metrics
from .visualize import draw_panels

LOSS_KEYS = ("loss", "loss_cla", "loss_neg", "loss_pos")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops and keeps its last good checkpoint."""


# ---------------------------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _say(msg: str) -> None:
    if dist_utils.is_main():
        progress.write(msg, file=sys.stdout)


def validation_split(args):
    """(split or None, warning or None) for per-epoch validation and best-checkpoint selection.

    tiny-imagenet: val (its only held-out split). cub / ilsvrc: val = wsolevaluation's CUBV2 / ImageNetV2
    when --metadata is given; without it the only held-out split is the test split (for ILSVRC the 2012
    validation images, which the paper reports on), used with a warning unless --select-on-test says so.
    folder: its val/ subfolder, else test/ (warned), else no validation.
    """
    if args.select_on_test:
        return "test", None
    if args.val_split == "none":
        return None, None
    if args.val_split in ("val", "test"):
        return args.val_split, None
    if args.dataset in ("tiny-imagenet", "voc-seg"):  # their only held-out split
        return "val", None
    test_warning = (f"no validation split for {args.dataset} at {args.data}: the best checkpoint is selected on "
                    f"the TEST split, so test figures of best.pt are optimistic. Give --metadata (wsolevaluation: "
                    f"CUBV2 / ImageNetV2 val) for a clean validation split, or pass --select-on-test to do this "
                    f"on purpose.")
    if args.dataset in ("cub", "ilsvrc"):
        return ("val", None) if args.metadata else ("test", test_warning)

    root = resolve_root(args.data)
    if os.path.isdir(os.path.join(root, "val")):
        return "val", None
    if os.path.isdir(os.path.join(root, "test")):
        return "test", test_warning
    return None, (f"folder dataset {args.data} has no val/ or test/ subfolder: no validation, best.pt is the "
                  f"last epoch")


def model_options(args) -> dict:
    return dict(fstar_block=args.fstar_block, mc_kernel_size=args.mc_kernel_size, norm=args.norm,
                lambda_pos=args.lambda_pos, lambda_neg=args.lambda_neg, negatives=args.negatives,
                gather_negatives=args.gather_negatives,
                cls_loss=args.cls_loss, map_source=args.map_source, ops_backend=args.ops_backend,
                drop_path_rate=args.drop_path)



def dataset_options(args) -> dict:
    return dict(metadata=args.metadata, class_list=args.class_list, boxes=args.boxes)


def build_datasets(args):

    train_set = first_samples(build_dataset(args.dataset, args.data, "train", img_size=args.img_size, train=True,
                                     on_corrupt="skip", **dataset_options(args)),
                       args.limit_train_images)
    split, warning = validation_split(args)
    if warning:
        warn(warning)
    val_set = None
    if split is not None:
        val_set = first_samples(build_dataset(args.dataset, args.data, split, img_size=args.img_size, train=False,
                                       **dataset_options(args)), args.limit_val_images)
        check_images_open(val_set, f"{split} (validation)")
    return train_set, val_set, split


def build_optimizer(model, args, device: torch.device):
    """timm's AdamW (biases and norm weights, the 1-d parameters, out of weight decay); the fused CUDA kernel
    on CUDA (one launch per step instead of 100+ over the model's ~465 tensors)."""
    from timm.optim import create_optimizer_v2

    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    return create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay,
                               eps=args.opt_eps, betas=tuple(args.betas), **fused)


def channels_last_enabled(args) -> bool:
    """--channels-last / --no-channels-last, else on for cuda (faster convolutions and pooling), off for cpu."""
    return args.device == "cuda" if args.channels_last is None else bool(args.channels_last)


def configure_device(device: torch.device) -> None:
    """cuDNN picks the fastest convolution algorithms for the (fixed) training shapes."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_model(model, device: torch.device, fullgraph: bool = False):
    """torch.compile, after the DBC head's ops backends are resolved for `device`: the availability probe
    (library loading, dispatcher queries) then is a cached dict lookup, not a graph break inside the model."""
    from .. import ops

    ops.available_backends(device)
    return torch.compile(model, fullgraph=fullgraph)


def build_scheduler(optimizer, args, steps_per_epoch: int):
    """A timm scheduler stepped per iteration (`step_update(global_step)`)."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    common = dict(warmup_t=warmup, warmup_lr_init=args.warmup_lr, t_in_epochs=False)
    if args.sched == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=args.min_lr, **common)
    decay = max(1, int(round(args.decay_epochs * steps_per_epoch)))
    rate = 1.0 if args.sched == "const" else args.decay_rate
    return StepLRScheduler(optimizer, decay_t=decay, decay_rate=rate, **common)


def _autocast(device: torch.device, amp: str):
    if amp != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class _JsonlLog:
    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(os.path.join(out, "tb"))


# ---------------------------------------------------------------------------------------------- resuming and stopping


class StopRequest:
    """SIGINT / SIGTERM handlers that only record the signal: the loop stops at the next step boundary with
    a checkpoint. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        _say(f"\n{signal.Signals(signum).name}: stopping after this step and saving a resumable checkpoint "
             f"(Ctrl-C again to stop at once, without saving)")

    def install(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


SCHEDULE_KEYS = ("epochs", "lr", "min_lr", "sched", "decay_epochs", "decay_rate", "warmup_epochs", "warmup_lr")


def _differs(old, new) -> bool:
    return ckpt_lib.plain(old) != ckpt_lib.plain(new)


def _changes(keys, old: dict, args) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (was {old[k]})" for k in keys)


def _schedule_changed(fresh: dict, saved: dict) -> bool:
    """The scheduler built from this run's options differs from the checkpoint's (a new --epochs, --lr, ...)."""
    return ckpt_lib.plain(fresh) != ckpt_lib.plain(saved)


def check_resume_identity(state: dict, args, path: str) -> None:
    """A checkpoint resumes only the model it holds: another --arch / --method is one line naming both."""
    config = state["config"]
    for key in ("arch", "method"):
        if config.get(key) != getattr(args, key):
            raise UserError(f"--resume {path}: the checkpoint is a {config.get('arch')}/{config.get('method')} "
                             f"model but this run asks for --arch {args.arch} --method {args.method}; resume with "
                             f"its --arch/--method, or start a new run (another --out, or --overwrite)")


def apply_optimizer_options(optimizer, args, old: dict) -> None:
    """AdamW's eps, betas and weight decay from this run's options (a restored optimizer would keep the old
    ones silently); groups without decay (biases, norms) keep 0."""
    for group in optimizer.param_groups:
        group["eps"] = args.opt_eps
        group["betas"] = tuple(args.betas)
        if group.get("weight_decay"):
            group["weight_decay"] = args.weight_decay
    changed = [k for k in ("weight_decay", "opt_eps", "betas") if k in old and _differs(old[k], getattr(args, k))]
    if changed:
        _say(f"resuming with {_changes(changed, old, args)}: the optimizer uses the new values from here on")


def weights_finite(model) -> bool:
    """One device sync: every parameter finite (checked before a checkpoint is written)."""
    flags = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
    return bool(flags.all())


# ---------------------------------------------------------------------------------------------- the step


def train_step(model, optimizer, images, labels, amp: str = "none", clip_grad: float | None = None,
               params=None) -> torch.Tensor:
    """One optimizer step that never waits for the device.

    Returns a device tensor [loss, loss_cla, loss_neg, loss_pos, n] with each loss times n, the batch's image
    count; the loop sums these over ranks and checks them at log points (`_check_losses`).
    """
    with _autocast(images.device, amp):
        outputs = model(images, labels=labels)
    n = images.shape[0]
    parts = torch.stack([outputs[k].detach().float().reshape(()) for k in LOSS_KEYS])
    record = torch.cat([parts * n, parts.new_full((1,), n)])  # a fill, not a copy from host memory
    optimizer.zero_grad(set_to_none=True)
    outputs["loss"].backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters() if params is None else params, clip_grad)
    optimizer.step()
    return record


def _check_losses(pending: list, last_good: str) -> list:
    """[(losses, images)] of the steps in `pending` ([(record, epoch, step, global_step)]), summed over ranks:
    the one host sync of a log interval. Raises NonFiniteLoss naming the first step whose loss was not finite
    and `last_good`, a sentence naming the last checkpoint written (checked finite) or saying there is none.
    """
    if not pending:
        return []
    rows = dist_utils.all_reduce_sum(torch.stack([r for r, *_ in pending])).tolist()
    checked = []
    for row, (_, epoch, step, global_step) in zip(rows, pending):
        images = row[-1]
        losses = [v / images for v in row[:-1]]
        if not all(math.isfinite(v) for v in losses):
            detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_KEYS, losses))
            raise NonFiniteLoss(
                f"non-finite loss at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}): "
                f"{detail}. Stopped; {last_good}. Lower --lr or try --clip-grad / --amp none "
                f"(--log-every 1 checks before every update).")
        checked.append((losses, images))
    return checked


def _host_flag_group():
    """A gloo group for per-step flags under NCCL: agreeing on a host value then costs no CUDA sync."""
    import torch.distributed as dist

    if dist_utils.is_distributed() and dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return None


def _any_rank(flags: list, group) -> list:
    """Each flag true on any rank (one all-reduce for all of them)."""
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags])  # a CPU tensor, reduced over gloo
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return [v > 0 for v in t.tolist()]


def count_step_syncs(args, batch_size: int = 8, img_size: int = 224, steps: int = 3, warmup: int = 2,
                     channels_last: bool = True, compile: bool = False, mode: str = "warn",
                     device: str = "cuda") -> int:
    """Host syncs made by `steps` steps of the trainer's step (`train_step`, the trainer's optimizer and device
    settings for the training options `args`, e.g. `dbc_fast.cli.train.train_options("--amp", "bf16")`) on
    synthetic data, between two log points. `warmup` steps run first (lazy initialisation,
    cuDNN autotuning, optimizer state). Each batch comes from pinned host memory with a non-blocking copy,
    as the loaders deliver it. mode "warn" counts the syncs (0 expected); "error" raises RuntimeError at the
    first one, with its stack. Needs a CUDA device.
    """
    import warnings

    import dbc_fast

    if mode not in ("warn", "error"):
        raise ValueError(f"mode must be 'warn' or 'error', got {mode!r}")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("count_step_syncs needs a CUDA device (sync debug mode is CUDA's)")
    configure_device(device)
    num_classes = 10
    model = dbc_fast.create_model(args.arch, num_classes, method=args.method, **model_options(args)).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, args, device)
    step_model = compile_model(model, device) if compile else model
    step_model.train()
    gen = torch.Generator().manual_seed(0)
    host_images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).pin_memory()
    host_labels = torch.randint(0, num_classes, (batch_size,), generator=gen).pin_memory()

    def one_step():
        images = host_images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = host_labels.to(device, non_blocking=True)
        return train_step(step_model, optimizer, images, labels, amp=args.amp)

    for _ in range(warmup):
        one_step()
    torch.cuda.synchronize(device)
    records = []
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            for _ in range(steps):
                records.append(one_step())
        finally:
            torch.cuda.set_sync_debug_mode(before)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    if not all(math.isfinite(v) for v in torch.stack(records).flatten().tolist()):
        raise RuntimeError("count_step_syncs: the synthetic steps gave a non-finite loss")
    return syncs


# ---------------------------------------------------------------------------------------------- the run


@dataclass(eq=False)
class Run:
    """One training, handed from piece to piece: its options, data, model, optimizer and LR schedule, and where
    it stands (the epoch and step it starts at, the global step, the best validation, the last good checkpoint)."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    train_set: object
    val_set: object  # None: no validation
    val_split: str | None
    loader: object
    val_loader: object
    steps_per_epoch: int
    model: torch.nn.Module  # the plain model: checkpoints and validation
    config: dict  # the model's description, saved in every checkpoint
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_model: torch.nn.Module | None = None  # what the steps run: the model, DDP- and/or torch.compile-wrapped
    start_epoch: int = 0
    start_step: int = 0
    global_step: int = 0
    best: dict = field(default_factory=lambda: {"top1_loc": -1.0, "epoch": None})
    resumed_meters: dict | None = None  # the running loss sums of a checkpoint written inside an epoch
    last_good: tuple | None = None  # (path, epoch, step) of the last checkpoint written or resumed from
    flag_group: object = None  # the process group of the per-step flags (`_any_rank`)
    stop: StopRequest | None = None
    log: _JsonlLog | None = None  # metrics.jsonl (rank 0)
    tb: object = None  # the tensorboard writer (rank 0, when tensorboard is installed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> str:
        return self.args.out

    def last_good_sentence(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written yet, so there is nothing to resume"
        path, epoch, step = self.last_good
        where = f"end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
        return f"the last good checkpoint is {path} ({where}): resume from it with --resume {path}"


@dataclass(eq=False)
class EpochProgress:
    """One epoch's training so far."""

    meters: dict  # loss sums and image count of the checked steps, skipped images (kept by mid-epoch checkpoints)
    tracker: object  # the epoch's SkippedImages
    bar: progress.Progress
    step: int  # the next step of the epoch
    t0: float  # when the epoch's steps (re)started
    seen: int = 0  # images of the checked steps since t0 (images/s)
    pending: list = field(default_factory=list)  # (loss record on the device, epoch, step, global step) unchecked
    stopped: bool = False  # ended early by a stop request
    train_time: float = 0.0


# ---------------------------------------------------------------------------------------------- the main loop


def train(args) -> int:
    locks: list = []  # the run folder's lock, released however the run ends
    try:
        return _train(args, locks)
    finally:
        for fd in locks:
            os.close(fd)


def _train(args, locks: list) -> int:
    """Sets up (or resumes) the run, then per epoch: train, validate, checkpoint and log, until the last epoch
    or a stop request. Returns the exit code: 0, or 128 + the signal that stopped the run."""
    check_img_size(args.img_size, "--img-size")
    if args.log_every < 1:
        raise UserError(f"--log-every must be >= 1, got {args.log_every}")
    device = dist_utils.setup(args.device)
    configure_device(device)
    resume_path = open_run_dir(args, locks)
    state = read_resume_checkpoint(args, resume_path)
    run = build_run(args, device, state)
    if state is not None:
        resume(run, state, resume_path)
    if run.start_epoch >= args.epochs:
        _say(f"nothing to do: {args.epochs} epoch(s) already done")
        dist_utils.cleanup()
        return 0
    prepare_training(run)
    run.stop = StopRequest().install()
    try:
        for epoch in range(run.start_epoch, args.epochs):
            trained = train_one_epoch(run, epoch)
            if trained.stopped:
                return stop_run(run, epoch, trained.step, trained.meters)
            record = epoch_record(run, epoch, trained)
            is_best = validate(run, epoch, record)
            say_epoch(run, epoch, record)
            save_epoch_checkpoints(run, epoch, is_best)
            if run.is_main:
                draw_epoch_panels(run, epoch)
                log_epoch(run, epoch, record)
            debug_kill(run)
            if epoch + 1 < args.epochs and stop_requested(run):
                return stop_run(run, epoch + 1, 0, None)  # the epoch's checkpoint, written again with the stop
    finally:
        run.stop.restore()
    finish(run)
    return 0


# ---------------------------------------------------------------------------------------------- setting up


def open_run_dir(args, locks: list) -> str | None:
    """Locks --out (rank 0; the lock joins `locks`) and claims it for this run. Returns the checkpoint the run
    resumes from, None for a new run."""
    out, is_main = args.out, dist_utils.rank() == 0
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if is_main:
        os.makedirs(out, exist_ok=True)
        locks.append(lock_run_dir(out))
    resume_path = find_resume_path(out, args.resume)
    if args.resume == "auto" and resume_path is None:
        _say(f"--resume: no {os.path.join(out, 'last.pt')} yet, starting a new run")
    if is_main:
        removed = claim_run_dir(out, resuming=resume_path is not None, overwrite=args.overwrite)
        if removed:
            _say(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")
    return resume_path


def read_resume_checkpoint(args, path: str | None) -> dict | None:
    """The checkpoint to resume from (None for a new run), checked to hold this run's --arch / --method."""
    state = ckpt_lib.load_checkpoint(path) if path else None
    if state is not None:
        check_resume_identity(state, args, path)
    return state


def build_run(args, device: torch.device, state: dict | None) -> Run:
    """Data, model, optimizer and LR schedule. The model starts from --pretrained in a new run; a resumed run's
    weights come from its checkpoint (`resume`)."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    channels_last = channels_last_enabled(args)
    seed_everything(args.seed + rank)  # each rank its own drop-path stream; data is seeded separately
    train_set, val_set, val_split = build_datasets(args)
    loader, val_loader, steps_per_epoch = build_loaders(args, device, train_set, val_set, channels_last, world)
    model, config = build_model(args, device, state, train_set, val_split, channels_last)
    optimizer = build_optimizer(model, args, device)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    return Run(args=args, device=device, rank=rank, world=world, train_set=train_set, val_set=val_set,
               val_split=val_split, loader=loader, val_loader=val_loader, steps_per_epoch=steps_per_epoch,
               model=model, config=config, optimizer=optimizer, scheduler=scheduler)


def build_loaders(args, device: torch.device, train_set, val_set, channels_last: bool, world: int):
    """(training loader, validation loader or None, optimizer steps per epoch)."""

    loader = build_loader(train_set, args.batch_size, train=True, loader=args.loader, device=device,
                          num_workers=args.num_workers, seed=args.seed, channels_last=channels_last)
    val_loader = None
    if val_set is not None:
        val_loader = build_loader(val_set, args.eval_batch_size or args.batch_size, train=False,
                                  loader=args.loader, device=device, num_workers=args.num_workers,
                                  seed=args.seed, channels_last=channels_last)
    steps_per_epoch = len(loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise UserError(f"not one full batch of {args.batch_size} per process in {len(train_set)} training "
                         f"images over {world} process(es): lower --batch-size")
    return loader, val_loader, steps_per_epoch


def build_model(args, device: torch.device, state: dict | None, train_set, val_split, channels_last: bool):
    """(the model on `device`, its checkpoint description)."""
    import dbc_fast

    try:
        model = dbc_fast.create_model(args.arch, train_set.num_classes, method=args.method,
                                      pretrained=None if state else args.pretrained, **model_options(args))
    except (ValueError, FileNotFoundError) as e:
        if args.pretrained and not state:  # the file's problem, said in one line
            raise ckpt_lib.CheckpointError(f"--pretrained: {e}") from None
        raise
    config = ckpt_lib.model_config(model, args.img_size, train_set.class_names, args.dataset,
                                   data=args.data, val_split=val_split)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, config


def prepare_training(run: Run) -> None:
    """The model the steps run (DDP, torch.compile), the step flags' process group, metrics.jsonl, tensorboard
    and config.json; then the line that says what is trained."""
    args, device = run.args, run.device
    run.train_model = run.model
    if run.world > 1:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.ddp_find_unused)
    if args.compile:
        run.train_model = compile_model(run.train_model, device)
    run.flag_group = _host_flag_group()
    if not run.is_main:
        return
    run.log = _JsonlLog(os.path.join(run.out, "metrics.jsonl"))
    run.tb = _tensorboard(run.out)
    write_json_atomic(os.path.join(run.out, "config.json"),
                      {"args": vars(args), "config": run.config, "world_size": run.world}, default=str)
    _say(f"training {args.arch}/{args.method} on {len(run.train_set)} {args.dataset} images "
         f"({run.steps_per_epoch} steps/epoch x {args.epochs} epochs, {run.world} process(es), device {device}); "
         f"validation: {run.val_split or 'none'} ({len(run.val_set) if run.val_set is not None else 0} images)")


# ---------------------------------------------------------------------------------------------- resuming


def resume(run: Run, state: dict, path: str) -> None:
    """Continues the run of checkpoint `state` (read from `path`): weights, optimizer, LR schedule, counters,
    best validation, running meters and RNG streams; says what this run's options change."""
    args, old = run.args, state.get("train_args", {})
    load_weights(run.model, state, path, run.train_set, args)
    run.optimizer.load_state_dict(state["optimizer"])
    apply_optimizer_options(run.optimizer, args, old)
    schedule_changed = restore_schedule(run.scheduler, state["scheduler"])
    run.start_epoch, run.start_step = state["epoch"], state.get("step", 0)
    run.global_step = state.get("global_step", 0)
    run.best = state.get("best_metric") or run.best
    run.resumed_meters = state.get("meters")
    restore_rng(run, state.get("rng") or [], path)
    if schedule_changed:
        run.scheduler.step_update(num_updates=run.global_step)
        changed = [key for key in SCHEDULE_KEYS if key in old and _differs(old[key], getattr(args, key))]
        _say(f"resuming with {_changes(changed, old, args) or 'another steps-per-epoch'}: the LR schedule is "
             f"recomputed for the new values and continues from global step {run.global_step} "
             f"(LR now {run.optimizer.param_groups[0]['lr']:.3g})")
    warn_data_changes(args, old)
    run.last_good = (path, run.start_epoch, run.start_step)
    _say(f"resumed from {path}: epoch {run.start_epoch + 1}, step {run.start_step}, global step {run.global_step}")
    if run.is_main:
        trim_metrics(os.path.join(run.out, "metrics.jsonl"), run.start_epoch)


def load_weights(model, state: dict, path: str, train_set, args) -> None:
    """The checkpoint's weights, refused in one line for other classes or other model options."""
    saved_names = state["config"].get("class_names")
    if saved_names is not None and list(saved_names) != list(train_set.class_names):
        raise UserError(f"--resume {path}: its classes differ from those of --data {args.data} "
                         f"(by name or order); resume with the data it was trained on")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # other model options (e.g. --fstar-block, --mc-kernel-size)
        first = str(e).strip().splitlines()
        raise UserError(f"--resume {path}: its weights do not fit this model ({first[-1].strip()[:160]}"
                         f"); resume with the model options it was trained with") from None


def restore_schedule(scheduler, saved: dict) -> bool:
    """The checkpoint's LR schedule; or, when this run's options give another one (a new --epochs, --lr, ...),
    that one, left for the caller to continue from the restored step. True when the schedule changed."""
    fresh = scheduler.state_dict()
    scheduler.load_state_dict(saved)
    if not _schedule_changed(fresh, saved):
        return False
    scheduler.load_state_dict(fresh)
    return True


def restore_rng(run: Run, rngs: list, path: str) -> None:
    """This rank's RNG streams, when the checkpoint has one per process of this run."""
    if len(rngs) == run.world:
        ckpt_lib.set_rng_state(rngs[run.rank])
    elif run.start_step:
        raise UserError(f"{path} was written in the middle of an epoch by {len(rngs)} process(es); "
                         f"resume it with the same number of processes (this run has {run.world})")
    else:
        warn(f"checkpoint has RNG states of {len(rngs)} process(es), this run has {run.world}: "
             "drop-path randomness is re-seeded (data order and augmentation are unaffected)")


def warn_data_changes(args, old: dict) -> None:
    """Options that change what the resumed run sees: it will not match an uninterrupted one."""
    for key in ("batch_size", "seed", "max_steps_per_epoch", "limit_train_images"):
        if key in old and _differs(old[key], getattr(args, key)):
            warn(f"resuming with --{key.replace('_', '-')} {getattr(args, key)} but the checkpoint "
                 f"was trained with {old[key]}: the run will not match an uninterrupted one")


# ---------------------------------------------------------------------------------------------- one epoch


def train_one_epoch(run: Run, epoch: int) -> EpochProgress:
    """The epoch's optimizer steps (in a resumed run's first epoch, from the step it resumes at), with the loss
    checks, mid-epoch checkpoints and test hooks. Ends early, `stopped`, at a stop request (on any rank)."""
    args = run.args
    ep = begin_epoch(run, epoch)
    params = list(run.model.parameters())
    for batch in run.loader:
        if ep.step >= run.steps_per_epoch:
            break
        ep.tracker.update(batch)  # warns per unreadable image; too many stop the run
        empty = len(batch["image"]) == 0  # every image of this batch was unreadable
        stopping = run.stop.signum is not None
        if run.world > 1:  # DDP needs every rank in every step: all skip when one has nothing, all stop
            empty, stopping = _any_rank([empty, stopping], run.flag_group)
        if stopping:
            ep.stopped = True
            break
        if empty:
            ep.step += 1
            ep.bar.update(1)
            continue
        run.scheduler.step_update(num_updates=run.global_step)
        record = train_step(run.train_model, run.optimizer, batch["image"], batch["label"], amp=args.amp,
                            clip_grad=args.clip_grad, params=params)
        ep.pending.append((record, epoch, ep.step, run.global_step))
        run.global_step += 1
        ep.step += 1
        if run.is_main:
            ep.bar.update(1)
        after_step(run, epoch, ep)
    check_pending_losses(run, ep)
    ep.bar.close()
    ep.train_time = time.perf_counter() - ep.t0
    return ep


def begin_epoch(run: Run, epoch: int) -> EpochProgress:
    """The loader at the epoch's first step, the model in training mode, the meters (a mid-epoch checkpoint's
    when the run resumes inside this epoch) and the progress bar."""

    args = run.args
    first_step = run.start_step if epoch == run.start_epoch else 0
    run.loader.set_epoch(epoch, first_step)
    run.train_model.train()
    meters = run.resumed_meters if (epoch == run.start_epoch and first_step and run.resumed_meters) else \
        {"sums": [0.0] * len(LOSS_KEYS), "images": 0, "skipped": {}}
    tracker = SkippedImages(len(run.train_set), max_fraction=args.max_skipped_fraction)
    tracker.paths.update(meters["skipped"])
    meters["skipped"] = tracker.paths
    bar = progress.Progress(run.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", unit="step",
                            initial=first_step, enabled=run.is_main and not args.no_progress)
    return EpochProgress(meters=meters, tracker=tracker, bar=bar, step=first_step, t0=time.perf_counter())


def after_step(run: Run, epoch: int, ep: EpochProgress) -> None:
    """At log points the losses are checked; every --save-every-steps steps inside the epoch, last.pt is
    written; then the test hooks (--debug-kill-after-steps, --debug-signal-after-steps)."""
    args = run.args
    saving = args.save_every_steps and ep.step % args.save_every_steps == 0 and ep.step < run.steps_per_epoch
    if saving or run.global_step % args.log_every == 0:
        check_pending_losses(run, ep)
    if saving:
        save_checkpoint(run, os.path.join(run.out, "last.pt"), epoch, ep.step, ep.meters)
    if ep.step < run.steps_per_epoch:  # the epoch's last step is followed by its end-of-epoch save
        debug_kill(run)
    if args.debug_signal_after_steps is not None and run.global_step == args.debug_signal_after_steps:
        os.kill(os.getpid(), getattr(signal, args.debug_signal))


def check_pending_losses(run: Run, ep: EpochProgress) -> None:
    """The losses since the last check: NaN/inf stops the run; meters and progress bar advance."""
    checked = _check_losses(ep.pending, run.last_good_sentence())
    ep.pending.clear()
    for losses, batch_images in checked:
        ep.meters["sums"] = [s + v * batch_images for s, v in zip(ep.meters["sums"], losses)]
        ep.meters["images"] += int(batch_images)
        ep.seen += int(batch_images)
    if checked and run.is_main:
        rate = ep.seen / max(time.perf_counter() - ep.t0, 1e-9)
        ep.bar.set_postfix(loss=f"{checked[-1][0][0]:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                             img_s=f"{rate:.1f}")


# ---------------------------------------------------------------------------------------------- validation


def validate(run: Run, epoch: int, record: dict) -> bool:
    """Validates the epoch's model into `record` ("val", "val_split", "val_time_s", then "best") and keeps the
    best epoch by Top-1 Loc of the map M. True when this epoch is the best so far (without validation: always).
    A failing validation saves the epoch's training first."""

    if run.val_loader is None:
        record["best"] = run.best
        return True  # no validation: the latest epoch is the one kept as best.pt
    t1 = time.perf_counter()
    try:
        results = evaluate_model(_unwrap(run.model), run.val_loader, run.device, amp=run.args.amp,
                                 cam_threshold=run.args.cam_threshold, map_keys=("map",), box_eval=False,
                                 threshold_sweep=False, progress=False)
    except Exception:  # the epoch's training is kept: save it before the error ends the run
        last = os.path.join(run.out, "last.pt")
        save_checkpoint(run, last, epoch + 1, 0, None)
        warn(f"validation of epoch {epoch + 1} failed; the epoch's training was saved first to {last} "
             f"(--resume continues with epoch {epoch + 2})")
        raise
    record["val"] = results.get("M", {})
    record["val_split"] = run.val_split
    record["val_time_s"] = time.perf_counter() - t1
    top1 = record["val"]["top1_loc"]
    is_best = top1 > run.best["top1_loc"]
    if is_best:
        run.best = {"top1_loc": top1, "epoch": epoch + 1}
    record["best"] = run.best
    return is_best


# ---------------------------------------------------------------------------------------------- logging


def epoch_record(run: Run, epoch: int, ep: EpochProgress) -> dict:
    """The epoch's metrics.jsonl line so far: LR, mean training losses, images (used, skipped), images/s.
    Warns about the unreadable training images of all ranks."""
    parts = dist_utils.all_gather_objects(ep.tracker.paths)
    skipped = sorted({p: r for part in parts for p, r in part.items()}.items())
    if skipped:
        warn(f"epoch {epoch + 1}: skipped {len(skipped)} unreadable training image(s), e.g. "
             + "; ".join(f"{p} ({r})" for p, r in skipped[:3]))
    meters = ep.meters
    return {"epoch": epoch + 1, "global_step": run.global_step, "lr": run.optimizer.param_groups[0]["lr"],
            "train": {k: s / max(1, meters["images"]) for k, s in zip(LOSS_KEYS, meters["sums"])},
            "train_images": meters["images"], "skipped_images": len(skipped),
            "skipped_files": [p for p, _ in skipped[:100]],
            "images_per_s": ep.seen / max(ep.train_time, 1e-9), "train_time_s": ep.train_time}


def say_epoch(run: Run, epoch: int, record: dict) -> None:
    """The epoch's line: its loss and, with validation, its headline metrics and the best epoch."""

    if run.val_loader is None:
        _say(f"epoch {epoch + 1}: loss {record['train']['loss']:.4f}")
        return
    best = run.best
    _say(f"epoch {epoch + 1}: loss {record['train']['loss']:.4f}, {run.val_split} "
         + headline(record["val"], "M") + f" (best Top-1 Loc {best['top1_loc']:.2f} at epoch {best['epoch']})")


def log_epoch(run: Run, epoch: int, record: dict) -> None:
    """The epoch's line in metrics.jsonl and its scalars in tensorboard (rank 0)."""
    run.log.write(record)
    if run.tb is None:
        return
    for k, v in record["train"].items():
        run.tb.add_scalar(f"train/{k}", v, epoch + 1)
    for k, v in record.get("val", {}).items():
        if isinstance(v, (int, float)):
            run.tb.add_scalar(f"val/{k}", v, epoch + 1)
    run.tb.add_scalar("lr", record["lr"], epoch + 1)
    run.tb.flush()


def draw_epoch_panels(run: Run, epoch: int) -> None:
    """--visualize N: the maps of the first N validation images into RUN_DIR/panels/ (rank 0)."""
    if not run.args.visualize or run.val_set is None:
        return

    with _autocast(run.device, run.args.amp):
        draw_panels(_unwrap(run.model), run.val_set, range(min(run.args.visualize, len(run.val_set))),
                    os.path.join(run.out, "panels"), run.args.cam_threshold, epoch=epoch + 1, quiet=True)


def finish(run: Run) -> None:
    """The end of a run that trained all its epochs: where its checkpoints are."""
    if run.tb is not None:
        run.tb.close()
    out, best = run.out, run.best
    _say(f"done: {out}/last.pt, {out}/best.pt (best validation Top-1 Loc {best['top1_loc']:.2f} "
         f"at epoch {best['epoch']})" if run.val_loader is not None else f"done: {out}/last.pt")
    dist_utils.cleanup()


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run, path: str, epoch: int, step: int, meters: dict | None) -> None:
    """A resumable checkpoint at `step` of `epoch` (step 0: the epoch's start), written by rank 0 with every
    rank's RNG streams. Non-finite weights are never saved: a bad update does not replace a good file."""
    if not weights_finite(run.model):  # one sync per checkpoint
        raise NonFiniteLoss(f"non-finite weights after global step {run.global_step}: not saved; "
                            f"{run.last_good_sentence()}. Lower --lr or try --clip-grad / --amp none.")
    rngs = dist_utils.all_gather_objects(ckpt_lib.rng_state())  # every rank's stream (collective)
    if run.is_main:
        ckpt_lib.save_atomic({
            "model": _unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "epoch": epoch, "step": step, "global_step": run.global_step,
            "rng": rngs, "best_metric": dict(run.best), "config": run.config,
            "train_args": ckpt_lib.plain(vars(run.args)), "meters": ckpt_lib.plain(meters),
        }, path)
    run.last_good = (path, epoch, step)


def save_epoch_checkpoints(run: Run, epoch: int, is_best: bool) -> None:
    """last.pt at the end of the epoch; best.pt the same file when the epoch is the best."""
    last = os.path.join(run.out, "last.pt")
    save_checkpoint(run, last, epoch + 1, 0, None)
    if run.is_main and is_best:
        ckpt_lib.link_or_copy(last, os.path.join(run.out, "best.pt"))


# ---------------------------------------------------------------------------------------------- stopping


def stop_requested(run: Run) -> bool:
    """SIGINT / SIGTERM arrived (on any rank)."""
    if run.world > 1:
        return _any_rank([run.stop.signum is not None], run.flag_group)[0]
    return run.stop.signum is not None


def stop_run(run: Run, epoch: int, step: int, meters: dict | None) -> int:
    """After SIGINT/SIGTERM: a resumable checkpoint at the step reached, and how to resume it. Returns the exit
    code, 128 + the signal."""
    path = os.path.join(run.out, "last.pt")
    save_checkpoint(run, path, epoch, step, meters)
    name = signal.Signals(run.stop.signum).name
    _say(f"{name}: stopped at epoch {epoch + 1}, step {step} (global step {run.global_step}); saved {path}. "
         f"Resume with:\n  {resume_command(run.args)}")
    dist_utils.cleanup()
    return 128 + run.stop.signum


def debug_kill(run: Run) -> None:
    """--debug-kill-after-steps: a hard exit (as if killed) once that many steps are done."""
    if run.args.debug_kill_after_steps is not None and run.global_step >= run.args.debug_kill_after_steps:
        dist_utils.barrier()
        os._exit(137)
