"""Inference speed of the exported module: eager vs TorchScript vs AOTInductor vs the C++ program.

    python benchmarks/bench_inference.py [--arch conformer_tiny_patch16] [--img-size 224] [--batches 1 64]
        [--iters 20] [--iters-large 5] [--device cpu|cuda] [--dbc-infer csrc/example/build/dbc_infer] [--out results.json]

One run measures everything side by side on the same seeded model (1000 classes) and the same pixels:
* eager: dbc_fast.export.InferenceModule in Python (torch.no_grad), the reference;
* torchscript: the traced file loaded with torch.jit.load, in Python;
* aoti: the .pt2 (torch.export + AOTInductor) loaded with torch._inductor.aoti_load_package, in Python;
* cpp-torchscript / cpp-aoti: csrc/example's dbc_infer --bench (libtorch, no Python), when built.
Each figure is the median over --iters (batch < 16) or --iters-large timed calls after 3 warm-up calls;
throughput = batch / median.
The whole module is timed (normalisation, model, map upsampling, box op, top-k). Prints a Markdown
table for benchmarks/RESULTS.md with device, versions and the command.

pytest-benchmark: `python -m pytest benchmarks/bench_inference.py --benchmark-only` times eager and
TorchScript at batch 1 (small, 64x64 input) with the same module.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, iters: int, sync) -> list:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def build(arch: str, img_size: int, device: str, topk: int = 5):
    import dbc_fast
    from dbc_fast import export as ex

    ex.load_op_library()
    torch.manual_seed(0)
    model = dbc_fast.create_model(arch, 1000, method="dbc").to(device).eval()
    return ex.InferenceModule(model, (img_size, img_size), cam_threshold=0.2, topk=topk).to(device).eval()


def run(args) -> dict:
    from dbc_fast import export as ex

    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = build(args.arch, args.img_size, device)
    meta = ex.metadata_for(module, {"class_names": [str(i) for i in range(1000)]}, "uint8", device)
    work = tempfile.mkdtemp(prefix="dbc_bench_")
    paths = {"torchscript": os.path.join(work, "model.ts"), "aoti": os.path.join(work, "model.pt2")}
    timings = {}
    runners = {"eager": module}
    if "torchscript" in args.variants:
        start = time.time()
        ex.export_torchscript(module, paths["torchscript"], meta, ex.example_inputs(module, 2, "uint8", device))
        timings["export_torchscript_s"] = time.time() - start
        runners["torchscript"] = ex.ExportedModel(paths["torchscript"])
    if "aoti" in args.variants:
        start = time.time()
        ex.export_aoti(module, paths["aoti"], meta, ex.example_inputs(module, 2, "uint8", device),
                       max_batch=max(args.batches))
        timings["export_aoti_s"] = time.time() - start
        runners["aoti"] = ex.ExportedModel(paths["aoti"])

    rows = []
    for batch in args.batches:
        iters = args.iters if batch < 16 else args.iters_large
        images, classes = ex.example_inputs(module, batch, "uint8", device, seed=batch)
        reference = None
        for name, runner in runners.items():
            def call(runner=runner):
                with torch.no_grad():
                    return runner(images, classes)
            out = call()
            if reference is None:
                reference = out
            diffs = ex.compare_outputs(reference, out)
            times = _time(call, iters, sync)
            median = statistics.median(times)
            rows.append({"variant": name, "batch": batch, "median_ms": median, "min_ms": min(times),
                         "images_per_s": batch * 1000.0 / median, "max_logit_diff": diffs["logits"],
                         "box_mismatches": diffs["boxes"]})
            print(json.dumps(rows[-1]), flush=True)
        if args.dbc_infer and os.path.exists(args.dbc_infer) and len(runners) > 1:
            image = _bench_image(work, args.image)
            for name in (v for v in ("torchscript", "aoti") if v in runners):
                cmd = [args.dbc_infer, paths[name], image, "--ops", ex.load_op_library(), "--bench", str(iters),
                       "--batch", str(batch)]
                if device == "cuda":
                    cmd += ["--device", "cuda"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"dbc_infer failed: {done.stderr[-2000:]}", file=sys.stderr)
                    continue
                bench = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"variant": f"cpp-{name}", "batch": batch, "median_ms": bench["median_ms"],
                             "min_ms": bench["min_ms"], "images_per_s": bench["images_per_s"],
                             "max_logit_diff": None, "box_mismatches": None})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "timings": timings, "env": _environment(device), "args": vars(args)}


def _bench_image(work: str, image: str | None) -> str:
    """A real photo for the C++ program: --image, else the first ILSVRC val image of ../shared/data (or of
    .carry/data on a device machine, where ../shared does not travel)."""
    if image:
        return image
    import tarfile

    archive = os.path.join(ROOT, "..", "shared", "data", "ilsvrc-val-300.tar")
    if not os.path.exists(archive):
        archive = os.path.join(ROOT, ".carry", "data", "ilsvrc-val-300.tar")
    if not os.path.exists(archive):
        raise SystemExit("bench_inference: no image for dbc_infer: pass --image or carry "
                         ".carry/data/ilsvrc-val-300.tar")
    with tarfile.open(archive) as tar:
        member = sorted((m for m in tar.getmembers() if m.name.endswith(".JPEG")), key=lambda m: m.name)[0]
        tar.extractall(work, members=[member], filter="data")
    return os.path.join(work, member.name)


def _environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
           platform.machine(), "threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"Device: {env['device']} ({env.get('gpu', env['cpu'])}, {env['threads']} threads); torch {env['torch']}, "
             f"Python {env['python']}. Export times: " + (", ".join(
                 f"{k[7:-2]} {v:.0f} s" for k, v in result["timings"].items()) or "none") + ".", "",
             "| variant | batch | median ms | min ms | images/s | max abs logit diff vs eager | box mismatches |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        diff = "-" if r["max_logit_diff"] is None else f"{r['max_logit_diff']:.1e}"
        boxes = "-" if r["box_mismatches"] is None else f"{int(r['box_mismatches'])}"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['images_per_s']:.1f} | {diff} | {boxes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="conformer_tiny_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--variants", default="eager,torchscript,aoti",
                   help="comma list of the Python runners to export and time: eager (always, the reference), "
                        "torchscript, aoti (default all three); dbc_infer runs each exported one")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--iters", type=int, default=20, help="timed calls per figure for batches < 16 (default 20)")
    p.add_argument("--iters-large", type=int, default=5, help="timed calls per figure for batches >= 16 (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dbc-infer", default=os.path.join(ROOT, "csrc", "example", "build", "dbc_infer"),
                   help="the built C++ example (skipped if missing or empty)")
    p.add_argument("--image", default=None, help="image for the C++ program (default: an ILSVRC val image)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.variants = ["eager"] + [v for v in args.variants.split(",") if v and v != "eager"]
    bad = [v for v in args.variants if v not in ("eager", "torchscript", "aoti")]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from eager, torchscript, aoti")
    result = run(args)
    print()
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


# ------------------------------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # the script itself does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def small_runners():
        """Eager and TorchScript of conformer_tiny at 64x64 (small enough for a CPU run), same pixels."""
        from dbc_fast import export as ex

        module = build("conformer_tiny_patch16", 64, "cpu")
        path = os.path.join(tempfile.mkdtemp(prefix="dbc_bench_"), "model.ts")
        ex.export_torchscript(module, path, ex.metadata_for(module, {}, "uint8", "cpu"),
                              ex.example_inputs(module, 2, "uint8", "cpu"))
        return {"eager": module, "torchscript": ex.ExportedModel(path)}, ex.example_inputs(module, 1, "uint8", "cpu")

    @pytest.mark.parametrize("variant", ["eager", "torchscript"])
    def test_inference_batch1(benchmark, small_runners, variant):
        runners, (images, classes) = small_runners

        def call():
            with torch.no_grad():
                return runners[variant](images, classes)

        benchmark(call)


if __name__ == "__main__":
    sys.exit(main())
