"""Loads the compiled kernels (fastser._C, fastser._C_cuda) and maps torch dtypes to their codes.

The extensions take raw pointers, so every call passes tensor.data_ptr() and, on CUDA, the
current stream handle; the tensors must be contiguous and stay alive for the call.
"""
import torch

try:
    from fastser import _C as cpu  # noqa: N811
except ImportError as exc:  # a source checkout that was never built
    cpu = None
    CPU_IMPORT_ERROR = exc
else:
    CPU_IMPORT_ERROR = None

try:
    from fastser import _C_cuda as cuda
except ImportError as exc:  # built without nvcc, or no CUDA runtime here
    cuda = None
    CUDA_IMPORT_ERROR = exc
else:
    CUDA_IMPORT_ERROR = None

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the native kernels take float32/float16/bfloat16/float64, not {dtype}") from None


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
