"""Typed wrappers around the compiled kernels (fastser._C for the CPU, fastser._C_cuda for CUDA).

The CPU kernels run their OpenMP loops with torch.get_num_threads() threads (passed on every
call), so `torch.set_num_threads` governs them as it governs torch's own ops.

The extensions take raw pointers, so they never link libtorch and a plain `pip install .` needs no
torch to build. That makes them easy to misuse, so nothing else in fastser calls them: each
wrapper below takes tensors, checks dtype, device, contiguity and shape (a TypeError/ValueError
naming the argument), passes the pointers, and holds every tensor it made (a `.contiguous()`
copy) in a local until the kernel returns, so no pointer can dangle.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from fastser import _C as cpu  # noqa: N811
except ImportError as exc:  # a source checkout that was never built
    cpu = None
    CPU_IMPORT_ERROR: Optional[ImportError] = exc
else:
    CPU_IMPORT_ERROR = None


def _explain_missing_cpu_kernels(error: ImportError) -> str:
    """Why fastser._C is missing: most often a source tree that shadows the installed package."""
    import importlib.metadata
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # every fastser on the path: a build leaves fastser.egg-info in the source tree, which is found
    # first from there and locates the tree itself, while the installed copy is further down
    places = (
        os.path.abspath(str(d.locate_file("fastser")))
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower() == "fastser"
    )
    installed = next((p for p in places if p != here and os.path.isdir(p)), None)
    if installed:
        return (
            f"fastser is imported from {here}, which has no compiled kernels, while the installed copy is "
            f"{installed}: the source tree shadows it (run from another folder, or install with "
            f"pip install -e .)"
        )
    return f"fastser at {here} was not built ({error}); pip install . (or -e .) builds them with a C++ compiler"


if cpu is None:
    import warnings

    warnings.warn(
        f"fastser's compiled CPU kernels are not importable, so the slower torch fallbacks run: "
        f"{_explain_missing_cpu_kernels(CPU_IMPORT_ERROR)}",
        RuntimeWarning,
        stacklevel=2,
    )

try:
    from fastser import _C_cuda as cuda
except ImportError as exc:  # built without nvcc, or no CUDA runtime here
    cuda = None
    CUDA_IMPORT_ERROR: Optional[ImportError] = exc
else:
    CUDA_IMPORT_ERROR = None

# dtype codes shared with csrc/center_loss_cpu.h (enum DTypeCode)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CPU_CENTER_DTYPES = (torch.float32, torch.float64)
CUDA_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(
    t: Optional[torch.Tensor], name: str, *, dtypes, device_type: str, shape=None, optional: bool = False
) -> int:
    """Validate one tensor argument and return its data pointer (0 for an absent optional one)."""
    if t is None:
        if optional:
            return 0
        raise ValueError(f"native kernel argument {name!r} is required")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"native kernel argument {name!r} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"native kernel argument {name!r} must be {'/'.join(map(str, dtypes))}, got {t.dtype}")
    if t.device.type != device_type:
        raise ValueError(f"native kernel argument {name!r} must be on {device_type}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"native kernel argument {name!r} must be contiguous")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"native kernel argument {name!r} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.data_ptr()


def _need(module, name: str, error: Optional[ImportError]):
    if module is None:
        raise RuntimeError(f"fastser's compiled {name} kernels are not importable here ({error})")
    return module


def _stride(row_scale: torch.Tensor, B: int) -> int:
    """0 broadcasts one upstream gradient to every row ("mean"/"sum"); 1 reads one per row."""
    if row_scale.numel() == 1:
        return 0
    if row_scale.numel() != B:
        raise ValueError(f"row_scale must hold 1 or {B} values, got {row_scale.numel()}")
    return 1


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _forward_args(x, labels, centers, row_loss, diff, device_type: str, x_dtypes, out_dtype) -> tuple:
    """The center-loss forward's arguments, checked: (B, D, C, pointers by name)."""
    B, D = x.shape
    C = centers.shape[0]
    out = (out_dtype,)
    return (
        B,
        D,
        C,
        dict(
            x=_check(x, "x", dtypes=x_dtypes, device_type=device_type),
            labels=_check(labels, "labels", dtypes=(torch.int64,), device_type=device_type, shape=(B,)),
            centers=_check(centers, "centers", dtypes=out, device_type=device_type, shape=(C, D)),
            row_loss=_check(row_loss, "row_loss", dtypes=out, device_type=device_type, shape=(B,)),
            diff=_check(diff, "diff", dtypes=out, device_type=device_type, shape=(B, D)),
        ),
    )


