"""CI's skip policy (.ci/skip_policy.py, loaded by .ci/run): a run fails when a test skipped for any reason but
needing a CUDA GPU, so a missing install step cannot hide behind a skip."""
import os
import pathlib
import subprocess
import sys
import textwrap

CI = pathlib.Path(__file__).resolve().parents[1] / ".ci"

ALLOWED = '''
import pytest

def test_runs():
    pass

def test_reason_needs_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.skipif(True, reason="needs CUDA: sync debug mode counts host syncs on a GPU")
def test_skipif_needs_cuda():
    pass

@pytest.mark.skipif(True, reason="memory and epoch time are measured on CUDA only")
def test_reason_names_cuda():
    pass

@pytest.mark.cuda
def test_marked_cuda():
    pytest.skip("the fused kernels run on the device only")

@pytest.mark.xfail(reason="a known failure is not a skip")
def test_xfail():
    assert False
'''

REFUSED = '''
import pytest

def test_missing_package():
    pytest.skip("NVIDIA DALI is not installed")

def test_needs_toolkit():
    pytest.skip("needs a CUDA toolkit to build csrc/example")

@pytest.mark.skipif(True, reason="torch is a CUDA build and its CMake config wants a CUDA toolkit")
def test_names_cuda_without_needing_a_gpu():
    pass

def test_version_lacks_an_api():
    pytest.skip("this DALI version has no Pipeline._build_graph to inspect the graph without a GPU")
'''

MODULE_SKIPPED = '''
import pytest

pytest.importorskip("a_module_that_is_not_installed")

def test_never_collected():
    pass
'''


def _run_ci_pytest(folder, *files):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CI), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "skip_policy", "-p", "no:cacheprovider",
                           *files], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_gpu_skips_pass_other_skips_fail(tmp_path):
    for name, text in (("test_allowed.py", ALLOWED), ("test_refused.py", REFUSED),
                       ("test_module_skipped.py", MODULE_SKIPPED)):
        (tmp_path / name).write_text(textwrap.dedent(text))

    ok = _run_ci_pytest(tmp_path, "test_allowed.py")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 passed, 4 skipped, 1 xfailed" in ok.stdout and "CI skip policy" not in ok.stdout

    bad = _run_ci_pytest(tmp_path, "test_allowed.py", "test_refused.py", "test_module_skipped.py")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    policy = bad.stdout.split("CI skip policy", 1)[1]
    refused = [line for line in policy.splitlines() if line.startswith("skipped, not for want of a GPU")]
    assert len(refused) == 5, policy
    for name in ("test_missing_package", "test_needs_toolkit", "test_names_cuda_without_needing_a_gpu",
                 "test_version_lacks_an_api", "test_module_skipped.py"):
        assert any(name in line for line in refused), (name, policy)
    assert "NVIDIA DALI is not installed" in policy and "a_module_that_is_not_installed" in policy
    assert not any("allowed" in line for line in refused)
    assert "5 test(s) skipped for a reason other than needing a CUDA GPU" in policy
