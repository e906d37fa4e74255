"""The GPU compile gate's worker: compiles every Triton kernel fastser can launch, in every
specialisation its launchers produce, ahead of time to cubin for sm_80 and sm_90, with no GPU.

`python -m tests.ops.gpu_compile_gate FAMILY [ARCH ...]` prints one JSON line per architecture: how many
specialisations compiled, which failed, which spill registers to local memory, and each kernel's
most registers per thread. It must run with TRITON_INTERPRET unset (Triton set
to interpret cannot also compile), so tests/ops/test_gpu_compile.py starts it as a subprocess.
The launches come from the same `*_launch` functions the package runs (on meta tensors), so what
is compiled is what is launched.
"""

import itertools
import json
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastser.features import functional as F
from fastser.ops import center_loss_triton, mel_chain
from fastser.ops._triton_launch import TritonLaunch

ARCHS = (80, 90)  # A100, H100/H200
META = torch.device("meta")


def compile_for(launch: TritonLaunch, arch: int):
    signature, constexprs = launch.signature()
    source = ASTSource(fn=launch.jit_function(), signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))


def empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


# ----------------------------------------------------------------------------- what the package launches


def center_loss_launches():
    """Every dtype the Triton backend accepts (features fp32/fp16/bf16, fp32 centers, the gradient
    in the features' dtype), every tile width (D from 1 to 513 covers BLOCK_D 16..512), every
    backward mode (grad_x or not x nothing / Wen update / center gradient), both row-scale forms,
    both gate forms (the forward's int32 bad-row count, a bool), the forward with and without its
    class/bad-row counts and bad-batch counter (int64 or int32), and the deterministic segment
    kernel in both modes."""
    B, C = 8, 5
    labels, counts = empty(B, dtype=torch.int64), empty(C, dtype=torch.int64)
    order, offsets = empty(B, dtype=torch.int64), empty(C + 1, dtype=torch.int64)
    for dtype, D in itertools.product((torch.float32, torch.float16, torch.bfloat16), (1, 17, 33, 65, 129, 257, 513)):
        x, diff, centers = empty(B, D, dtype=dtype), empty(B, D), empty(C, D)
        stats = empty(C + 1, dtype=torch.int32)
        for stats, bad_batches in (
            (None, None),
            (stats, None),
            (stats, empty((), dtype=torch.int64)),
            (stats, empty((), dtype=torch.int32)),
        ):
            yield center_loss_triton.forward_launch(x, labels, centers, empty(B), diff, stats, bad_batches)
        gates = (None, empty((), dtype=torch.int32), empty((), dtype=torch.bool))
        modes = (("none", None), ("grad", None), ("wen", counts), ("wen", empty(C, dtype=torch.int32)))
        for with_grad_x, (mode, mode_counts), scale_rows, bad in itertools.product((True, False), modes, (1, B), gates):
            # the row scale is the upstream gradient as it comes: fp32, or the features' dtype when
            # the loss is half precision (half centers)
            yield center_loss_triton.backward_launch(
                diff,
                labels,
                mode_counts,
                C,
                empty(scale_rows, dtype=dtype if scale_rows == 1 else torch.float32),
                empty(B, D, dtype=dtype) if with_grad_x else None,
                centers if mode == "wen" else None,
                0.5,
                centers if mode == "grad" else None,
                bad,
            )
        for wen, bad, scale_dtype in itertools.product((True, False), gates, (torch.float32, dtype)):
            yield center_loss_triton.segment_update_launch(
                diff,
                order,
                offsets,
                empty(1, dtype=scale_dtype),
                centers if wen else None,
                0.5,
                None if wen else centers,
                bad,
            )


