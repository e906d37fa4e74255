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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fastser._io import atomic_torch_save
from fastser.audio import AudioError, load, speed_perturb
from fastser.data.base import Corpus, CorpusError
from fastser.features.featureset import FeatureSet

FEATURE_VERSION = 2  # 2: the log-mel branch is called "logmel" (was "spectrogram")


@dataclasses.dataclass
class FeatureTable:
    """The features of every utterance, row i = corpus.utterances[i]. With speed-perturbed copies
    (`with_speed_copies`), rows [k*N, (k+1)*N) are copy k of the N utterances (copy 0 the originals),
    at speed copy_speeds[k-1]: same labels, each copy its own "speaker" for input statistics."""
    feats: dict[str, torch.Tensor]  # kind -> (rows, bins, T) float16, zero beyond frames[i]
    frames: torch.Tensor  # (rows,) valid frames
    corpus: Corpus  # the original utterances (bad files removed, listed in corpus.skipped)
    copy_speeds: tuple = ()  # speed of each perturbed copy after the originals

    @property
    def n_utterances(self) -> int:
        return len(self.corpus.utterances)

    @property
    def labels(self) -> torch.Tensor:
        """(rows,) the class of every row, copies included."""
        return torch.from_numpy(self.corpus.labels).repeat(1 + len(self.copy_speeds))

    @property
    def speakers(self) -> np.ndarray:
        """(rows,) each row's speaker; a copy at speed s is speaker "<name>@speed<s>" (its pitch and
        formants moved: it gets its own input statistics, from its own audio)."""
        names = self.corpus.speakers
        return np.concatenate([names] + [np.char.add(names, f"@speed{s:g}") for s in self.copy_speeds])


def cache_key(corpus: Corpus, features: FeatureSet, max_seconds: float, speed: float = 1.0) -> str:
    files = []
    for u in corpus.utterances:
        if u.path is None:
            raise ValueError("only corpora read from disk are cached")
        st = os.stat(u.path)
        files.append([u.uid, u.path, st.st_size, st.st_mtime_ns])
    key = {"version": FEATURE_VERSION, "corpus": corpus.name, "files": files, "max_seconds": max_seconds,
           "features": features.to_dict()}
    if speed != 1.0:  # (the originals keep the key they always had)
        key["speed"] = speed
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_audio(corpus: Corpus, sr: int, *, max_seconds: float, strict: bool = False, workers: int = 4,
               progress: bool = False):
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
        idx = order[start: start + batch_size]
        batch = torch.zeros(len(idx), int(lengths[idx].max()))
        for row, i in enumerate(idx.tolist()):
            batch[row, : lengths[i]] = torch.from_numpy(audio[i])
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        out, _ = features.extract(batch, lengths[idx].to(device))
        for kind, x in out.items():
            feats[kind][idx, :, : x.shape[-1]] = x.to("cpu", torch.float16)
    return feats, frames


def build_feature_table(corpus: Corpus, features: FeatureSet, device: torch.device, *, max_seconds: float = 8.0,
                        cache_dir: Optional[os.PathLike] = None, strict: bool = False, progress: bool = False,
                        is_builder: bool = True, wait: Callable[[], None] = lambda: None,
                        speed: float = 1.0) -> FeatureTable:
    """Features for every utterance, from the cache when it holds this exact corpus and config.
    Under torch.distributed only rank 0 (`is_builder`) builds; the others `wait` and then read.
    speed != 1: of the audio played that much faster (`speed_perturb`), cut to max_seconds after."""
    if not isinstance(features, FeatureSet):  # a list of kinds: the paper's settings for them
        features = FeatureSet.paper(features)
    path = None
    if cache_dir is not None and all(u.path is not None for u in corpus.utterances):
        path = Path(cache_dir) / f"{corpus.name}-{cache_key(corpus, features, max_seconds, speed)}.pt"
    if path is not None and not path.exists() and is_builder:
        table = _build(corpus, features, device, max_seconds, strict, progress, speed)
        _save_atomic(path, table)
    wait()
    if path is not None and path.exists():
        return _load(path, corpus, strict)
    return _build(corpus, features, device, max_seconds, strict, progress, speed)


def _build(corpus, features, device, max_seconds, strict, progress, speed=1.0) -> FeatureTable:
    # a copy played faster is cut after the change, so it may start from up to max_seconds * speed
    audio, corpus = load_audio(corpus, features.sr, max_seconds=max_seconds * max(speed, 1.0), strict=strict,
                               progress=progress)
    if speed != 1.0:
        audio = [speed_perturb(y, features.sr, speed)[: int(max_seconds * features.sr)] for y in audio]
    feats, frames = compute_features(audio, features, device)
    return FeatureTable(feats, frames, corpus)


def with_speed_copies(table: FeatureTable, features: FeatureSet, device: torch.device, speeds, **build) -> FeatureTable:
    """`table` plus one speed-perturbed copy of every utterance per speed (rows appended, see
    FeatureTable), each built (or read from the cache) like the originals; `build`: the keyword
    arguments of build_feature_table. Every table is padded to the widest."""
    speeds = tuple(float(s) for s in speeds)
    if not speeds:
        return table
    if table.copy_speeds:
        raise ValueError("this table already has speed copies")
    copies = [build_feature_table(table.corpus, features, device, speed=s, **build) for s in speeds]
    for s, c in zip(speeds, copies):
        if [u.uid for u in c.corpus.utterances] != [u.uid for u in table.corpus.utterances]:
            raise CorpusError(f"{table.corpus.name}: the speed {s:g} copy lost files the originals kept")
    parts = [table] + copies
    width = max(t.feats[k].shape[-1] for t in parts for k in t.feats)
    feats = {k: torch.cat([torch.nn.functional.pad(t.feats[k], (0, width - t.feats[k].shape[-1])) for t in parts])
             for k in table.feats}
    return FeatureTable(feats, torch.cat([t.frames for t in parts]), table.corpus, speeds)


def _save_atomic(path: Path, table: FeatureTable) -> None:
    atomic_torch_save({"feats": table.feats, "frames": table.frames, "skipped": table.corpus.skipped,
                       "uids": [u.uid for u in table.corpus.utterances]}, path)


def _load(path: Path, corpus: Corpus, strict: bool) -> FeatureTable:
    payload = torch.load(path, weights_only=True)
    if strict and payload["skipped"]:
        _raise_strict(payload["skipped"][0])
    by_uid = {u.uid: u for u in corpus.utterances}
    kept = [by_uid[uid] for uid in payload["uids"]]
    skipped = [tuple(s) for s in payload["skipped"]]
    return FeatureTable(payload["feats"], payload["frames"],
                        dataclasses.replace(corpus, utterances=kept, skipped=skipped))
