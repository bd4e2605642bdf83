import os
import pathlib

# Triton kernels run on CPU tensors through the interpreter; this must be set before they are defined.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The real data every test reads (images, boxes, masks, metadata): $DBC_FAST_DATA, else ../shared/data.
SHARED_DATA = pathlib.Path(os.environ.get("DBC_FAST_DATA") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The one way tests find their data."""
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.fail(f"the real test data is not at {SHARED_DATA}: put the project's shared/ folder beside the "
                    f"repository (../shared/data) or set DBC_FAST_DATA to its data folder")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine, OpenMP threads waiting on each other
    cost ~7x for the model's many small ops."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def user_error(capsys):
    """Runs a `dbc-fast` call that must stop on bad input and returns its one error line (`dbc-fast CMD: error:
    ...`), after checking the exit code is 1 and that exactly one such line was printed."""
    def run(call, *args):
        capsys.readouterr()
        code = call(*args)
        err = capsys.readouterr().err.strip().splitlines()
        lines = [line for line in err if ": error: " in line]
        assert code == 1 and len(lines) == 1, (code, err)
        return lines[0]
    return run
