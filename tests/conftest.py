import os

# A run without --threads takes the cores that are free when it starts (fastser.threads), which
# depends on whatever else the machine is doing; tests compare runs, so they fix the count the way
# fastser respects, OMP_NUM_THREADS (inherited by the commands they start), at the usable cores.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

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


def pytest_configure(config):
    # here, not in pyproject.toml: naming the class there imports fastser before TRITON_INTERPRET is set
    # (the tests' models never heard speech; the warning is tested where it is the subject)
    config.addinivalue_line("filterwarnings", "ignore::fastser.predict.PredictWarning")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (CUDA graphs, NCCL, CUDA's sync debug mode, ...) are skipped without a
    GPU, with the marker's reason; `python -m pytest -m gpu` runs just them on a GPU machine."""
    if _has_cuda:
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {marker.kwargs.get('reason', 'CUDA only')}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
