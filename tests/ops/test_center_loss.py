"""Every center-loss backend against the torch oracle and against the usual module."""

import copy
import os
import time

import pytest
import torch

from fastser.nn import CenterLoss
from fastser.ops import available_backends, center_loss
from fastser.reference.center_loss import ReferenceCenterLoss
from instruments.ledger import NO_KERNEL, Ledger

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = available_backends(DEVICE)
FLOAT32_BACKENDS = BACKENDS
FLOAT64_BACKENDS = [b for b in BACKENDS if b in ("cpp", "torch")]
SHAPES = [(1, 1, 1), (7, 1, 5), (33, 5, 130), (64, 10, 513), (16, 40, 32)]


def test_expected_backends_are_built():
    cpu = available_backends("cpu")
    assert "torch" in cpu
    assert "cpp" in cpu, "the C++ extension fastser._C did not build or import"
    if os.environ.get("FASTSER_BUILD_CUDA") == "1":  # CI builds the CUDA kernels with nvcc, GPU or not
        from fastser.ops import _native

        assert _native.cuda is not None, f"fastser._C_cuda did not build or import: {_native.CUDA_IMPORT_ERROR}"
    if DEVICE == "cuda":
        assert "triton" in BACKENDS and "torch" in BACKENDS
    else:
        pytest.importorskip("triton")
        assert "triton" in cpu, "Triton kernels must run here under TRITON_INTERPRET=1"


def make_batch(B, C, D, dtype=torch.float32, scale=1.0, device=DEVICE):
    x = (torch.randn(B, D, device=device) * scale).to(dtype)
    labels = torch.randint(0, C, (B,), device=device)
    centers = torch.randn(C, D, device=device) * scale
    return x, labels, centers


