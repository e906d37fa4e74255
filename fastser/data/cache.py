"""Audio -> features for a whole corpus, once, on the training device, cached on disk.

The cache file is keyed by a hash of the corpus file list (path, size, mtime), the feature
configuration and the fastser feature version: a changed file or setting builds a new cache.
It is written atomically (temp file + rename), so an interrupted build never leaves a file that
a later run would trust. Files that cannot be read as audio are skipped (or, strict, raise) and
the skip list is part of the cached result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fastser._io import atomic_torch_save
from fastser.audio import AudioError, add_noise, load, speed_perturb
from fastser.data.base import Corpus, CorpusError
from fastser.features.featureset import FeatureSet

FEATURE_VERSION = 2  # 2: the log-mel branch is called "logmel" (was "spectrogram")
NOISE_VERSION = 1  # of add_noise and its seeding: a change there must not reuse cached noisy copies


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """How a training copy of every utterance is made: kind "speed" (played `value` times faster,
    `speed_perturb`) or "noise" (coloured noise at `value` dB SNR, `add_noise`; each utterance's
    noise is seeded by its id, so a copy is the same in every run and its cache stays valid)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in ("speed", "noise"):
            raise ValueError(f"a perturbation is 'speed' or 'noise', not {self.kind!r}")

    @property
    def name(self) -> str:
        return f"speed{self.value:g}" if self.kind == "speed" else f"snr{self.value:g}"

    def apply(self, y: np.ndarray, sr: int, uid: str, max_seconds: float) -> np.ndarray:
        if self.kind == "speed":
            return speed_perturb(y, sr, self.value)[: int(max_seconds * sr)]
        rng = np.random.default_rng(zlib.crc32(f"{uid}|{self.name}".encode()))
        return add_noise(y, self.value, rng)


@dataclasses.dataclass
class FeatureTable:
    """The features of every utterance, row i = corpus.utterances[i]. With perturbed copies
    (`with_copies`), rows [k*N, (k+1)*N) are copy k of the N utterances (copy 0 the originals),
    made by copies[k-1]: same labels, each copy its own "speaker" for input statistics."""

    feats: dict[str, torch.Tensor]  # kind -> (rows, bins, T) float16, zero beyond frames[i]
    frames: torch.Tensor  # (rows,) valid frames
    corpus: Corpus  # the original utterances (bad files removed, listed in corpus.skipped)
    copies: tuple = ()  # the Perturbation of each copy after the originals
    # (N, F) float64 openSMILE functionals of the originals (fastser.functionals), when the run uses them
    functionals: Optional[np.ndarray] = None

    @property
    def n_utterances(self) -> int:
        return len(self.corpus.utterances)

    @property
    def labels(self) -> torch.Tensor:
        """(rows,) the class of every row, copies included."""
        return torch.from_numpy(self.corpus.labels).repeat(1 + len(self.copies))

    @property
    def speakers(self) -> np.ndarray:
        """(rows,) each row's speaker; a copy is speaker "<name>@<copy>", e.g. "03@speed1.1" or
        "03@snr20" (its pitch and formants moved, or its background changed: it gets its own input
        statistics, from its own audio, as a test speaker recorded that way would)."""
        names = self.corpus.speakers
        return np.concatenate([names] + [np.char.add(names, f"@{c.name}") for c in self.copies])


def cache_key(
    corpus: Corpus, features: FeatureSet, max_seconds: float, perturbation: Optional[Perturbation] = None
) -> str:
    files = []
    for u in corpus.utterances:
        if u.path is None:
            raise ValueError("only corpora read from disk are cached")
        st = os.stat(u.path)
        files.append([u.uid, u.path, st.st_size, st.st_mtime_ns])
    key = {
        "version": FEATURE_VERSION,
        "corpus": corpus.name,
        "files": files,
        "max_seconds": max_seconds,
        "features": features.to_dict(),
    }
    if perturbation is not None:  # (the originals and speed copies keep the keys they always had)
        if perturbation.kind == "speed":
            key["speed"] = perturbation.value
        else:
            key["noise"] = {"snr_db": perturbation.value, "version": NOISE_VERSION}
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_audio(
    corpus: Corpus, sr: int, *, max_seconds: float, strict: bool = False, workers: int = 4, progress: bool = False
):
    """-> (list of float32 arrays, corpus without the files that failed, with them in `skipped`)."""
    if all(u.audio is not None for u in corpus.utterances):
        if corpus.sample_rate != sr:
            raise ValueError(f"{corpus.name} was generated at {corpus.sample_rate} Hz, the model needs {sr} Hz")
        return [u.audio[: int(max_seconds * sr)] for u in corpus.utterances], corpus

    if strict and corpus.skipped:
        _raise_strict(corpus.skipped[0])

    def read(u):
        try:
            y, _ = load(u.path, sr=sr)
        except AudioError as e:  # its message starts with the path; the skip list keeps path and reason apart
            return None, str(e).removeprefix(f"{u.path}: ")
        if y.size < sr // 100:
            return None, f"too short ({y.size} samples at {sr} Hz)"
        return y[: int(max_seconds * sr)], None

    iterator = ThreadPoolExecutor(max_workers=workers).map(read, corpus.utterances)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(corpus.utterances), desc=f"loading {corpus.name}", leave=False)
    audio, kept, skipped = [], [], list(corpus.skipped)
    for u, (y, err) in zip(corpus.utterances, iterator):
        if err is not None:
            if strict:
                _raise_strict((u.path, err))
            skipped.append((u.path, err))
            continue
        audio.append(y)
        kept.append(u)
    if not kept:
        raise CorpusError(f"{corpus.name}: none of the {len(corpus.utterances)} files could be read")
    return audio, dataclasses.replace(corpus, utterances=kept, skipped=skipped)


