"""The paper's CNNs (Tripathi et al., PMLR 122, 2020) with a reconstruction decoder.

Each model takes features (B, bins, T) with valid frame counts (B,) and returns SERResult:
    logits          (B, num_classes)
    embedding       (B, embed_dim)  the penultimate features the center loss acts on
    reconstruction  dict kind -> (B, bins, T), the decoder's estimate of each input

From the paper: 2-D convolutions over time x frequency, a first layer of parallel branches with
different kernel sizes (wide in time, wide in frequency, square) concatenated, a small network
(few parameters), softmax + center loss on the embedding, and a decoder of transposed convolutions
that reconstructs the input features as an auxiliary task. Ours: batch norm, masked mean+max
pooling over the valid frames (so any length works and padding never leaks in), dropout, and the
decoder reading the last convolutional map rather than the pooled vector (so it keeps time).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastser.functionals import CLIP_KINDS


class SERResult(NamedTuple):
    logits: torch.Tensor
    embedding: torch.Tensor
    reconstruction: dict


def _block(cin, cout, kernel, downsample=None):
    """One stage: conv, BN, ReLU, with a 2x2 downsampling as `downsample` says: "pool" max-pools the
    conv's output (the paper's order); "stride" computes the conv at every other position (a stride-2
    conv); None keeps the size (the caller has pooled the input: FeatureEncoder masks it first)."""
    ph, pw = kernel[0] // 2, kernel[1] // 2
    if downsample == "stride":
        # one zero fewer after than before: floor(n / 2) outputs, the size (and frame mask) a 2x2
        # pooling gives, with every output centred where the full-resolution conv would be
        layers = [nn.ZeroPad2d((pw, pw - 1, ph, ph - 1)), nn.Conv2d(cin, cout, kernel, stride=2, bias=False)]
    else:
        layers = [nn.Conv2d(cin, cout, kernel, padding=(ph, pw), bias=False)]
    # conv -> pool -> BN -> ReLU: max-pooling first (it commutes with ReLU) runs the normalisation and
    # activation on a quarter of the values; on the CPU those memory-bound passes cost more than the conv.
    if downsample == "pool":
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ParallelStem(nn.Module):
    """First layer: parallel kernels (freq x time): tall (spectral shape), wide (temporal), square;
    each branch at half resolution before it is normalised and concatenated (see _block): pooled
    after a full-resolution conv ("pool"), or a stride-2 conv ("stem", "early").

    Shapes: (B, 1, bins, T) -> (B, 3 * channels_per_branch, bins // 2, T // 2)."""

    def __init__(self, channels_per_branch: int, kernels=((9, 3), (3, 9), (5, 5)), downsample: str = "pool"):
        super().__init__()
        self.strided = downsample in ("stem", "early")
        first = "stride" if self.strided else downsample
        self.branches = nn.ModuleList(_block(1, channels_per_branch, k, first) for k in kernels)
        self.out_channels = channels_per_branch * len(kernels)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


def masked_mean_std(x: torch.Tensor, keep: torch.Tensor, n: torch.Tensor, zero_padded: bool = False):
    """Mean and std over the last dim of x (..., T) where keep (broadcastable, bool) is set; n the
    number kept, (...,) or broadcastable to it, at least 1. `zero_padded`: x is already zero where
    keep is not (a masked map), so its sum needs no mask."""
    mean = (x if zero_padded else x * keep).sum(-1) / n
    var = ((x - mean[..., None]).square() * keep).sum(-1) / n
    return mean, (var + 1e-5).sqrt()


class FrameMasks:
    """The valid-frame masks of one batch, built once per time stride and shared by every branch and
    stage that needs them: position j of a map at time stride s is valid iff j < frames // s (at
    least 1). at(s, length) -> (B, 1, 1, length) bool; padding(s, length) its complement;
    count(s, length) -> (B, 1, 1) int64, the valid positions (at least 1). Each is built on first
    use and kept, since the branches and stages of a batch all ask for the same few."""

    def __init__(self, frames: torch.Tensor):
        self.frames, self._masks = frames, {}

    def _entry(self, stride: int, length: int) -> dict:
        entry = self._masks.get(stride)  # keyed by stride alone: a traced length is no dictionary key
        if entry is None or entry["keep"].shape[-1] != length:
            valid = (self.frames if stride == 1 else self.frames // stride).clamp(min=1)
            keep = torch.arange(length, device=self.frames.device)[None, :] < valid[:, None]
            entry = self._masks[stride] = {"keep": keep[:, None, None, :]}
        return entry

    def at(self, stride: int, length: int) -> torch.Tensor:
        return self._entry(stride, length)["keep"]

    def padding(self, stride: int, length: int) -> torch.Tensor:
        entry = self._entry(stride, length)
        if "padding" not in entry:
            entry["padding"] = ~entry["keep"]
        return entry["padding"]

    def count(self, stride: int, length: int) -> torch.Tensor:
        entry = self._entry(stride, length)
        if "count" not in entry:
            entry["count"] = entry["keep"].sum(dim=3).clamp(min=1)
        return entry["count"]


def _valid_frames(x: torch.Tensor, frames: torch.Tensor, masks: Optional[FrameMasks] = None):
    """(keep (B, 1, T) bool, n (B, 1)) for x (B, channels, T) with frames (B,) valid."""
    masks = masks or FrameMasks(frames)
    return masks.at(1, x.shape[-1])[:, 0], masks.count(1, x.shape[-1])[:, 0]


class FeatureEncoder(nn.Module):
    """(B, bins, T) -> conv map (B, C, bins/8, T/8) and pooled vector (B, out_dim) over valid frames.

    The pooled vector is the conv map's mean and max over the valid frames: with `pooling="global"`
    over frequency too (2C values), with `pooling="time"` per frequency band (2C * bins/8 values), so
    the embedding knows *where* in the spectrum a pattern is (more energy high up when angry) rather
    than only that it occurred somewhere, as the paper's flattened CNN output does. With `bin_stats`
    each input bin's own mean and std over the utterance (2 bins) are appended: the functionals a
    classic SVM baseline lives on, handed to the embedding directly.

    Every map is multiplied by its valid-time mask (frames // stride, at least 1), so an utterance
    gives the same result alone or padded inside a batch: batch norm's shift never turns padding
    into signal that the next convolution would read."""

    def __init__(
        self, n_bins: int, width: int = 16, bin_stats: bool = False, pooling: str = "time", downsample: str = "pool"
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if downsample not in DOWNSAMPLINGS:
            raise ValueError(f"downsample must be one of {DOWNSAMPLINGS}, got {downsample!r}")
        self.n_bins, self.pooling = n_bins, pooling
        self.stem = ParallelStem(width, downsample=downsample)
        self.pool_first = downsample == "early"
        after = None if self.pool_first else "pool"
        self.blocks = nn.ModuleList(
            [
                _block(self.stem.out_channels, 2 * width, (3, 3), after),
                _block(2 * width, 4 * width, (3, 3), after),
            ]
        )
        self.out_channels = 4 * width
        self.bin_stats = bin_stats
        self.stride = 8
        bands = n_bins // self.stride if pooling == "time" else 1  # the three 2x2 max-pools floor the bins
        self.out_dim = 2 * self.out_channels * bands + (2 * n_bins if bin_stats else 0)

    def forward(self, x: torch.Tensor, frames: torch.Tensor, masks: Optional[FrameMasks] = None):
        masks = masks or FrameMasks(frames)
        T = x.shape[-1]
        stats = []
        if self.bin_stats:
            keep, n = _valid_frames(x, frames, masks)
            stats = [t.to(x.dtype) for t in masked_mean_std(x.float(), keep, n)]
        if T < self.stride:  # pooling needs 8 frames; longer tails are floored
            x = F.pad(x, (0, self.stride - T))
        x = x.unsqueeze(1)
        # Position j at stride s is valid iff j < frames // s, which with floor pooling is every position
        # when frames == T: a batch without padding (the usual training crop) needs no masks. Checked on
        # the CPU only, where the check is free and the multiplications are not (on a GPU, the reverse);
        # never in an exported graph, which must serve padded batches too.
        full = (
            x.device.type == "cpu"
            and x.shape[-1] == T
            and not torch.compiler.is_exporting()
            and bool((frames >= T).all())
        )
        masked = (lambda h, stride: h) if full else (lambda h, stride: h * masks.at(stride, h.shape[-1]))
        h = self.stem(masked(x, 1))
        h = masked(h, 2)
        stride = 2
        for block in self.blocks:
            stride *= 2
            if self.pool_first:
                # a floored 2x2 window that mixes the last valid frame with padding is padding: masked
                # before the conv reads it, as an utterance alone has no such window
                h = masked(F.max_pool2d(h, 2), stride)
            h = masked(block(h), stride)
        mean = h.sum(dim=3) / masks.count(stride, h.shape[-1])  # (B, C, bands) over the valid frames
        peak = h.masked_fill(masks.padding(stride, h.shape[-1]), float("-inf")).amax(dim=3)
        if self.pooling == "global":  # every band has the same valid frames: the mean of means is the mean
            mean, peak = mean.mean(dim=2), peak.amax(dim=2)
        return h, torch.cat([mean.flatten(1), peak.flatten(1), *stats], dim=1)


class ContourEncoder(nn.Module):
    """(B, channels, T) contours (prosody: F0, voicing, HNR, level, ...) -> pooled vector over the
    valid frames: two 1-D convolutions (about 0.1 s and 0.3 s of context) with masked mean, std and
    max pooling, beside the input contours' own masked mean and std — the functionals (level,
    range, variability) that carry most of what eGeMAPS knows, with a learnt part on top."""

    def __init__(self, n_bins: int, width: int = 16):
        super().__init__()
        self.n_bins = n_bins
        hidden = 2 * width
        self.layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv1d(n_bins, hidden, 5, padding=2, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)
                ),
                nn.Sequential(
                    nn.Conv1d(hidden, hidden, 5, padding=4, dilation=2, bias=False),
                    nn.BatchNorm1d(hidden),
                    nn.ReLU(inplace=True),
                ),
            ]
        )
        self.out_dim = 3 * hidden + 2 * n_bins

    def forward(self, x: torch.Tensor, frames: torch.Tensor, masks: Optional[FrameMasks] = None) -> torch.Tensor:
        masks = masks or FrameMasks(frames)
        keep, n = _valid_frames(x, frames, masks)
        x = h = x * keep
        for layer in self.layers:
            h = layer(h) * keep  # batch norm's shift never turns padding into signal for the next layer
        h_mean, h_std = masked_mean_std(h, keep, n, zero_padded=True)
        peak = h.masked_fill(masks.padding(1, x.shape[-1])[:, 0], float("-inf")).amax(-1)
        x_mean, x_std = masked_mean_std(x.float(), keep, n, zero_padded=True)
        return torch.cat([h_mean, h_std, peak, x_mean.to(h.dtype), x_std.to(h.dtype)], dim=1)