def _backward_args(
    diff, labels, num_classes, row_scale, grad_x, centers, grad_centers, device_type: str, diff_dtypes, grad_x_dtypes
) -> tuple:
    """The center-loss backward's arguments, checked: (B, D, C, pointers by name). The gradient,
    centers and row scale are in diff's dtype; grad_x in one of grad_x_dtypes."""
    if centers is not None and grad_centers is not None:
        raise ValueError("pass centers (Wen update) or grad_centers, not both")
    B, D = diff.shape
    C = num_classes
    dt = (diff.dtype,)
    return (
        B,
        D,
        C,
        dict(
            diff=_check(diff, "diff", dtypes=diff_dtypes, device_type=device_type),
            labels=_check(labels, "labels", dtypes=(torch.int64,), device_type=device_type, shape=(B,)),
            row_scale=_check(row_scale, "row_scale", dtypes=dt, device_type=device_type),
            grad_x=_check(grad_x, "grad_x", dtypes=grad_x_dtypes, device_type=device_type, shape=(B, D), optional=True),
            centers=_check(centers, "centers", dtypes=dt, device_type=device_type, shape=(C, D), optional=True),
            grad_centers=_check(
                grad_centers, "grad_centers", dtypes=dt, device_type=device_type, shape=(C, D), optional=True
            ),
        ),
    )


# ----------------------------------------------------------------------------- CPU (fastser._C)


def center_loss_forward_cpu(
    x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, row_loss: torch.Tensor, diff: torch.Tensor
) -> int:
    """x (B, D), centers (C, D), row_loss (B,), diff (B, D): one float dtype (fp32/fp64); labels
    (B,) int64. Returns -1, or the index of the first label outside [0, C) (then nothing is written)."""
    lib = _need(cpu, "CPU", CPU_IMPORT_ERROR)
    B, D, C, args = _forward_args(x, labels, centers, row_loss, diff, "cpu", CPU_CENTER_DTYPES, x.dtype)
    return lib.center_loss_forward(
        DTYPE_CODES[x.dtype],
        args["x"],
        args["labels"],
        args["centers"],
        B,
        D,
        C,
        args["row_loss"],
        args["diff"],
        torch.get_num_threads(),
    )


def center_loss_backward_cpu(
    diff: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    row_scale: torch.Tensor,
    grad_x: Optional[torch.Tensor],
    centers: Optional[torch.Tensor],
    alpha: float,
    grad_centers: Optional[torch.Tensor],
) -> None:
    """diff (B, D) fp32/fp64; labels (B,) int64; row_scale (1,) or (B,); grad_x (B, D) or None; at most
    one of centers (C, D, updated in place by Wen's rule) and grad_centers (C, D, zeroed by the caller)."""
    lib = _need(cpu, "CPU", CPU_IMPORT_ERROR)
    B, D, C, args = _backward_args(
        diff, labels, num_classes, row_scale, grad_x, centers, grad_centers, "cpu", CPU_CENTER_DTYPES, (diff.dtype,)
    )
    lib.center_loss_backward(
        DTYPE_CODES[diff.dtype],
        args["diff"],
        args["labels"],
        B,
        D,
        C,
        args["row_scale"],
        _stride(row_scale, B),
        args["grad_x"],
        args["centers"],
        float(alpha),
        args["grad_centers"],
        torch.get_num_threads(),
    )


def mel_chain_cpu(
    spec: torch.Tensor,
    frames: torch.Tensor,
    fb: torch.Tensor,
    *,
    power: float,
    to_db: bool,
    amin: float,
    log_ref: float,
    ref_max: bool,
    top_db: Optional[float],
    dct: Optional[torch.Tensor],
    lift: Optional[torch.Tensor],
    mel_out: torch.Tensor,
    mfcc_out: Optional[torch.Tensor],
) -> None:
    """The fused post-FFT chain on the CPU (csrc/mel_chain_cpu.h).

    spec (B, T, F) complex64, frame-major; frames (B,) int64; fb (M, F); dct (K, M) and lift (K,)
    with mfcc_out (B, K, T), or all three None; mel_out (B, M, T). All float32 on the CPU.
    """
    lib = _need(cpu, "CPU", CPU_IMPORT_ERROR)
    B, T, F = spec.shape
    M = fb.shape[0]
    has_dct = dct is not None
    if has_dct != (lift is not None) or has_dct != (mfcc_out is not None):
        raise ValueError("dct, lift and mfcc_out go together: pass all three or none")
    K = dct.shape[0] if has_dct else 0
    f32 = (torch.float32,)
    fb = fb.contiguous()  # held until the call returns
    args = dict(
        spec=_check(spec, "spec", dtypes=(torch.complex64,), device_type="cpu"),
        frames=_check(frames, "frames", dtypes=(torch.int64,), device_type="cpu", shape=(B,)),
        fb=_check(fb, "fb", dtypes=f32, device_type="cpu", shape=(M, F)),
        dct=_check(dct, "dct", dtypes=f32, device_type="cpu", shape=(K, M), optional=True),
        lift=_check(lift, "lift", dtypes=f32, device_type="cpu", shape=(K,), optional=True),
        mel_out=_check(mel_out, "mel_out", dtypes=f32, device_type="cpu", shape=(B, M, T)),
        mfcc_out=_check(mfcc_out, "mfcc_out", dtypes=f32, device_type="cpu", shape=(B, K, T), optional=True),
    )
    lib.mel_chain(
        args["spec"],
        B,
        T,
        F,
        args["frames"],
        args["fb"],
        M,
        float(power),
        bool(to_db),
        float(amin),
        float(log_ref),
        bool(ref_max),
        top_db is not None,
        float(top_db or 0.0),
        args["dct"],
        args["lift"],
        K,
        args["mel_out"],
        args["mfcc_out"],
        torch.get_num_threads(),
    )


