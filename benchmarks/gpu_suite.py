"""One command for a GPU lease: build, check and time dbc_fast in parts, by priority, under one deadline.

    bash benchmarks/gpu_suite.sh [--budget SECONDS] [--parts a,b,c] [--out DIR] [--dali-parts DIR] [--dry-run]

Runs on the device machine (python3 with torch + CUDA, Triton, nvcc, ninja, timm, pytest) from a copy of the
working tree. Parts run in the order of PARTS (most important first). Each part is a subprocess with its own
time limit; a part starts only when at least its `min_s` seconds of the budget are left (else it is skipped with
a note), and it is cut at the deadline. A failing part never stops the ones after it: every benchmark measures
what is available (the build falls back to an install without the op library, so Triton and eager still run).
Writes, under --out (default $OUT):
  summary.json  device, versions, every part's status and seconds, every part's results, the headline figures;
  log.txt       everything every part printed;
  results.md    the results as Markdown tables (for benchmarks/RESULTS.md).
--dry-run runs every part at toy size on the CPU (no GPU: TRITON_INTERPRET=1, tiny shapes, few iterations,
light torch.compile backends), so the suite itself is tested in CI. See benchmarks/README.md for the lease.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import tempfile
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DALI_SITE = "/tmp/dbc_fast_site"  # where carried wheels are installed (pip --target)


class Part:
    """One step of the suite. gpu/dry: argv builders (work dir -> list of str); None = the part has no run there.

    min_s: seconds of budget that must be left to start it (parts that save results as they go can start with
    less than their full length and keep what they measured); limit_s: its own time limit; expect_s: its usual
    length on an H100 (a planning figure, from the parts' sizes: not a measurement until a run confirms it).
    """

    def __init__(self, name, what, expect_s, min_s, limit_s, gpu, dry=None, result=None, when=None):
        self.name, self.what, self.expect_s, self.min_s, self.limit_s = name, what, expect_s, min_s, limit_s
        self.gpu, self.dry, self.result, self.when = gpu, dry or gpu, result, when


def _bench(script, *args):
    return [PY, os.path.join("benchmarks", script), *args]


def _pytest(expr, xml):
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests/test_kernels.py",
            "-k", expr, f"--junitxml={xml}"]


# tests/test_kernels.py's GPU tests (named test_cuda_*): first every one but the fp32 (dtype0) and fp16 (dtype2)
# cases of the backend-vs-float64 test, which come later
BF16_TESTS = "test_cuda and not (cuda_backends and (dtype0 or dtype2))"
OTHER_TESTS = "test_cuda and cuda_backends and (dtype0 or dtype2)"
STEP_TOY = ["--device", "cpu", "--batch", "2", "--img-size", "64", "--warmup", "1", "--steps", "1"]
KERNEL_TOY = ["--device", "cpu", "--tiny", "--shapes", "Ti", "--calls", "2", "--reps", "2", "--compile-backend",
              "aot_eager"]
ARCH_SHORT = {"conformer_tiny_patch16": "Ti", "conformer_small_patch16": "S"}


def _dali_carried(args) -> bool:
    return bool(_dali_pieces(args))


def _dali_pieces(args):
    dirs = [args.dali_parts, os.path.join(ROOT, ".carry", "dali")]
    return sorted(p for d in dirs if d and os.path.isdir(d) for p in glob.glob(os.path.join(d, "part.*")))


def _loader_data(args):
    carried = os.path.join(ROOT, ".carry", "data", "ilsvrc-val-300.tar")
    if os.path.exists(carried):
        return carried
    shared = os.path.join(ROOT, "..", "shared", "data", "ilsvrc-val-300.tar")
    return shared if args.dry_run and os.path.exists(shared) else None


def _dbc_infer_binary():
    return os.path.join(ROOT, "csrc", "example", "build", "dbc_infer")


def parts_for(args) -> list:
    w = args.work
    j = lambda name: os.path.join(w, f"{name}.json")  # noqa: E731
    x = lambda name: os.path.join(w, f"{name}.xml")  # noqa: E731
    suite = [PY, os.path.abspath(__file__)]
    dali_dirs = ",".join(d for d in (args.dali_parts, os.path.join(ROOT, ".carry", "dali")) if d)
    data = _loader_data(args)
    return [
        Part("env", "device, versions, copy bandwidth and bf16 matmul rate", 10, 5, 60,
             lambda: suite + ["--probe-env", j("env")], lambda: suite + ["--probe-env", j("env"), "--dry-run"],
             result=j("env")),
        Part("build", "op library for sm_90 (pip install -e ., TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16); backends",
             80, 30, 180, lambda: suite + ["--build", j("build")], lambda: suite + ["--build", j("build"), "--dry-run"],
             result=j("build")),
        Part("dali_install", "join, verify (sha256) and install the carried DALI wheels", 20, 15, 90,
             lambda: [PY, "benchmarks/dali_carry.py", "install", "--pieces", dali_dirs, "--target", DALI_SITE,
                      "--json", j("dali_install")],
             lambda: [PY, "benchmarks/dali_carry.py", "install", "--pieces", dali_dirs, "--target", DALI_SITE,
                      "--verify-only", "--json", j("dali_install")],
             result=j("dali_install"), when=lambda: None if _dali_carried(args) else "DALI not carried"),
        Part("tests_bf16", "GPU correctness: bf16 and bf16 masks, Triton and CUDA backends vs float64 eager (pytest)", 50, 20, 150,
             lambda: _pytest(BF16_TESTS, x("tests_bf16")), result=x("tests_bf16")),
        Part("step_eager", "training step, eager: Ti and S, plain vs DBC (auto ops), fused AdamW", 45, 25, 150,
             lambda: _bench("bench_step.py", "--archs", "Ti,S", "--variants", "plain,dbc-auto", "--opt", "fused",
                            "--out", j("step_eager")),
             lambda: _bench("bench_step.py", "--archs", "Ti,S", "--variants", "plain,dbc-auto", "--opt", "fused",
                            *STEP_TOY, "--out", j("step_eager")),
             result=j("step_eager")),
        Part("kernels_bf16_cl", "kernels bf16, pooling channels_last + losses, Ti and S: eager/compile/triton/cuda",
             60, 20, 120,
             lambda: _bench("bench_kernels.py", "--dtypes", "bf16", "--layouts", "channels_last", "--out",
                            j("kernels_bf16_cl")),
             lambda: _bench("bench_kernels.py", "--dtypes", "bf16", "--layouts", "channels_last", *KERNEL_TOY,
                            "--out", j("kernels_bf16_cl")),
             result=j("kernels_bf16_cl")),
        Part("sync_audit", "host syncs of the trainer's step (count_step_syncs), Ti batch 64", 20, 15, 90,
             lambda: _bench("bench_step.py", "--variants", "", "--sync-audit", "--out", j("sync_audit")),
             lambda: _bench("bench_step.py", "--variants", "", "--sync-audit", *STEP_TOY, "--out", j("sync_audit")),
             result=j("sync_audit")),
        Part("dali_loader", "DALI GPU pipeline vs torch loader (16 workers), alone and feeding the Ti step", 60, 30,
             150,
             lambda: [PY, "-m", "dbc_fast", "bench-loader", "--data", data or "", "--batch-size", "64",
                      "--num-workers", "16", "--batches", "20", "--warmup", "3", "--steps", "20",
                      "--arch", "conformer_tiny_patch16", "--amp", "bf16", "--channels-last", "--json",
                      j("dali_loader")],
             lambda: [PY, "-m", "dbc_fast", "bench-loader", "--data", data or "", "--device", "cpu",
                      "--max-images", "8", "--img-size", "64", "--batch-size", "4", "--num-workers", "1",
                      "--batches", "1", "--warmup", "1", "--no-train-step", "--json", j("dali_loader")],
             result=j("dali_loader"),
             when=lambda: ("loader data not carried (.carry/data/ilsvrc-val-300.tar)" if data is None else
                           None if _dali_importable(args) else "DALI not installed (not carried)")),
        Part("step_compile_ti", "training step, torch.compile (default mode): Ti, DBC (auto) then plain", 150, 100,
             300,
             lambda: _bench("bench_step.py", "--archs", "Ti", "--variants", "dbc-auto,plain", "--compile", "default",
                            "--out", j("step_compile_ti")),
             lambda: _bench("bench_step.py", "--archs", "Ti", "--variants", "dbc-auto,plain", "--compile", "default",
                            "--compile-backend", "eager", *STEP_TOY, "--out", j("step_compile_ti")),
             result=j("step_compile_ti")),
        Part("tests_other", "GPU correctness, fp32 and fp16, both backends (pytest)", 60, 20, 150,
             lambda: _pytest(OTHER_TESTS, x("tests_other")), result=x("tests_other")),
        Part("inference", "inference: eager vs TorchScript, batch 1 and 64", 40, 25, 150,
             lambda: _bench("bench_inference.py", "--device", "cuda", "--variants", "eager,torchscript",
                            "--batches", "1", "64", "--iters", "20", "--iters-large", "10", "--dbc-infer", "",
                            "--out", j("inference")),
             lambda: _bench("bench_inference.py", "--device", "cpu", "--variants", "eager,torchscript",
                            "--img-size", "64", "--batches", "1", "2", "--iters", "1", "--iters-large", "1",
                            "--dbc-infer", "", "--out", j("inference")),
             result=j("inference")),
        Part("kernels_bf16_nchw", "kernels bf16, pooling NCHW, Ti and S", 25, 15, 90,
             lambda: _bench("bench_kernels.py", "--ops", "pool", "--dtypes", "bf16", "--layouts", "nchw", "--out",
                            j("kernels_bf16_nchw")),
             lambda: _bench("bench_kernels.py", "--ops", "pool", "--dtypes", "bf16", "--layouts", "nchw",
                            *KERNEL_TOY, "--out", j("kernels_bf16_nchw")),
             result=j("kernels_bf16_nchw")),
        Part("step_backends", "training step, eager: DBC with each ops backend (cpp, triton, eager) vs plain", 60, 25,
             150,
             lambda: _bench("bench_step.py", "--archs", "Ti,S", "--variants", "plain,dbc-cpp,dbc-triton,dbc-eager",
                            "--opt", "fused", "--out", j("step_backends")),
             lambda: _bench("bench_step.py", "--archs", "Ti", "--variants", "plain,dbc-cpp,dbc-eager", "--opt",
                            "fused", *STEP_TOY, "--out", j("step_backends")),
             result=j("step_backends")),
        Part("step_timm", "training step, eager: timm's foreach AdamW (the fused one's baseline)", 40, 20, 120,
             lambda: _bench("bench_step.py", "--archs", "Ti,S", "--variants", "plain,dbc-auto", "--opt", "timm",
                            "--out", j("step_timm")),
             lambda: _bench("bench_step.py", "--archs", "Ti", "--variants", "dbc-auto", "--opt", "timm",
                            *STEP_TOY, "--out", j("step_timm")),
             result=j("step_timm")),
        Part("kernels_fp32", "kernels fp32, pooling both layouts + losses, Ti and S", 70, 20, 150,
             lambda: _bench("bench_kernels.py", "--dtypes", "fp32", "--out", j("kernels_fp32")),
             lambda: _bench("bench_kernels.py", "--dtypes", "fp32", "--ops", "losses", *KERNEL_TOY, "--out",
                            j("kernels_fp32")),
             result=j("kernels_fp32")),
        Part("step_cudagraphs_ti", "training step, torch.compile mode=reduce-overhead (CUDA graphs): Ti", 150, 60, 300,
             lambda: _bench("bench_step.py", "--archs", "Ti", "--variants", "dbc-auto,plain", "--compile",
                            "reduce-overhead", "--out", j("step_cudagraphs_ti")),
             lambda: _bench("bench_step.py", "--archs", "Ti", "--variants", "plain", "--compile", "reduce-overhead",
                            "--compile-backend", "eager", *STEP_TOY, "--out", j("step_cudagraphs_ti")),
             result=j("step_cudagraphs_ti")),
        Part("step_compile_s", "training step, torch.compile (default mode): S, DBC (auto) then plain", 180, 60, 300,
             lambda: _bench("bench_step.py", "--archs", "S", "--variants", "dbc-auto,plain", "--compile", "default",
                            "--out", j("step_compile_s")),
             lambda: _bench("bench_step.py", "--archs", "S", "--variants", "plain", "--compile", "default",
                            "--compile-backend", "eager", *STEP_TOY, "--out", j("step_compile_s")),
             result=j("step_compile_s")),
        Part("dbc_infer_build", "build csrc/example (dbc_infer, libtorch C++) with cmake", 60, 30, 150,
             lambda: suite + ["--build-dbc-infer", j("dbc_infer_build")],
             lambda: suite + ["--build-dbc-infer", j("dbc_infer_build"), "--dry-run"], result=j("dbc_infer_build"),
             when=lambda: None if not args.dry_run or os.access(_dbc_infer_binary(), os.X_OK) else
             "dry run: csrc/example/build/dbc_infer not built here (tests/test_export.py builds it)"),
        Part("inference_aoti", "inference: AOTInductor (Python and dbc_infer), TorchScript in dbc_infer", 150, 90, 300,
             lambda: _bench("bench_inference.py", "--device", "cuda", "--variants", "eager,torchscript,aoti",
                            "--batches", "1", "64", "--iters", "20", "--iters-large", "10", "--out",
                            j("inference_aoti")),
             lambda: _bench("bench_inference.py", "--device", "cpu", "--variants", "eager,aoti", "--img-size", "64",
                            "--batches", "1", "--iters", "1", "--iters-large", "1", "--out", j("inference_aoti")),
             result=j("inference_aoti")),
    ]


def _dali_importable(args) -> bool:
    env = _part_env(args)
    return subprocess.run([PY, "-c", "import nvidia.dali"], env=env, capture_output=True).returncode == 0


def _part_env(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    if os.path.isdir(DALI_SITE):
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + DALI_SITE
    if args.dry_run:
        # CPU only; one thread per process (the CI machine is small and shared)
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    else:
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        env.setdefault("MAX_JOBS", "16")
    return env


# ------------------------------------------------------------------------------------------ running parts


def run_part(part, args, deadline, log) -> dict:
    rec = {"name": part.name, "what": part.what, "status": "skipped", "seconds": 0.0, "expect_s": part.expect_s,
           "min_s": part.min_s, "limit_s": part.limit_s}
    left = deadline - time.monotonic()
    why_not = part.when() if part.when else None
    if why_not:
        rec["note"] = why_not
    elif left < part.min_s:
        rec["note"] = f"not enough time: {left:.0f} s of the budget left, needs at least {part.min_s} s"
    if "note" in rec:
        _say(log, f"=== {part.name}: skipped ({rec['note']})")
        return rec
    argv = (part.dry if args.dry_run else part.gpu)()
    limit = max(1, min(part.limit_s * (2 if args.dry_run else 1), int(left)))  # the dry run's CPU is slower
    rec.update(command=" ".join(shlex.quote(a) for a in argv), limit_applied_s=limit)
    _say(log, f"=== {part.name} (t={args.elapsed():.0f} s, limit {limit} s): {part.what}\n$ {rec['command']}")
    start = time.monotonic()
    with open(args.log_path, "a") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=_part_env(args), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            rec["note"] = f"stopped at its limit ({limit} s); results saved so far are kept"
            rc = "timeout"
    rec["seconds"] = round(time.monotonic() - start, 1)
    rec["rc"] = rc
    rec["status"] = "ok" if rc == 0 else "timeout" if rc == "timeout" else "failed"
    _say(log, f"--- {part.name}: {rec['status']} ({rec['seconds']} s, rc {rc})")
    return rec


def _say(log, msg):
    print(msg, flush=True)
    log.write(msg + "\n")
    log.flush()


def _row_errors(res) -> list:
    """The failed measurements (rows with an error, failed tests) of a part's results."""
    if not isinstance(res, dict):
        return []
    out = [r["error"] for r in res.get("rows", []) if isinstance(r, dict) and r.get("error")]
    out += [f"{f['test']}: {f['message']}" for f in res.get("failures", [])]
    if isinstance(res.get("sync_audit"), dict) and res["sync_audit"].get("status") == "error":
        out.append(res["sync_audit"]["error"])
    return out[:20]


def read_result(path):
    if path is None or not os.path.exists(path):
        return None
    if path.endswith(".xml"):
        return junit_summary(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        return {"unreadable": str(err)}


def junit_summary(path) -> dict:
    """Counts and the failing tests' names and first message lines from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    out = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif skip is not None:
            out["skipped"] += 1
            reason = (skip.get("message") or "")[:200]
            if reason not in out["skip_reasons"]:
                out["skip_reasons"].append(reason)
        else:
            out["passed"] += 1
    cases = list(root.iter("testcase"))
    out["passed_names"] = [c.get("name") for c in cases
                           if c.find("failure") is None and c.find("error") is None and c.find("skipped") is None]
    out["skipped_names"] = [c.get("name") for c in cases if c.find("skipped") is not None]
    return out


# ------------------------------------------------------------------------------------------ helper steps


def probe_env(path, dry_run) -> int:
    """Versions, the device's properties, and two reference rates measured once: a device copy and a bf16 matmul."""
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    for mod in ("triton", "timm", "numpy", "nvidia.dali"):
        try:
            out[mod.replace("nvidia.", "")] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as err:
            out[mod.replace("nvidia.", "")] = f"not importable ({type(err).__name__})"
    out["nvcc"] = _first_match(["nvcc", "--version"], r"release ([\d.]+)")
    out["ninja"] = _first_match(["ninja", "--version"], r"([\d.]+)")
    out["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                   "clocks.max.mem,power.limit", "--format=csv,noheader"])
    out["cuda_libs"] = sorted(os.path.basename(p) for p in glob.glob("/usr/local/cuda/lib64/lib*.so*")
                              if re.match(r"lib(nvjpeg|npp|cufft)", os.path.basename(p)))[:20]
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out["device"] = {"name": p.name, "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2 ** 30, 1),
                         "l2_mb": round(getattr(p, "L2_cache_size", 0) / 1e6, 1)}
    else:
        out["device"] = {"name": "cpu (dry run)" if dry_run else "cpu (no CUDA device visible)"}
    copy_bytes, mm = ((1 << 30), 8192) if device.type == "cuda" else ((1 << 24), 256)
    src = torch.empty(copy_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    out["copy_gbs"] = 2 * copy_bytes / _time_ms(lambda: dst.copy_(src), device) / 1e6
    a = torch.randn(mm, mm, device=device, dtype=torch.bfloat16)
    b = torch.randn(mm, mm, device=device, dtype=torch.bfloat16)
    out["bf16_matmul_tflops"] = 2 * mm ** 3 / _time_ms(lambda: a @ b, device) / 1e9
    out["matmul_size"] = mm
    print(json.dumps(out, indent=1))
    _write_json(path, out)
    return 0


def _time_ms(fn, device, calls=10, reps=5) -> float:
    import statistics

    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / calls)
    return statistics.median(times)


def _run_text(argv, timeout=20):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return (done.stdout + done.stderr).strip()[:2000]
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({type(err).__name__})"


def _first_match(argv, pattern):
    found = re.search(pattern, _run_text(argv))
    return found.group(1) if found else None


def _install_prebuilt(library, pip) -> bool:
    """Use an op library built elsewhere (same torch version, sm_90) when it loads and registers its CUDA
    kernels on this machine: saves the build's minutes of device time. False (and nothing kept) otherwise."""
    target = os.path.join(ROOT, "dbc_fast", "_C.so")
    if not os.path.isfile(library):
        print(f"prebuilt op library {library} not found: building", flush=True)
        return False
    backup = target + ".before-prebuilt"
    if os.path.exists(target):
        os.replace(target, backup)
    shutil.copyfile(library, target)
    installed = subprocess.run(pip, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, DBC_FAST_NO_EXT="1"))
    probe = subprocess.run([PY, "-c", "import torch, dbc_fast.ops.cpp_backend as c; import sys; "
                            "sys.exit(0 if torch.cuda.is_available() and c._has_cuda_kernels() else 3)"],
                           cwd=ROOT, capture_output=True, text=True)
    if installed.returncode == 0 and probe.returncode == 0:
        if os.path.exists(backup):
            os.remove(backup)
        return True
    print(f"prebuilt op library {library} unusable here (install rc {installed.returncode}, probe rc "
          f"{probe.returncode}: {(probe.stdout + probe.stderr)[-1500:]}): building", flush=True)
    os.remove(target)
    if os.path.exists(backup):
        os.replace(backup, target)
    return False


def build(path, dry_run) -> int:
    """pip install -e . (the op library with CUDA kernels for TORCH_CUDA_ARCH_LIST); if that fails, an install
    without the op library so Triton and eager still run. Then the backends each device gets."""
    out = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"), "MAX_JOBS": os.environ.get("MAX_JOBS")}
    pip = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    existing = glob.glob(os.path.join(ROOT, "dbc_fast", "_C*.so"))
    prebuilt = os.environ.get("DBC_FAST_PREBUILT_LIB")
    if prebuilt and not dry_run and _install_prebuilt(prebuilt, pip):
        out.update(mode="prebuilt", rc=0, note=f"op library {prebuilt} (built elsewhere against this torch) loads "
                   "with its CUDA kernels: not rebuilt")
    elif dry_run and existing:
        out.update(mode="reused", note=f"dry run: the op library {os.path.relpath(existing[0], ROOT)} is already "
                   "built here; not rebuilt", rc=0)
    else:
        start = time.monotonic()
        done = subprocess.run(pip, cwd=ROOT, capture_output=True, text=True)
        out.update(mode="built", rc=done.returncode, seconds=round(time.monotonic() - start, 1),
                   log_tail=(done.stdout + done.stderr)[-3000:], command=" ".join(pip))
        print(done.stdout[-20000:] + done.stderr[-20000:], flush=True)
        if done.returncode != 0:
            start = time.monotonic()
            fallback = subprocess.run(pip, cwd=ROOT, capture_output=True, text=True,
                                      env=dict(os.environ, DBC_FAST_NO_EXT="1"))
            out.update(fallback_rc=fallback.returncode, fallback_seconds=round(time.monotonic() - start, 1),
                       note="the op library build failed: installed without it (DBC_FAST_NO_EXT=1), so Triton "
                            "and eager still run")
            print(fallback.stdout[-5000:] + fallback.stderr[-5000:], flush=True)
    check = ("import json, torch, dbc_fast.ops as o\n"
             "devs = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])\n"
             "print(json.dumps({'library': o.library_path(), 'backends': {d: {k: list(v) for k, v in "
             "o.available_backends(d).items()} for d in devs}}))")
    done = subprocess.run([PY, "-c", check], cwd=ROOT, capture_output=True, text=True)
    try:
        out.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        out["check_error"] = (done.stdout + done.stderr)[-2000:]
    print(json.dumps({k: v for k, v in out.items() if k != "log_tail"}, indent=1), flush=True)
    _write_json(path, out)
    return 0 if out.get("rc") == 0 and "backends" in out else 1


def build_dbc_infer(path, dry_run) -> int:
    """cmake build of csrc/example (incremental in csrc/example/build; the dry run reuses the one tests built)."""
    import torch.utils

    source = os.path.join(ROOT, "csrc", "example")
    build_dir = os.path.join(source, "build")
    steps = [["cmake", "-S", source, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
             ["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 1)]]
    if dry_run:
        steps = []  # the binary exists (the part's condition) and is the one the export tests built
    out = {"binary": _dbc_infer_binary(), "steps": []}
    rc = 0
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True)
        out["steps"].append({"command": " ".join(argv), "rc": done.returncode,
                             "tail": (done.stdout + done.stderr)[-1500:]})
        print(done.stdout[-5000:] + done.stderr[-5000:], flush=True)
        rc = done.returncode
        if rc:
            break
    out["built"] = rc == 0 and os.access(_dbc_infer_binary(), os.X_OK)
    _write_json(path, out)
    return 0 if out["built"] else 1


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ summary


TARGETS = {
    "step_img_s": "Ti >= 4000 img/s and S >= 2000 img/s (H100, best mode)",
    "dbc_overhead": "DBC step <= 3% over the plain step",
    "pool": "pooling fwd+bwd at S: >= 3x eager, >= 1.5x compile, >= 70% of copy bandwidth",
    "losses": "losses fwd+bwd >= 3x eager",
}


def headlines(results: dict) -> dict:
    """The figures RESULTS.md records, pulled out of the parts' results."""
    h = {"targets": TARGETS}
    tests = {k: {x: v[x] for x in ("tests", "passed", "failed", "skipped")} for k, v in results.items()
             if k.startswith("tests_") and isinstance(v, dict) and "tests" in v}
    if tests:
        h["correctness"] = tests
    steps = []
    for name, res in results.items():
        if name.startswith("step_") and isinstance(res, dict):
            for r in res.get("rows", []):
                row = {k: r.get(k) for k in ("arch", "variant", "compile", "opt", "img_s", "ms_per_step",
                                             "host_ms_per_step", "peak_mem_gib", "dbc_overhead", "ops", "error")
                       if r.get(k) is not None}
                row.update(part=name, batch=res.get("batch"), img_size=res.get("img_size"), amp=res.get("amp"),
                           channels_last=res.get("channels_last"))
                steps.append(row)
    if steps:
        h["training_step"] = steps
    kern = []
    for name, res in results.items():
        if name.startswith("kernels_") and isinstance(res, dict):
            for r in res.get("rows", []):
                kern.append({k: r.get(k) for k in ("op", "shape", "dtype", "layout", "impl", "fwd_ms", "fwdbwd_ms",
                                                    "fwdbwd_x_eager", "fwdbwd_x_compile", "fwdbwd_copy_share",
                                                    "max_err_vs_eager", "error") if r.get(k) is not None})
    if kern:
        h["kernels"] = kern
    audit = (results.get("sync_audit") or {}).get("sync_audit")
    if audit:
        h["sync_audit"] = audit
    for name in ("inference", "inference_aoti"):
        res = results.get(name)
        if isinstance(res, dict) and res.get("rows"):
            h[name] = [{k: r.get(k) for k in ("variant", "batch", "median_ms", "images_per_s", "max_logit_diff")}
                       for r in res["rows"]]
    return h


def markdown(summary: dict) -> str:
    env = summary.get("versions", {})
    rates = {k: v or 0 for k, v in summary.get("measured", {}).items()}
    lines = [f"# GPU suite: {summary['device'].get('name')}", "",
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Triton {env.get('triton')}, nvcc "
             f"{env.get('nvcc')}, Python {env.get('python')}; copy {rates.get('copy_gbs', 0):.0f}"
             f" GB/s, bf16 matmul {rates.get('bf16_matmul_tflops', 0):.0f} TFLOP/s; "
             f"{summary['started_utc']}; `{summary['command']}`", "",
             "| part | status | s | note |", "|---|---|---:|---|"]
    for p in summary["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p.get('note', '')} |")
    h = summary["headlines"]
    if "training_step" in h:
        first = h["training_step"][0]
        lines += ["", f"## Training step (batch {first['batch']}, {first['img_size']}x{first['img_size']}, autocast "
                  f"{first['amp'] or 'none'}, channels_last {first['channels_last']})", "",
                  "| arch | variant (ops) | compile | opt | img/s | ms/step | host ms/step | peak GiB | DBC overhead |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in h["training_step"]:
            if "img_s" not in r:
                lines.append(f"| {ARCH_SHORT.get(r['arch'], r['arch'])} | {r['variant']} | {r['compile']} | "
                             f"{r['opt']} | error: {r.get('error', '')[:80]} | | | | |")
                continue
            ops = "/".join(sorted(set((r.get("ops") or {}).values())))
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            over = f"{100 * r['dbc_overhead']:+.1f}%" if "dbc_overhead" in r else "-"
            lines.append(f"| {ARCH_SHORT.get(r['arch'], r['arch'])} | {r['variant']}{f' ({ops})' if ops else ''} | "
                         f"{r['compile']} | {r['opt']} | "
                         f"{r['img_s']:.0f} | {r['ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | {mem} | {over} |")
    if "kernels" in h:
        lines += ["", "## Kernels (per call; fwd+bwd ratios)", "",
                  "| op | shape | dtype | layout | impl | fwd ms | fwd+bwd ms | x eager | x compile | % copy | max err |",
                  "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in h["kernels"]:
            if "fwdbwd_ms" not in r:
                lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r.get('layout', '-')} | {r['impl']} | "
                             f"error: {r.get('error', '')[:60]} | | | | | |")
                continue
            share = f"{100 * r['fwdbwd_copy_share']:.0f}%" if "fwdbwd_copy_share" in r else "-"
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r.get('layout', '-')} | {r['impl']} | "
                         f"{r['fwd_ms']:.4f} | {r['fwdbwd_ms']:.4f} | {r.get('fwdbwd_x_eager', 0):.2f} | "
                         f"{r.get('fwdbwd_x_compile', 0):.2f} | {share} | {r.get('max_err_vs_eager', 0):.1e} |")
    for name in ("inference", "inference_aoti"):
        if name in h:
            lines += ["", f"## {name}", "", "| variant | batch | median ms | images/s | max logit diff |",
                      "|---|---:|---:|---:|---:|"]
            for r in h[name]:
                diff = "-" if r["max_logit_diff"] is None else f"{r['max_logit_diff']:.1e}"
                lines.append(f"| {r['variant']} | {r['batch']} | {r['median_ms']:.2f} | {r['images_per_s']:.0f} | "
                             f"{diff} |")
    if "correctness" in h:
        lines += ["", "## Correctness", ""] + [f"- {k}: {v}" for k, v in h["correctness"].items()]
    if "sync_audit" in h:
        lines += ["", f"## Sync audit\n\n{json.dumps(h['sync_audit'])}"]
    return "\n".join(lines) + "\n"


def short_report(summary: dict) -> str:
    """The end of stdout (what the device tool's reply shows): part statuses and the headline figures."""
    lines = [f"device: {summary['device'].get('name')} | torch {summary['versions'].get('torch')} | "
             f"triton {summary['versions'].get('triton')} | elapsed {summary['elapsed_s']:.0f} s of "
             f"{summary['budget_s']} s"]
    for p in summary["parts"]:
        lines.append(f"  {p['name']:20s} {p['status']:8s} {p['seconds']:6.1f} s  {p.get('note', '')}")
    h = summary["headlines"]
    for k, v in h.get("correctness", {}).items():
        lines.append(f"{k}: {v}")
    for r in h.get("training_step", []):
        if "img_s" in r:
            over = f" dbc {100 * r['dbc_overhead']:+.1f}%" if "dbc_overhead" in r else ""
            lines.append(f"step {ARCH_SHORT.get(r['arch'], r['arch'])} {r['variant']} {r['compile']} {r['opt']}: {r['img_s']:.0f} img/s, "
                         f"host {r['host_ms_per_step']:.1f}/{r['ms_per_step']:.1f} ms{over}")
    for r in h.get("kernels", []):
        if "fwdbwd_ms" in r and r["impl"] != "eager":
            share = f" {100 * r['fwdbwd_copy_share']:.0f}% copy" if "fwdbwd_copy_share" in r else ""
            lines.append(f"{r['op']} {r['shape']} {r['dtype']} {r.get('layout') or ''} {r['impl']}: "
                         f"{r['fwdbwd_ms']:.4f} ms x{r.get('fwdbwd_x_eager', 0):.2f} eager "
                         f"x{r.get('fwdbwd_x_compile', 0):.2f} compile{share}")
    if "sync_audit" in h:
        lines.append(f"sync audit: {h['sync_audit']}")
    return "\n".join(lines)


def _git_commit():
    done = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for all parts together (default 480; dry run 1200: CPUs are slower)")
    p.add_argument("--parts", default=None, help="comma list of parts to run (default all, in priority order)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else /tmp/gpu_suite_out)")
    p.add_argument("--dali-parts", default="/tmp/dali_parts",
                   help="folder holding DALI pieces carried by earlier calls (default /tmp/dali_parts)")
    p.add_argument("--dry-run", action="store_true", help="every part at toy size on the CPU (tests the suite)")
    p.add_argument("--list", action="store_true", help="list the parts with their planning times and exit")
    p.add_argument("--probe-env", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--build", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--build-dbc-infer", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_env:
        return probe_env(args.probe_env, args.dry_run)
    if args.build:
        return build(args.build, args.dry_run)
    if args.build_dbc_infer:
        return build_dbc_infer(args.build_dbc_infer, args.dry_run)

    if args.budget is None:
        args.budget = 1200 if args.dry_run else 480
    out_dir = args.out or os.environ.get("OUT") or "/tmp/gpu_suite_out"
    os.makedirs(out_dir, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix="gpu_suite_work_")  # the parts' own JSON, gathered into summary.json
    parts = parts_for(args)
    names = [x.name for x in parts]
    if args.list:
        total = 0
        for x in parts:
            total += x.expect_s
            print(f"{x.name:20s} ~{x.expect_s:4d} s (starts with >= {x.min_s:3d} s left, limit {x.limit_s:3d} s; "
                  f"cumulative ~{total} s)  {x.what}")
        return 0
    if args.parts:
        wanted = args.parts.split(",")
        bad = [x for x in wanted if x not in names]
        if bad:
            p.error(f"unknown part(s) {', '.join(bad)}; parts are: {', '.join(names)}")
        parts = [x for x in parts if x.name in wanted]
    args.log_path = os.path.join(out_dir, "log.txt")
    t0 = time.monotonic()
    args.elapsed = lambda: time.monotonic() - t0
    deadline = t0 + args.budget
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = "bash benchmarks/gpu_suite.sh " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    records, results = [], {}
    with open(args.log_path, "w") as log:
        _say(log, f"gpu_suite {'dry run ' if args.dry_run else ''}started {started}; budget {args.budget} s; "
                  f"parts {', '.join(x.name for x in parts)}")
        for part in parts:
            rec = run_part(part, args, deadline, log)
            records.append(rec)
            res = read_result(part.result) if rec.get("rc") is not None else None
            if res is not None:
                results[part.name] = res
                errors = _row_errors(res)
                if errors:
                    rec["row_errors"] = errors
                    if rec["status"] == "ok":
                        rec["status"] = "errors"
                        rec["note"] = f"{len(errors)} measurement(s) failed: see results.{part.name}"
                        _say(log, f"--- {part.name}: {rec['note']}")
        env = results.get("env") or {}
        summary = {
            "suite": "dbc_fast benchmarks/gpu_suite.sh",
            "command": command, "dry_run": args.dry_run, "git_commit": _git_commit(),
            "started_utc": started, "budget_s": args.budget, "elapsed_s": round(args.elapsed(), 1),
            "device": env.get("device", {"name": "unknown (env part did not run)"}),
            "versions": {k: env.get(k) for k in ("python", "torch", "torch_cuda", "cudnn", "triton", "nvcc", "ninja",
                                                 "timm", "dali", "nvidia_smi", "platform", "cpu_count")},
            "measured": {k: env.get(k) for k in ("copy_gbs", "bf16_matmul_tflops", "matmul_size")},
            "parts": records,
            "how_to_read": {
                "status": "ok = ran and exited 0; errors = ran, but some measurements or tests failed (row_errors);"
                          " failed = exited non-zero (see log.txt); timeout = cut at its limit (results saved "
                          "before are kept); skipped = not run, note says why",
                "training_step": "bench_step.py: img_s = batch / ms_per_step over back-to-back steps between two "
                                 "CUDA events; host_ms_per_step ~ ms_per_step means CPU-bound; dbc_overhead = "
                                 "ms(dbc)/ms(plain) - 1 (same arch, compile mode, optimizer)",
                "kernels": "bench_kernels.py: per-call ms (median over reps of many back-to-back calls); "
                           "fwdbwd_x_eager/x_compile = speed-up; fwdbwd_copy_share = achieved bytes/s over the "
                           "device copy's",
                "tests": "pytest junit counts of tests/test_kernels.py's CUDA tests",
            },
            "results": results,
        }
        summary["headlines"] = headlines(results)
        _write_json(os.path.join(out_dir, "summary.json"), summary)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(markdown(summary))
        report = short_report(summary)
        log.write("\n" + report + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    print("\n" + report, flush=True)
    print(f"wrote {out_dir}/summary.json, results.md, log.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
