"""SpecAugment's masks: drawn on the CPU generator (reproducible on any device), built where the
features are, with one small copy of their bounds as the only host-to-device traffic."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastser.training.batches import spec_augment


class HostToDevice(TorchDispatchMode):
    """The shapes of every tensor copied from the CPU to another device."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            source = args[1] if name == "copy_" else args[0]
            if source.device.type == "cpu":
                self.shapes.append(tuple(source.shape))
        return out


def features(B=6, device="cpu"):
    return {"logmel": torch.ones(B, 64, 300, device=device), "mfcc": torch.ones(B, 40, 300, device=device)}


def test_each_item_gets_its_bands_masked_within_the_drawn_widths():
    frames = torch.tensor([300, 250, 200, 120, 80, 40])
    out = spec_augment(features(), frames, torch.Generator().manual_seed(0))
    for kind, bins in (("logmel", 64), ("mfcc", 40)):
        x = out[kind]
        assert x.shape == (6, bins, 300) and set(x.unique().tolist()) <= {0.0, 1.0}
        masked_frames = (x == 0).all(1).sum(1)  # frames masked in every bin: the time masks
        masked_bins = (x == 0).all(2).sum(1)  # bins masked in every frame: the frequency masks
        assert (masked_frames <= 2 * (0.1 * frames + 1)).all(), masked_frames
        assert (masked_bins <= 2 * (bins // 8 + 1)).all(), masked_bins
        assert ((masked_frames + masked_bins) > 0).any()  # something was masked


def test_the_same_generator_state_gives_the_same_masks_and_another_does_not():
    frames = torch.full((6,), 300)
    a, b, c = (spec_augment(features(), frames, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_on_a_device_only_the_bounds_are_copied_over():
    """On the meta device (the CUDA path's ops): one host-to-device copy, of the (2 + 2 * kinds, B, 2)
    bounds, never a (B, bins, T) mask."""
    frames = torch.full((6,), 300)
    copies = HostToDevice()
    with copies:
        out = spec_augment(features(device="meta"), frames, torch.Generator().manual_seed(0))
    assert copies.shapes == [(6, 6, 2)]  # t_lo, t_hi, and f_lo, f_hi per kind; B = 6; 2 masks
    assert out["logmel"].device.type == "meta" and out["logmel"].shape == (6, 64, 300)