def wen_update_loop(x, labels, centers, alpha):
    """Wen et al. (2016), Eq. 4, written out class by class."""
    new = centers.clone().double()
    for j in range(centers.shape[0]):
        rows = labels == j
        n = int(rows.sum())
        if n:
            delta = (x.double()[rows] - centers.double()[j]).sum(0) / (1 + n)
            new[j] += alpha * delta
    return new


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("B,C,D", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_usual_module(backend, B, C, D, reduction):
    x, labels, centers = make_batch(B, C, D)
    ref = ReferenceCenterLoss(C, D, use_gpu=DEVICE == "cuda")
    with torch.no_grad():
        ref.centers.copy_(centers)
    xr = x.clone().requires_grad_()
    ref_loss = ref(xr, labels) * (B if reduction == "sum" else 1)
    ref_loss.backward()

    c = centers.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    loss = center_loss(xf, labels, c, reduction=reduction, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.grad, ref.centers.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("B,C,D", SHAPES + [(50, 3, 700)])
def test_wen_update_matches_paper(backend, deterministic, B, C, D):
    x, labels, centers = make_batch(B, C, D)
    expected = wen_update_loop(x, labels, centers, 0.3).float()
    before = centers.clone()
    xf = x.clone().requires_grad_()
    loss = center_loss(xf, labels, centers, wen_alpha=0.3, backend=backend, deterministic=deterministic)
    torch.testing.assert_close(centers, before, rtol=0, atol=0)  # the forward never writes them
    loss.backward()
    torch.testing.assert_close(centers, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, 2.0 / B * (x - before[labels]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_absent_classes_and_repeated_labels(backend):
    x, _, centers = make_batch(40, 9, 24)
    labels = torch.tensor([2, 2, 2, 7] * 10, device=DEVICE)
    expected = wen_update_loop(x, labels, centers, 0.5).float()
    untouched = centers[[0, 1, 3, 4, 5, 6, 8]].clone()
    center_loss(x.requires_grad_(), labels, centers, wen_alpha=0.5, backend=backend).backward()
    torch.testing.assert_close(centers, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(centers[[0, 1, 3, 4, 5, 6, 8]], untouched)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_reduction_none_matches_per_row(backend):
    x, labels, centers = make_batch(12, 4, 20)
    c = centers.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    per_row = center_loss(xf, labels, c, reduction="none", backend=backend)
    w = torch.rand(12, device=DEVICE)
    (per_row * w).sum().backward()
    xo, co = x.clone().requires_grad_(), centers.clone().requires_grad_()
    expected = ((xo - co[labels]) ** 2).sum(1)
    (expected * w).sum().backward()
    torch.testing.assert_close(per_row, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, xo.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.grad, co.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
def test_upstream_gradient_read_in_place(backend, update):
    """reduction="none" then .sum(): the upstream gradient arrives as a stride-0 expanded view, which
    the Triton kernels read in place with its stride (half-precision ones: the half-centers test):
    gradients and the Wen update equal the oracle's."""
    x, labels, centers = make_batch(37, 5, 24)
    fused = CenterLoss(5, 24, update=update, reduction="none", backend=backend).to(DEVICE)
    oracle = CenterLoss(5, 24, update=update, reduction="none", backend="torch").to(DEVICE)
    grads = []
    for m in (fused, oracle):
        m.centers.data.copy_(centers)
        xr = x.clone().requires_grad_()
        m(xr, labels).sum().backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.centers.detach(), oracle.centers.detach(), rtol=1e-5, atol=1e-5)
    if update == "gradient":
        torch.testing.assert_close(fused.centers.grad, oracle.centers.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_features(backend, dtype, tol):
    x, labels, centers = make_batch(48, 6, 96, dtype=dtype)
    oracle_centers = centers.clone()
    xf = x.clone().requires_grad_()
    loss = center_loss(xf, labels, centers, wen_alpha=0.5, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and xf.grad.dtype == dtype
    x32 = x.float().requires_grad_()
    ref = center_loss(x32, labels, oracle_centers, wen_alpha=0.5, backend="torch")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(xf.grad.float(), x32.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(centers, oracle_centers, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("centers_dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("update", ["wen", "gradient"])
def test_half_precision_centers(backend, centers_dtype, tol, update):
    """fp16/bf16 centers (e.g. a model cast with .half()): every backend reads them as numbers, not as
    reinterpreted fp32 bits, and writes the update or the gradient back in their own dtype."""
    x, labels, centers32 = make_batch(40, 6, 72)
    centers = centers32.to(centers_dtype)
    exact = centers.double()  # the oracle starts from the same rounded centers, in float64
    if update == "gradient":
        c, co = centers.clone().requires_grad_(), exact.clone().requires_grad_()
        loss = center_loss(x, labels, c, backend=backend)
        ref = center_loss(x.double(), labels, co, backend="torch")
        loss.backward()
        ref.backward()
        assert c.grad.dtype == centers_dtype
        torch.testing.assert_close(c.grad.double(), co.grad, rtol=tol, atol=tol)
    else:
        loss = center_loss(x.clone().requires_grad_(), labels, centers, wen_alpha=0.5, backend=backend)
        loss.backward()
        ref = center_loss(x.double().requires_grad_(), labels, exact, wen_alpha=0.5, backend="torch")
        ref.backward()
        assert centers.dtype == centers_dtype
        torch.testing.assert_close(centers.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_large_magnitudes(backend):
    x, labels, centers = make_batch(32, 5, 64, scale=1e4)
    c = centers.clone().requires_grad_()
    loss = center_loss(x, labels, c, backend=backend)
    expected = ((x.double() - centers.double()[labels]) ** 2).sum() / 32
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_float64(backend):
    x = torch.randn(9, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    c = torch.randn(4, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 3, 3, 3, 0, 1, 3], device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: center_loss(a, labels, b, reduction=reduction, backend=backend), (x, c)
        )


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_empty_batch(backend):
    centers = torch.randn(3, 8, device=DEVICE)
    before = centers.clone()
    x = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    loss = center_loss(x, torch.empty(0, dtype=torch.long, device=DEVICE), centers, wen_alpha=0.5, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 8)
    assert torch.equal(centers, before)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_deterministic_is_bit_identical(backend):
    x, labels, centers = make_batch(256, 7, 200)
    results = []
    for _ in range(2):
        c = centers.clone()
        center_loss(
            x.clone().requires_grad_(), labels, c, wen_alpha=0.5, backend=backend, deterministic=True
        ).backward()
        results.append(c)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_non_contiguous_inputs(backend):
    x, labels, centers = make_batch(20, 4, 30)
    wide = torch.randn(30, 20, device=DEVICE)  # x.T of this is a non-contiguous (20, 30) view
    lab = torch.stack([labels, labels], 1)[:, 0]
    loss = center_loss(wide.t(), lab, centers, backend=backend)
    expected = ((wide.t() - centers[labels]) ** 2).sum() / 20
    torch.testing.assert_close(loss, expected)


def test_int32_labels_work():
    x, labels, centers = make_batch(10, 3, 4)
    a = center_loss(x, labels.int(), centers)
    b = center_loss(x, labels, centers)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    (
        "label out of range",
        lambda x, y, c: (x, torch.tensor([0, 1, 5, 2], device=DEVICE), c),
        ValueError,
        r"label 5 at index 2 is out of range \(num_classes=3\)",
    ),
    (
        "negative label",
        lambda x, y, c: (x, torch.tensor([0, -1, 1, 2], device=DEVICE), c),
        ValueError,
        r"label -1 at index 1",
    ),
    ("float labels", lambda x, y, c: (x, y.float(), c), TypeError, "integer tensor"),
    ("3-D features", lambda x, y, c: (x[None], y, c), ValueError, "features must be 2-D"),
    ("wrong feat_dim", lambda x, y, c: (x[:, :3], y, c), ValueError, "feat_dim=6"),
    ("batch mismatch", lambda x, y, c: (x, y[:3], c), ValueError, "4 feature rows but 3 labels"),
    ("int features", lambda x, y, c: (x.long(), y, c), TypeError, "floating point"),
    (
        "NaN features",
        lambda x, y, c: (x.index_fill(0, torch.tensor([2], device=DEVICE), float("nan")), y, c),
        ValueError,
        r"NaN or Inf \(first in row 2\)",
    ),
]


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_and_leaves_centers(backend, update, name, mutate, exc, match):
    """Both update modes: the error comes before anything could write a center (the Wen update in
    backward, or the usual second optimizer stepping on a NaN gradient)."""
    loss_fn = CenterLoss(3, 6, backend=backend, update=update).to(DEVICE)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5) if update == "gradient" else None
    before = loss_fn.centers.detach().clone()
    x, labels, _ = make_batch(4, 3, 6)
    labels = torch.tensor([0, 1, 2, 1], device=DEVICE)
    bad_x, bad_labels, _ = mutate(x, labels, loss_fn.centers.detach())
    with pytest.raises(exc, match=match):
        loss_fn(bad_x.requires_grad_() if bad_x.is_floating_point() else bad_x, bad_labels).backward()
        if opt is not None:
            opt.step()
    assert torch.equal(loss_fn.centers.detach(), before)
    if update == "gradient":
        assert loss_fn.centers.grad is None


def test_unchecked_bad_label_still_caught_by_cpp_kernel():
    if "cpp" not in BACKENDS:
        pytest.skip("C++ extension not built")
    centers = torch.randn(3, 4)
    before = centers.clone()
    with pytest.raises(ValueError, match="label 9 at index 1"):
        center_loss(torch.randn(2, 4), torch.tensor([0, 9]), centers, wen_alpha=0.5, backend="cpp", validate=False)
    assert torch.equal(centers, before)


def test_devices_must_match():
    if not torch.cuda.is_available():
        x, labels, centers = make_batch(4, 3, 6, device="cpu")
        with pytest.raises(ValueError, match="different devices"):
            center_loss(x, labels.to("meta"), centers)
    else:  # pragma: no cover
        x, labels, centers = make_batch(4, 3, 6, device="cpu")
        with pytest.raises(ValueError, match="different devices"):
            center_loss(x.cuda(), labels.cuda(), centers)


def test_unknown_backend_and_reduction():
    x, labels, centers = make_batch(4, 3, 6)
    with pytest.raises(ValueError, match="backend must be one of"):
        center_loss(x, labels, centers, backend="fast")
    with pytest.raises(ValueError, match="reduction must be one of"):
        center_loss(x, labels, centers, reduction="avg")


# --------------------------------------------------------------------------- module


def test_module_is_a_drop_in_for_the_usual_checkpoint():
    ref = ReferenceCenterLoss(10, 2, use_gpu=False)
    ours = CenterLoss(10, 2, update="gradient")
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == ["centers"]
    assert isinstance(ours.centers, torch.nn.Parameter)
    wen = CenterLoss(10, 2)
    wen.load_state_dict(ref.state_dict())
    assert not isinstance(wen.centers, torch.nn.Parameter) and "centers" in dict(wen.named_buffers())
    assert torch.equal(wen.centers, ref.centers.detach())


def test_wen_mode_no_update_in_eval_or_without_backward():
    loss_fn = CenterLoss(4, 8).to(DEVICE)
    before = loss_fn.centers.clone()
    x = torch.randn(16, 8, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 4, (16,), device=DEVICE)
    loss_fn(x, labels)  # no backward
    assert torch.equal(loss_fn.centers, before)
    loss_fn.eval()
    loss_fn(x, labels).backward()
    assert torch.equal(loss_fn.centers, before) and x.grad is not None
    loss_fn.train()
    loss_fn(x, labels).backward()
    assert not torch.equal(loss_fn.centers, before)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
def test_training_loop_tracks_oracle(backend, update):
    """50 optimiser steps with the usual recipe: model SGD + (gradient mode) a center SGD."""
    torch.manual_seed(1)
    model = torch.nn.Linear(12, 6).to(DEVICE)
    crit = CenterLoss(5, 6, update=update, backend=backend, alpha=0.5).to(DEVICE)
    model_o, crit_o = copy.deepcopy(model), copy.deepcopy(crit)
    crit_o.backend = "torch"
    weight = 0.1

    def make_opts(m, c):
        opts = [torch.optim.SGD(m.parameters(), lr=0.05)]
        if update == "gradient":
            opts.append(torch.optim.SGD(c.parameters(), lr=0.5))
        return opts

    opts, opts_o = make_opts(model, crit), make_opts(model_o, crit_o)
    data = torch.randn(50, 32, 12, device=DEVICE)
    targets = torch.randint(0, 5, (50, 32), device=DEVICE)
    for step in range(50):
        for m, c, os_ in ((model, crit, opts), (model_o, crit_o, opts_o)):
            for o in os_:
                o.zero_grad()
            loss = weight * c(m(data[step]), targets[step])
            loss.backward()
            if update == "gradient":
                for p in c.parameters():
                    p.grad.data *= 1.0 / weight
            for o in os_:
                o.step()
    torch.testing.assert_close(crit.centers, crit_o.centers, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.weight, model_o.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_never_sizes_a_tensor_from_the_labels(backend, deterministic, monkeypatch):
    """torch.bincount reads the largest label back to the host on a GPU (a sync every step): the
    Wen update and the center gradient count classes into a tensor of known size instead."""

    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount called in the center-loss step")

    x, labels, centers = make_batch(40, 6, 24)
    expected = wen_update_loop(x, labels, centers, 0.5).float()
    monkeypatch.setattr(torch, "bincount", no_bincount)
    xf = x.clone().requires_grad_()
    center_loss(
        xf, labels, centers, wen_alpha=0.5, backend=backend, deterministic=deterministic, validate=False
    ).backward()
    torch.testing.assert_close(centers, expected, rtol=1e-5, atol=1e-5)
    learnt = centers.clone().requires_grad_()
    center_loss(x, labels, learnt, backend=backend, deterministic=deterministic, validate=False).backward()
    assert learnt.grad is not None and learnt.grad.abs().sum() > 0


def test_class_counts():
    from fastser.ops.center_loss import class_counts

    labels = torch.tensor([3, 0, 3, 3, 1], device=DEVICE)
    assert class_counts(labels, 6).tolist() == [1, 1, 0, 3, 0, 0]
    assert class_counts(labels[:0], 2).tolist() == [0, 0]
    # out of range: not counted
    assert class_counts(torch.tensor([-1, 2, 7, 1], device=DEVICE), 3).tolist() == [0, 1, 1]


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_unvalidated_bad_label_never_writes_out_of_bounds(backend, deterministic):
    """validate=False: a label out of range either raises before any write (C++) or its row is
    left out of the Wen update (torch, the GPU kernels); the other rows' update is exact and
    nothing outside the centers is touched."""
    x, labels, centers = make_batch(12, 4, 20)
    labels[3] = 4  # == num_classes
    keep = torch.arange(12, device=labels.device) != 3
    expected = wen_update_loop(x[keep], labels[keep], centers, 0.5).float()
    before = centers.clone()
    xf = x.clone().requires_grad_()
    try:
        loss = center_loss(
            xf, labels, centers, wen_alpha=0.5, backend=backend, deterministic=deterministic, validate=False
        )
        loss.backward()
    except (IndexError, ValueError, RuntimeError):
        torch.testing.assert_close(centers, before, rtol=0, atol=0)
        return
    assert backend in ("triton", "cuda", "torch")  # the C++ kernel raises instead
    torch.testing.assert_close(centers, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- deferred validation

DEFERRED_BAD = [
    ("label == C", lambda x, y: (x, torch.tensor([0, 1, 3, 2], device=DEVICE))),
    ("negative label", lambda x, y: (x, torch.tensor([0, -2, 1, 2], device=DEVICE))),
    ("NaN features", lambda x, y: (x.index_fill(0, torch.tensor([1], device=DEVICE), float("nan")), y)),
    (
        "Inf feature",
        lambda x, y: (
            x.index_put(
                (torch.tensor([3], device=DEVICE), torch.tensor([2], device=DEVICE)),
                torch.tensor(float("inf"), device=DEVICE),
            ),
            y,
        ),
    ),
]


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name,mutate", DEFERRED_BAD, ids=[b[0] for b in DEFERRED_BAD])
def test_deferred_validation_skips_a_bad_batch_on_the_device(backend, update, deterministic, name, mutate):
    """validate="deferred": no error at the call; the loss is NaN, no center moves (zero center
    gradient), the batch is counted, raise_on_bad_batches() reports it once; the next good batch
    updates exactly as the oracle."""
    loss_fn = CenterLoss(3, 6, backend=backend, update=update, validate="deferred", deterministic=deterministic).to(
        DEVICE
    )
    before = loss_fn.centers.detach().clone()
    x, _, _ = make_batch(4, 3, 6)
    labels = torch.tensor([0, 1, 2, 1], device=DEVICE)
    bad_x, bad_labels = mutate(x, labels)
    xr = bad_x.clone().requires_grad_()
    loss = loss_fn(xr, bad_labels)
    loss.backward()
    assert not torch.isfinite(loss)  # NaN for a bad label or a NaN feature, Inf for an Inf feature
    assert torch.equal(loss_fn.centers.detach(), before)
    if update == "gradient":
        assert torch.equal(loss_fn.centers.grad, torch.zeros_like(before))
        loss_fn.centers.grad = None
    assert int(loss_fn.bad_batches) == 1
    with pytest.raises(ValueError, match=r"1 batch had non-finite features or labels outside \[0, 3\)"):
        loss_fn.raise_on_bad_batches()
    loss_fn.raise_on_bad_batches()  # reported once, then reset
    # a good batch afterwards: exactly the eager result
    xg = x.clone().requires_grad_()
    loss_fn(xg, labels).backward()
    assert int(loss_fn.bad_batches) == 0
    if update == "wen":
        torch.testing.assert_close(
            loss_fn.centers.detach(), wen_update_loop(x, labels, before, 0.5).float(), rtol=1e-5, atol=1e-5
        )
    else:
        expected = -2.0 / 4 * torch.stack([(x[labels == j] - before[j]).sum(0) for j in range(3)])
        torch.testing.assert_close(loss_fn.centers.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
@pytest.mark.parametrize("update", ["wen", "gradient"])
def test_deferred_validation_equals_eager_on_good_batches(backend, update):
    torch.manual_seed(5)
    eager = CenterLoss(10, 33, backend=backend, update=update).to(DEVICE)
    deferred = copy.deepcopy(eager)
    deferred.validate = "deferred"
    for _ in range(3):
        x, labels, _ = make_batch(40, 10, 33)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = eager(xa, labels), deferred(xb, labels)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(deferred.centers.detach(), eager.centers.detach(), rtol=1e-6, atol=1e-6)
    assert int(deferred.bad_batches) == 0


@pytest.mark.parametrize("backend", [b for b in FLOAT32_BACKENDS if b in ("cpp", "torch")])
def test_deferred_validation_reads_nothing_back_to_the_host(backend, monkeypatch):
    """The point of "deferred": no value goes device -> host in the step, bad batch or not. Every
    Tensor method that would read one is made to fail (CPU backends; on a GPU the suite's sync-debug
    test below checks the same for every backend)."""
    loss_fn = CenterLoss(4, 8, backend=backend, validate="deferred").to(DEVICE)
    x, labels, _ = make_batch(16, 4, 8)
    batches = [
        (x, labels),
        (x, torch.where(labels == 2, 7, labels)),
        (x.index_fill(0, labels[:1] * 0, float("nan")), labels),
    ]

    def no_host_read(*args, **kwargs):
        raise AssertionError("a value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    for xb, lb in batches:
        loss_fn(xb.clone().requires_grad_(), lb).backward()
    monkeypatch.undo()
    assert int(loss_fn.bad_batches) == 2


@pytest.mark.gpu(reason="CUDA's sync debug mode needs a GPU (the CPU test above covers cpp/torch)")
@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_deferred_validation_never_syncs_the_stream(backend):
    loss_fn = CenterLoss(4, 8, backend=backend, validate="deferred").to(DEVICE)
    x, labels, _ = make_batch(16, 4, 8)
    loss_fn(x.clone().requires_grad_(), labels).backward()  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lb in (labels, torch.where(labels == 2, 7, labels)):
            loss_fn(x.clone().requires_grad_(), lb).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(loss_fn.bad_batches) == 1


@pytest.mark.gpu(reason="CUDA's sync debug mode needs a GPU")
def test_the_default_validation_on_a_gpu_never_syncs_yet_reports_a_bad_batch():
    """validate="auto" (the drop-in default) is "reported" on a GPU: no call stalls the stream,
    and a bad batch still reaches the user as a ValueError from a later call, with no call of
    their own (what the bad batch did to the centers: the CPU test below)."""
    loss_fn = CenterLoss(4, 8).to(DEVICE)
    assert loss_fn.validation(torch.device(DEVICE)) == "reported"
    x, labels, _ = make_batch(16, 4, 8)
    loss_fn(x.clone().requires_grad_(), labels).backward()  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(x.clone().requires_grad_(), torch.where(labels == 2, 7, labels)).backward()
        with pytest.raises(ValueError, match="1 batch had non-finite features or labels outside"):
            for _ in range(50):  # the count arrives behind the kernels: a call or two later
                loss_fn(x.clone().requires_grad_(), labels).backward()
                time.sleep(0.001)  # host time passes; the GPU catches up
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_reported_validation_raises_a_bad_batch_at_a_later_call_once():
    """ "reported" (a GPU's default; on the CPU the count's copy is done at once, so the next call
    raises): the bad batch's loss is NaN and it moves no center; the next call raises before it
    computes anything, exactly once; raise_on_bad_batches does not count it again."""
    loss_fn = CenterLoss(4, 8, validate="reported").to(DEVICE)
    assert CenterLoss(4, 8).validation(torch.device("cpu")) == "eager"
    assert CenterLoss(4, 8).validation(torch.device("cuda")) == "reported"
    x, labels, _ = make_batch(16, 4, 8)
    loss_fn(x.clone().requires_grad_(), labels).backward()
    bad = x.clone()
    bad[3, 1] = float("nan")
    before = loss_fn.centers.clone()
    loss = loss_fn(bad.requires_grad_(), labels)
    loss.backward()
    assert not torch.isfinite(loss) and torch.equal(loss_fn.centers, before)
    with pytest.raises(ValueError, match="1 batch had non-finite features"):
        loss_fn(x.clone().requires_grad_(), labels)
    assert torch.equal(loss_fn.centers, before)  # the raising call wrote nothing
    for _ in range(2):
        loss_fn(x.clone().requires_grad_(), labels).backward()  # reported once, not again
    loss_fn.raise_on_bad_batches()  # nothing new since
    assert not torch.equal(loss_fn.centers, before)


def test_validation_per_device_type_is_one_setting():
    """validate={device type: mode} picks the mode by the call's device ("*" for the others): the
    training objective's {"cpu": "eager", "*": "deferred"} raises at once on the CPU and defers
    elsewhere, without being rewritten per call."""
    from fastser.models.objective import SERObjective

    per_device = CenterLoss(4, 8, validate={"cpu": "deferred", "*": "off"})
    assert per_device.validation(torch.device("cpu")) == "deferred"
    assert per_device.validation(torch.device("meta")) == "off"
    assert CenterLoss(4, 8, validate={"cpu": "eager"}).validation(torch.device("cuda")) == "reported"
    with pytest.raises(ValueError, match="validate must be"):
        CenterLoss(4, 8, validate={"cpu": "sometimes"})
    x, labels, _ = make_batch(16, 4, 8)
    bad = labels.clone()
    bad[2] = 7
    before = per_device.centers.clone()
    loss = per_device(x.clone().requires_grad_(), bad)  # deferred on the CPU: no raise, NaN, no update
    loss.backward()
    assert not torch.isfinite(loss) and torch.equal(per_device.centers, before)
    with pytest.raises(ValueError, match="1 batch had"):
        per_device.raise_on_bad_batches()
    objective = SERObjective(4, 8).center_loss
    assert objective.validation(torch.device("cpu")) == "eager"
    assert objective.validation(torch.device("cuda")) == objective.validation(torch.device("meta")) == "deferred"


@pytest.mark.gpu(reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("update", ["wen", "gradient"])
@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_a_step_captured_in_a_cuda_graph_replays_like_eager_steps(backend, update):
    """A whole step (forward, backward with the Wen update, the deferred checks) captured once in a
    CUDA graph and replayed on new batches copied into its static inputs gives, step after step, the
    loss, the feature gradient and the centers (or their gradient) of the same steps run eagerly; a
    bad batch replayed is counted and moves nothing."""
    torch.manual_seed(0)
    C, D = 10, 32
    batches = [make_batch(64, C, D)[:2] for _ in range(6)]
    batches[3] = (batches[3][0], torch.where(batches[3][1] == 2, C + 5, batches[3][1]))  # a bad label
    eager = CenterLoss(C, D, backend=backend, update=update, validate="deferred").to(DEVICE)
    graphed = copy.deepcopy(eager)
    start = graphed.centers.detach().clone()
    static_x, static_y = batches[0][0].clone().requires_grad_(), batches[0][1].clone()
    # warm-up on a side stream (kernel compilation, lazy workspaces), as torch.cuda.graph asks;
    # then the module is put back to where the eager one starts
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed(static_x, static_y).backward()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        graphed.centers.copy_(start)
        graphed.bad_batches.zero_()
    static_x.grad, graphed.centers.grad = None, None  # the graph's backward writes them, not adds
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = graphed(static_x, static_y)
        static_loss.backward()
    for step, (x, y) in enumerate(batches):
        with torch.no_grad():
            static_x.copy_(x)
            static_y.copy_(y)
        graph.replay()
        ex = x.clone().requires_grad_()
        eager.centers.grad = None
        loss = eager(ex, y)
        loss.backward()
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"loss, step {step}")
        torch.testing.assert_close(
            static_x.grad, ex.grad, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"x.grad, step {step}"
        )
        torch.testing.assert_close(graphed.centers, eager.centers, rtol=1e-5, atol=1e-6, msg=f"centers, step {step}")
        if update == "gradient":
            torch.testing.assert_close(graphed.centers.grad, eager.centers.grad, rtol=1e-5, atol=1e-6)
    assert int(graphed.bad_batches) == int(eager.bad_batches) == 1
    if update == "wen":
        assert not torch.equal(graphed.centers, start)  # the replays really moved the centers


# --------------------------------------------------------------------------- launches per step


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
def test_triton_forward_counts_classes_and_bad_rows():
    """With `stats` the forward kernel adds each class's row count and the number of bad rows (label
    outside [0, C), NaN or Inf feature) into one int32 buffer — what the Wen update and the
    deferred gate need, with no op of their own — across several programs of rows."""
    from fastser.ops.center_loss import op as ops
    from fastser.ops.center_loss import backend_triton

    C, D = 5, 24
    x, labels, centers = make_batch(41, C, D)
    labels[3], labels[10] = -1, C  # two bad labels
    x[20, 5], x[33, 0] = float("nan"), float("-inf")  # two bad features, and one row with both:
    labels[33] = 7
    stats = ops.new_stats(C, x.device)
    row_loss, diff = torch.empty(41, device=x.device), torch.empty(41, D, device=x.device)
    backend_triton.launch_forward(x, labels, centers, row_loss, diff, stats)
    in_range = (labels >= 0) & (labels < C)
    assert stats.dtype == torch.int32 and stats.shape == (C + 2,)
    assert torch.equal(stats[:C].long(), torch.bincount(labels[in_range], minlength=C))
    assert int(stats[C]) == 4  # rows 3, 10, 20, 33
    good = torch.ones(41, dtype=torch.bool, device=x.device)
    good[[3, 10, 20, 33]] = False
    # a bad-batch counter: + 1 for this batch, however many of its programs hold bad rows
    bad_batches = torch.full((), 5, dtype=torch.int64, device=x.device)
    stats2 = ops.new_stats(C, x.device)
    backend_triton.launch_forward(x, labels, centers, row_loss, diff, stats2, bad_batches)
    assert torch.equal(stats2, stats) and int(bad_batches) == 6
    backend_triton.launch_forward(
        x[good], labels[good], centers, row_loss[good], diff[good], ops.new_stats(C, x.device), bad_batches
    )
    assert int(bad_batches) == 6  # a good batch counts nothing
    ref_loss, ref_diff = ops._forward("torch", x[good], labels[good], centers)
    torch.testing.assert_close(row_loss[good], ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(diff[good], ref_diff, rtol=0, atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("validate", ["deferred", "eager"])
def test_triton_step_launches_two_kernels_and_few_small_ops(validate, monkeypatch):
    """One Wen training step with the Triton backend: exactly two Triton kernels (forward, which
    also counts the classes, the bad rows and a bad batch; backward with the center update, reading
    the upstream gradient in place, and reduces the loss) and nothing else (deferred: the stats
    come zeroed from the slab); eager adds its check, one host read."""
    import importlib
    from torch.utils._python_dispatch import _disable_current_modes

    triton_backend = importlib.import_module("fastser.ops.center_loss.backend_triton")
    rec = Ledger()
    for name in ("forward", "backward", "segment_update"):
        real = getattr(triton_backend, "launch_" + name)

        def launch(*args, _real=real, _name=name, **kwargs):
            rec.ops.append("triton." + _name)
            with _disable_current_modes():
                _real(*args, **kwargs)

        monkeypatch.setattr(triton_backend, "launch_" + name, launch)
    loss_fn = CenterLoss(4, 16, backend="triton", validate=validate).to(DEVICE)
    x, labels, _ = make_batch(32, 4, 16)
    x.requires_grad_()
    grad = torch.ones((), device=DEVICE)
    torch.autograd.backward(loss_fn(x, labels), grad)  # a first step may zero a slab of stats
    rec.ops.clear()
    x.grad = None
    before = loss_fn.centers.detach().clone()
    with rec:
        loss = loss_fn(x, labels)
        torch.autograd.backward(loss, grad)
    launched = [op for op in rec.ops if op not in NO_KERNEL]
    step = ["triton.forward"]  # counts, bad rows and the loss, into stats zeroed ahead
    if validate == "eager":  # labels and features checked at once, by the finiteness of the forward's total
        # (a bad label's row loss is NaN), read on the host once; isfinite is abs/ne/eq/mul
        step += ["sum", "abs", "ne", "eq", "mul", "_local_scalar_dense"]
    assert launched.count("_local_scalar_dense") == (validate == "eager")  # the host reads: one, or none
    step += ["triton.backward"]  # grad_x + Wen update (the row scale is read in the kernel)
    assert launched == step
    plain = (x.detach() - before[labels]).pow(2).sum(1).mean()
    torch.testing.assert_close(loss.detach(), plain)  # the loss the kernel reduced
    assert not torch.equal(loss_fn.centers, before)  # the update really ran


def test_the_stats_slab_zeroes_a_block_of_rows_at_once_and_hands_each_row_out_once():
    """The Triton forward's scratch: 64 steps cost one zeroing launch, each row is zero, of its own
    memory, and a used-up block is followed by a new one (the old one stays valid for its rows)."""
    from fastser.ops.center_loss import StatsSlab

    slab = StatsSlab()
    rec = Ledger()
    with rec:
        rows = [slab.take(5, torch.device("cpu")) for _ in range(65)]
    assert [op for op in rec.ops if op not in NO_KERNEL] == ["zeros", "zeros"]
    assert all(r.shape == (7,) and r.dtype == torch.int32 and not r.any() for r in rows)
    assert len({r.data_ptr() for r in rows}) == 65
    assert len({r.untyped_storage().data_ptr() for r in rows}) == 2
    rows[0].add_(3)  # a row written (by a step) leaves every other row as it was
    assert not any(r.any() for r in rows[1:])
    wide = slab.take(2_000_000, torch.device("cpu"))  # a block is at most 4 MiB: one row here
    assert wide.shape == (2_000_002,) and not wide.any()


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("validate", ["deferred", "eager"])
def test_the_loss_reduced_in_the_kernel_is_the_reference_and_a_tensor_of_its_own(reduction, validate):
    """With the Wen update the Triton forward reduces the loss itself. Its value and gradients are
    the plain ones; the loss is no view (it can be changed in place or kept without touching any
    later step); two forwards before one backward each keep their own counts."""
    C, D = 6, 40
    fused = CenterLoss(C, D, backend="triton", reduction=reduction, validate=validate).to(DEVICE)
    plain = CenterLoss(C, D, backend="torch", reduction=reduction, validate=validate).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    kept = []
    for step in range(3):
        x, labels, _ = make_batch(37, C, D)
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = fused(xf, labels)
        assert loss.shape == () and loss._base is None and not loss._is_view()
        ref = plain(xp, labels)
        torch.testing.assert_close(loss, ref, rtol=2e-6, atol=1e-6)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.centers, plain.centers, rtol=1e-5, atol=1e-6)
        kept.append((loss.detach().clone(), loss))
        loss.detach().add_(100.0)  # a caller's in-place change of its loss
    assert all(torch.equal(a + 100.0, b) for a, b in kept)
    (x1, y1, _), (x2, y2, _) = make_batch(20, C, D), make_batch(30, C, D)
    grad = [x.clone().requires_grad_() for x in (x1, x2, x1, x2)]
    (fused(grad[0], y1) + fused(grad[1], y2)).backward()  # each forward keeps its own stats
    (plain(grad[2], y1) + plain(grad[3], y2)).backward()
    torch.testing.assert_close(fused.centers, plain.centers, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", ["eager", "deferred"])
def test_a_validated_step_reads_the_host_once_or_never(backend, validate):
    """The drop-in default (eager) checks labels and features with one host read a step, after the
    forward; deferred reads nothing. On a GPU each read is a stall of the stream."""
    loss_fn = CenterLoss(4, 16, backend=backend, validate=validate).to(DEVICE)
    x, labels, _ = make_batch(32, 4, 16)
    x.requires_grad_()
    rec = Ledger()
    with rec:
        loss_fn(x, labels).backward()
    assert rec.ops.count("_local_scalar_dense") == (validate == "eager")
    bad = labels.clone()
    bad[5] = 4
    before = loss_fn.centers.detach().clone()
    if validate == "eager":
        with pytest.raises(ValueError, match="label 4 at index 5 is out of range"):
            loss_fn(x, bad).backward()
        assert torch.equal(loss_fn.centers, before)


def test_use_gpu_without_cuda_keeps_the_centers_on_the_cpu_and_says_so_once(monkeypatch):
    """The README's drop-in line, CenterLoss(C, D, use_gpu=True), on a machine without CUDA: one
    warning naming where the centers are, and a module that trains on the CPU."""
    import warnings

    from fastser.nn import CenterLoss

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn = CenterLoss(num_classes=10, feat_dim=2, use_gpu=True)
    assert [str(w.message) for w in caught] == [
        "CenterLoss(use_gpu=True): CUDA is not available, the centers stay on the CPU"
    ]
    assert loss_fn.centers.device.type == "cpu"
    x = torch.randn(4, 2, requires_grad=True)
    loss_fn(x, torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
