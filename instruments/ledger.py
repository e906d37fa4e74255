"""The launch / sync / bytes ledger: what each benchmark case issues on a GPU, counted without one.

    python -m instruments.ledger             # print the table
    python -m instruments.ledger --record    # also write benchmarks/results/ledger/<time>_ledger.json

Every case runs on the `meta` device, which takes the code path a CUDA device takes (fastser's
device checks read "not the CPU"): forward, backward and optimizers run there, custom ops through
their fake implementations, and each Triton launch is recorded where it is launched
(`TritonLaunch.launch`), not run. Counted per case:

- launches: ATen compute ops (each about one CUDA kernel; allocation and views are free) plus
  Triton kernels;
- host syncs: every value the host reads from the device (`.item()`, `bool(t)`, `nonzero`, a
  blocking copy to the CPU, ...), each with the file:line of the fastser code that asked; an
  asynchronous copy to pinned host memory is listed apart, as it does not stall the stream;
- bytes: what each op or kernel reads and writes in device memory. An ATen op reads each tensor
  argument once and writes each output once (what it spans: a strided view of overlapping frames
  counts every frame); a Triton kernel's traffic is its arguments' (TRAFFIC below: gathered rows
  of a table counted once per distinct row, the L2 keeping repeats), against the least any
  implementation must move for the operation (`min_bytes`).

The budgets tests hold these figures to are in tests/test_ledger.py; the table is the README's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "ledger"
PACKAGE = str(Path(__file__).resolve().parent.parent / "fastser")

# ops that launch no device kernel: allocation, views, metadata
NO_KERNEL = frozenset(
    {
        "empty",
        "empty_strided",
        "new_empty",
        "detach",
        "view",
        "slice",
        "select",
        "alias",
        "expand",
        "reshape",
        "_reshape_alias",
        "as_strided",
        "set_",
        "unsqueeze",
        "squeeze",
        "t",
        "transpose",
        "transpose_",
        "permute",
        "unfold",
        "view_as_real",
        "view_as_complex",
        "_unsafe_view",
        "lift_fresh",
        "split",
        "split_with_sizes",
        "promote_types",
        "_record_function_enter_new",  # profiler markers
        "_record_function_exit",
    }
)
HOST_READS = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero"})
# ops that read only their argument's shape, dtype and device
FACTORIES = frozenset(
    {"new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like", "empty_like"}
)
# ops whose output size depends on the values: on a GPU each reads a count back to the host
DATA_DEPENDENT = frozenset({"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "bincount"})


@dataclass
class Op:
    name: str
    read: int = 0  # bytes
    written: int = 0
    where: str = ""  # host reads: the fastser line that asked


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _caller() -> str:
    """The innermost frame in fastser's own code: the line that caused an op."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(PACKAGE):
            return f"fastser{frame.filename[len(PACKAGE) :]}:{frame.lineno}"
    return "(outside fastser)"


def _fake_value(t: torch.Tensor):
    """What a host read of a meta tensor answers: the value of a good batch (finite, in range)."""
    return True if t.dtype == torch.bool else (1 if not t.is_floating_point() else 1.0)


