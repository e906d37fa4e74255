"""The GPU compile gate: every Triton kernel fastser can launch, in every specialisation its
launchers produce, compiled ahead of time to cubin for sm_80 (A100) and sm_90 (H100/H200) — on a
machine with no GPU, so CI catches a kernel that only the CPU interpreter accepts.

The interpreter (TRITON_INTERPRET=1, used by the kernel tests here) runs kernels the GPU compiler
refuses, e.g. one reading a plain module global; that shipped once and crashed every CUDA run.
`triton.compile(..., target=GPUTarget("cuda", arch, 32))` runs Triton's front end, the NVIDIA back
end and ptxas. A Triton imported to interpret cannot compile, so the work runs in a subprocess
(tests/ops/gpu_compile_gate.py) with TRITON_INTERPRET unset.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


ARCHS = (80, 90)
# the lowest occupancy any specialisation may have (resident warps per SM over 64, from its
# registers and shared memory): the center-loss kernels are bandwidth-bound and keep 16 warps of
# 128-bit loads in flight (at most 128 registers a thread on 4 warps; the widest forward tile
# needs 94 on sm_80); the mel kernels' tiles were sized for 8 warps (178 registers at 256 mels)
OCCUPANCY = {"center_loss": 0.25, "mel_chain": 0.125, "planted": 0.0}


def run_gate(family: str) -> dict:
    """{arch: report}; one worker per architecture, side by side (a cold compile of the mel kernels
    takes minutes; Triton's cache makes reruns of unchanged kernels take seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ops.gpu_compile_gate", family, str(arch)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for arch in ARCHS
    ]
    reports = {}
    for worker in workers:
        out, err = worker.communicate(timeout=1200)
        assert worker.returncode == 0, err[-3000:]
        reports.update({r["arch"]: r for r in map(json.loads, out.splitlines())})
    assert sorted(reports) == list(ARCHS), reports
    return reports


@pytest.mark.parametrize("family,at_least", [("center_loss", 100), ("mel_chain", 25)])
def test_every_launched_triton_kernel_compiles_for_sm80_and_sm90(family, at_least):
    for arch, report in run_gate(family).items():
        assert report["launches"] >= at_least  # the enumeration really enumerates
        assert not report["failures"], (
            f"{len(report['failures'])} of {report['launches']} specialisations do not "
            f"compile for sm_{arch}:\n" + "\n".join(report["failures"][:5])
        )
        assert report["compiled"] == report["launches"]
        # a spill is local-memory traffic on every access: the first fused mel kernel spilled 1.3 KB
        # (log-mel) and 6.5 KB (MFCC) per thread on sm_90 and ran 3-12x slower than torchaudio
        assert not report["spills"], (
            f"{len(report['spills'])} specialisations spill registers on sm_{arch}:\n" + "\n".join(report["spills"][:5])
        )
        # what the package really launches (CenterLoss and the feature functions on CPU tensors,
        # specialised as the JIT would) is among what was compiled
        assert report["in_use"] > 0
        assert not report["uncovered"], "launched but never compiled:\n" + "\n".join(report["uncovered"][:5])
        for name, usage in report["kernels"].items():
            assert 0 < usage["registers"] <= 255, (name, usage)
            assert usage["occupancy"] >= OCCUPANCY[family], (arch, name, usage)
        # atomics with the default acq_rel order each bring a full fence and an L1 invalidate (SASS
        # MEMBAR.ALL.GPU + CCTL.IVALL); the kernels' atomics only accumulate, so they are relaxed
        assert not report["fenced"], "\n".join(report["fenced"][:5])
        if family == "center_loss":
            assert report["atomics"] > 0  # the check reads SASS that has atomics in it
            # the JIT marks a D divisible by 16 (and the pointers) so; compiled without those
            # attributes, as the gate once did, the row loads were scalar
            wide = report["wide_loads"]
            assert wide["_forward_kernel"] and wide["_backward_kernel"], wide
        if family == "mel_chain":
            # the mel projection (and the DCT up to 64 mels) are tf32x3 products: HMMA on sm_80,
            # HMMA or Hopper's HGMMA on sm_90; on fp32 FMA (input_precision="ieee") the SASS has none
            assert report["tensor_cores"].get("_mel_db_kernel") == report["kernels"]["_mel_db_kernel"]["count"]
            assert report["tensor_cores"].get("_db_finish_kernel", 0) > 0  # the DCT up to 64 mels
            assert not report["no_tensor_cores"], "\n".join(report["no_tensor_cores"][:5])
            # the frame-major spectrum is read along its bins, a warp's lanes on consecutive floats
            assert not report["uncoalesced"], "\n".join(report["uncoalesced"][:5])


def test_the_gate_fails_on_a_kernel_that_reads_a_non_constexpr_global():
    """The planted kernel runs under the CPU interpreter, yet the gate must refuse it on both targets."""
    if not torch.cuda.is_available():  # the interpreter accepts it: this is what the gate exists for
        from tests.ops import gpu_compile_gate as gate

        x = torch.ones(4)
        gate.reads_a_plain_global[(1,)](X_ptr=x, N=4, BLOCK=16)
        assert torch.equal(x, torch.full((4,), 0.5))
    for arch, report in run_gate("planted").items():
        assert report["compiled"] == 0 and len(report["failures"]) == 1, report
        assert "global variable PLANTED_SCALE" in report["failures"][0], report["failures"][0]