def _raise_strict(skip) -> None:
    path, reason = skip
    raise CorpusError(f"bad audio file (--strict): {path}: {reason}")


@torch.no_grad()
def compute_features(audio: list, features: FeatureSet, device: torch.device, batch_size: int = 64):
    """Batched on `device` (sorted by length, so padding is small) -> (feats float16 on CPU, frames)."""
    lengths = torch.tensor([len(a) for a in audio], dtype=torch.int64)
    frames = features.frame_count(lengths)
    T = int(frames.max())
    feats = {k: torch.zeros(len(audio), n, T, dtype=torch.float16) for k, n in features.n_bins.items()}
    order = torch.argsort(lengths)
    for start in range(0, len(audio), batch_size):
        idx = order[start : start + batch_size]
        batch = torch.zeros(len(idx), int(lengths[idx].max()))
        for row, i in enumerate(idx.tolist()):
            batch[row, : lengths[i]] = torch.from_numpy(audio[i])
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        out, _ = features.extract(batch, lengths[idx].to(device))
        for kind, x in out.items():
            feats[kind][idx, :, : x.shape[-1]] = x.to("cpu", torch.float16)
    return feats, frames


def build_feature_table(
    corpus: Corpus,
    features: FeatureSet,
    device: torch.device,
    *,
    max_seconds: float = 8.0,
    cache_dir: Optional[os.PathLike] = None,
    strict: bool = False,
    progress: bool = False,
    is_builder: bool = True,
    wait: Callable[[], None] = lambda: None,
    perturbation: Optional[Perturbation] = None,
) -> FeatureTable:
    """Features for every utterance, from the cache when it holds this exact corpus and config.
    Under torch.distributed only rank 0 (`is_builder`) builds; the others `wait` and then read.
    With a `perturbation`: of the perturbed audio (cut to max_seconds after a speed change)."""
    if not isinstance(features, FeatureSet):  # a list of kinds: the paper's settings for them
        features = FeatureSet.paper(features)
    path = None
    if cache_dir is not None and all(u.path is not None for u in corpus.utterances):
        path = Path(cache_dir) / f"{corpus.name}-{cache_key(corpus, features, max_seconds, perturbation)}.pt"
    if path is not None and not path.exists() and is_builder:
        table = _build(corpus, features, device, max_seconds, strict, progress, perturbation)
        _save_atomic(path, table)
    wait()
    if path is not None and path.exists():
        return _load(path, corpus, strict)
    return _build(corpus, features, device, max_seconds, strict, progress, perturbation)


def _build(corpus, features, device, max_seconds, strict, progress, perturbation=None) -> FeatureTable:
    # a copy played faster is cut after the change, so it may start from up to max_seconds * speed
    speed = perturbation.value if perturbation is not None and perturbation.kind == "speed" else 1.0
    audio, corpus = load_audio(
        corpus, features.sr, max_seconds=max_seconds * max(speed, 1.0), strict=strict, progress=progress
    )
    if perturbation is not None:
        audio = [perturbation.apply(y, features.sr, u.uid, max_seconds) for y, u in zip(audio, corpus.utterances)]
    feats, frames = compute_features(audio, features, device)
    return FeatureTable(feats, frames, corpus)


def with_copies(
    table: FeatureTable, features: FeatureSet, device: torch.device, perturbations, **build
) -> FeatureTable:
    """`table` plus one perturbed copy of every utterance per Perturbation (rows appended, see
    FeatureTable), each built (or read from the cache) like the originals; `build`: the keyword
    arguments of build_feature_table. Every table is padded to the widest."""
    perturbations = tuple(perturbations)
    if not perturbations:
        return table
    if table.copies:
        raise ValueError("this table already has perturbed copies")
    copies = [build_feature_table(table.corpus, features, device, perturbation=p, **build) for p in perturbations]
    for p, c in zip(perturbations, copies):
        if [u.uid for u in c.corpus.utterances] != [u.uid for u in table.corpus.utterances]:
            raise CorpusError(f"{table.corpus.name}: the {p.name} copy lost files the originals kept")
    parts = [table] + copies
    width = max(t.feats[k].shape[-1] for t in parts for k in t.feats)
    feats = {
        k: torch.cat([torch.nn.functional.pad(t.feats[k], (0, width - t.feats[k].shape[-1])) for t in parts])
        for k in table.feats
    }
    return FeatureTable(feats, torch.cat([t.frames for t in parts]), table.corpus, perturbations)


def _save_atomic(path: Path, table: FeatureTable) -> None:
    atomic_torch_save(
        {
            "feats": table.feats,
            "frames": table.frames,
            "skipped": table.corpus.skipped,
            "uids": [u.uid for u in table.corpus.utterances],
        },
        path,
    )


def _load(path: Path, corpus: Corpus, strict: bool) -> FeatureTable:
    payload = torch.load(path, weights_only=True)
    if strict and payload["skipped"]:
        _raise_strict(payload["skipped"][0])
    by_uid = {u.uid: u for u in corpus.utterances}
    kept = [by_uid[uid] for uid in payload["uids"]]
    skipped = [tuple(s) for s in payload["skipped"]]
    return FeatureTable(
        payload["feats"], payload["frames"], dataclasses.replace(corpus, utterances=kept, skipped=skipped)
    )