class Ledger(TorchDispatchMode):
    """with Ledger() as ledger: ... -> ledger.ops (every dispatched op by name, and "triton.<kernel>"
    for recorded launches), ledger.launches (those that launch a kernel), ledger.host_reads, and
    with `bytes=True` ledger.records: one Op per launch with its traffic and, for host reads, where.
    Tests that stand CPU tensors in for the device's count every op; `host_is_free` (counting on
    meta) leaves out the ops that touch only CPU tensors."""

    def __init__(self, bytes: bool = False, host_is_free: bool = False):
        super().__init__()
        self.ops: list = []
        self.records: list = []
        self.count_bytes = bytes
        self.host_is_free = host_is_free  # counting on meta: ops on CPU tensors alone are the host's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in flat_in)
        if on_meta and name in HOST_READS:
            self.records.append(Op(name, where=_caller()))
            return _fake_value(flat_in[0])
        if on_meta and name in DATA_DEPENDENT:
            self.records.append(Op(name, where=_caller()))
            self.ops.append("_local_scalar_dense")  # the count it reads back
            out = func(*args, **kwargs) if name != "nonzero" else None
            return out if out is not None else args[0].new_empty((0, args[0].dim()), dtype=torch.long)
        if on_meta and name in ("_to_copy", "copy_") and self._to_host(name, args, kwargs):
            return self._host_copy(name, args, kwargs)
        out = func(*args, **kwargs)
        written = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if self.host_is_free and flat_in + written and all(t.device.type == "cpu" for t in flat_in + written):
            self.ops[-1] = "host." + name  # the host's own work (host-side lengths): no device launch
            return out
        if self.count_bytes and name not in NO_KERNEL:
            read = 0 if name in FACTORIES else sum(map(_nbytes, flat_in))
            self.records.append(Op(name, read, sum(map(_nbytes, written))))
        return out

    @staticmethod
    def _to_host(name, args, kwargs) -> bool:
        if name == "copy_":
            return args[0].device.type == "cpu" and args[1].device.type == "meta"
        return torch.device(kwargs.get("device") or args[0].device).type == "cpu"

    def _host_copy(self, name, args, kwargs):
        """A device-to-host copy: a sync unless non_blocking (fastser pins the host buffer of such a
        copy on CUDA, which the meta device cannot). Zeros stand in for the data."""
        src = args[1] if name == "copy_" else args[0]
        asynchronous = bool(args[2] if name == "copy_" and len(args) > 2 else kwargs.get("non_blocking"))
        self.ops.append("async_copy_to_host" if asynchronous else "_local_scalar_dense")
        self.records.append(Op("async_copy_to_host" if asynchronous else "copy_to_host", _nbytes(src), where=_caller()))
        if name == "copy_":
            return args[0].zero_()
        return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)

    def record_graph_replay(self) -> None:
        """A CUDA graph's replay: one launch from the host, whatever the graph holds."""
        self.ops.append("cuda_graph_replay")
        self.records.append(Op("cuda_graph_replay"))

    def record_triton(self, launch) -> None:
        self.ops.append("triton." + launch.name)
        read, written = TRAFFIC[launch.name](launch.args) if launch.name in TRAFFIC else (0, 0)
        self.records.append(Op("triton." + launch.name, read, written))

    @property
    def launches(self) -> list:
        return [
            op
            for op in self.ops
            if op not in NO_KERNEL
            and op not in HOST_READS
            and op != "async_copy_to_host"
            and not op.startswith("host.")
        ]

    @property
    def host_reads(self) -> int:
        return sum(op in HOST_READS for op in self.ops)

    @property
    def syncs(self) -> list:
        """The host reads that stall a GPU's stream, each as 'op at file:line'."""
        return [f"{r.name} at {r.where}" for r in self.records if r.where and r.name != "async_copy_to_host"]

    @property
    def bytes_moved(self) -> int:
        return sum(r.read + r.written for r in self.records)


# ----------------------------------------------------------------------------- Triton kernels' traffic


def _rows(table: torch.Tensor, n: int) -> int:
    """Bytes of the distinct rows that n gathered rows of `table` can touch at most."""
    return min(n, table.shape[0]) * table.shape[1] * table.element_size()


