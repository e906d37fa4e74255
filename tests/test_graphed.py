"""The graphed training step (fastser.training.graphed) on the CPU, its CUDA graph emulated by
instruments.graph_tape: replays are the eager step bit for bit, train like the eager loop, and a
step that cannot be captured falls back to eager training with one line."""

import pytest
import torch

from instruments.graph_tape import CaptureError, TapeCapture, capturable_on
from fastser.models import SERModel, SERObjective
from fastser.normalization import Normalizer
from fastser.training.batches import Augmentation, Batcher, PlannedBatches, mixup, spec_augment
from fastser.training.trainer import EpochTotals
from fastser.training.graphed import GraphedTrainStep
from fastser.training.step import train_step

BINS, N, WIDTH, CROP, B, STEPS = {"logmel": 16, "mfcc": 8}, 40, 120, 50, 8, 7


@pytest.fixture(autouse=True)
def capturable_cpu():
    with capturable_on("cpu"):
        yield


@pytest.fixture(scope="module")
def table():
    gen = torch.Generator().manual_seed(0)
    # every utterance at least a crop long: the CPU path's model skips its masks for a batch without
    # padding, a host read the stand-in graph checks; the CUDA path (tests/test_ledger.py) never reads
    frames = torch.randint(CROP + 10, WIDTH + 1, (N,), generator=gen)
    feats = {k: torch.randn(N, n, WIDTH, generator=gen) for k, n in BINS.items()}
    feats = {k: x * (torch.arange(WIDTH) < frames[:, None, None]) for k, x in feats.items()}
    labels = torch.randint(0, 4, (N,), generator=gen)
    return feats, frames, labels, Normalizer.fit(feats, frames, torch.arange(N))


def parts():
    torch.manual_seed(1)
    model = SERModel(BINS, 4, width=4, embed_dim=16)
    objective = SERObjective(4, 16)
    objective.center_loss.backend = "torch"  # ATen ops the tape records (fastser's C++ kernels are not)
    # eps well above the rounding: a bias before a BatchNorm has a gradient of about 0, which Adam
    # with a tiny eps turns into full steps of either sign, so rounding alone would decide them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3, eps=1e-3, capturable=True, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS, pct_start=0.3)
    return model, objective, opt, sched


def rows_of(step):
    return torch.randperm(N, generator=torch.Generator().manual_seed(step))[:B]