def mel_chain_launches():
    """Every flag combination of the fused post-FFT kernel (mel / log-mel / MFCC, power 2, 1 and
    other, ref constant or per-utterance max, top_db or not) at the paper's size, and every tile
    size (n_mels 16..256, n_mfcc 1..n_mels) at the default flags: the flags choose code, the tiles
    only size it."""
    B, T = 3, 50
    base = dict(sr=16000, n_fft=512, hop_length=160)
    configs = [
        F.FeatureConfig(kind, **base, n_mels=40, n_mfcc=40, power=power, ref=ref, top_db=top_db)
        for kind, power, ref, top_db in itertools.product(
            ("mel", "logmel", "mfcc"), (2.0, 1.0, 1.5), (1.0, "max"), (80.0, None)
        )
    ]
    for n_mels in (16, 40, 64, 65, 128, 256):
        configs.append(F.FeatureConfig("logmel", **base, n_mels=n_mels, ref="max"))
        configs += [F.FeatureConfig("mfcc", **base, n_mels=n_mels, n_mfcc=k, ref="max") for k in {1, 13, n_mels}]
    spec = torch.empty(B, 1 + base["n_fft"] // 2, T, dtype=torch.complex64, device=META)
    frames = empty(B, dtype=torch.int64)
    for cfg in configs:
        launches, _ = mel_chain.triton_launches(spec, frames, cfg, F.constants(cfg, META))
        yield from launches


# ----------------------------------------------------------------------------- a kernel the gate must refuse

PLANTED_SCALE = 0.5  # a plain module global, as LOG10_2 once was: the interpreter reads it, the GPU compiler must not


@triton.jit
def reads_a_plain_global(X_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X_ptr + offs, mask=offs < N)
    tl.store(X_ptr + offs, x * PLANTED_SCALE, mask=offs < N)


def planted_launches():
    yield TritonLaunch(reads_a_plain_global, (1,), dict(X_ptr=empty(4), N=4, BLOCK=16))


LAUNCHES = {"center_loss": center_loss_launches, "mel_chain": mel_chain_launches, "planted": planted_launches}


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread of a compiled kernel, as cuobjdump -res-usage reports
    them. A stack frame in a Triton kernel (which has no local arrays or calls) is spilled registers:
    local-memory traffic that made the first fused mel kernel several times slower than it should be."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line:\n{out}")
    return {"registers": int(usage.group(1)), "stack": int(usage.group(2))}


TILE_CONSTEXPRS = ("BLOCK_D", "ROWS", "BLOCK", "BLOCK_T", "BLOCK_M", "BLOCK_K")
ATOMIC_SASS = re.compile(r"\b(?:RED|REDG|REDUX|ATOM|ATOMG|ATOMS)\.")
FENCE_SASS = re.compile(r"\b(?:MEMBAR|CCTL\.IVALL|FENCE)\b")


def atomics_and_fences(cubin: bytes) -> tuple:
    """(atomic instructions, memory fences and L1 invalidations) in a kernel's SASS. Triton's default
    atomic order (acq_rel) puts a full fence and an L1 invalidate beside every atomic; the center
    loss's atomics only accumulate (nothing in the same launch reads what they write), so they are
    relaxed and the SASS must hold no fence."""
    from triton.tools.disasm import get_sass

    sass = get_sass(cubin)
    return len(ATOMIC_SASS.findall(sass)), len(FENCE_SASS.findall(sass))


def unique(launches):
    return list({launch.key(): launch for launch in launches}.values())


def main(family: str, archs) -> None:
    launches = unique(LAUNCHES[family]())
    for arch in archs:
        failures, spills, max_registers, fenced, atomics, read_sass = [], [], {}, [], 0, set()
        for launch in launches:
            try:
                compiled = compile_for(launch, arch)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as e:  # noqa: BLE001 - report every failing specialisation
                failures.append(f"{launch.name} {launch.signature()[1]}: {type(e).__name__}: {str(e).strip()[-600:]}")
                continue
            usage = resource_usage(compiled.asm["cubin"])
            max_registers[launch.name] = max(max_registers.get(launch.name, 0), usage["registers"])
            if usage["stack"]:
                spills.append(f"{launch.name} {launch.signature()[1]} {launch.options}: {usage}")
            # the atomics' order is the same at every tile size and dtype, and reading SASS takes about
            # half a second a kernel: once per kernel and choice of code (its constexpr flags)
            flags = (
                launch.name,
                tuple(sorted((k, v) for k, v in launch.signature()[1].items() if k not in TILE_CONSTEXPRS)),
            )
            if "atomic_" in launch.jit_function().src and flags not in read_sass:
                read_sass.add(flags)
                n_atomics, n_fences = atomics_and_fences(compiled.asm["cubin"])
                atomics += n_atomics
                if n_fences:
                    fenced.append(f"{launch.name} {flags[1]}: {n_fences} fences beside {n_atomics} atomics")
        print(
            json.dumps(
                {
                    "family": family,
                    "arch": arch,
                    "compiled": len(launches) - len(failures),
                    "launches": len(launches),
                    "failures": failures,
                    "spills": spills,
                    "max_registers": max_registers,
                    "sass_read": len(read_sass),
                    "atomics": atomics,
                    "fenced": fenced,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or ARCHS)