def _center_forward(a) -> tuple[int, int]:
    x, diff = a["X_ptr"], a["DIFF_ptr"]
    B = x.shape[0]
    read = _nbytes(x) + B * 8 + _rows(a["CENTERS_ptr"], B)
    written = _nbytes(diff) + B * a["ROW_LOSS_ptr"].element_size()
    if a["STATS"]:  # integer atomics on the (C + 2,) stats, read and written, and their zeroing ahead (a slab)
        read, written = read + (a["C"] + 2) * 4, written + 2 * (a["C"] + 2) * 4
    if a["loss_scale"]:  # each program adds its rows' loss into one fp32 slot
        from fastser.ops.center_loss.backend_triton import ROWS

        programs = -(-B // ROWS)
        read, written = read + programs * 4, written + programs * 4
    return read, written


def _center_backward(a) -> tuple[int, int]:
    diff = a["DIFF_ptr"]
    B = diff.shape[0]
    read = _nbytes(diff) + B * 8 + (B if a["row_scale_stride"] else 1) * a["ROW_SCALE_ptr"].element_size()
    written = B * diff.shape[1] * a["GRAD_X_ptr"].element_size() if a["HAS_GRAD_X"] else 0
    if a["SCATTER"] == 1:  # the Wen update: the class counts, each touched center read and written
        table = a["CENTERS_ptr"]
        read, written = read + a["C"] * 4 + _rows(table, B), written + _rows(table, B)
    if a["SCATTER"] == 2:
        table = a["GRAD_C_ptr"]
        read, written = read + _rows(table, B), written + _rows(table, B)
    return read, written


def _segment(a) -> tuple[int, int]:
    diff, out = a["DIFF_ptr"], a["OUT_ptr"]
    read = _nbytes(diff) + _nbytes(a["ORDER_ptr"]) + _nbytes(a["OFFSETS_ptr"])
    return read + (_nbytes(out) if a["WEN"] else 0), _nbytes(out)


def _mel_db(a) -> tuple[int, int]:
    spec, out = a["SPEC_ptr"], a["OUT_ptr"]
    read = _nbytes(spec) + _nbytes(a["FB_ptr"]) + _nbytes(a["FRAMES_ptr"])
    return read, _nbytes(out) + (_nbytes(a["TILE_MAX_ptr"]) if a["WRITE_TILE_MAX"] else 0)


def _db_finish(a) -> tuple[int, int]:
    db = a["DB_ptr"]
    read = _nbytes(db) + _nbytes(a["TILE_MAX_ptr"]) + _nbytes(a["FRAMES_ptr"])
    if a["DO_DCT"]:
        read += _nbytes(a["DCT_ptr"]) + _nbytes(a["LIFT_ptr"])
        return read, _nbytes(a["MFCC_OUT_ptr"])
    return read, _nbytes(db) if a["WRITE_DB"] else 0


TRAFFIC = {
    "_forward_kernel": _center_forward,
    "_backward_kernel": _center_backward,
    "_segment_kernel": _segment,
    "_mel_db_kernel": _mel_db,
    "_db_finish_kernel": _db_finish,
}


ACTIVE: list = []  # the ledger `as_on_a_gpu` counts into (a graph replay records itself there)


@contextmanager
def as_on_a_gpu(ledger: Ledger):
    """Inside: the Triton implementations serve meta tensors as they serve CUDA ones, and every
    Triton launch is recorded into `ledger` instead of run."""
    import importlib

    from fastser.ops import _triton_launch, registry

    optimizer, foreach_utils = (
        importlib.import_module("torch.optim.optimizer"),
        importlib.import_module("torch.utils._foreach_utils"),
    )
    runs_on, usable, launch = (
        registry.Implementation.runs_on,
        registry.Implementation.usable,
        _triton_launch.TritonLaunch.launch,
    )

    def runs_on_meta(self, device_type, interpreted_ok=True):
        return runs_on(self, "cuda" if device_type == "meta" else device_type, interpreted_ok)

    def usable_if_built(self):
        return self.built() if "cuda" in self.devices else usable(self)

    registry.Implementation.runs_on, registry.Implementation.usable = runs_on_meta, usable_if_built
    _triton_launch.TritonLaunch.launch = lambda launch: ledger.record_triton(launch)
    ACTIVE[:] = [ledger]
    registry._CHOSEN.clear()
    # the multi-tensor kernels (fused AdamW, foreach clipping) have meta implementations; torch offers
    # them only on the devices it lists
    lists = [(optimizer, n) for n in ("_get_fused_kernels_supported_devices", "_get_foreach_kernels_supported_devices")]
    lists += [(foreach_utils, "_get_foreach_kernels_supported_devices")]
    saved = [getattr(module, name) for module, name in lists]
    for (module, name), listed in zip(lists, saved):
        setattr(module, name, lambda listed=listed: listed() + ["meta"])
    try:
        yield ledger
    finally:
        registry.Implementation.runs_on, registry.Implementation.usable = runs_on, usable
        _triton_launch.TritonLaunch.launch = launch
        registry._CHOSEN.clear()
        for (module, name), listed in zip(lists, saved):
            setattr(module, name, listed)
        ACTIVE.clear()


# ----------------------------------------------------------------------------- the cases

CENTER_SHAPES = [(256, 4, 256), (65536, 10000, 512)]
N_CLIPS, SR, SAMPLES = 256, 16000, 48000
FEATURE_KW = dict(sr=SR, n_fft=512, hop_length=160, n_mels=40)
META = torch.device("meta")


def center_loss_min_bytes(B: int, C: int, D: int, x_bytes: int) -> int:
    """Least traffic of one step: read x and the centers it needs, write grad_x and those centers."""
    touched = min(B, C) * D * 4
    return B * D * x_bytes * 2 + 2 * touched + B * 8


def center_loss_case(impl: str, B: int, C: int, D: int, dtype=torch.float32):
    """-> (prepare, step): `prepare` builds the module once (not counted); `step` runs one training step."""
    from fastser.nn import CenterLoss
    from fastser.reference.center_loss import ReferenceCenterLoss

    x = torch.empty(B, D, device=META, dtype=dtype, requires_grad=True)
    labels = torch.empty(B, dtype=torch.long, device=META)
    if impl == "reference":  # the usual module and its SGD for the centers, as its users run it
        crit = ReferenceCenterLoss(C, D, use_gpu=False).to(META)
        opt = torch.optim.SGD(crit.parameters(), lr=0.5)

        def step():
            opt.zero_grad(set_to_none=True)
            crit(x.float(), labels).backward()
            opt.step()

        return step
    backend, validate = {
        "triton-deferred": ("triton", "deferred"),
        "triton-default": ("triton", None),  # the drop-in default: "reported" on a GPU
        "torch-gather": ("torch", "deferred"),
    }[impl]
    crit = CenterLoss(C, D, backend=backend, **({} if validate is None else {"validate": validate})).to(META)

    def step():
        x.grad = None
        crit(x, labels).backward()

    return step


def feature_case(impl: str, kind: str, with_lengths: bool):
    from fastser.features import functional as F

    x = torch.empty(N_CLIPS, SAMPLES, device=META)
    lengths = torch.full((N_CLIPS,), SAMPLES, dtype=torch.long) if with_lengths else None  # on the host
    if impl == "torchaudio-chain":
        return torchaudio_chain(x, kind)
    if kind == "mfcc":
        return lambda: F.mfcc(x, n_mfcc=40, backend="triton", lengths=lengths, **FEATURE_KW)
    return lambda: F.log_melspectrogram(x, backend="triton", lengths=lengths, **FEATURE_KW)


def torchaudio_chain(x: torch.Tensor, kind: str):
    """The ops torchaudio's MelSpectrogram / AmplitudeToDB(top_db=80) / MFCC transforms issue for a
    padded batch (torchaudio.functional: spectrogram, melscale, amplitude_to_DB, the DCT product),
    for a machine without torchaudio (it has no build for this torch); the real transforms when it
    is installed."""
    try:
        import torchaudio

        kw = dict(n_fft=512, hop_length=160, n_mels=40, norm="slaney", mel_scale="slaney")
        if kind == "mfcc":
            tf = torchaudio.transforms.MFCC(SR, n_mfcc=40, melkwargs=kw).to(META)
        else:
            tf = torch.nn.Sequential(
                torchaudio.transforms.MelSpectrogram(SR, **kw), torchaudio.transforms.AmplitudeToDB("power", top_db=80)
            ).to(META)
        return lambda: tf(x)
    except ImportError:
        pass
    window = torch.empty(512, device=META)
    fb = torch.empty(257, 40, device=META)
    dct = torch.empty(40, 40, device=META)

    def chain():
        spec = torch.stft(
            x, 512, 160, 512, window, center=True, pad_mode="reflect", normalized=False, return_complex=True
        )
        power = spec.abs().pow(2.0)
        mel = torch.matmul(power.transpose(-1, -2), fb).transpose(-1, -2)
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        db = db - 10.0 * 0.0  # db_multiplier = log10(max(amin, ref)) with ref 1
        packed = db.reshape(-1, 1, db.shape[-2], db.shape[-1])
        db = torch.max(packed, (packed.amax(dim=(-3, -2, -1)) - 80.0).view(-1, 1, 1, 1)).reshape(db.shape)
        if kind == "mfcc":
            return torch.matmul(db.transpose(-1, -2), dct).transpose(-1, -2)
        return db

    return chain


def feature_min_bytes(kind: str) -> int:
    """Read the audio once, write the features once."""
    frames = SAMPLES // FEATURE_KW["hop_length"] + 1
    return N_CLIPS * SAMPLES * 4 + N_CLIPS * 40 * frames * 4


def _default_model():
    """The default model (log-mel, MFCC and prosody branches) and its joint objective, on meta, training."""
    from fastser.checkpoints import ModelSpec, build_model
    from fastser.config import ModelConfig, ObjectiveConfig
    from fastser.features.featureset import FeatureSet
    from fastser.models import SERObjective

    # the settings a run takes by default, read from the configuration so the ledger follows them
    m, o = ModelConfig(), ObjectiveConfig()
    fs = FeatureSet.paper(["logmel", "mfcc", "prosody"], hop_ms=m.hop_ms)
    spec = ModelSpec(
        fs, tuple("abcd"), width=m.width, embed_dim=m.embed_dim, pooling=m.pooling, downsample=m.downsample
    )
    model = build_model(spec).to(META, memory_format=torch.channels_last)
    objective = SERObjective(
        4,
        m.embed_dim,
        lambda_center=o.lambda_center,
        lambda_recon=o.lambda_recon,
        center_alpha=o.center_alpha,
        class_weights=torch.ones(4),
    ).to(META)
    return fs, model.train(), objective.train()


def _crop_frames() -> int:
    """A default training crop's frames (3 s at the default hop)."""
    from fastser.config import ModelConfig, OptimConfig, crop_frames

    return crop_frames(OptimConfig().train_seconds, ModelConfig().hop_ms)


def train_step_case(batch: int = 64):
    """One training step of the default model as the training loop runs it on a GPU, at `batch`
    (3 s crops): `train_step` (gradients None, forward, joint loss with the fused center loss's
    Wen update, backward, foreach gradient clipping, fused AdamW), the one-cycle schedule and the
    epoch's running sums. The batch gather before it is not counted."""
    from fastser.training.trainer import EpochTotals
    from fastser.training.step import train_step

    fs, model, objective = _default_model()
    feats = {k: torch.empty(batch, n, _crop_frames() + 1, device=META) for k, n in fs.n_bins.items()}
    frames = torch.empty(batch, dtype=torch.long, device=META)
    labels = torch.empty(batch, dtype=torch.long, device=META)

    params = [p for p in model.parameters() if p.requires_grad]
    with as_on_a_gpu(Ledger()):  # fused=True is refused on a device torch does not list
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=1000, pct_start=0.15)
    totals = EpochTotals(META)

    def step():
        out, terms = train_step(model, objective, opt, feats, feats, frames, labels, clip_params=params)
        sched.step()
        totals.add(terms, out.logits, labels)

    return step


