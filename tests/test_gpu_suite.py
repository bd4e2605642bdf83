"""The GPU suite (benchmarks/gpu_suite.sh) on CPU: its dry run, its deadline handling, and the DALI carrying.

The dry run runs every part at toy size (the CPU, the Triton interpreter, light torch.compile backends), so a
renamed option, a moved function or a broken result file shows here and not in a short GPU lease. The
AOTInductor part is left out for time (tests/test_export.py exports AOTInductor on CPU).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parts that need something a CPU machine may not have; skipped only with a note that says so.
OPTIONAL = {"dali_install": "not carried", "dali_loader": "not", "dbc_infer_build": "not built here"}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite(out, *args, timeout=900):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    gpu_suite = _load("gpu_suite")
    names = [p.name for p in gpu_suite.parts_for(_Args())]
    out = tmp_path_factory.mktemp("suite")
    run = _suite(out, "--dry-run", "--parts", ",".join(n for n in names if n != "inference_aoti"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(out / "summary.json") as f:
        return out, json.load(f), run.stdout, names


class _Args:
    dry_run, dali_parts, work = True, None, "/nonexistent"


def test_dry_run_runs_every_part(dry_run):
    out, summary, stdout, names = dry_run
    assert summary["dry_run"] is True
    assert [p["name"] for p in summary["parts"]] == [n for n in names if n != "inference_aoti"]
    for part in summary["parts"]:
        if part["name"] in OPTIONAL and part["status"] == "skipped":
            assert OPTIONAL[part["name"]] in part["note"], part
            continue
        assert part["status"] == "ok", part
        assert part["seconds"] > 0 and part["command"]
    # what comes back from a lease: at most 8 files, the three named ones among them
    assert sorted(os.listdir(out)) == ["log.txt", "results.md", "summary.json"]
    assert "=== step_eager" in (out / "log.txt").read_text()
    assert "| part | status |" in (out / "results.md").read_text()
    # the end of stdout (all a device call's reply shows) has every part's status
    lines = stdout.splitlines()
    report = lines[max(i for i, line in enumerate(lines) if line.startswith("device: ")):]
    assert [line.split()[0] for line in report[1:1 + len(summary["parts"])]] == [p["name"] for p in summary["parts"]]
    assert len("\n".join(report)) < 12000


def test_dry_run_summary_is_self_explanatory(dry_run):
    _, summary, _, _ = dry_run
    for key in ("torch", "triton", "python", "torch_cuda"):
        assert summary["versions"][key], key
    assert summary["device"]["name"].startswith("cpu")
    assert summary["measured"]["copy_gbs"] > 0 and summary["measured"]["bf16_matmul_tflops"] > 0
    assert set(summary["how_to_read"]) >= {"status", "training_step", "kernels", "tests"}
    build = summary["results"]["build"]
    assert build["backends"]["cpu"]["eager"][0] is True


def test_dry_run_selects_the_cuda_kernel_tests(dry_run):
    _, summary, _, _ = dry_run
    bf16, other = summary["results"]["tests_bf16"], summary["results"]["tests_other"]
    # the -k expressions still select the CUDA tests (skipped on a CPU machine): a rename would select none
    assert bf16["tests"] >= 4 and other["tests"] >= 4
    assert any("mask_dtypes" in name for name in bf16["skipped_names"])  # the model's bf16 masks
    assert bf16["failed"] == other["failed"] == 0


def test_dry_run_step_rows(dry_run):
    _, summary, _, _ = dry_run
    rows = summary["results"]["step_eager"]["rows"]
    assert {(r["arch"], r["variant"]) for r in rows} == {
        (a, v) for a in ("conformer_tiny_patch16", "conformer_small_patch16") for v in ("plain", "dbc-auto")}
    for r in rows:
        assert "error" not in r, r
        assert r["img_s"] > 0 and math.isfinite(r["loss_last"])
        if r["variant"] == "dbc-auto":
            assert r["ops"]["pool"] in ("cpp", "triton", "eager")
            plain = next(p for p in rows if p["variant"] == "plain" and p["arch"] == r["arch"])
            assert r["dbc_overhead"] == pytest.approx(r["ms_per_step"] / plain["ms_per_step"] - 1)
    compiled = summary["results"]["step_compile_ti"]["rows"]
    assert {r["compile"] for r in compiled} == {"default"} and all("error" not in r for r in compiled)
    assert summary["headlines"]["training_step"]


def test_dry_run_kernel_rows(dry_run):
    _, summary, _, _ = dry_run
    res = summary["results"]["kernels_bf16_cl"]
    assert set(res["impls"]) == {"eager", "compile", "triton", "cpp"}
    seen = {(r["op"], r["impl"]) for r in res["rows"]}
    assert seen == {(op, impl) for op in ("pool", "losses") for impl in res["impls"]}
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["max_err_vs_eager"] < 0.1, r  # bf16 outputs of every impl agree with eager
        if r["op"] == "pool":
            assert r["fwdbwd_copy_share"] > 0
    eager = next(r for r in res["rows"] if r["impl"] == "eager")
    assert eager["fwdbwd_x_eager"] == pytest.approx(1.0)


def test_dry_run_inference_rows(dry_run):
    _, summary, _, _ = dry_run
    rows = summary["results"]["inference"]["rows"]
    assert {r["variant"] for r in rows} == {"eager", "torchscript"}
    assert all(r["max_logit_diff"] < 1e-3 for r in rows)


def test_budget_skips_what_does_not_fit(tmp_path):
    run = _suite(tmp_path, "--dry-run", "--budget", "3", "--parts", "env,build,step_eager", timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {p["name"]: p for p in summary["parts"]}
    assert status["build"]["status"] == status["step_eager"]["status"] == "skipped"
    assert "not enough time" in status["step_eager"]["note"]


def test_unknown_part_is_a_clear_error(tmp_path):
    run = _suite(tmp_path, "--dry-run", "--parts", "env,warp_drive", timeout=60)
    assert run.returncode != 0
    assert "unknown part(s) warp_drive" in run.stderr and "tests_bf16" in run.stderr


def test_a_hanging_part_is_stopped_at_its_limit(tmp_path):
    gpu_suite = _load("gpu_suite")
    args = _Args()
    args.log_path = str(tmp_path / "log.txt")
    args.elapsed = lambda: 0.0
    hang = gpu_suite.Part("hang", "sleeps", 1, 1, 2, lambda: [sys.executable, "-c", "import time; time.sleep(60)"])
    import time
    start = time.monotonic()
    with open(tmp_path / "suite.log", "w") as log:
        rec = gpu_suite.run_part(hang, args, time.monotonic() + 100, log)
    assert rec["status"] == "timeout" and time.monotonic() - start < 30
    assert "stopped at its limit" in rec["note"]


# ------------------------------------------------------------------------------------------- DALI carrying


def _fake_wheel(folder, name="dbcfakepkg", version="0.1"):
    """A minimal valid wheel holding one module, so pip really installs it."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{info}/RECORD", record)
    return path


