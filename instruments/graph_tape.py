"""A CUDA graph emulated on any device: `GraphedTrainStep(..., capture=TapeCapture())`.

Capturing records every ATen op the step dispatches, with its arguments as they were then: Python
numbers are baked in, tensors are held by identity (the graph's static memory). A replay runs the
recorded ops again on those same tensors, writing each result into the tensor the capture produced,
as a CUDA graph replays its kernels on the same addresses. So a replay computes what a real one
would: a value read from a tensor follows the tensor, a value the host passed as a number stays the
capture's. A host read while capturing (`.item()`, a data-dependent shape, a copy to the host) or a
copy from host memory is an error here as it is under `torch.cuda.graph`.

The ledger counts what a graphed step issues outside the graph with it (a replay counts as one
launch); tests compare replays with eager steps on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

HOST_READS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "masked_select", "unique"})
NOT_REPLAYED = frozenset({"empty", "empty_strided", "new_empty", "empty_like"})  # a graph does not re-run allocation
METADATA_ONLY = frozenset({"set_"})  # in place on a tensor's storage and shape, not its data: nothing to undo or replay


class CaptureError(RuntimeError):
    pass


def _where() -> str:
    """(at the innermost fastser line that asked)"""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        if "/fastser/" in frame.filename:
            return f" (at {frame.filename.split('/fastser/')[-1]}:{frame.lineno})"
    return ""


# ops that update buffers their schema does not mark as written: argument positions
UNDECLARED_WRITES = {"native_batch_norm": (3, 4)}  # the running mean and variance, when training


def _written(func, args, kwargs) -> list:
    """The tensors an op writes into (in place or out=), from its schema."""
    name = func.overloadpacket.__name__
    out = [args[i] for i in UNDECLARED_WRITES.get(name, ()) if i < len(args) and isinstance(args[i], torch.Tensor)]
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return out


class _Recorder(TorchDispatchMode):
    """Records the tape; `undo` keeps what each in-place op overwrote, so the capture can be taken
    back (a real capture runs nothing: the step it captured happens at the first replay)."""

    def __init__(self, device: torch.device, check_host_reads: bool):
        super().__init__()
        self.device, self.tape, self.undo = device, [], []
        self.check_host_reads = check_host_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READS and self.check_host_reads:
            out = func(*args, **kwargs)
            self.tape.append((func, args, kwargs, out, _where()))
            return out
        if name in HOST_READS:
            raise CaptureError(f"{name} reads the device from the host while a graph is captured{_where()}")
        if name in ("_to_copy", "copy_") and self.device.type != "cpu":
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
            if (src.device.type == "cpu") != (dst.type == "cpu"):
                raise CaptureError(f"a copy between host and device ({src.device} -> {dst}) while a graph is captured")
        if name in METADATA_ONLY:
            return func(*args, **kwargs)
        if func._schema.is_mutable or name in UNDECLARED_WRITES:
            self.undo += [(t, t.clone()) for t in _written(func, args, kwargs)]
        out = func(*args, **kwargs)
        if name not in NOT_REPLAYED and not func.is_view:
            self.tape.append((func, args, kwargs, out, ""))
        return out


def _replay(tape) -> None:
    # below autograd, as the recorded ops ran: the backward's ops are on the tape themselves
    with _disable_current_modes(), torch._C._AutoDispatchBelowADInplaceOrView():
        for func, args, kwargs, out, where in tape:
            result = func(*args, **kwargs)
            if not isinstance(out, torch.Tensor) and func.overloadpacket.__name__ in HOST_READS:
                if not bool(torch.equal(torch.as_tensor(result), torch.as_tensor(out))):
                    raise CaptureError(f"a host read baked into the graph{where} changed: {out} then {result}")
                continue
            # outputs that alias an argument (in place, out=) were written again; fresh ones are
            # copied into the tensors the capture returned
            for ret, fresh, static in zip(func._schema.returns, _as_tuple(result), _as_tuple(out)):
                if ret.alias_info is None:
                    for f, t in zip(tree_flatten(fresh)[0], tree_flatten(static)[0]):
                        if isinstance(t, torch.Tensor):
                            t.copy_(f)


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class TapeCapture:
    """The stand-in for CudaGraphCapture: `warm` runs eagerly, `capture` records, the replay it
    returns re-runs the tape; `load` copies an input into its static tensor. `replays` counts
    replays; with `on_replay`, each replay calls it first (the ledger counts the launch there).
    `check_host_reads`: the CPU's own code path reads values on the host (free there, never on the
    CUDA path); with it such a read is recorded, and a replay where it reads a different value is
    an error (the graph would have taken the capture's branch)."""

    def __init__(self, device=None, on_replay=None, check_host_reads=False):
        self.device = torch.device(device) if device is not None else None
        self.check_host_reads = check_host_reads
        self.on_replay, self.replays, self.tape = on_replay, 0, None

    def warm(self, fn):
        return fn()

    def capture(self, fn):
        recorder = _Recorder(self.device or torch.device("cpu"), self.check_host_reads)
        rng = torch.get_rng_state()
        try:
            with recorder:
                result = fn()
        finally:
            with torch.no_grad():
                for tensor, before in reversed(recorder.undo):
                    tensor.copy_(before)
            torch.set_rng_state(rng)
        self.tape = recorder.tape

        def replay():
            self.replays += 1
            if self.on_replay is not None:
                self.on_replay()
            _replay(self.tape)

        return replay, result

    def load(self, static: torch.Tensor, value: torch.Tensor) -> None:
        static.copy_(value)


@contextmanager
def capturable_on(*device_types: str):
    """Inside: torch's capturable Adam/AdamW accepts tensors on these devices too (it lists only
    the accelerators a graph can be captured on)."""
    import torch.optim.adam as adam

    listed = adam._get_capturable_supported_devices
    adam._get_capturable_supported_devices = lambda *a, **k: listed(*a, **k) + list(device_types)
    try:
        yield
    finally:
        adam._get_capturable_supported_devices = listed