def graphed_train_step_case(batch: int = 64, mixup: float = 0.0, specaugment: bool = False):
    """The training loop's step on a GPU with its default CUDA graph (fastser.training.graphed),
    counted outside the graph: after the warm-up steps and the capture (in `count`'s uncounted
    calls), a step is the host's plan of crops and augmentation, the copies of the plan and of the
    learning rate and beta1, the replay (a stand-in graph: instruments.graph_tape) and the
    schedule's step on the host."""
    from instruments.graph_tape import TapeCapture, capturable_on
    from fastser.normalization import Normalizer
    from fastser.training.batches import Augmentation, Batcher, PlannedBatches
    from fastser.training.trainer import EpochTotals
    from fastser.training.graphed import GraphedTrainStep

    fs, model, objective = _default_model()
    n_rows, width = 4 * batch, 500
    table = {k: torch.empty(n_rows, n, width, device=META) for k, n in fs.n_bins.items()}
    norm = Normalizer(
        {k: torch.zeros(n) for k, n in fs.n_bins.items()}, {k: torch.ones(n) for k, n in fs.n_bins.items()}
    )
    frames = torch.full((n_rows,), width)
    crop = _crop_frames() + 1
    batcher = Batcher(table, frames, torch.zeros(n_rows, dtype=torch.long), norm, META, crop, resident=True)
    planned = PlannedBatches(batcher, batch, Augmentation(mixup=mixup, specaugment=specaugment))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3, capturable=True, foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=1000, pct_start=0.15)
    totals = EpochTotals(META)
    inputs = {"plan": torch.zeros(planned.size, dtype=torch.long, device=META)}
    capture = TapeCapture(META, on_replay=lambda: ACTIVE[0].record_graph_replay())
    graphed = GraphedTrainStep(
        model, objective, opt, inputs, lambda i: planned.build(i["plan"]), totals=totals, capture=capture
    )
    gen = torch.Generator().manual_seed(0)

    def step():
        with capturable_on("meta"):
            graphed(plan=planned.plan(torch.randperm(n_rows, generator=gen)[:batch], gen))
        sched.step()

    step.graphed = graphed
    return step


