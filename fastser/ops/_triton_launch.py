"""One description of a Triton launch, used both to launch it and to compile it ahead of time.

Every Triton kernel in fastser is launched through a `TritonLaunch`: the launcher functions
(`center_loss_triton.forward_launch`, `mel_chain_triton.mel_chain_launches`, ...) turn tensors into
the kernel's arguments, by name, and `launch()` runs it. The GPU compile gate
(tests/ops/test_gpu_compile.py) calls the same launcher functions on meta tensors and compiles
each resulting specialisation for sm_80 and sm_90 with `triton.compile` — so the gate compiles
exactly what the code launches, and a kernel that only the CPU interpreter accepts fails CI.
"""

from __future__ import annotations

import dataclasses

import torch

# torch dtype -> Triton's pointer element / scalar type names
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    kernel: object  # a @triton.jit function
    grid: tuple
    args: dict  # every kernel parameter by name, constexprs included
    options: dict = dataclasses.field(default_factory=dict)  # num_warps, num_stages

    def launch(self) -> None:
        self.kernel[self.grid](**self.args, **self.options)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def jit_function(self):
        """The kernel as a compilable JITFunction, also when TRITON_INTERPRET=1 made it an
        InterpretedFunction (the Python function and its module globals are the same)."""
        from triton.runtime.jit import JITFunction

        return self.kernel if isinstance(self.kernel, JITFunction) else JITFunction(self.kernel.fn)

    def signature(self) -> tuple[dict, dict]:
        """(signature, constexprs) in the form `triton.compiler.ASTSource` takes, as the JIT would
        specialise this launch (without its value-based specialisations such as divisibility by 16)."""
        signature, constexprs = {}, {}
        for param in self.jit_function().params:
            value = self.args[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + TRITON_TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{self.name}: argument {param.name} has unsupported type {type(value)}")
        return signature, constexprs

    def key(self) -> tuple:
        """What makes two launches one compiled kernel."""
        signature, constexprs = self.signature()
        return (self.name, tuple(signature.items()), tuple(constexprs.items()), tuple(sorted(self.options.items())))
