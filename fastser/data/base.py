"""What every corpus loader returns: utterances with label and speaker, and a skip report."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


class CorpusError(ValueError):
    """A corpus that cannot be read as asked (missing folder, wrong layout, bad file under --strict)."""


@dataclasses.dataclass
class Utterance:
    """One labelled utterance. `path` for files on disk; `audio` for generated ones (synthetic)."""

    uid: str
    label: str
    speaker: str
    path: Optional[str] = None
    session: Optional[str] = None
    gender: Optional[str] = None
    text: Optional[str] = None
    audio: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class Corpus:
    name: str
    classes: list[str]
    utterances: list[Utterance]
    sample_rate: int = 16000
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    default_split: str = "loso"

    @property
    def labels(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[u.label] for u in self.utterances], dtype=np.int64)

    @property
    def speakers(self) -> np.ndarray:
        return np.array([u.speaker for u in self.utterances])

    def select(self, keep: Callable[[Utterance], bool]) -> "Corpus":
        return dataclasses.replace(self, utterances=[u for u in self.utterances if keep(u)])

    def with_classes(self, spec: Optional[str]) -> "Corpus":
        """Restrict or map labels: "neutral,happy,sad,angry" keeps those; "happy=happy+excited" style
        entries merge labels ("a=b+c" gives class a to labels b and c). Order of the spec = class order."""
        if not spec:
            return self
        mapping, classes = {}, []
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            name, _, sources = item.partition("=")
            classes.append(name)
            for src in sources.split("+") if sources else [name]:
                mapping[src.strip()] = name
        unknown = sorted(set(mapping) - set(self.classes))
        if unknown:
            raise CorpusError(f"--classes names {unknown}, which {self.name} does not have; it has {self.classes}")
        kept = [dataclasses.replace(u, label=mapping[u.label]) for u in self.utterances if u.label in mapping]
        return dataclasses.replace(self, classes=classes, utterances=kept)

    def summary(self) -> str:
        counts = {c: 0 for c in self.classes}
        for u in self.utterances:
            counts[u.label] += 1
        spk = len(set(self.speakers.tolist()))
        return (
            f"{self.name}: {len(self.utterances)} utterances, {spk} speakers, classes "
            + ", ".join(f"{c}={n}" for c, n in counts.items())
            + (f"; skipped {len(self.skipped)} bad files" if self.skipped else "")
        )
