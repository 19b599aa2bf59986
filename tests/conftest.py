import os
import sys
from pathlib import Path

import pytest
import torch

# The test folders carry no __init__.py (their basenames are unique): the
# shared helpers (tests/_support: the oracle, the bucket and distributed
# cases, ...) are imported by name from every folder.
sys.path.insert(0, str(Path(__file__).resolve().parent / "_support"))

# Without a GPU the Triton kernels run on the CPU through Triton's
# interpreter; it must be chosen before any module that defines a @triton.jit
# kernel is imported (torch itself defines none). With a GPU they compile
# natively, unless TRITON_INTERPRET is set by hand.
if not torch.cuda.is_available() and not os.environ.get("INTERPOLATRON_TRITON_NATIVE"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random data per test, reproducible from the test's name."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module's tests (``pytest.mark.usefixtures("one_thread")``):
    their bitwise or memory assertions hold for the single-threaded kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
