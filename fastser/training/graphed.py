"""The whole training step captured once in a CUDA graph and replayed (the default on one GPU).

At SER sizes one step is a few hundred small kernels (the default model at batch 16: about 330),
so an eager step waits on the host launching them (about 23 ms a step at batch 16 on an H100).
Captured here, in `GraphedTrainStep._step`: the batch built from static inputs (in training the
packed row and crop indices of `PlannedBatches`: gather, normalisation, mixup, SpecAugment), the
forward (bf16 autocast with amp), the joint loss with the fused center loss (its Wen update and its
device-side input checks), the backward, the gradient clipping, the optimizer step (capturable
AdamW reading the learning rate and beta1 from a device tensor) and the epoch's running sums.
Outside the graph, a step is two copies to the device (the step's inputs; the schedule's learning
rate and beta1, which the host scheduler computes as in eager training) and the replay.

What makes a replay the same step as an eager one: one shape for every step (static crops; on a GPU
the last batch is filled up), no host read inside the step (the center loss validates on the
device), hyperparameters read from device tensors rather than baked into the graph, and gradients
written rather than accumulated (they are None when the graph is captured, and nothing zeroes them
afterwards). The first `warmup` steps run eagerly (on a side stream on CUDA, as `torch.cuda.graph`
asks: cuDNN/cuBLAS plans, Triton compilation, lazy workspaces); they are real training steps. A
capture that fails leaves the fold training eagerly, with one line saying why.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from fastser.training.step import step_body


class CudaGraphCapture:
    """How `GraphedTrainStep` warms up, captures and loads inputs on a CUDA device. Another object
    with the same three methods stands in for it where there is no GPU (the ledger's emulation)."""

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, not {device}")
        self.device = device

    def warm(self, fn):
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            result = fn()
        main.wait_stream(side)
        return result

    def capture(self, fn):
        """-> (replay, what fn returned while captured: the graph's static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = fn()
        return graph.replay, result

    def load(self, static: torch.Tensor, value: torch.Tensor) -> None:
        if value.device.type == "cpu":
            value = value.pin_memory()  # the caching host allocator keeps it until the copy is done
        static.copy_(value, non_blocking=True)


class GraphedTrainStep:
    """One optimizer step a call, captured after `warmup` eager ones and replayed from then on.

        step = GraphedTrainStep(model, objective, opt, inputs, build, totals=None, amp=False)
        out, terms = step(plan=host_plan)      # each keyword: a new value for inputs[keyword]

    inputs: {name: static device tensor}, what changes from step to step; `build(inputs)` ->
    (feats, targets, frames, labels, mix), the step's batch built from them on the device without a
    host read (`PlannedBatches.build`, or copies of given tensors). `opt`: an Adam/AdamW built with
    `capturable=True` (its learning rate and beta1 are handed in as device tensors, so the host's
    scheduler can change them). `totals`: an EpochTotals the step adds to, inside the graph.
    `capture`: a CudaGraphCapture (the default) or a stand-in. The returned tensors are the graph's
    static outputs, valid until the next call."""

    def __init__(
        self, model, objective, opt, inputs: dict, build, totals=None, amp=False, warmup=3, capture=None, log=None
    ):
        if not all(g.get("capturable") for g in opt.param_groups):
            raise ValueError("a graphed step needs an optimizer built with capturable=True")
        if warmup < 1:
            raise ValueError("a graphed step needs at least one eager warm-up step before the capture")
        device = next(model.parameters()).device
        self.capture = capture if capture is not None else CudaGraphCapture(device)
        self.model, self.objective, self.opt, self.amp = model, objective, opt, amp
        self.inputs, self.build, self.totals = inputs, build, totals
        self.params = [p for p in model.parameters() if p.requires_grad]
        # per parameter group: the learning rate and beta1 of the step, copied in before each call
        self.hyper = torch.zeros(2 * len(opt.param_groups), dtype=torch.float64, device=device)
        self.warmup, self.steps, self.log = warmup, 0, log
        self.replay, self.eager = None, False

    def __call__(self, **values):
        for name, value in values.items():
            static = self.inputs[name]
            if value.shape != static.shape:
                raise ValueError(
                    f"a graphed step's {name} has shape {tuple(static.shape)}, got {tuple(value.shape)}: "
                    "every step must have the shape of the first"
                )
            self.capture.load(static, value)
        hyper = [v for g in self.opt.param_groups for v in (g["lr"], g["betas"][0] if "betas" in g else 0.0)]
        self.capture.load(self.hyper, torch.tensor(hyper, dtype=torch.float64))
        self.steps += 1
        if self.eager or (self.replay is None and self.steps <= self.warmup):
            self.opt.zero_grad(set_to_none=True)
            return self.capture.warm(self._step)
        if self.replay is None:
            self.opt.zero_grad(set_to_none=True)  # the captured backward then writes the gradients
            try:
                self.replay, self.out = self.capture.capture(lambda: self._step(autocast_cache=False))
            except RuntimeError as err:
                self.eager = True
                if self.log is not None:
                    self.log(f"CUDA graph capture failed ({str(err).splitlines()[0]}): training eagerly")
                self.opt.zero_grad(set_to_none=True)
                return self.capture.warm(self._step)
        self.replay()
        return self.out

    def _step(self, autocast_cache: bool = True):
        feats, targets, frames, labels, mix = self.build(self.inputs)
        out, terms = step_body(
            self.model, self.objective, feats, targets, frames, labels, self.amp, self.params, mix, autocast_cache
        )
        with self._hyperparameters_on_device():
            self.opt.step()
        if self.totals is not None:
            self.totals.add(terms, out.logits, labels)
        return out, terms

    @contextmanager
    def _hyperparameters_on_device(self):
        """The optimizer reads lr and beta1 from `self.hyper` (what the graph keeps), not from the
        floats the scheduler writes into its groups (those a graph would bake in)."""
        groups = self.opt.param_groups
        saved = [(g["lr"], g.get("betas")) for g in groups]
        for i, g in enumerate(groups):
            g["lr"] = self.hyper[2 * i]
            if "betas" in g:
                g["betas"] = (self.hyper[2 * i + 1], g["betas"][1])
        try:
            yield
        finally:
            for g, (lr, betas) in zip(groups, saved):
                g["lr"] = lr
                if betas is not None:
                    g["betas"] = betas


def cuda_graph_refusal(run, info, device) -> "str | None":
    """Why the training step cannot be one CUDA graph in this run (None: it can; the default then).

    Args:
        run: the run's fastser.config.RunConfig (--compile refuses it).
        info: fastser.distributed.DistInfo (torchrun refuses it).
        device: the training device (only CUDA has graphs).
    """
    if device.type != "cuda":
        return f"device {device.type}"
    if info.enabled:
        return "torchrun"
    if run.compile:
        return "--compile"
    return None