class FunctionalsEncoder(nn.Module):
    """(B, F, 1) normalised openSMILE functionals, one column per clip -> (B, 4 * width): the classic
    baseline's features as a branch of the network, fused before the embedding like the others, so
    the center loss and the reconstruction act on an embedding that holds them. The z-scores are
    clipped at +-CLIP first: statistics from too few clips (one enrollment clip has no spread) give
    scores in the thousands, which would swamp the branch; dropout on the input, as the baseline's
    classifier is regularised, since the functionals outnumber the training clips."""

    CLIP = 5.0

    def __init__(self, n_bins: int, width: int = 16, dropout: float = 0.5):
        super().__init__()
        self.n_bins, self.out_dim = n_bins, 4 * width
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(n_bins, self.out_dim, bias=False),
            nn.BatchNorm1d(self.out_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, 0].clamp(-self.CLIP, self.CLIP))


class FeatureDecoder(nn.Module):
    """Transposed convolutions from the conv map back to (B, bins, T)."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(in_channels, 2 * width, 4, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),
        )

    def forward(self, fmap: torch.Tensor, shape) -> torch.Tensor:
        out = self.net(fmap).squeeze(1)
        bins, t = shape
        if out.shape[-1] < t or out.shape[-2] < bins:  # the poolings floored an odd size: zeros to the input's
            out = F.pad(out, (0, max(0, t - out.shape[-1]), 0, max(0, bins - out.shape[-2])))
        return out[:, :bins, :t]


POOLINGS = ("global", "time")
# where each of the three 2x2 downsamplings sits: after the conv ("pool", the paper's order, every
# conv at its input's resolution), before the first only ("stem": a stride-2 first conv, no map at the
# input's resolution) or before each ("early": also max-pooling before the other convs, each conv at
# its output's resolution, a quarter of the convolutions' FLOPs); the same map sizes in all three
DOWNSAMPLINGS = ("pool", "stem", "early")
CONTOUR_KINDS = ("prosody",)  # 1-D inputs: a ContourEncoder, no decoder (the CNN branches reconstruct)


def drop_batch_counters(model: nn.Module) -> None:
    """BatchNorm counts its training batches (`num_batches_tracked`) for momentum=None, a cumulative
    average; with a fixed momentum nothing reads the count, yet counting is a launch per BatchNorm
    per step (17 of the default model's). The counters go, and a state dict that has them (an
    older checkpoint) still loads: its counters are dropped on the way in."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.num_batches_tracked = None
            # runs inside the BatchNorm's own loading, after it has filled in a missing counter
            module.register_load_state_dict_pre_hook(_drop_counter)


