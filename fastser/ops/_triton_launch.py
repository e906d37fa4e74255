"""One description of a Triton launch, used both to launch it and to compile it ahead of time.

Every Triton kernel in fastser is launched through a `TritonLaunch`: the launcher functions
(`center_loss.backend_triton.forward_launch`, `mel_chain_triton.mel_chain_launches`, ...) turn tensors into
the kernel's arguments, by name, and `launch()` runs it. The GPU compile gate
(tests/ops/test_gpu_compile.py) calls the same launcher functions on meta tensors, specialises
each launch with Triton's own binder as the JIT would, and compiles it for sm_80 and sm_90 with
`triton.compile` — so the gate compiles exactly what the code launches, and a kernel that only
the CPU interpreter accepts fails CI.
"""

from __future__ import annotations

import dataclasses


# Grid and block sizes in plain integer arithmetic: triton.cdiv and triton.next_power_of_2 are
# constexpr functions whose Python wrapper costs about 6 us a call, and a step makes several.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


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
        InterpretedFunction (the Python function, its module globals and its specialisation options
        are the same)."""
        from triton.runtime.jit import JITFunction

        if isinstance(self.kernel, JITFunction):
            return self.kernel
        return JITFunction(self.kernel.fn, **self.kernel.kwargs)
