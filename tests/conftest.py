import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before triton is
# imported anywhere, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def restore_num_threads():
    """PyTorch's thread count as it was before the test, whatever the test sets."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread(restore_num_threads):
    """Tiny models gain nothing from more threads, and spinning threads slow a busy 2-core machine badly."""
    torch.set_num_threads(1)
