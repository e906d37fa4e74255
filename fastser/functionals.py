"""openSMILE functionals beside the model: the classic baseline's features (eGeMAPS, ComParE_2016)
and a linear classifier over them whose probabilities are averaged with the model's.

    x = extract(clips, "compare", sr=16000)                         # (N, F) float64, one row a clip
    head = FunctionalsHead.fit(x[train], speakers[train], labels[train], num_classes, "compare")
    p = head(torch.from_numpy(x[test]), speaker_statistics(x[test]))  # (n, classes) probabilities
    p = head(torch.from_numpy(x[test]))                             # without enrollment (its own classifier)
    fused = fuse(model_probs, p)

The classifier is the baseline's recipe with a softmax output: each speaker's functionals
standardised with that speaker's own statistics (labels unused, so the test speaker's enrollment
audio serves), then standardised across the training rows, then a class-balanced multinomial
logistic regression (scikit-learn, C = 0.01, the baseline's linear SVM's). A clip without its
speaker's statistics is standardised with the training speakers' pooled ones and scored by a
second such regression, fitted on the training rows standardised that way. The parameters are
tensors in the checkpoint, so predict needs openSMILE to extract but no scikit-learn to score.
openSMILE and scikit-learn are among fastser's dependencies.

With `--functionals-fusion input` the functionals are instead one more input of the network
(INPUT_KIND, `input_columns`; fastser.models.cnn.FunctionalsEncoder), normalised like the spectral
inputs, and no classifier is fitted beside it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from fastser.errors import UserError

SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}  # fastser's name -> openSMILE's
SIZES = {"egemaps": 88, "compare": 6373}  # functionals per clip of each set
# the model's input kind when the functionals enter the network (--functionals-fusion input) rather
# than a classifier beside it: (N, F, 1), one column per clip, normalised like the spectral kinds
INPUT_KIND = "functionals"
# the input kinds with one column per clip: a clip counts once in their statistics however many frames
# it has, they have no padding, no crop and no decoder
CLIP_KINDS = (INPUT_KIND,)
C = 0.01  # the inverse regularisation strength of the baseline's linear SVM
MODEL_WEIGHT = 0.5  # the model's share of the fused probabilities: equal, fixed before any test speaker was seen
MIN_SPEAKER_CLIPS = 2  # one clip has no spread: below this the training speakers' statistics serve
EPS = 1e-12  # a constant functional's spread: standardised to 0, never divided by 0


def _opensmile():
    try:
        import opensmile
    except ImportError as e:
        raise UserError("openSMILE functionals need opensmile (a fastser dependency): pip install opensmile") from e
    return opensmile


def extract(clips: list, feature_set: str, sr: int = 16000) -> np.ndarray:
    """openSMILE functionals of each clip.

    Args:
        clips: 1-D float arrays of mono samples at `sr`.
        feature_set (str): "egemaps" (eGeMAPSv02, 88 functionals) or "compare" (ComParE_2016, 6373).
        sr (int): the clips' sample rate.

    Returns:
        (len(clips), F) float64 array, one row per clip.

    Example:
        >>> import numpy as np
        >>> clip = np.sin(2 * np.pi * 220 * np.arange(16000) / 16000).astype(np.float32)
        >>> extract([clip], "egemaps").shape
        (1, 88)
    """
    if feature_set not in SETS:
        raise UserError(f"functionals: unknown feature set {feature_set!r} (choose from {', '.join(SETS)})")
    smile = _smile(feature_set)
    return np.stack([smile.process_signal(np.asarray(y, np.float32), sr).to_numpy()[0] for y in clips]).astype(
        np.float64
    )


@functools.lru_cache(maxsize=None)
def _smile(feature_set: str):
    """One openSMILE extractor per feature set, kept: building one takes about 0.2 s (ComParE, 2-core
    EPYC), four times a 3-s clip's extraction; a kept one gives the same functionals bit for bit."""
    opensmile = _opensmile()
    return opensmile.Smile(
        feature_set=getattr(opensmile.FeatureSet, SETS[feature_set]),
        feature_level=opensmile.FeatureLevel.Functionals,
    )


