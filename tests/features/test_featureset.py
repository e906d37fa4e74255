"""FeatureSet.extract, the model's input: every kind on one frame grid, and no wait for the device."""

import pytest
import torch

from fastser.features import FeatureSet
from fastser.features.functional import resolve_backend
from instruments.ledger import Ledger


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_batch_with_lengths_is_extracted_without_a_host_read(backend):
    """The training and predict path: padded audio with each item's length. The output spans the
    padded length's frames (known from the shape), so no frame count is read from the device —
    on a GPU that read would stall the stream on every batch."""
    fs = FeatureSet.paper(("logmel", "mfcc", "prosody"))
    lengths = torch.tensor([16000, 9000, 12345])
    audio = torch.randn(3, 16000) * 0.1
    rec = Ledger()
    with rec:
        feats, frames = fs.extract(audio, lengths, backend=backend)
    assert rec.host_reads == 0, resolve_backend(backend, audio.device)
    assert {x.shape[-1] for x in feats.values()} == {16000 // 160 + 1}
    assert frames.tolist() == [1 + n // 160 for n in lengths.tolist()]


def test_padding_beyond_the_longest_item_only_adds_zero_frames():
    fs = FeatureSet.paper(("logmel", "mfcc", "prosody"))
    lengths = torch.tensor([12000, 9000])
    audio = torch.randn(2, 12000) * 0.1
    tight, frames = fs.extract(audio, lengths)
    wide, frames_wide = fs.extract(torch.nn.functional.pad(audio, (0, 3000)), lengths)
    assert torch.equal(frames, frames_wide)
    for kind in tight:
        T = tight[kind].shape[-1]
        torch.testing.assert_close(wide[kind][..., :T], tight[kind], rtol=0, atol=1e-5)
        assert not wide[kind][..., T:].any()
