"""Counting what a piece of code would launch on a GPU, without one: the ATen ops it dispatches
(about one CUDA launch each), the host reads among them, and Triton launches recorded by name."""

from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch no device kernel: allocation, views, metadata
NO_KERNEL = frozenset(
    {
        "empty",
        "empty_strided",
        "new_empty",
        "detach",
        "view",
        "slice",
        "select",
        "alias",
        "expand",
        "reshape",
        "_reshape_alias",
        "as_strided",
        "unsqueeze",
        "squeeze",
        "t",
        "transpose",
        "permute",
        "unfold",
        "view_as_real",
        "_unsafe_view",
        "lift_fresh",
        "split",
        "split_with_sizes",
        "promote_types",
    }
)
HOST_READS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero"})


class Ledger(TorchDispatchMode):
    """with Ledger() as ledger: ... -> ledger.ops (every dispatched op by name, and "triton.<kernel>"
    for launches a test records), ledger.launches (those that launch a kernel), ledger.host_reads."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> list:
        return [op for op in self.ops if op not in NO_KERNEL and op not in HOST_READS]

    @property
    def host_reads(self) -> int:
        return sum(op in HOST_READS for op in self.ops)