def speaker_znorm(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Each speaker's rows standardised by that speaker's own mean and std (constant features -> 0).

    Args:
        x: (N, F) functionals.  speakers: (N,) each row's speaker.

    Returns:
        (N, F) array of x's dtype.
    """
    out = np.empty_like(x)
    for s in np.unique(speakers):
        rows = speakers == s
        mean, std = statistics(x[rows])
        out[rows] = (x[rows] - mean) / std
    return out


def statistics(x: np.ndarray) -> tuple:
    """((F,) mean, (F,) std) of rows of functionals, a constant feature's std 1 (it standardises to 0)."""
    std = x.std(0)
    return x.mean(0), np.where(std > EPS, std, 1.0)


def speaker_statistics(x: np.ndarray) -> Optional[tuple]:
    """A speaker's statistics from the functionals of their clips (N, F); None with fewer than
    MIN_SPEAKER_CLIPS clips, where the training speakers' stand in."""
    return statistics(x) if len(x) >= MIN_SPEAKER_CLIPS else None


class FunctionalsHead(nn.Module):
    """Two fitted linear classifiers over standardised functionals (see the module docstring): one
    for clips standardised with their speaker's statistics (enrollment), one for clips standardised
    with the training speakers' pooled statistics (no enrollment), each fitted on training rows
    standardised the same way, as the model's enrollment dropout trains it for both.

    Args:
        n_features (int): F, the feature set's functionals.  num_classes (int): C.
        feature_set (str): the feature set it was fitted on ("egemaps" or "compare").

    Buffers (float64): `mean`, `std` (F,), the training speakers' pooled statistics; `shift`,
    `scale` (F,), the standardisation after the speaker's; `weight` (C, F) and `bias` (C,), the
    logistic regression on speaker-standardised rows; `pooled_weight`, `pooled_bias`, the one on
    rows standardised with the pooled statistics (a class absent from the training rows has bias
    -inf in both: probability 0).

    Call: head(x, speaker=None) with x (N, F) raw functionals and `speaker` a (mean, std) pair of
    (F,) arrays (speaker_statistics of the speaker's clips; None: no enrollment) -> (N, C) float64
    probabilities.
    """

    def __init__(self, n_features: int, num_classes: int, feature_set: str):
        super().__init__()
        self.feature_set = feature_set
        for name in ("mean", "shift"):
            self.register_buffer(name, torch.zeros(n_features, dtype=torch.float64))
        for name in ("std", "scale"):
            self.register_buffer(name, torch.ones(n_features, dtype=torch.float64))
        for prefix in ("", "pooled_"):
            self.register_buffer(prefix + "weight", torch.zeros(num_classes, n_features, dtype=torch.float64))
            self.register_buffer(prefix + "bias", torch.zeros(num_classes, dtype=torch.float64))

    @classmethod
    def fit(
        cls, x: np.ndarray, speakers: np.ndarray, labels: np.ndarray, num_classes: int, feature_set: str
    ) -> "FunctionalsHead":
        """Fits both classifiers on training rows.

        Args:
            x: (N, F) raw functionals.  speakers: (N,) each row's speaker.  labels: (N,) int classes.
            num_classes (int): C (classes without a training row get probability 0).
            feature_set (str): recorded with the head.

        Returns:
            the fitted head (CPU, eval mode).
        """
        labels = np.asarray(labels)
        z = speaker_znorm(x, np.asarray(speakers))
        shift, scale = statistics(z)
        mean, std = statistics(x)
        weight, bias = _logistic_regression((z - shift) / scale, labels, num_classes)
        pooled_weight, pooled_bias = _logistic_regression((x - mean) / std, labels, num_classes)
        head = cls(x.shape[1], num_classes, feature_set)
        fitted = dict(mean=mean, std=std, shift=shift, scale=scale, weight=weight, bias=bias)
        fitted.update(pooled_weight=pooled_weight, pooled_bias=pooled_bias)
        for name, value in fitted.items():
            getattr(head, name).copy_(torch.from_numpy(np.asarray(value, np.float64)))
        return head.eval()

    def forward(self, x: torch.Tensor, speaker: Optional[tuple] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"functionals must be (N, {self.weight.shape[1]}), got {tuple(x.shape)}")
        x = x.to(torch.float64)
        if speaker is None:
            logits = self.pooled_logits(x)
        else:
            mean, std = (torch.as_tensor(np.asarray(s), dtype=torch.float64, device=x.device) for s in speaker)
            logits = self.speaker_logits(x, mean, std)
        return torch.softmax(logits, dim=1)

    def speaker_logits(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """(N, C) logits of rows x (N, F) float64 standardised with their speaker's (F,) mean and std."""
        return (((x - mean) / std - self.shift) / self.scale) @ self.weight.T + self.bias

    def pooled_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) logits of rows x (N, F) float64 without their speaker's statistics."""
        return ((x - self.mean) / self.std) @ self.pooled_weight.T + self.pooled_bias

    def to_checkpoint(self) -> dict:
        """What a checkpoint keeps: the feature set and the buffers (CPU tensors)."""
        return {"feature_set": self.feature_set, "state": {k: v.cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_checkpoint(cls, stored: dict) -> "FunctionalsHead":
        state = stored["state"]
        num_classes, n_features = state["weight"].shape
        head = cls(n_features, num_classes, stored["feature_set"])
        head.load_state_dict(state)
        return head.eval()


@torch.no_grad()
def score_speakers(head: FunctionalsHead, x: np.ndarray, speakers: np.ndarray) -> tuple:
    """Test speakers' clips scored by a fitted head, both ways predict can.

    Args:
        head: the fitted classifier.  x: (N, F) raw functionals.  speakers: (N,) each row's speaker.

    Returns:
        (enrolled, unenrolled): (N, C) float64 probabilities, each speaker's rows standardised with
        that speaker's statistics (speaker_statistics: all their clips here, the enrollment audio in
        predict), and with the training speakers' pooled ones (predict without enrollment).
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    unenrolled = head(xt).numpy()
    enrolled = unenrolled.copy()
    for s in np.unique(speakers):
        mine = np.asarray(speakers) == s
        enrolled[mine] = head(xt[mine], speaker_statistics(x[mine])).numpy()
    return enrolled, unenrolled


def _logistic_regression(z: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple:
    """((C, F) weight, (C,) bias) of a class-balanced multinomial logistic regression on standardised
    rows; a class without rows gets bias -inf."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise UserError("--functionals needs scikit-learn (a fastser dependency): pip install scikit-learn") from e
    present = np.unique(labels)
    if len(present) < 2:
        raise UserError(f"functionals: the training rows hold {len(present)} class; a classifier needs two")
    lr = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(z, labels)
    weight, bias = np.zeros((num_classes, z.shape[1])), np.full(num_classes, -np.inf)
    if len(present) == 2:  # scikit-learn keeps one row, for the second class: softmax([0, w.x + b])
        weight[present[1]], bias[present] = lr.coef_[0], (0.0, lr.intercept_[0])
    else:
        weight[present], bias[present] = lr.coef_, lr.intercept_
    return weight, bias


def input_columns(x: np.ndarray) -> torch.Tensor:
    """(N, F) functionals -> (N, F, 1) float32: the model's INPUT_KIND, one frame per clip (float32,
    not the spectral table's float16: raw functionals reach past float16's range)."""
    return torch.from_numpy(np.asarray(x, np.float32))[:, :, None]


def fuse(model_probs, functionals_probs, model_weight: float = MODEL_WEIGHT):
    """The fused probabilities: model_weight * the model's + (1 - model_weight) * the functionals'.
    Works on NumPy arrays and tensors of the same shape (N, classes)."""
    return model_weight * model_probs + (1 - model_weight) * functionals_probs


def corpus_functionals(
    corpus, feature_set: str, sr: int, max_seconds: float, cache_dir: Optional[os.PathLike] = None
) -> np.ndarray:
    """(N, F) functionals of a corpus's utterances (row i = corpus.utterances[i], cut to max_seconds
    as the model's inputs are), read from `cache_dir` when it holds this exact list of files.

    Args:
        corpus: a fastser.data.Corpus (files on disk or generated audio).
        feature_set (str): "egemaps" or "compare".  sr (int): the rate the audio is read at.
        max_seconds (float): each utterance's length cap.  cache_dir: where to keep them (None: not kept).
    """
    from fastser.data.cache import load_audio

    path = None
    if cache_dir is not None and all(u.path is not None for u in corpus.utterances):
        # the real path: one corpus reached through another spelling (relative, a link) is the same cache
        stats = [(u, os.stat(u.path)) for u in corpus.utterances]
        files = [[u.uid, os.path.realpath(u.path), st.st_size, st.st_mtime_ns] for u, st in stats]
        version = _opensmile().__version__
        key = json.dumps([feature_set, version, sr, max_seconds, files])
        path = Path(cache_dir) / f"functionals-{feature_set}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
        if path.is_file():
            return np.load(path)
    audio, kept = load_audio(corpus, sr, max_seconds=max_seconds)
    if len(kept.utterances) != len(corpus.utterances):
        lost = len(corpus.utterances) - len(kept.utterances)
        raise UserError(f"functionals: {lost} of the corpus's files could not be read again")
    x = extract(audio, feature_set, sr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, x)
        os.replace(partial, path)
    return x