def _drop_counter(module, state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + "num_batches_tracked", None)


class SERModel(nn.Module):
    """One encoder per feature kind (2-D CNNs for "logmel"/"mfcc", a ContourEncoder for "prosody", a
    FunctionalsEncoder for openSMILE "functionals"), pooled vectors concatenated (fused before the
    embedding, so the center loss acts on the fused embedding), an embedding layer, a classifier,
    and one decoder per spectral kind."""

    def __init__(
        self,
        input_bins: dict,
        num_classes: int,
        *,
        width: int = 16,
        embed_dim: int = 128,
        dropout: float = 0.3,
        reconstruct: bool = True,
        bin_stats: bool = False,
        pooling: str = "time",
        downsample: str = "pool",
    ):
        super().__init__()
        self.kinds = list(input_bins)
        self.spectral_kinds = [k for k in self.kinds if k not in CONTOUR_KINDS + CLIP_KINDS]
        self.encoders = nn.ModuleDict(
            {k: _encoder(k, b, width, bin_stats, pooling, downsample) for k, b in input_bins.items()}
        )
        pooled = sum(e.out_dim for e in self.encoders.values())
        self.embed = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(pooled, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))
        self.decoders = (
            nn.ModuleDict(
                {k: FeatureDecoder(e.out_channels, width) for k, e in self.encoders.items() if k in self.spectral_kinds}
            )
            if reconstruct
            else None
        )
        self.embed_dim, self.num_classes = embed_dim, num_classes
        drop_batch_counters(self)

    def forward(self, feats: dict, frames: torch.Tensor) -> SERResult:
        missing = set(self.kinds) - set(feats)
        if missing:
            raise ValueError(f"model expects features {self.kinds}, missing {sorted(missing)}")
        pooled, recon = [], {}
        masks = FrameMasks(frames)  # one set for every branch: they share the frame grid
        for kind in self.kinds:
            x = feats[kind]
            if x.dim() != 3 or x.shape[1] != self.encoders[kind].n_bins:
                raise ValueError(
                    f"{kind} features must be (batch, {self.encoders[kind].n_bins}, frames), got {tuple(x.shape)}"
                )
            if kind in CLIP_KINDS:
                pooled.append(self.encoders[kind](x))
                continue
            if kind in CONTOUR_KINDS:
                pooled.append(self.encoders[kind](x, frames, masks))
                continue
            fmap, vec = self.encoders[kind](x, frames, masks)
            pooled.append(vec)
            if self.decoders is not None and self.training:
                recon[kind] = self.decoders[kind](fmap, x.shape[1:])
        embedding = self.embed(torch.cat(pooled, dim=1))
        return SERResult(self.classifier(embedding), embedding, recon)


def _encoder(kind: str, bins: int, width: int, bin_stats: bool, pooling: str, downsample: str) -> nn.Module:
    if kind in CLIP_KINDS:
        return FunctionalsEncoder(bins, width)
    if kind in CONTOUR_KINDS:
        return ContourEncoder(bins, width)
    return FeatureEncoder(bins, width, bin_stats, pooling, downsample)


def spectrogram_cnn(num_classes: int, n_bins: int = 64, **kw) -> SERModel:
    return SERModel({"logmel": n_bins}, num_classes, **kw)


def mfcc_cnn(num_classes: int, n_bins: int = 40, **kw) -> SERModel:
    return SERModel({"mfcc": n_bins}, num_classes, **kw)


def two_branch_cnn(num_classes: int, spectrogram_bins: int = 64, mfcc_bins: int = 40, **kw) -> SERModel:
    return SERModel({"logmel": spectrogram_bins, "mfcc": mfcc_bins}, num_classes, **kw)
