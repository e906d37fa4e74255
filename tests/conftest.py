import os

# The Triton kernels run on CPU tensors through Triton's interpreter wherever there is no GPU.
# This must be set before triton.jit wraps the kernels, i.e. before fastser.ops is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