GRAPH_WARM = 4  # GraphedTrainStep's three eager warm-up steps and the capture


@dataclass
class Row:
    suite: str
    case: str
    impl: str
    aten: int
    triton: int
    syncs: list
    async_copies: int
    bytes: int
    min_bytes: int = 0
    kernels: dict = field(default_factory=dict)  # Triton kernel -> bytes

    @property
    def launches(self) -> int:
        return self.aten + self.triton


def count(step, warm: int = 1) -> Ledger:
    """One steady call of `step` (after `warm` uncounted ones: lazy constants, first-call setup).
    The center loss's stats are zeroed a block of rows at a time (`StatsSlab`): the block is made
    fresh here, so its one zeroing launch falls in the warm-up, never in the counted call, whatever
    ran before (its cost per step, 1/64 of a launch, is tested apart)."""
    from fastser.ops.center_loss import STATS_SLAB

    STATS_SLAB.clear()
    for _ in range(warm):
        warm_up = Ledger(host_is_free=True)
        with as_on_a_gpu(warm_up), warm_up:
            step()
    ledger = Ledger(bytes=True, host_is_free=True)
    with as_on_a_gpu(ledger), ledger:
        step()
    return ledger


def row(suite: str, case: str, impl: str, step, min_bytes: int = 0, warm: int = 1) -> Row:
    ledger = count(step, warm)
    triton = [r for r in ledger.records if r.name.startswith("triton.")]
    return Row(
        suite,
        case,
        impl,
        aten=len(ledger.launches) - len(triton),
        triton=len(triton),
        syncs=ledger.syncs,
        async_copies=ledger.ops.count("async_copy_to_host"),
        bytes=ledger.bytes_moved,
        min_bytes=min_bytes,
        kernels={r.name[len("triton.") :]: r.read + r.written for r in triton},
    )