def test_dali_pieces_join_verify_and_install(tmp_path):
    carry = _load("dali_carry")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _fake_wheel(str(wheels))
    with open(wheels / "padding-0.1-py3-none-any.whl", "wb") as f:  # makes several pieces
        f.write(os.urandom(5000))
    packed = carry.pack([wheel], str(tmp_path / "dali"), piece_bytes=700)
    assert len(packed["pieces"]) >= 3
    assert all(os.path.getsize(p) <= 700 for p in packed["pieces"])
    # earlier calls left the first pieces on the machine; this call carries the rest and SHA256SUMS
    earlier, now = tmp_path / "earlier", tmp_path / "now"
    earlier.mkdir(), now.mkdir()
    for i, piece in enumerate(packed["pieces"]):
        os.replace(piece, (earlier if i < 2 else now) / os.path.basename(piece))
    os.replace(tmp_path / "dali" / "SHA256SUMS", now / "SHA256SUMS")
    target = tmp_path / "site"
    result = carry.install([str(earlier), str(now)], str(target))
    assert result["sha256"] == packed["sha256"] and result["wheels"] == [os.path.basename(wheel)]
    assert (target / "dbcfakepkg" / "__init__.py").read_text() == "VALUE = 42\n"


def test_dali_join_names_a_missing_or_corrupt_piece(tmp_path):
    carry = _load("dali_carry")
    wheel = _fake_wheel(str(tmp_path))
    packed = carry.pack([wheel], str(tmp_path / "dali"), piece_bytes=400)
    dali = tmp_path / "dali"
    last = packed["pieces"][-1]
    data = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SystemExit, match="SHA-256"):
        carry.join([str(dali)], str(tmp_path / "joined.tar"))
    os.remove(last)
    with pytest.raises(SystemExit, match=f"missing piece.*{os.path.basename(last)}"):
        carry.join([str(dali)], str(tmp_path / "joined.tar"))