def graphed_run(table, warmup, augment, build_hook=None, log=None, strict=False):
    feats, frames, labels, norm = table
    batcher = Batcher(feats, frames, labels, norm, torch.device("cpu"), CROP, resident=True)
    planned = PlannedBatches(batcher, B, Augmentation(mixup=0.4 if augment else 0.0, specaugment=augment))
    model, objective, opt, sched = parts()
    totals = EpochTotals(torch.device("cpu"))

    def build(inputs):
        out = planned.build(inputs["plan"])
        return build_hook(out) if build_hook is not None else out

    # the CPU path's own host reads are allowed but must not change (strict: none allowed)
    capture = TapeCapture(check_host_reads=not strict)
    step = GraphedTrainStep(
        model,
        objective,
        opt,
        {"plan": torch.zeros(planned.size, dtype=torch.long)},
        build,
        totals=totals,
        warmup=warmup,
        capture=capture,
        log=log,
    )
    gen, losses = torch.Generator().manual_seed(3), []
    for i in range(STEPS):
        torch.manual_seed(100 + i)  # dropout
        out, terms = step(plan=planned.plan(rows_of(i), gen))
        losses.append(terms.total.detach().clone())
        sched.step()
    return model, objective, totals, torch.stack(losses), step


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "mixup+specaugment"])
def test_replays_of_the_captured_step_are_its_eager_steps_bit_for_bit(table, augment):
    """The same steps, once captured after two warm-up steps and replayed, once run eagerly
    (never captured): every loss, weight, center and running sum identical. So nothing the step
    depends on is baked into the graph: the plan, the schedule's learning rate and beta1 (the
    one-cycle schedule changes both every step), dropout's draws."""
    replayed = graphed_run(table, warmup=2, augment=augment)
    eager = graphed_run(table, warmup=10**9, augment=augment)
    assert replayed[4].capture.replays == STEPS - 2 and eager[4].capture.replays == 0
    assert torch.equal(replayed[3], eager[3])
    for p, q in zip(replayed[0].state_dict().values(), eager[0].state_dict().values()):
        assert torch.equal(p, q)
    assert torch.equal(replayed[1].center_loss.centers, eager[1].center_loss.centers)
    assert torch.equal(replayed[2].values, eager[2].values)
    assert not torch.equal(replayed[1].center_loss.centers, parts()[1].center_loss.centers)  # they moved


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "mixup+specaugment"])
def test_the_graphed_step_trains_like_the_eager_loop(table, augment):
    """Against the loop's eager path (Batcher.batch, mixup, spec_augment, train_step, the sums):
    the same batches from the same draws, the same training up to the rounding of a learning rate
    held in a float64 tensor instead of a Python float."""
    feats, frames, labels, norm = table
    graphed = graphed_run(table, warmup=2, augment=augment)
    batcher = Batcher(feats, frames, labels, norm, torch.device("cpu"), CROP, resident=True)
    model, objective, opt, sched = parts()
    totals = EpochTotals(torch.device("cpu"))
    gen, losses = torch.Generator().manual_seed(3), []
    for i in range(STEPS):
        torch.manual_seed(100 + i)
        batch = batcher.batch(rows_of(i), gen)
        mix = None
        if augment:
            batch, mix = mixup(batch, gen, 0.4)
        x = spec_augment(batch.feats, batch.frames_host, gen) if augment else batch.feats
        out, terms = train_step(
            model, objective, opt, x, batch.feats, batch.frames, batch.labels, clip_params=model.parameters(), mix=mix
        )
        totals.add(terms, out.logits, batch.labels)
        losses.append(terms.total.detach())
        sched.step()
    torch.testing.assert_close(graphed[3], torch.stack(losses), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), graphed[0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(graphed[1].center_loss.centers, objective.center_loss.centers, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(graphed[2].values, totals.values, rtol=1e-4, atol=1e-4)


def test_a_step_that_reads_the_device_falls_back_to_eager_training_with_one_line(table):
    """A host read inside the step cannot be captured (here a `.item()`; on a GPU torch.cuda.graph
    refuses it the same way): the fold says so in one line and trains eagerly, the step that failed
    to capture included, exactly as if it had never tried."""
    lines = []

    def reads_the_device(batch):
        float(batch[2].float().mean())
        return batch

    tried = graphed_run(table, warmup=2, augment=True, build_hook=reads_the_device, log=lines.append, strict=True)
    eager = graphed_run(table, warmup=10**9, augment=True)
    assert len(lines) == 1 and lines[0].startswith("CUDA graph capture failed (") and "eagerly" in lines[0]
    assert "host" in lines[0] and tried[4].eager and tried[4].capture.replays == 0
    assert torch.equal(tried[3], eager[3])
    for p, q in zip(tried[0].state_dict().values(), eager[0].state_dict().values()):
        assert torch.equal(p, q)


def test_the_stand_in_graph_bakes_in_what_a_cuda_graph_bakes_in():
    """A number the host passed at capture stays the capture's; a tensor's value follows the tensor;
    a host read that would take another branch at a replay is an error, not a silent stale branch."""
    x, scale = torch.ones(3), [2.0]
    capture = TapeCapture(check_host_reads=True)
    replay, out = capture.capture(lambda: x * scale[0] + (x.sum() > 2).float())
    replay()
    assert torch.equal(out, torch.full((3,), 3.0))
    x.fill_(2.0)
    scale[0] = 10.0
    replay()
    assert torch.equal(out, torch.full((3,), 5.0))  # 2 * 2 (the capture's scale) + 1
    x.fill_(0.0)
    strict = TapeCapture()
    with pytest.raises(CaptureError, match="reads the device from the host"):
        strict.capture(lambda: bool(x.sum() > 0))
    replay_read, _ = capture.capture(lambda: torch.tensor(float(bool(x.sum() > 0))))
    x.fill_(1.0)
    with pytest.raises(CaptureError, match="changed"):
        replay_read()


def test_a_graphed_step_refuses_what_it_cannot_replay(table):
    model, objective, opt, _ = parts()
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(model, objective, torch.optim.AdamW(model.parameters()), {}, None, capture=TapeCapture())
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(model, objective, opt, {}, None)  # the real graph on a CPU model
    step = GraphedTrainStep(
        model, objective, opt, {"plan": torch.zeros(5, dtype=torch.long)}, None, capture=TapeCapture()
    )
    with pytest.raises(ValueError, match=r"plan has shape \(5,\), got \(6,\): every step must have the shape"):
        step(plan=torch.zeros(6, dtype=torch.long))
