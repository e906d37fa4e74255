"""The fused center loss under torch.compile(fullgraph=True): registered as torch.library custom ops
(fake implementations, an autograd formula, the Wen update as a mutation in the backward), so a
compiled model keeps the fused loss in its graph and gets the same loss, gradients and centers as
eager execution."""

import pytest
import torch

from fastser.nn import CenterLoss
from fastser.ops import available_backends
from fastser.ops.center_loss.op import _op_backward, _op_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the Triton interpreter is too slow to run under compile in CI time; on a GPU every backend runs
BACKENDS = [b for b in available_backends(DEVICE) if DEVICE == "cuda" or b != "triton"]


class Head(torch.nn.Module):
    def __init__(self, update, backend, reduction="mean"):
        super().__init__()
        self.lin = torch.nn.Linear(12, 6)
        self.loss = CenterLoss(5, 6, update=update, backend=backend, reduction=reduction)

    def forward(self, x, y):
        out = self.loss(self.lin(x), y)
        return out if out.dim() == 0 else out.sum()


def step_both_and_compare(eager, compiled, step, x, y):
    """One step of the eager and the compiled model on the same batch: loss, weight gradient and
    centers agree."""
    eager.zero_grad()
    compiled.zero_grad()
    a, b = eager(x, y), step(x, y)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.lin.weight.grad, eager.lin.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.loss.centers.detach(), eager.loss.centers.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_fullgraph_matches_eager(backend, update, reduction):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled = Head(update, backend, reduction).to(DEVICE), Head(update, backend, reduction).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)  # fullgraph: any graph break is an error
    for i in range(3):
        x = torch.randn(32, 12, device=DEVICE)
        y = torch.randint(0, 5, (32,), device=DEVICE)
        step_both_and_compare(eager, compiled, step, x, y)
        if update == "gradient":
            torch.testing.assert_close(compiled.loss.centers.grad, eager.loss.centers.grad, rtol=1e-5, atol=1e-6)
    if update == "wen":  # the Wen update moved them (in "gradient" mode an optimizer would, from their grad)
        torch.manual_seed(0)
        untrained = Head(update, backend, reduction).loss.centers.detach()
        assert not torch.equal(compiled.loss.centers.detach().cpu(), untrained)
    else:
        assert compiled.loss.centers.grad.abs().sum() > 0


def test_the_ops_pass_torch_library_opcheck():
    """The two halves of CenterLossFunction as torch.library ops: schema, fake implementation and
    functionalisation (the backward mutates the centers) as opcheck tests them; the forward's
    outputs are the eager body's."""
    x = torch.randn(8, 6, device=DEVICE)
    y = torch.randint(0, 4, (8,), device=DEVICE)
    c = torch.randn(4, 6, device=DEVICE)
    backend = BACKENDS[0]
    for bad_label_is_nan in (False, True):
        torch.library.opcheck(_op_forward, (x, y, c, backend, bad_label_is_nan, False))
    row_loss, diff, stats = _op_forward(x, y, c, backend, True, False)
    torch.testing.assert_close(row_loss, ((x - c[y]) ** 2).sum(1))
    torch.testing.assert_close(diff, x - c[y])
    assert stats.numel() == 0  # only the Triton forward counts (count=True)
    empty = diff.new_empty(0)
    counts = torch.bincount(y, minlength=4)
    for update, want_gc, bad in (
        (True, False, empty),
        (True, False, torch.ones((), dtype=torch.int32)),
        (False, True, empty),
    ):
        args = (diff, y, torch.ones(8, device=DEVICE), 2.0, c.clone(), 0.5, update, True, want_gc, torch.float32)
        torch.library.opcheck(_op_backward, args + (backend, False, bad, counts))
    # the Wen update as the op makes it, against the rule written out; a bad batch moves nothing
    moved, gated = c.clone(), c.clone()
    _op_backward(
        diff, y, torch.ones(1), 2.0, moved, 0.5, True, False, False, torch.float32, backend, False, empty, empty
    )
    sums = torch.zeros_like(c).index_add_(0, y, diff)
    torch.testing.assert_close(moved, c + 0.5 * sums / (1 + counts)[:, None].float())
    bad = torch.ones((), dtype=torch.int32)
    _op_backward(diff, y, torch.ones(1), 2.0, gated, 0.5, True, False, False, torch.float32, backend, False, bad, empty)
    assert torch.equal(gated, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
def test_compiled_step_validates_on_the_device(backend, update):
    """Under torch.compile the host-side checks cannot run (they would break the graph), so the
    compiled step validates on the device, as validate="deferred" does eagerly: a batch with a NaN
    feature or a label outside [0, C) moves no center and is counted; a good batch then matches eager."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    eager, compiled = Head(update, backend).to(DEVICE), Head(update, backend).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    x = torch.randn(32, 12, device=DEVICE)
    y = torch.randint(0, 5, (32,), device=DEVICE)
    before = compiled.loss.centers.detach().clone()
    bad_x = x.clone()
    bad_x[4, 0] = float("nan")
    for bx, by in ((bad_x, y), (x, torch.where(y == 3, 5, y))):
        compiled.zero_grad()
        loss = step(bx, by)
        loss.backward()
        assert not torch.isfinite(loss)
        assert torch.equal(compiled.loss.centers.detach(), before)
        if update == "gradient":
            assert torch.equal(compiled.loss.centers.grad, torch.zeros_like(before))
    with pytest.raises(ValueError, match="2 batches had non-finite features"):
        compiled.loss.raise_on_bad_batches()
    step_both_and_compare(eager, compiled, step, x, y)
    assert int(compiled.loss.bad_batches) == 0


@pytest.mark.parametrize("order", [("wen", "gradient"), ("gradient", "wen")])
def test_both_update_modes_compile_in_one_process(order):
    """Models with a Wen-mode and a gradient-mode CenterLoss (a buffer, a Parameter) compiled one
    after the other in one process, without resetting dynamo in between: each compiles and matches
    eager, and calling a compiled model again reuses its graph (no recompilation)."""
    torch._dynamo.reset()
    for update in order:
        torch.manual_seed(0)
        eager, compiled = Head(update, BACKENDS[0]).to(DEVICE), Head(update, BACKENDS[0]).to(DEVICE)
        compiled.load_state_dict(eager.state_dict())
        step = torch.compile(compiled, fullgraph=True)
        x, y = torch.randn(32, 12, device=DEVICE), torch.randint(0, 5, (32,), device=DEVICE)
        step_both_and_compare(eager, compiled, step, x, y)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                step_both_and_compare(eager, compiled, step, x, y)
