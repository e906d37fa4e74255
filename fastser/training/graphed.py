"""A training step captured once in a CUDA graph and replayed (`--cuda-graph`, GPU only).

At SER sizes one step is a few hundred small kernels (a 184k-parameter model at batch 16), so the
GPU waits on the host launching them (about 23 ms a step at batch 16 on an H100). A replayed graph
launches them all at once. Captured: `step_body`, the function eager steps run too — the forward
(bf16 autocast with --amp), the joint loss with the fused center loss (its Wen update and its
device-side input checks), the backward and the gradient clipping. Not captured: the optimizer step
(fused AdamW on CUDA: a few launches), so the one-cycle schedule's learning rate and momentum change
every step exactly as in eager training (a captured optimizer would bake in the values of the
capture step); and the batch gather, whose result is copied into the graph's static inputs.

What the training loop guarantees so that a replay is the same step as an eager one: one shape
for every training batch (static crops; on a GPU the last batch is filled up), no host read inside
the step (the center loss validates on the device), and gradients written rather than accumulated
(they are None when the graph is captured, and nothing zeroes them afterwards). The first `warmup`
steps run eagerly on a side stream, as `torch.cuda.graph` asks (cuDNN/cuBLAS plans, Triton
compilation, lazy workspaces); they are real training steps.
"""

from __future__ import annotations

import torch

from fastser.training.step import step_body, train_step


class GraphedTrainStep:
    """`step(feats, targets, frames, labels, mix=None) -> (out, terms)`: one optimizer step, like
    `train_step(model, objective, opt, ...)`; the returned tensors are the graph's static outputs,
    valid until the next call. `targets` may be `feats` itself (no SpecAugment); `mix` (mixup) is
    given at every step or at none, since the graph is captured with or without it."""

    def __init__(self, model, objective, opt, amp: bool = False, warmup: int = 3):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"--cuda-graph needs the model on a CUDA device, not {device}")
        self.model, self.objective, self.opt, self.amp = model, objective, opt, amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.warmup, self.steps = warmup, 0
        self.graph = None

    def __call__(self, feats: dict, targets: dict, frames: torch.Tensor, labels: torch.Tensor, mix=None):
        self.steps += 1
        if self.graph is None and self.steps <= self.warmup:
            side, main = torch.cuda.Stream(), torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                result = train_step(
                    self.model,
                    self.objective,
                    self.opt,
                    feats,
                    targets,
                    frames,
                    labels,
                    self.amp,
                    clip_params=self.params,
                    mix=mix,
                )
            main.wait_stream(side)
            return result
        if self.graph is None:
            self._capture(feats, targets, frames, labels, mix)
        else:
            if (mix is None) != (self.mix is None):
                raise ValueError(
                    "the CUDA graph was captured "
                    + ("without" if self.mix is None else "with")
                    + " mixup: give `mix` at every step or at none"
                )
            self._load(feats, targets, frames, labels, mix)
        self.graph.replay()
        self.opt.step()
        return self.out, self.terms

    def _load(self, feats, targets, frames, labels, mix) -> None:
        for k, x in feats.items():
            self.feats[k].copy_(x, non_blocking=True)
        if self.targets is not self.feats:
            for k, x in targets.items():
                self.targets[k].copy_(x, non_blocking=True)
        self.frames.copy_(frames, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if mix is not None:
            for static, x in zip(self.mix, mix):
                static.copy_(x, non_blocking=True)

    def _capture(self, feats, targets, frames, labels, mix) -> None:
        self.feats = {k: x.clone() for k, x in feats.items()}
        self.targets = self.feats if targets is feats else {k: x.clone() for k, x in targets.items()}
        self.frames, self.labels = frames.clone(), labels.clone()
        self.mix = type(mix)(*(x.clone() for x in mix)) if mix is not None else None
        self.opt.zero_grad(set_to_none=True)  # the captured backward then writes the gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, self.terms = step_body(
                self.model,
                self.objective,
                self.feats,
                self.targets,
                self.frames,
                self.labels,
                self.amp,
                self.params,
                self.mix,
                autocast_cache=False,
            )