def center_loss_rows() -> list:
    rows = []
    for B, C, D in CENTER_SHAPES:
        for dtype in (torch.float32, torch.bfloat16) if B > 4096 else (torch.float32,):
            case = f"B{B}_C{C}_D{D}" + ("_bf16" if dtype == torch.bfloat16 else "")
            least = center_loss_min_bytes(B, C, D, dtype.itemsize)
            for impl in ("triton-deferred", "triton-default", "torch-gather", "reference"):
                if impl == "reference" and B * C > 1 << 26:
                    continue  # its B x C distance matrix: 2.6 GB at 65536 x 10000, not how anyone runs it
                rows.append(row("center_loss", case, impl, center_loss_case(impl, B, C, D, dtype), least))
    return rows


def feature_rows() -> list:
    rows = []
    for kind in ("mfcc", "logmel"):
        for with_lengths in (False, True):
            case = kind + ("-lengths" if with_lengths else "")
            least = feature_min_bytes(kind)
            rows.append(row("features", case, "fastser-triton", feature_case("triton", kind, with_lengths), least))
            if not with_lengths:  # torchaudio has no lengths: its padded batch is the comparison
                rows.append(
                    row("features", case, "torchaudio-chain", feature_case("torchaudio-chain", kind, False), least)
                )
    return rows


def all_rows() -> list:
    return (
        center_loss_rows()
        + feature_rows()
        + [row("train_step", "B64_3s", "train_step+schedule+sums", train_step_case())]
        + [row("train_step", "B64_3s", "cuda-graph (outside the graph)", graphed_train_step_case(), warm=GRAPH_WARM)]
    )


def table(rows: list) -> str:
    lines = [
        "| suite | case | implementation | launches (ATen + Triton) | host syncs | async copies to host | "
        "bytes moved | × the minimum |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r.bytes / r.min_bytes:.2f}×" if r.min_bytes else ""
        syncs = str(len(r.syncs)) + (f" ({'; '.join(r.syncs)})" if r.syncs else "")
        lines.append(
            f"| {r.suite} | {r.case} | {r.impl} | {r.launches} ({r.aten} + {r.triton}) | {syncs} | "
            f"{r.async_copies} | {r.bytes / 2**20:,.1f} MiB | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def record(rows: list) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{stamp}_ledger.json"
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    path.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instruments.ledger", description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="write the rows to benchmarks/results/ledger/")
    args = parser.parse_args(argv)
    rows = all_rows()
    print(table(rows), end="")
    if args.record:
        print(f"written to {record(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