def cpu_has_mel_chain() -> bool:
    return cpu is not None and hasattr(cpu, "mel_chain")


# ----------------------------------------------------------------------------- CUDA (fastser._C_cuda)


def center_loss_forward_cuda(
    x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, row_loss: torch.Tensor, diff: torch.Tensor
) -> None:
    """x (B, D) fp32/fp16/bf16; labels (B,) int64; centers (C, D), row_loss (B,), diff (B, D) fp32.
    Launched on the current stream of x's device."""
    lib = _need(cuda, "CUDA", CUDA_IMPORT_ERROR)
    B, D, C, args = _forward_args(x, labels, centers, row_loss, diff, "cuda", CUDA_INPUT_DTYPES, torch.float32)
    lib.center_loss_forward(
        DTYPE_CODES[x.dtype],
        args["x"],
        args["labels"],
        args["centers"],
        B,
        D,
        C,
        args["row_loss"],
        args["diff"],
        _stream(x.device),
    )


def center_loss_backward_cuda(
    diff: torch.Tensor,
    labels: torch.Tensor,
    counts: Optional[torch.Tensor],
    num_classes: int,
    row_scale: torch.Tensor,
    grad_x: Optional[torch.Tensor],
    centers: Optional[torch.Tensor],
    alpha: float,
    grad_centers: Optional[torch.Tensor],
) -> None:
    """diff (B, D) fp32; labels (B,) int64; counts (C,) int64 (rows per class; the Wen update needs
    it); row_scale (1,) or (B,) fp32; grad_x (B, D) fp32/fp16/bf16 or None; at most one of centers
    (Wen update with fp32 atomics) and grad_centers (zeroed by the caller), both (C, D) fp32."""
    lib = _need(cuda, "CUDA", CUDA_IMPORT_ERROR)
    if centers is not None and counts is None:
        raise ValueError("the Wen update needs the per-class counts")
    B, D, C, args = _backward_args(
        diff, labels, num_classes, row_scale, grad_x, centers, grad_centers, "cuda", (torch.float32,), CUDA_INPUT_DTYPES
    )
    args["counts"] = _check(counts, "counts", dtypes=(torch.int64,), device_type="cuda", shape=(C,), optional=True)
    grad_code = DTYPE_CODES[grad_x.dtype if grad_x is not None else torch.float32]
    lib.center_loss_backward(
        grad_code,
        args["diff"],
        args["labels"],
        args["counts"],
        B,
        D,
        C,
        args["row_scale"],
        _stride(row_scale, B),
        args["grad_x"],
        args["centers"],
        float(alpha),
        args["grad_centers"],
        _stream(diff.device),
    )


def center_loss_segment_update_cuda(
    diff: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    row_scale: torch.Tensor,
    centers: Optional[torch.Tensor],
    alpha: float,
    grad_centers: Optional[torch.Tensor],
) -> None:
    """Deterministic class sums: order (B,) rows sorted by label, offsets (C + 1,) int64; exactly one
    of centers (Wen update) and grad_centers (written, not accumulated), (C, D) fp32."""
    lib = _need(cuda, "CUDA", CUDA_IMPORT_ERROR)
    if (centers is None) == (grad_centers is None):
        raise ValueError("pass exactly one of centers (Wen update) and grad_centers")
    B, D = diff.shape
    C = offsets.numel() - 1
    f32 = (torch.float32,)
    args = dict(
        diff=_check(diff, "diff", dtypes=f32, device_type="cuda"),
        order=_check(order, "order", dtypes=(torch.int64,), device_type="cuda", shape=(B,)),
        offsets=_check(offsets, "offsets", dtypes=(torch.int64,), device_type="cuda"),
        row_scale=_check(row_scale, "row_scale", dtypes=f32, device_type="cuda"),
        centers=_check(centers, "centers", dtypes=f32, device_type="cuda", shape=(C, D), optional=True),
        grad_centers=_check(grad_centers, "grad_centers", dtypes=f32, device_type="cuda", shape=(C, D), optional=True),
    )
    lib.center_loss_segment_update(
        args["diff"],
        args["order"],
        args["offsets"],
        D,
        C,
        args["row_scale"],
        _stride(row_scale, B),
        args["centers"],
        float(alpha),
        args["grad_centers"],
        _stream(diff.device),
    )
