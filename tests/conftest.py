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
