"""Export a trained model as one file, audio in, emotions out: `python -m fastser.export RUN [--format onnx|torch]`.

The file takes mono audio at the model's sample rate, `audio` (batch, samples) float32 zero-padded
with `lengths` (batch,) int64, and returns the class probabilities of each clip scored whole, as
`fastser.predict` scores a clip up to the run's --max-seconds: features (STFT, mel, dB, DCT,
prosody), the run's input normalisation, the CNN and the softmax are all inside. Batch and length
are dynamic. It needs nothing of fastser to run: onnxruntime for `--format onnx` (model.onnx),
PyTorch's `torch.export.load` for `--format torch` (model.pt2).

A run that fuses openSMILE functionals (`--functionals`, the default on real corpora) is exported
whole: the file takes one more input, `functionals` (batch, F) float32, each clip's openSMILE
functionals of the run's set (ComParE_2016 or eGeMAPSv02, `opensmile.Smile(...).process_signal`,
computed outside the graph, which cannot run openSMILE), and holds their standardisation, both
functionals classifiers, the choice between them and the fusion with the model. Optional inputs
functionals_mean / functionals_std (F,) float64 and functionals_enrolled (bool) are the speaker's
functionals statistics and whether to use them (else the training-statistics classifier);
`--model-only` writes the model alone.

Outputs: probabilities (B, classes); feature_sum and feature_sq_sum (B, D), each clip's raw
feature sums over its valid frames, and frames (B,) — what a speaker's statistics are made of.
Inputs speaker_mean / speaker_std (D,) are the statistics the features are normalised with
(runs trained with --normalize speaker or corpus); they default to the training statistics, or
to a speaker's own with --enroll. Left outside: windowing a recording longer than --max-seconds
(the file scores what it is given whole; predict's windows and their hop are in the metadata),
reading and resampling audio, and enrollment's checks of short or silent files.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

import fastser
from fastser.cli import ArgumentParser, prog_name, run_cli
from fastser.errors import UserError
from fastser.functionals import MIN_SPEAKER_CLIPS, SETS, fuse
from fastser.normalization import Normalizer, mean_std

FORMATS = {"onnx": "model.onnx", "torch": "model.pt2"}
INPUTS = ("audio", "lengths")
STATISTICS = ("speaker_mean", "speaker_std")
FUNCTIONALS_INPUT = "functionals"
FUNCTIONALS_STATISTICS = ("functionals_mean", "functionals_std", "functionals_enrolled")
OUTPUTS = ("probabilities", "feature_sum", "feature_sq_sum", "frames")
OPSET = 18
MIN_PAD_HOPS = 16  # the three 2x2 poolings need 8 frames, the traced graph 16: padding past `lengths` is ignored


class AudioClassifier(nn.Module):
    """A trained model with its features and normalisation, as one traceable module.

    AudioClassifier(spec, model, norm, windows)  — from a Predictor: `AudioClassifier.from_predictor(p)`
    (a FusedAudioClassifier for a run that fuses openSMILE functionals).
    forward(audio (B, samples) float32, lengths (B,) int64)
        -> (probabilities (B, classes), feature_sum (B, D), feature_sq_sum (B, D), frames (B,))
    D = sum of the feature kinds' bins, in `kinds` order; the buffers speaker_mean and speaker_std
    (D,) hold the statistics the features are normalised with (unused with --normalize utterance,
    where each clip's own are). CPU, inference only. A clip's result does not depend on the padding
    beside it (features and pooling use each clip's own frames)."""

    def __init__(self, spec, model: nn.Module, norm, windows: dict):
        super().__init__()
        self.head = None  # a FusedAudioClassifier's functionals classifier
        # the prosody's autocorrelation: "fft" as predict computes it; an ONNX file's is "matmul",
        # since onnxruntime's DFT operator took three quarters of the whole file's time
        self.autocorrelation = "fft"
        self.windows = windows
        self.features, self.normalize = spec.features, spec.normalize
        self.kinds, self.classes = list(spec.features.kinds), list(spec.classes)
        self.bins = [spec.features.n_bins[k] for k in self.kinds]
        self.model = model.eval()
        self.pad = MIN_PAD_HOPS * spec.features.configs[0][1].hop_length
        if spec.normalize == "utterance":
            mean, std = torch.zeros(sum(self.bins)), torch.ones(sum(self.bins))
        else:
            mean = torch.cat([norm.mean[k].float().cpu() for k in self.kinds])
            std = torch.cat([norm.std[k].float().cpu() for k in self.kinds])
        self.register_buffer("speaker_mean", mean)
        self.register_buffer("speaker_std", std)

    @classmethod
    def from_predictor(cls, predictor) -> "AudioClassifier":
        cls.check_exportable(predictor)
        windows = {
            "whole_seconds": predictor.whole_seconds,
            "window_seconds": predictor.window_seconds,
            "hop_seconds": predictor.hop_seconds,
        }
        parts = (predictor.spec, predictor.models[0], predictor.norms[0], windows)
        if predictor.heads:
            return FusedAudioClassifier(*parts, predictor.heads[0], predictor.functionals_speaker)
        return cls(*parts)

    @staticmethod
    def check_exportable(predictor) -> None:
        """A UserError for what an exported file cannot hold: an ensemble, a network that reads
        openSMILE functionals as an input branch."""
        if predictor.spec.functionals_input:
            raise UserError(
                f"the run's network reads openSMILE functionals as an input branch (--functionals-fusion "
                f"input, {predictor.spec.functionals_input}), whose speaker statistics an exported file "
                "does not hold: score it with python -m fastser.predict"
            )
        if len(predictor.models) != 1:
            raise UserError(
                f"export takes one model; this predictor holds an ensemble of {len(predictor.models)} "
                f"(export each checkpoint on its own)"
            )

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        audio = torch.nn.functional.pad(audio, (0, self.pad))
        feats, frames = self.features.extract(audio, lengths, backend="torch", autocorrelation=self.autocorrelation)
        raw = torch.cat([feats[k] for k in self.kinds], dim=1).double()  # (B, D, T), zero past frames
        total, sq_total = raw.sum(-1), raw.square().sum(-1)
        if self.normalize == "utterance":  # each clip's own statistics, as predict computes them
            mean, std = mean_std(total, sq_total, frames[:, None].double())
            norm, groups = Normalizer(self._per_kind(mean), self._per_kind(std)), torch.arange(frames.shape[0])
        else:
            norm, groups = Normalizer(self._per_kind(self.speaker_mean), self._per_kind(self.speaker_std)), None
        normed = norm.apply(feats, frames, groups)
        probabilities = torch.softmax(self.model(normed, frames).logits.float(), dim=1)
        return probabilities, total.float(), sq_total.float(), frames

    def _per_kind(self, values: torch.Tensor) -> dict:
        """(..., D) -> {kind: (..., bins)}: the flat statistics as the Normalizer holds them."""
        return dict(zip(self.kinds, values.split(self.bins, dim=-1)))

    @property
    def input_names(self) -> list:
        return list(INPUTS) + ([FUNCTIONALS_INPUT] if self.head is not None else [])

    @property
    def optional_inputs(self) -> list:
        """The buffers a caller may feed (ONNX) or assign (torch): the statistics."""
        spectral = list(STATISTICS) if self.normalize != "utterance" else []
        return spectral + (list(FUNCTIONALS_STATISTICS) if self.head is not None else [])

    def metadata(self) -> dict:
        """What a program needs to feed the file and read its outputs (stored inside it)."""
        functionals = None
        if self.head is not None:
            functionals = {
                "feature_set": self.head.feature_set,
                "opensmile_feature_set": SETS[self.head.feature_set],
                "size": int(self.head.weight.shape[1]),
                "min_speaker_clips": MIN_SPEAKER_CLIPS,
            }
        return {
            "fastser_version": fastser.__version__,
            "classes": self.classes,
            "sample_rate": self.features.sr,
            "kinds": self.kinds,
            "bins": self.bins,
            "normalize": self.normalize,
            "inputs": self.input_names,
            "optional_inputs": self.optional_inputs,
            "outputs": list(OUTPUTS),
            "functionals": functionals,
            **self.windows,
        }


class FusedAudioClassifier(AudioClassifier):
    """An AudioClassifier whose probabilities are fused with a functionals classifier's, as
    predict's (fastser.functionals.FunctionalsHead and fuse).

    FusedAudioClassifier(spec, model, norm, windows, head, functionals_speaker=None)
    forward(audio (B, samples) float32, lengths (B,) int64, functionals (B, F) float32)
        -> as AudioClassifier's, the probabilities the fused ones.
    `functionals` are the clips' raw openSMILE functionals of head.feature_set. The buffers
    functionals_mean / functionals_std (F,) float64 are a speaker's functionals statistics, used
    where functionals_enrolled (bool) is true; else the head's training-statistics classifier
    scores. `functionals_speaker`: a (mean, std) pair (predict's enrolled speaker) or None."""

    def __init__(self, spec, model: nn.Module, norm, windows: dict, head, functionals_speaker=None):
        super().__init__(spec, model, norm, windows)
        self.head = head
        n = head.weight.shape[1]
        f_mean, f_std = functionals_speaker or (torch.zeros(n), torch.ones(n))
        self.register_buffer("functionals_mean", torch.as_tensor(np.asarray(f_mean), dtype=torch.float64))
        self.register_buffer("functionals_std", torch.as_tensor(np.asarray(f_std), dtype=torch.float64))
        self.register_buffer("functionals_enrolled", torch.tensor(functionals_speaker is not None))

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, functionals: torch.Tensor):
        probabilities, *sums = super().forward(audio, lengths)
        x = functionals.double()  # openSMILE's float32 values, exactly as predict holds them
        # both classifiers computed, the one the statistics call for kept (no branch in the graph)
        logits = torch.where(
            self.functionals_enrolled,
            self.head.speaker_logits(x, self.functionals_mean, self.functionals_std),
            self.head.pooled_logits(x),
        )
        return fuse(probabilities, torch.softmax(logits, dim=1)).float(), *sums


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm as the per-channel affine it computes, x * scale + shift (channels on
    dim 1): torch's CPU batch_norm kernel took 15 % of a torch file's time on one clip."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        scale = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
        shift = norm.bias.detach().double() - norm.running_mean.double() * scale
        self.register_buffer("scale", scale.float())
        self.register_buffer("shift", shift.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(view) + self.shift.view(view)


def with_affine_norms(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode `model` with each affine, tracked BatchNorm as a ChannelAffine."""
    model = copy.deepcopy(model)
    for child in list(model.modules()):
        for key, sub in list(child.named_children()):
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.affine and sub.track_running_stats:
                setattr(child, key, ChannelAffine(sub))
    return model


def speaker_statistics(feature_sum, feature_sq_sum, frames):
    """Speaker statistics from the outputs for some of the speaker's clips (NumPy or torch; (N, D),
    (N, D), (N,)) -> (speaker_mean (D,), speaker_std (D,)) float32, as fastser's enrollment
    computes them; any program can do the same three lines."""
    s, ss, n = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (feature_sum, feature_sq_sum, frames))
    mean, std = mean_std(s.sum(0), ss.sum(0), n.sum())
    return mean.numpy(), std.numpy()


# ----------------------------------------------------------------------------- writing the file


def _example(module: AudioClassifier):
    sr = module.features.sr
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(2, 2 * sr, generator=generator) * 0.1
    example = (audio, torch.tensor([2 * sr, sr + sr // 3]))
    if module.head is not None:
        example += (torch.randn(2, module.head.weight.shape[1], generator=generator),)
    return example


def _dynamic_shapes(module: AudioClassifier):
    batch, samples = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("samples", min=1, max=2**31 - 1)
    shapes = {"audio": {0: batch, 1: samples}, "lengths": {0: batch}}
    if module.head is not None:
        shapes[FUNCTIONALS_INPUT] = {0: batch}
    return shapes


def _traced(module: AudioClassifier, trace):
    """trace(module, example inputs) after one eager call, which builds the cached windows and filters
    outside the trace (so they enter the graph as constants, and no traced tensor is ever cached)."""
    example = _example(module)
    with torch.no_grad():
        module(*example)
        return trace(module, example)


def export_torch(module: AudioClassifier, path: Path) -> None:
    """model.pt2: program = torch.export.load(path); program.module()(audio, lengths); the statistics
    are the module's buffers speaker_mean / speaker_std (assign them to score another speaker)."""
    program = _traced(module, lambda m, x: torch.export.export(m, x, dynamic_shapes=_dynamic_shapes(m)))
    torch.export.save(program, str(path), extra_files={"fastser.json": json.dumps(module.metadata())})


def export_onnx(module: AudioClassifier, path: Path) -> None:
    """model.onnx: inputs audio and lengths, and speaker_mean / speaker_std, which default to the
    statistics stored in the file; outputs OUTPUTS; the metadata in its metadata_props."""
    try:
        import onnx
        import onnxscript
        from onnxscript import ir
    except ImportError:
        raise UserError("--format onnx needs onnx and onnxscript: pip install 'fastser[export]'") from None

    def trace(m, example):
        # the exporter's notes on torchvision ops it does not need come as warnings and as log lines
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        try:
            return _export(m, example)
        finally:
            registration.setLevel(level)

    def _export(m, example):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # optimize=False: onnxscript's rewriter takes `x + 1e-10` for `x + 0` (it matches constants
            # within an absolute 1e-8) and drops it, which turns a silent frame's level into -inf; the
            # constants are folded below without the rewriter
            return torch.onnx.export(
                m,
                example,
                dynamic_shapes=_dynamic_shapes(m),
                dynamo=True,
                input_names=m.input_names,
                output_names=list(OUTPUTS),
                opset_version=OPSET,
                optimize=False,
                verbose=False,
                report=False,
            )

    graph = _traced(module, trace).model
    # an initializer that is also an input: fed, or its stored value
    graph.graph.inputs.extend(graph.graph.initializers[n] for n in module.optional_inputs)
    onnxscript.optimizer.fold_constants_ir(graph)
    ir.passes.common.RemoveUnusedNodesPass()(graph)
    proto = ir.to_proto(graph)
    for key, value in module.metadata().items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(path))


def export(checkpoint, fmt: str = "onnx", out=None, enroll=None, model_only: bool = False) -> Path:
    """Writes a trained run's model, with its features and normalisation, as one file.

    Args:
        checkpoint: the run folder or its checkpoint.pt.
        fmt (str): "onnx" (model.onnx, for onnxruntime; needs `fastser[export]`) or "torch"
            (model.pt2, torch.export).
        out (path, optional): where to write it (default: beside the checkpoint).
        enroll (list of paths, optional): a speaker's audio whose statistics the file carries as
            its defaults (else the training speakers').
        model_only (bool): a run trained with openSMILE functionals (fastser.functionals): write
            its model alone, without them (else the fused model, which takes the functionals).

    Returns:
        Path: the file written. Its model takes audio (B, samples) float32 at the model's rate,
        lengths (B,) int64 and, for a fused run, functionals (B, F) float32, and returns OUTPUTS
        (CPU, inference only).

    Example:
        >>> path = export("runs/demo", "onnx")  # doctest: +SKIP
        >>> session, meta = load_onnx(path)  # doctest: +SKIP
        >>> session.run(["probabilities"], {"audio": audio, "lengths": lengths})[0].shape  # doctest: +SKIP
        (1, 8)
    """
    from fastser.predict import Predictor

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    predictor = Predictor(checkpoint, device="cpu")
    if model_only:
        predictor.heads = []  # scored as the model alone, enrollment included
    AudioClassifier.check_exportable(predictor)  # before enrolling: a refusal needs no audio read
    if enroll:
        predictor.enroll_speaker(enroll)
    module = AudioClassifier.from_predictor(predictor)
    module.windows.update(enrolled=bool(enroll), trained_on=predictor.trained_on)
    src = Path(checkpoint)
    path = Path(out) if out else (src if src.is_dir() else src.parent) / FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        module.autocorrelation = "matmul"
    else:
        module.model = with_affine_norms(module.model)  # onnxruntime fuses its BatchNormalization itself
    (export_onnx if fmt == "onnx" else export_torch)(module, path)
    return path


# ----------------------------------------------------------------------------- loading what was written


def load_onnx(path, arena: bool = True):
    """Opens a model.onnx with onnxruntime on the CPU.

    Args:
        path: the model.onnx file.
        arena (bool): onnxruntime's memory arena; False frees buffers after each call rather than
            keeping them for the next.

    Returns:
        (onnxruntime.InferenceSession, metadata dict: classes, sample rate, windows, ...).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the notice that speaker_mean / speaker_std may be fed (they are meant to)
    options.enable_cpu_mem_arena = arena
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    return session, meta


def load_torch(path):
    """Opens a model.pt2 written by `export(..., "torch")`.

    Args:
        path: the model.pt2 file.

    Returns:
        (torch.export.ExportedProgram, metadata dict); `program.module()(audio, lengths)` scores.
    """
    extra = {"fastser.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra["fastser.json"])


def run_file(path, audio: np.ndarray, lengths: np.ndarray, functionals: Optional[np.ndarray] = None) -> np.ndarray:
    """Probabilities (B, classes) from an exported file, with its default statistics; `functionals`
    (B, F): the clips' openSMILE functionals, for a file exported from a fused run."""
    inputs = {"audio": np.ascontiguousarray(audio, np.float32), "lengths": np.ascontiguousarray(lengths, np.int64)}
    if functionals is not None:
        inputs[FUNCTIONALS_INPUT] = np.ascontiguousarray(functionals, np.float32)
    if str(path).endswith(".onnx"):
        session, _ = load_onnx(path)
        return session.run(["probabilities"], inputs)[0]
    program, _ = load_torch(path)
    with torch.no_grad():
        return program.module()(*(torch.from_numpy(v) for v in inputs.values()))[0].numpy()


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(
        prog=prog_name("fastser.export"),
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("checkpoint", metavar="RUN", help="a training run's folder or its checkpoint.pt")
    ap.add_argument(
        "--format",
        choices=sorted(FORMATS),
        default="onnx",
        help="onnx (onnxruntime; needs fastser[export]) or torch (torch.export) (default: onnx)",
    )
    ap.add_argument("--out", default=None, help="the file to write (default: RUN/model.onnx or RUN/model.pt2)")
    ap.add_argument(
        "--enroll",
        nargs="+",
        metavar="AUDIO",
        default=None,
        help="audio of the one speaker the file will score: their statistics become its defaults",
    )
    ap.add_argument(
        "--model-only",
        action="store_true",
        help="a run that fuses openSMILE functionals (--functionals, the default on real corpora): "
        "export its model alone (metrics.json's 'model' accuracy), a file that needs no functionals input; "
        "without it the file holds the fusion and takes the clips' functionals",
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = prog_name("fastser.export")
    enroll = None
    if args.enroll:
        from fastser.predict import expand_inputs

        enroll, errors = expand_inputs(args.enroll)
        if errors:
            raise UserError("--enroll: " + "; ".join(errors))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export(args.checkpoint, args.format, args.out, enroll, model_only=args.model_only)
    from fastser.predict import PredictWarning

    for w in caught:
        if issubclass(w.category, PredictWarning):
            print(f"{prog}: warning: {w.message}", file=sys.stderr)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {args.format}) in {time.perf_counter() - start:.0f} s")
    return 0


def cli(argv=None) -> int:
    """`fastser-export` / `python -m fastser.export`: exit 0, or 2 with one line naming a bad input."""
    return run_cli(main, "fastser.export", argv)


if __name__ == "__main__":
    sys.exit(cli())
