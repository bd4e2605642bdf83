"""The paper's Table 10 for a model (behind `dbc-fast profile`): parameters, MACs, inference memory, epoch time.

- params: every parameter of the model (backbone, heads, the DBC head's M_c convolution).
- macs: torch.utils.flop_counter.FlopCounterMode over one forward pass at batch 1 in eval mode (it counts the
  matrix products, convolutions and attention products), MACs = FLOPs / 2, as the paper reports them.
- inference_memory_mb: on CUDA, torch.cuda.max_memory_allocated() during one no-grad forward at batch 1 in
  float32, with the model already on the device: weights + activations + workspace, in MiB (2^20 bytes).
  null on CPU: the CPU allocator keeps no peak counter, and process-wide figures (RSS, tracemalloc) do not
  measure what torch allocates for one forward.
- seconds_per_epoch: on CUDA, the mean time of a `dbc-fast train` step (forward with the losses, backward,
  timm's fused AdamW; channels_last; synthetic images already on the device, so data loading is not in
  it) at --batch-size, after warm-up steps, times the steps of a training epoch of --epoch-images images
  (the trainer drops the last partial batch: 5,994 CUB images at 64 = 93 steps). null on CPU.
The paper's figures for Conformer-Ti / -S (Table 10; CUB, 200 classes, one V100) are printed beside ours.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

PAPER_TABLE_10 = {  # arch -> the paper's Table 10 row
    "conformer_tiny_patch16": {"params": 23.0e6, "macs": 5.2e9, "inference_memory_mb": 161.8,
                               "seconds_per_epoch": 34.0},
    "conformer_small_patch16": {"params": 36.6e6, "macs": 10.6e9, "inference_memory_mb": 309.7,
                                "seconds_per_epoch": 55.0},
}
CUB_TRAIN_IMAGES = 5994


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, img_size: int, device: torch.device) -> int:
    """Multiply-accumulates of one eval-mode forward at batch 1 (FlopCounterMode FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)  # Q K^T and A V

    # the CPU flash-attention kernel has no formula in torch (the CUDA ones do): without this the CPU count
    # would miss every attention product
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    images = torch.randn(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with torch.no_grad(), counter:
        model(images)
    return counter.get_total_flops() // 2


def inference_memory_mb(model: torch.nn.Module, img_size: int, device: torch.device) -> tuple[float | None, ...]:
    """(allocated, reserved): peak CUDA memory (MiB) of a no-grad float32 forward at batch 1, weights
    included - what tensors held, and what the caching allocator held from the driver; None off CUDA."""
    if device.type != "cuda":
        return None, None
    images = torch.randn(1, 3, img_size, img_size, device=device)
    with torch.no_grad():
        model(images)  # first call: lazy initialisations (cuBLAS handles, kernels) out of the measurement
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model(images)
        torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20


def seconds_per_epoch(model: torch.nn.Module, args, device: torch.device) -> tuple[float | None, float | None]:
    """(seconds per epoch, seconds per step) of training steps as the trainer runs them; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    from .train import build_optimizer, configure_device, train_step

    configure_device(device)
    model.train().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, SimpleNamespace(lr=5e-4, weight_decay=5e-4, opt_eps=1e-8, betas=(0.9, 0.99)),
                                device)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=generator)
    for _ in range(args.warmup_steps):
        train_step(model, optimizer, images, labels, amp=args.amp)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, images, labels, amp=args.amp)
    torch.cuda.synchronize(device)
    per_step = (time.perf_counter() - start) / args.steps
    return per_step * (args.epoch_images // args.batch_size), per_step


def profile(args) -> dict:
    """The figures as JSON-ready values (null where not measured)."""
    import dbc_fast

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = dbc_fast.create_model(args.arch, args.num_classes, method=args.method,
                                  ops_backend=args.ops_backend).to(device).eval()
    report = {"arch": args.arch, "method": args.method, "num_classes": args.num_classes, "img_size": args.img_size,
              "ops_backend": args.ops_backend,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "params": count_params(model), "macs": count_macs(model, args.img_size, device)}
    report["inference_memory_mb"], report["inference_memory_reserved_mb"] = inference_memory_mb(
        model, args.img_size, device)
    report["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    epoch, step = seconds_per_epoch(model, args, device)
    report.update(seconds_per_epoch=epoch, seconds_per_step=step, batch_size=args.batch_size,
                  epoch_images=args.epoch_images, amp=args.amp)
    report["paper"] = PAPER_TABLE_10.get(args.arch)
    return report


def format_report(r: dict) -> list[str]:
    paper = r["paper"] or {}

    def row(name, ours, theirs, fmt):
        mine = "not measured" if ours is None else fmt(ours)
        return f"{name:<26}{mine:>16}{fmt(theirs) if theirs is not None else '-':>12}"

    millions, billions = (lambda v: f"{v / 1e6:.1f} M"), (lambda v: f"{v / 1e9:.2f} G")
    lines = [f"{r['arch']} / {r['method']}, {r['num_classes']} classes, {r['img_size']}x{r['img_size']}, "
             f"on {r['device']}",
             f"{'':<26}{'ours':>16}{'paper':>12}",
             row("params", r["params"], paper.get("params"), millions),
             row("MACs (batch 1)", r["macs"], paper.get("macs"), billions),
             row("inference memory (MiB)", r["inference_memory_mb"], paper.get("inference_memory_mb"),
                 lambda v: f"{v:.1f}"),
             row(f"s / epoch ({r['epoch_images']} @ {r['batch_size']})", r["seconds_per_epoch"],
                 paper.get("seconds_per_epoch"), lambda v: f"{v:.1f}")]
    if paper:
        lines.append("paper: Table 10 (CUB, i.e. 200-class heads, on one V100; how it measured memory is not stated)")
    return lines


