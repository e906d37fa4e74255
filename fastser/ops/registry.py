"""Every kernel's implementations, declared once: where each runs, what it computes in, whether it
keeps gradients, how it is probed, and the order "auto" tries them in.

    available("center_loss")                        # built and usable on this machine, fastest first
    available("center_loss", device)                # ... and computing on that device
    choose("center_loss", "auto", device, dtype)    # the implementation a request means, or an error
                                                    # naming what is missing

The ops (fastser.ops.center_loss, fastser.ops.mel_chain) and the feature code ask here; nothing
else decides a backend. Triton also runs CPU tensors under TRITON_INTERPRET=1 (the tests' way to
run the kernels without a GPU); "auto" never picks an interpreted kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, Optional

import torch

from fastser.ops import _native

ANY_DEVICE = frozenset({"*"})  # runs wherever torch does


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401 - the CUDA wheels of torch bring it, the CPU wheel does not

        return True
    except ImportError:
        return False


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    devices: frozenset  # device types it computes on (ANY_DEVICE: all)
    built: Callable[[], bool]  # compiled or importable here
    dtypes: Optional[tuple] = None  # compute dtypes (None: any)
    autograd: bool = True  # keeps gradients
    interpretable: bool = False  # Triton: CPU tensors too, under TRITON_INTERPRET=1
    needs: str = ""  # how to get it, for the error when it is missing
    module: str = ""  # the module that computes it, where the op dispatches to one (imported when first used)

    def runs_on(self, device_type: str, interpreted_ok: bool = True) -> bool:
        if "*" in self.devices or device_type in self.devices:
            return True
        return interpreted_ok and self.interpretable and device_type == "cpu" and triton_interpreted()

    def usable(self) -> bool:
        """Built, and a device it computes on is present."""
        if not self.built():
            return False
        if "*" in self.devices or "cpu" in self.devices:
            return True
        return torch.cuda.is_available() or (self.interpretable and triton_interpreted())


_F32 = (torch.float32,)
IMPLEMENTATIONS = {
    "center_loss": (
        Implementation(
            "triton",
            frozenset({"cuda"}),
            triton_importable,
            _F32,
            interpretable=True,
            needs="pip install triton",
            module="fastser.ops.center_loss.backend_triton",
        ),
        Implementation(
            "cuda",
            frozenset({"cuda"}),
            lambda: _native.cuda is not None,
            _F32,
            needs="fastser built with nvcc (FASTSER_BUILD_CUDA=1)",
            module="fastser.ops.center_loss.backend_cuda",
        ),
        Implementation(
            "cpp",
            frozenset({"cpu"}),
            lambda: _native.cpu is not None,
            (torch.float32, torch.float64),
            needs="fastser's compiled CPU kernels (pip install .)",
            module="fastser.ops.center_loss.backend_cpp",
        ),
        Implementation("torch", ANY_DEVICE, lambda: True, module="fastser.ops.center_loss.backend_torch"),
    ),
    "mel_chain": (
        Implementation(
            "triton",
            frozenset({"cuda"}),
            triton_importable,
            autograd=False,
            interpretable=True,
            needs="pip install triton",
        ),
        Implementation(
            "cpp",
            frozenset({"cpu"}),
            _native.cpu_has_mel_chain,
            autograd=False,
            needs="fastser's compiled CPU kernels (pip install .)",
        ),
        Implementation("torch", ANY_DEVICE, lambda: True),
    ),
}


def names(op: str) -> tuple:
    return tuple(impl.name for impl in IMPLEMENTATIONS[op])


def implementation(op: str, name: str) -> Implementation:
    return next(impl for impl in IMPLEMENTATIONS[op] if impl.name == name)


def module(op: str, name: str):
    """The module computing implementation `name` of `op` (imported on first use: Triton's needs triton)."""
    return importlib.import_module(implementation(op, name).module)


def available(op: str, device: Optional[torch.device | str] = None) -> list:
    """The implementations of `op` usable here, fastest first; with `device`, those computing on it."""
    usable = [impl for impl in IMPLEMENTATIONS[op] if impl.usable()]
    if device is not None:
        device_type = torch.device(device).type
        usable = [impl for impl in usable if impl.runs_on(device_type)]
    return [impl.name for impl in usable]


def choose(
    op: str,
    requested: str,
    device: torch.device | str,
    dtype: Optional[torch.dtype] = None,
    requires_grad: bool = False,
) -> str:
    """The implementation `requested` ("auto" or a name) means for tensors of `dtype` on `device`.
    "auto": the first usable one that computes there natively in that dtype (and keeps gradients
    when they are required). A named one that cannot serve is an error saying why. Answers are
    remembered (every call of a kernel asks), with TRITON_INTERPRET, which changes them, in the key."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (op, requested, device_type, dtype, requires_grad, triton_interpreted())
    name = _CHOSEN.get(key)
    if name is None:
        name = _CHOSEN[key] = _choose(op, requested, device_type, dtype, requires_grad)
    return name


_CHOSEN: dict = {}


def _choose(op: str, requested: str, device_type: str, dtype: Optional[torch.dtype], requires_grad: bool) -> str:
    if requested != "auto" and requested not in names(op):
        raise ValueError(f"backend must be one of {('auto',) + names(op)}, got {requested!r}")
    if requested == "auto":
        for impl in IMPLEMENTATIONS[op]:
            if (
                impl.usable()
                and impl.runs_on(device_type, interpreted_ok=False)
                and (impl.dtypes is None or dtype is None or dtype in impl.dtypes)
                and (impl.autograd or not requires_grad)
            ):
                return impl.name
        raise RuntimeError(f"no {op} implementation runs on {device_type}")  # unreachable: torch runs anywhere
    impl = implementation(op, requested)
    if requires_grad and not impl.autograd:
        raise ValueError(
            f"backend {requested!r} does not propagate gradients; the input requires grad, so use "
            f"backend='torch' (or 'auto', which picks it)"
        )
    if not impl.usable():
        why = f"it needs {impl.needs}" if not impl.built() else "no CUDA device here"
        raise RuntimeError(f"backend {requested!r} is not available here ({why}); available: {available(op)}")
    if not impl.runs_on(device_type):
        where = " or ".join(sorted(impl.devices)) + (
            " (or CPU tensors with TRITON_INTERPRET=1)" if impl.interpretable else ""
        )
        raise ValueError(f"backend {requested!r} needs {where} tensors, the input is on {device_type}")
    if impl.dtypes is not None and dtype is not None and dtype not in impl.dtypes:
        names_ = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        raise TypeError(f"backend {requested!r} computes in {names_}; use 'torch' (or 'auto') for {dtype}")
    return requested
