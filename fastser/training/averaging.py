"""Exponential moving averages of a model's weights (`--ema`), kept beside the model it follows.

`WeightAverages(model, decays)` holds one `torch.optim.swa_utils.AveragedModel` per decay (buffers
averaged too, so BatchNorm statistics match the averaged weights); `update(model)` after every
optimizer step costs one foreach lerp per decay on the device and no host sync (AveragedModel's own
`update_parameters` reads its device-side count back every call to tell the first from the rest;
here the host keeps that count). The average is
bias-corrected as Adam's moments are: after t steps it weighs step s by (1 - d) d^(t-s) / (1 - d^t),
so the random initial weights fade out at rate d^t instead of lingering with weight d^t in a short
run (a plain EMA started at the initial weights keeps 14% of them after 1000 steps at d = 0.998).
"""

from __future__ import annotations

import itertools

import torch
from torch.optim.swa_utils import AveragedModel

from fastser.checkpoints import cpu_state


def bias_corrected_ema(decay: float):
    """A `multi_avg_fn` for AveragedModel: ema += (1 - d) / (1 - d^t) * (w - ema) for float tensors
    (t counts the weights averaged so far, this one included), integer buffers copied."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"an EMA decay must be in (0, 1); got {decay!r}")

    @torch.no_grad()
    def update(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):  # e.g. BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged, current)
            return
        # a 0-d tensor computed on the device from the device-side count: no host read, no copy
        weight = (1.0 - decay) / (1.0 - decay ** (n_averaged + 1).to(torch.float32))
        torch._foreach_lerp_(averaged, current, weight.to(averaged[0].dtype))

    return update


class WeightAverages:
    """One bias-corrected EMA of `model`'s parameters and buffers per decay, named "ema_<decay>"."""

    def __init__(self, model: torch.nn.Module, decays=()):
        self.averages = {
            name_of(d): AveragedModel(model, multi_avg_fn=bias_corrected_ema(d), use_buffers=True) for d in decays
        }
        self.updates = 0  # the averages' count (each AveragedModel's n_averaged), kept on the host

    def __bool__(self) -> bool:
        return bool(self.averages)

    def update(self, model: torch.nn.Module) -> None:
        """What AveragedModel.update_parameters does (copy at the first call, then its avg function
        per dtype group; the count += 1), without reading the count from the device."""
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        for average in self.averages.values():
            mine = [t.detach() for t in itertools.chain(average.module.parameters(), average.module.buffers())]
            if self.updates == 0:
                torch._foreach_copy_(mine, current)
            else:
                for dtype in dict.fromkeys(a.dtype for a in mine):  # one group per dtype, as AveragedModel
                    group = [(a, c) for a, c in zip(mine, current) if a.dtype == dtype]
                    average.multi_avg_fn([a for a, _ in group], [c for _, c in group], average.n_averaged)
            average.n_averaged += 1
        self.updates += 1

    def models(self) -> dict:
        """name -> the averaged module (a copy of the model's class)."""
        return {name: average.module for name, average in self.averages.items()}

    def state_dict(self) -> dict:
        return {name: cpu_state(average) for name, average in self.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.averages):
            raise ValueError(f"weight averages {sorted(state)} in the checkpoint, {sorted(self.averages)} here")
        for name, average in self.averages.items():
            average.load_state_dict(state[name])
        # one read when a run resumes, not one per step
        self.updates = int(next(iter(self.averages.values())).n_averaged) if self.averages else 0


def name_of(decay: float) -> str:
    return f"ema_{decay:g}"
