"""The ledger's budgets (instruments/ledger.py): launches, host syncs and bytes of the CUDA code path,
counted on the meta device. A change that adds a launch, a stall of the stream or traffic fails here."""

import pytest
import torch

from instruments import ledger as L
from fastser.ops import registry

pytestmark = pytest.mark.skipif(not registry.triton_importable(), reason="the CUDA path's kernels need Triton")

# bytes moved over the least the operation needs, at most (the target for the center loss is
# 1.25x: its forward stores diff, fp32 or the features' half dtype, and the backward reads it back);
# the features at most 0.6x
# torchaudio's (its STFT writes the windowed frames and the spectrum's power; ours takes the FFT of
# the padded signal in place and windows in the kernel)
CENTER_LOSS_BYTES = {"B65536_C10000_D512": 1.95, "B65536_C10000_D512_bf16": 1.9}
FEATURES_VS_TORCHAUDIO_BYTES = 0.6
FEATURE_LAUNCHES_WITH_LENGTHS = 11  # torchaudio has no lengths: 4 more than the padded batch's
TRAIN_STEP_LAUNCHES = 315  # the default model's whole step at batch 64, as the loop runs it on a GPU
GRAPHED_STEP_OUTSIDE_LAUNCHES = 5  # the same step with its CUDA graph (the GPU default), outside it


@pytest.fixture(scope="module")
def center_rows():
    return {(r.case, r.impl): r for r in L.center_loss_rows()}


@pytest.fixture(scope="module")
def feature_rows():
    return {(r.case, r.impl): r for r in L.feature_rows()}


def test_the_fused_center_loss_step_is_two_kernels_and_three_small_ops_without_a_sync(center_rows):
    for (case, impl), r in center_rows.items():
        if impl.startswith("triton"):
            assert r.triton == 2 and set(r.kernels) == {"_forward_kernel", "_backward_kernel"}, (case, impl)
            # nothing of its own (the stats come zeroed from a slab, the forward reduces the loss):
            # autograd's ones for backward(); the default adds the copy of its bad-batch counter
            assert r.aten == (1 if impl == "triton-deferred" else 2), (case, impl, r)
            assert r.syncs == [], (case, impl)
            assert r.async_copies == (impl == "triton-default")
    for case, most in CENTER_LOSS_BYTES.items():
        r = center_rows[(case, "triton-deferred")]
        assert r.bytes <= most * r.min_bytes, (case, r.bytes / r.min_bytes)
        assert r.bytes < center_rows[(case, "torch-gather")].bytes / 3


def test_the_usual_module_is_counted_as_its_users_run_it(center_rows):
    r = center_rows[("B256_C4_D256", "reference")]
    assert r.triton == 0 and r.aten > 20 and r.syncs == []
    assert r.bytes > 5 * r.min_bytes  # its B x C distance matrix and its optimizer


@pytest.mark.parametrize("kind", ["mfcc", "logmel"])
def test_features_launch_no_more_than_torchaudio_and_move_fewer_bytes(feature_rows, kind):
    ours, theirs = feature_rows[(kind, "fastser-triton")], feature_rows[(kind, "torchaudio-chain")]
    assert ours.triton == 2 and theirs.triton == 0
    assert ours.launches <= theirs.launches, (ours.launches, theirs.launches)
    assert ours.bytes <= FEATURES_VS_TORCHAUDIO_BYTES * theirs.bytes, ours.bytes / theirs.bytes
    with_lengths = feature_rows[(kind + "-lengths", "fastser-triton")]
    assert with_lengths.launches <= FEATURE_LAUNCHES_WITH_LENGTHS
    # host-side lengths: the frame counts and the output's length are read on the host, and a GPU
    # checks the audio for NaN/Inf only when asked (check_finite=True)
    for r in (ours, with_lengths):
        assert r.syncs == [] and r.async_copies == 0, r.syncs


def test_the_default_training_step_fits_its_launch_budget_without_a_sync():
    """Forward, joint loss, backward, foreach clipping (8), fused AdamW (2: its step counters, the
    update), the schedule (host only) and the epoch's running sums (6)."""
    ledger = L.count(L.train_step_case())
    ops = ledger.launches
    assert "_fused_adamw_" in ops and "_foreach_norm" in ops  # the CUDA path's multi-tensor kernels
    assert sum(op.startswith("triton.") for op in ops) == 2  # the center loss's two kernels
    assert len(ops) <= TRAIN_STEP_LAUNCHES, len(ops)
    assert ledger.syncs == []


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "mixup+specaugment"])
def test_the_graphed_training_step_is_three_launches_outside_its_graph_without_a_sync(augment):
    """With the CUDA graph (the default on one GPU), a steady step issues from the host: the copy of
    the step's plan (rows, crops, augmentation draws), the copy of the learning rate and beta1, the
    replay. The capture itself went through on the CUDA path (the stand-in graph refuses a host read
    or a host-device copy while capturing, as torch.cuda.graph does), so nothing fell back to eager."""
    step = L.graphed_train_step_case(mixup=0.4 if augment else 0.0, specaugment=augment)
    ledger = L.count(step, warm=L.GRAPH_WARM)
    assert step.graphed.replay is not None and not step.graphed.eager
    assert ledger.launches == ["copy_", "copy_", "cuda_graph_replay"]
    assert len(ledger.launches) <= GRAPHED_STEP_OUTSIDE_LAUNCHES
    assert ledger.syncs == [] and ledger.ops.count("async_copy_to_host") == 0
    captured = [func.overloadpacket.__name__ for func, *_ in step.graphed.capture.tape]
    # what the graph holds: the batch gather, forward and backward, clipping, AdamW, the sums (the center
    # loss's two Triton kernels are launched into it too, outside the ATen tape)
    assert {"index", "convolution", "convolution_backward", "_foreach_norm", "addcdiv_", "argmax"} <= set(captured)


def test_a_host_read_is_caught_with_the_line_that_asks():
    x = torch.empty(8, device="meta")
    ledger = L.Ledger(bytes=True, host_is_free=True)
    with ledger:
        bool((x > 0).all())
        x.cpu()
        torch.nonzero(x)
    assert len(ledger.syncs) == 3 and all("outside fastser" in s for s in ledger.syncs)
    assert ledger.host_reads == 3  # bool, the copy, the count nonzero reads back


def test_the_table_has_a_row_per_case():
    rows = [L.Row("s", "c", "i", 3, 2, ["item at fastser/x.py:1"], 0, 2**20, 2**19)]
    text = L.table(rows)
    assert "| s | c | i | 5 (3 + 2) | 1 (item at fastser/x.py:1) | 0 | 1.0 MiB | 2.00× |" in text


def test_weight_averages_update_without_reading_the_device():
    """--ema: every step's update is one foreach lerp per decay (and a copy of the integer buffers),
    with no host read (AveragedModel.update_parameters reads its count back at every call)."""
    from fastser.training.averaging import WeightAverages

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).to(L.META)
    averages = WeightAverages(model, (0.9, 0.99))
    averages.update(model)  # the first: a copy
    ledger = L.Ledger(host_is_free=True)
    with ledger:
        averages.update(model)
    assert ledger.host_reads == 0 and ledger.syncs == []
    assert ledger.launches.count("_foreach_lerp_") == 2 and averages.updates == 2
