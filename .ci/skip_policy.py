"""pytest plugin for CI (.ci/run loads it with ``-p skip_policy``): a run in which any test was skipped for a
reason other than needing a CUDA GPU fails, so a green CI means every test that can run on the machine ran.

A skip counts as needing a GPU when the test carries a ``cuda`` or ``gpu`` marker, or when its reason names CUDA
or a GPU ("needs a CUDA GPU", "measured on CUDA only") and no install step: a reason that speaks of a toolkit,
compiler, headers, a version, or something missing / not installed / not built / not importable is a step the
install missed, even when it names CUDA. Such skips, also of whole modules, are listed under "CI skip policy".
"""
import re

import pytest

GPU_MARKERS = {"cuda", "gpu"}
NAMES_GPU = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)
INSTALL_STEP = re.compile(r"\b(toolkit|nvcc|compilers?|headers?|versions?|missing|not (installed|built|found)|"
                          r"cannot be (imported|found|built)|no module)\b", re.IGNORECASE)

_gpu_marked = set()
_refused = []


def _reason(report):
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return text.removeprefix("Skipped: ")


def needs_gpu(gpu_marked, reason):
    """True when CI allows a skip: of a test marked cuda/gpu, or with a reason naming CUDA/a GPU and no install
    step."""
    return gpu_marked or bool(NAMES_GPU.search(reason) and not INSTALL_STEP.search(reason))


def pytest_configure(config):
    for name in sorted(GPU_MARKERS):
        config.addinivalue_line("markers", f"{name}: needs a CUDA GPU (CI allows it to skip on a CPU machine)")


def pytest_collection_modifyitems(items):
    _gpu_marked.update(item.nodeid for item in items
                       if any(item.get_closest_marker(name) is not None for name in GPU_MARKERS))


def pytest_collectreport(report):
    # a whole module skipped at import (pytest.importorskip, allow_module_level)
    if report.skipped and not needs_gpu(False, _reason(report)):
        _refused.append((report.nodeid, _reason(report)))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if not needs_gpu(report.nodeid in _gpu_marked, reason):
            _refused.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    if _refused:
        terminalreporter.section("CI skip policy")
        for nodeid, reason in _refused:
            terminalreporter.write_line(f"skipped, not for want of a GPU: {nodeid}: {reason}")
        terminalreporter.write_line(f"{len(_refused)} test(s) skipped for a reason other than needing a CUDA GPU: "
                                    "CI fails (install what they need, or fix the test)")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _refused and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
