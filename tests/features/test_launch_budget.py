"""The feature path's launch budget, counted as the GPU would run it: the Triton path (interpreted
here, its kernels stubbed) issues these ATen ops, each about one CUDA launch, and reads nothing
back to the host. Budgets fail when a change adds launches or a host synchronisation."""

import pytest
import torch

from fastser.features import FeatureSet
from fastser.ops import _triton_launch, registry
from instruments.ledger import Ledger


@pytest.fixture
def triton_stubbed(monkeypatch):
    """Triton launches recorded by kernel name, not run (their own tensor traffic is not counted)."""
    if not registry.triton_importable():
        pytest.skip("needs Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ledger = Ledger()

    def launch(self):  # stubbed: the outputs keep whatever they were allocated with
        ledger.ops.append("triton." + self.name)

    monkeypatch.setattr(_triton_launch.TritonLaunch, "launch", launch)
    return ledger


# launches on the Triton path at most, for 256 clips of 1.5-3 s with their lengths: the frame counts
# (2), the zero padding (5), the STFT (3: window, FFT, layout), and per kind the frame counts as int32
# and the two fused kernels. torchaudio's MFCC transform issues 14 for its padded batch.
BUDGETS = {("mfcc",): 13, ("logmel", "mfcc"): 16}


@pytest.mark.parametrize("kinds", list(BUDGETS))
def test_features_of_a_batch_with_lengths_fit_their_launch_budget_without_a_host_read(triton_stubbed, kinds):
    fs = FeatureSet.paper(kinds)
    audio = torch.randn(256, 48000)
    lengths = torch.randint(24000, 48001, (256,))
    fs.extract(audio, lengths, backend="triton")  # warm: the windows and filters are built once
    ledger = triton_stubbed
    ledger.ops.clear()
    with ledger:
        fs.extract(audio, lengths, backend="triton")
    kernels = [op for op in ledger.launches if op.startswith("triton.")]
    assert len(kernels) == 2 * len(kinds)  # the fused mel/dB kernel and the top_db/DCT finish, per kind
    assert ledger.host_reads == 0
    assert len(ledger.launches) <= BUDGETS[kinds], ledger.launches
