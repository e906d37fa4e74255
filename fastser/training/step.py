"""One optimizer step, written once: eager training, the CUDA graph (graphed.py) and torch.compile
all run `step_body`; nothing here knows about folds, epochs or the loop.

    step_body(model, objective, feats, targets, frames, labels)  # forward, joint loss, backward, clip
    train_step(model, objective, opt, feats, targets, frames, labels)  # zero_grad, step_body, opt.step()
"""

from __future__ import annotations

import torch

GRAD_CLIP_NORM = 5.0  # max total gradient norm: the paper's CNNs with the center loss diverge now and then without


def step_body(
    model,
    objective,
    feats: dict,
    targets: dict,
    frames: torch.Tensor,
    labels: torch.Tensor,
    amp: bool = False,
    clip_params=None,
    mix=None,
    autocast_cache: bool = True,
):
    """Forward (bf16 autocast with amp), the joint loss in fp32 (`mix`: the Mix of a mixup batch),
    backward (the fused center loss moves its centers inside it) and gradient clipping of
    `clip_params`. Gradients must be None or zero before it. No host synchronisation.
    `autocast_cache=False` under CUDA-graph capture (the cache would keep casts of the capture)."""
    if amp:
        with torch.autocast(frames.device.type, dtype=torch.bfloat16, cache_enabled=autocast_cache):
            out = model(feats, frames)
    else:
        out = model(feats, frames)
    terms = objective(out, labels, targets, frames, mix)
    terms.total.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, GRAD_CLIP_NORM)
    return out, terms


def train_step(
    model,
    objective,
    opt,
    feats: dict,
    targets: dict,
    frames: torch.Tensor,
    labels: torch.Tensor,
    amp: bool = False,
    clip_params=None,
    mix=None,
):
    """One optimizer step: `step_body` between zeroing the gradients and `opt.step()`."""
    opt.zero_grad(set_to_none=True)
    out, terms = step_body(model, objective, feats, targets, frames, labels, amp, clip_params, mix)
    opt.step()
    return out, terms
