"""The GPU compile gate's worker: compiles every Triton kernel fastser can launch, in every
specialisation its launchers produce, ahead of time to cubin for sm_80 and sm_90, with no GPU.

`python -m tests.ops.gpu_compile_gate FAMILY [ARCH ...]` prints one JSON line per architecture: how many
specialisations compiled, which failed, which spill registers to local memory, each kernel's
registers, shared memory and the occupancy they allow, the atomics and fences in the SASS, and
which launches the package really makes were not among those compiled. It must run with
TRITON_INTERPRET unset (Triton set to interpret cannot also compile), so
tests/ops/test_gpu_compile.py starts it as a subprocess. `python -m tests.ops.gpu_compile_gate
--record benchmarks/results/kernels/DATE.json` writes both families' reports for the kernel table
of docs/development.md.

What is compiled is what the JIT would compile: the launches come from the same `*_launch`
functions the package runs (on meta tensors, whose data pointers carry their views' offsets), and
each is specialised by Triton's own binder and argument packer (`JITFunction.run`'s code): a
pointer or an int divisible by 16 gets the `tt.divisibility` attribute, an int equal to 1 becomes a
constexpr, a bool a `u1` — the attributes that decide, e.g., whether a row load is 128-bit.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature
from triton.tools.disasm import get_sass

from fastser.features import functional as F
from fastser.ops import mel_chain
from fastser.ops.center_loss import backend_triton
from fastser.ops import _triton_launch
from fastser.ops._triton_launch import TritonLaunch
from fastser.ops.center_loss.backend import BackwardOutputs, RowWeights

ARCHS = (80, 90)  # A100, H100/H200
META = torch.device("meta")


def target(arch: int) -> GPUTarget:
    return GPUTarget("cuda", arch, 32)


def specialise(launch: TritonLaunch, arch: int):
    """-> (JIT cache key, ASTSource, options) exactly as JITFunction.run makes them for this launch."""
    jit = launch.jit_function()
    backend = make_backend(target(arch))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.args, **launch.options)
    bound, specialization, options = binder(**kwargs)
    key = f"{launch.name}:" + compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return key, ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs), options.__dict__


def compile_for(launch: TritonLaunch, arch: int):
    _, source, options = specialise(launch, arch)
    return triton.compile(source, target=target(arch), options=options)


def constexprs_of(launch: TritonLaunch) -> dict:
    return {p.name: launch.args[p.name] for p in launch.jit_function().params if p.is_constexpr}


def empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


# ----------------------------------------------------------------------------- what the package launches


def center_loss_launches():
    """Every dtype the Triton backend accepts (features fp32/fp16/bf16, fp32 centers, diff and the
    gradient in the features' dtype), every tile width with D divisible by 16 and not, every
    backward mode (grad_x or not x nothing / Wen update / center gradient), both row-scale forms,
    both gate forms (the forward's int32 bad-row count, a bool), the forward with and without its
    class/bad-row counts and bad-batch counter (int64 or int32), and the deterministic segment
    kernel in both modes."""
    B, C = 8, 5
    labels, counts = empty(B, dtype=torch.int64), empty(C, dtype=torch.int64)
    order, offsets = empty(B, dtype=torch.int64), empty(C + 1, dtype=torch.int64)
    # every tile width BLOCK_D (16..512), each with a D the JIT marks divisible by 16 and one it does not
    widths = (1, 2, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)
    for dtype, D in itertools.product((torch.float32, torch.float16, torch.bfloat16), widths):
        x, diff, centers = empty(B, D, dtype=dtype), empty(B, D, dtype=dtype), empty(C, D)  # diff in x's dtype
        stats = empty(C + 2, dtype=torch.int32)
        for stats, bad_batches in (
            (None, None),
            (stats, None),
            (stats, empty((), dtype=torch.int64)),
            (stats, empty((), dtype=torch.int32)),
        ):
            yield backend_triton.forward_launch(x, labels, centers, empty(B), diff, stats, bad_batches)
        gates = (None, empty((), dtype=torch.int32), empty((), dtype=torch.bool))
        modes = (("none", None), ("grad", None), ("wen", counts), ("wen", empty(C, dtype=torch.int32)))
        scales = [(rows, scale_dtype) for rows in (1, B) for scale_dtype in {torch.float32, dtype}]
        for with_grad_x, (mode, mode_counts), (scale_rows, scale_dtype), bad in itertools.product(
            (True, False), modes, scales, gates
        ):
            # the row scale is the upstream gradient as it comes: (1,) or (B,), fp32 (fp32 centers)
            # or the features' dtype (half centers)
            yield backend_triton.backward_launch(
                diff,
                labels,
                mode_counts,
                C,
                RowWeights(empty(scale_rows, dtype=scale_dtype)),
                BackwardOutputs(
                    grad_x=empty(B, D, dtype=dtype) if with_grad_x else None,
                    centers=centers if mode == "wen" else None,
                    alpha=0.5,
                    grad_centers=centers if mode == "grad" else None,
                ),
                bad,
            )
        for wen, bad, scale_dtype in itertools.product((True, False), gates, (torch.float32, dtype)):
            targets = BackwardOutputs(centers=centers, alpha=0.5) if wen else BackwardOutputs(grad_centers=centers)
            yield backend_triton.segment_update_launch(
                diff, order, offsets, RowWeights(empty(1, dtype=scale_dtype)), targets, bad
            )


def mel_chain_launches():
    """Every flag combination of the fused post-FFT kernel (mel / log-mel / MFCC, power 2, 1 and
    other, ref constant or per-utterance max, top_db or not; the Hann window applied before or in
    the kernel) at the paper's size and at librosa's
    default (128 mels, 20 MFCCs), and every tile size (n_mels 16..256, n_mfcc 1..n_mels) at the
    default flags."""
    B, T = 3, 50
    base = dict(sr=16000, n_fft=512, hop_length=160)
    configs = [
        F.FeatureConfig(kind, **base, n_mels=n_mels, n_mfcc=n_mfcc, power=power, ref=ref, top_db=top_db)
        for (n_mels, n_mfcc), kind, power, ref, top_db in itertools.product(
            ((40, 40), (128, 20)), ("mel", "logmel", "mfcc"), (2.0, 1.0, 1.5), (1.0, "max"), (80.0, None)
        )
    ]
    for n_mels in (16, 40, 64, 65, 128, 256):
        configs.append(F.FeatureConfig("logmel", **base, n_mels=n_mels, ref="max"))
        configs += [F.FeatureConfig("mfcc", **base, n_mels=n_mels, n_mfcc=k, ref="max") for k in {1, 13, n_mels}]
    spec = torch.empty(B, T, 1 + base["n_fft"] // 2, dtype=torch.complex64, device=META).transpose(1, 2)  # stft's
    frames = empty(B, dtype=torch.int64)
    for cfg, hann_fold in itertools.product(configs, (False, True)):  # windowed spectrum, or the window in-kernel
        launches, _ = mel_chain.triton_launches(spec, frames, cfg, F.constants(cfg, META), hann_fold)
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


# ----------------------------------------------------------------------------- what the package really launches


def recorded(run) -> list:
    """The TritonLaunches that `run()` makes through the package's public code on CPU tensors,
    recorded instead of run. TRITON_INTERPRET is set meanwhile only so that the backend registry
    picks Triton on the CPU; the kernels were imported compiled-mode, and nothing is launched."""
    launches = []
    launch, interpret = TritonLaunch.launch, os.environ.get("TRITON_INTERPRET")
    _triton_launch.TritonLaunch.launch = lambda self: launches.append(self)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        run()
    finally:
        _triton_launch.TritonLaunch.launch = launch
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return launches


def center_loss_in_use():
    """CenterLoss (the module a user drops in) on batches a training run makes: feature dtypes,
    embedding widths, batch sizes (a last short batch, one row), class counts, both update modes,
    every validation mode, deterministic or not, mean or per-row loss."""
    from fastser.nn import CenterLoss

    torch.manual_seed(0)
    product = itertools.product(
        (torch.float32, torch.bfloat16, torch.float16),
        ((64, 4, 128), (37, 8, 512), (1, 10, 100), (256, 16, 2)),
        ("wen", "gradient"),
        ("eager", "deferred", "off"),
        (False, True),
        ("mean", "none"),
    )

    def run():
        for dtype, (B, C, D), update, validate, deterministic, reduction in product:
            module = CenterLoss(
                C,
                D,
                update=update,
                backend="triton",
                validate=validate,
                deterministic=deterministic,
                reduction=reduction,
            )
            x = torch.randn(B, D, dtype=dtype, requires_grad=True)
            module(x, torch.randint(0, C, (B,))).sum().backward()

    return recorded(run)


def mel_chain_in_use():
    """The paper's features (FeatureSet.extract, the training path) and the functional MFCC and
    log-mel, for batches with and without lengths and a single clip."""
    from fastser.features import FeatureSet

    torch.manual_seed(0)

    def run():
        features = FeatureSet.paper(("logmel", "mfcc"))
        for B in (1, 13, 16):
            audio = torch.randn(B, 40000)
            features.extract(audio, torch.randint(16000, 40001, (B,)), backend="triton")
            features.extract(audio, backend="triton")
            F.mfcc(audio, sr=16000, backend="triton")
            F.log_melspectrogram(audio, sr=16000, backend="triton")

    return recorded(run)


IN_USE = {"center_loss": center_loss_in_use, "mel_chain": mel_chain_in_use, "planted": list}


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and shared bytes of a compiled kernel, as cuobjdump -res-usage reports them.
    A stack frame in a Triton kernel (which has no local arrays or calls) is spilled registers:
    local-memory traffic that made the first fused mel kernel several times slower than it should be."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK/SHARED line:\n{out}")
    return {"registers": int(usage.group(1)), "stack": int(usage.group(2)), "shared": int(usage.group(3))}


# per SM, sm_80 and sm_90 alike except shared memory: 64K registers allocated per warp in units of
# 256, 64 warps, 32 blocks, 1 KB of shared memory reserved per block (CUDA occupancy calculator)
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> float:
    """Resident warps per SM over the 64 possible, as registers, shared memory and block limits allow."""
    registers_per_warp = -(-registers * 32 // 256) * 256
    blocks = min(
        65536 // (registers_per_warp * num_warps),
        SHARED_PER_SM[arch] // (shared + 1024),
        64 // num_warps,
        32,
    )
    return blocks * num_warps / 64


TILE_CONSTEXPRS = ("BLOCK_D", "ROWS", "BLOCK", "BLOCK_T", "BLOCK_M", "BLOCK_K")
ATOMIC_SASS = re.compile(r"\b(?:RED|REDG|REDUX|ATOM|ATOMG|ATOMS)\.")
FENCE_SASS = re.compile(r"\b(?:MEMBAR|CCTL\.IVALL|FENCE)\b")
# tensor-core matrix instructions: mma.sync (sm_80 and sm_90) and Hopper's warpgroup wgmma
TENSOR_CORE_SASS = re.compile(r"\b(?:HMMA|HGMMA)\.")


BLOCKED_LAYOUT = re.compile(r"^(#blocked\d*) = #ttg\.blocked<\{(.*)\}>", re.M)
SPECTRUM_LOAD = re.compile(r"%pairs\w* = \S+ %\S+.*?tensor<\d+x\d+x!tt\.ptr<f32>, (#blocked\d*)>")


def spectrum_lanes_along_bins(ttgir: str) -> bool:
    """Whether the mel kernel's spectrum tile (`pairs`: BLOCK_T frames x 2 * BLOCK_F floats, each
    frame's bins contiguous in memory) is loaded with a warp's lanes along the bins: its layout's
    fastest dimension is 1 with at least 16 lanes there, so a warp reads whole 64-byte runs of one
    frame. Loaded along time, neighbouring lanes were 2 KB apart."""
    layouts = {name: body for name, body in BLOCKED_LAYOUT.findall(ttgir)}
    loads = SPECTRUM_LOAD.findall(ttgir)
    if not loads:
        return False
    for name in loads:
        lanes = [int(v) for v in re.search(r"threadsPerWarp = \[(\d+), (\d+)\]", layouts[name]).groups()]
        order = [int(v) for v in re.search(r"order = \[(\d+), (\d+)\]", layouts[name]).groups()]
        if order[0] != 1 or lanes[1] < 16:
            return False
    return True


def tensor_core_products(launch: TritonLaunch) -> bool:
    """Whether the design puts this launch's tl.dot products on tensor cores: the mel projection
    always, the DCT where its precision is tf32x3 (mel_chain_triton.dct_precision)."""
    if launch.name == "_mel_db_kernel":
        return True
    return launch.name == "_db_finish_kernel" and launch.args["DO_DCT"] and launch.args["DCT_PRECISION"] == "tf32x3"


def atomics_and_fences(cubin: bytes) -> tuple:
    """(atomic instructions, memory fences and L1 invalidations) in a kernel's SASS. Triton's default
    atomic order (acq_rel) puts a full fence and an L1 invalidate beside every atomic; the center
    loss's atomics only accumulate (nothing in the same launch reads what they write), so they are
    relaxed and the SASS must hold no fence."""
    sass = get_sass(cubin)
    return len(ATOMIC_SASS.findall(sass)), len(FENCE_SASS.findall(sass))


def unique(launches, arch: int) -> dict:
    """{JIT cache key: launch}: one per kernel the JIT would compile."""
    return {specialise(launch, arch)[0]: launch for launch in launches}


def describe(launch: TritonLaunch) -> str:
    return f"{launch.name} {constexprs_of(launch)}"


def reports(family: str, archs):
    """One report per architecture (a dict, printed by main as a JSON line)."""
    enumerated, in_use = list(LAUNCHES[family]()), IN_USE[family]()
    for arch in archs:
        launches = unique(enumerated, arch)
        uncovered = {k: describe(v) for k, v in unique(in_use, arch).items() if k not in launches}
        failures, spills, kernels, fenced, atomics, read_sass, wide_loads = [], [], {}, [], 0, set(), {}
        tensor_cores, no_tensor_cores = {}, []  # per kernel: specialisations with tensor-core products
        uncoalesced = []
        for launch in launches.values():
            try:
                compiled = compile_for(launch, arch)
                if not compiled.asm.get("cubin"):
                    raise RuntimeError("no cubin produced")
            except Exception as e:  # noqa: BLE001 - report every failing specialisation
                failures.append(f"{describe(launch)}: {type(e).__name__}: {str(e).strip()[-600:]}")
                continue
            usage = resource_usage(compiled.asm["cubin"])
            usage["occupancy"] = occupancy(usage["registers"], usage["shared"], compiled.metadata.num_warps, arch)
            worst = kernels.setdefault(launch.name, {"registers": 0, "shared": 0, "occupancy": 1.0, "count": 0})
            worst["count"] += 1
            for k in ("registers", "shared"):
                worst[k] = max(worst[k], usage[k])
            worst["occupancy"] = min(worst["occupancy"], usage["occupancy"])
            if usage["stack"]:
                spills.append(f"{describe(launch)} {launch.options}: {usage}")
            # the atomics' order is the same at every tile size and dtype, and reading SASS takes about
            # half a second a kernel: once per kernel and choice of code (its constexpr flags)
            flags = (
                launch.name,
                tuple(sorted((k, v) for k, v in constexprs_of(launch).items() if k not in TILE_CONSTEXPRS)),
            )
            if launch.args.get("D") == 512 and launch.name not in wide_loads:
                # D divisible by 16, so the JIT marks it and the row loads must come out 128-bit
                wide_loads[launch.name] = "LDG.E.128" in get_sass(compiled.asm["cubin"])
            if launch.name == "_mel_db_kernel" and not spectrum_lanes_along_bins(compiled.asm["ttgir"]):
                uncoalesced.append(describe(launch))
            if tensor_core_products(launch):  # every tile size: the dot's layout depends on it
                if TENSOR_CORE_SASS.search(get_sass(compiled.asm["cubin"])):
                    tensor_cores[launch.name] = tensor_cores.get(launch.name, 0) + 1
                else:
                    no_tensor_cores.append(describe(launch))
            if "atomic_" in launch.jit_function().src and flags not in read_sass:
                read_sass.add(flags)
                n_atomics, n_fences = atomics_and_fences(compiled.asm["cubin"])
                atomics += n_atomics
                if n_fences:
                    fenced.append(f"{launch.name} {flags[1]}: {n_fences} fences beside {n_atomics} atomics")
        yield {
            "family": family,
            "arch": arch,
            "compiled": len(launches) - len(failures),
            "launches": len(launches),
            "in_use": len(in_use),
            "uncovered": list(uncovered.values()),
            "failures": failures,
            "spills": spills,
            "kernels": kernels,
            "sass_read": len(read_sass),
            "atomics": atomics,
            "fenced": fenced,
            "wide_loads": wide_loads,
            "tensor_cores": tensor_cores,
            "no_tensor_cores": no_tensor_cores,
            "uncoalesced": uncoalesced,
        }


def main(family: str, archs) -> None:
    for report in reports(family, archs):
        print(json.dumps(report), flush=True)


def record(path) -> None:
    """Write every family's reports on both architectures to `path` (benchmarks/results/kernels/):
    docs/development.md's kernel table is generated from the newest such file."""
    import datetime

    runs = [r for family in ("center_loss", "mel_chain") for r in reports(family, ARCHS)]
    environment = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "triton": triton.__version__}
    path.write_text(json.dumps({"environment": environment, "reports": runs}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--record":
        from pathlib import Path

        record(Path(sys.argv[2]))
    else:
        main(sys.argv[1], [int(a) for a in sys.argv[2:]] or ARCHS)
