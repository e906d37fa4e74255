"""Every training setting and its default, in one place.

    config = TrainConfig()                                   # the defaults
    config = TrainConfig.from_settings(settings)             # a run's settings.json (old runs migrated)
    config.model.width, config.optim.lr, config.augment.mixup
    config.replace(seed=3)                                   # a copy with some settings changed
    config.settings()                                        # the flat {name: value} a run folder stores

A setting's name is its command-line flag's (`--embed-dim` is `embed_dim`); `python -m fastser.train`
takes its defaults from here, and a test holds the flags and these fields to the same set. Three
defaults depend on the corpus (epochs, patience, validation): None here, `resolved()` fills them.
Settings marked RUN_OPTION say where and how a run goes, not what it computes: they may differ
when a run is resumed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

SCHEMA_VERSION = 1  # of settings(): stored in settings.json and in every checkpoint
RUN_OPTION = {"run_option": True}

FUNCTIONAL_SETS = ("egemaps", "compare")  # fastser.functionals.SETS's names; "none": the model alone
FUSIONS = ("late", "input")  # where the functionals meet the model (ModelConfig.functionals_fusion)
# The defaults that depend on the corpus, in one table: the command line's help, `resolved` and the
# docs read it. Every real corpus shares "real"; the synthetic corpus (generated tones, not speech)
# keeps a small setting of its own. Why each real-corpus value (docs/accuracy.md, every fold of
# ravdess-dev): 16 epochs with 20 ms hops were as accurate as 24 (12 underfit); no validation
# speakers (train on them, keep the last epoch); ComParE functionals' linear classifier averaged
# with the model: 6.9 UA per fold better with enrollment, 2.4 without.
CORPUS_DEFAULTS = {
    "synthetic": {"epochs": 12, "patience": 8, "validation": True, "functionals": "none"},
    "real": {"epochs": 16, "patience": 5, "validation": False, "functionals": "compare"},
}
# enrollment dropout, by input normalisation (other normalisations: 0): with speaker statistics, as
# good with the speaker's enrollment audio, far better with one clip of it or none (docs/accuracy.md,
# every fold of ravdess-dev, two seeds)
ENROLLMENT_DROPOUT_DEFAULTS = {"speaker": 0.5}


def corpus_defaults(corpus: str) -> dict:
    """The corpus's row of CORPUS_DEFAULTS (every corpus but the synthetic one: "real")."""
    return CORPUS_DEFAULTS["synthetic" if corpus == "synthetic" else "real"]


# the settings whose None `TrainConfig.resolved` fills from the others
RESOLVED_SETTINGS = ("epochs", "patience", "validation", "enrollment_dropout", "functionals")

# What fastser did before a setting was recorded: a run whose settings lack the key was made so.
BEFORE_RECORDED = {
    "normalize": "corpus",
    "prosody": False,
    "bin_stats": False,
    "pooling": "global",
    "downsample": "pool",
    "validation": True,
    "tempo": 0.0,
    "speed_perturb": None,
    "ema": None,
    "mixup": 0.0,
    "noise": None,
    "enrollment_dropout": 0.0,
    "sample_rate": 16000,
    "n_mels": 64,
    "functionals": "none",
    "hop_ms": 10,
    "functionals_fusion": "late",
}


@dataclass(frozen=True)
class DataConfig:
    """The corpus, its folds and its input statistics."""

    corpus: str = "synthetic"
    data_dir: Optional[str] = field(default=None, metadata=RUN_OPTION)
    split: Optional[str] = None  # None: the corpus's own protocol
    folds: int = 5  # for split "kfold"
    max_folds: Optional[int] = field(default=None, metadata=RUN_OPTION)  # a larger value trains further folds
    classes: Optional[str] = None  # e.g. "neutral,happy=happy+excited,sad,angry"
    iemocap_subset: str = "all"
    strict: bool = field(default=False, metadata=RUN_OPTION)
    max_seconds: float = 8.0
    sample_rate: int = 16000  # audio is resampled to it; frames stay 32 ms windows at any rate
    cache_dir: Optional[str] = field(default=None, metadata=RUN_OPTION)
    no_cache: bool = field(default=False, metadata=RUN_OPTION)
    synthetic_speakers: int = 16
    synthetic_per_class: int = 8
    normalize: str = "speaker"  # "speaker", "utterance" or "corpus"


@dataclass(frozen=True)
class ModelConfig:
    """The inputs and the network."""

    features: str = "both"  # "logmel", "mfcc" or both CNN branches
    n_mels: int = 64  # bands of the log-mel branch (the MFCC branch keeps 40 bands, 40 coefficients)
    # one frame of every input kind each hop_ms milliseconds (32 ms windows); 20 rather than the
    # paper's 10: half of every convolution's work, as accurate on ravdess-dev (docs/accuracy.md)
    hop_ms: int = 20
    prosody: bool = True
    # openSMILE functionals ("egemaps" or "compare") and a linear classifier over them, its
    # probabilities averaged with the model's (fastser.functionals); "none": the model alone;
    # None: CORPUS_DEFAULTS by corpus
    functionals: Optional[str] = None
    # where the functionals meet the model: "late", a classifier beside it whose probabilities are
    # averaged with the model's; "input", a branch of the network fused before the embedding
    # (fastser.models.cnn.FunctionalsEncoder), so the center loss and the reconstruction act on it
    functionals_fusion: str = "late"
    bin_stats: bool = False
    pooling: str = "time"
    downsample: str = "pool"  # after each conv (the paper's order), "stem" or "early" (fastser.models.cnn)
    width: int = 16
    embed_dim: int = 128

    @property
    def functionals_set(self) -> Optional[str]:
        """The openSMILE feature set whose classifier is fused with the model; None: the model alone."""
        return None if self.functionals in (None, "none") else self.functionals

    @property
    def functionals_input(self) -> Optional[str]:
        """The openSMILE feature set the network reads as an input branch; None: none does."""
        return self.functionals_set if self.functionals_fusion == "input" else None

    @property
    def functionals_late(self) -> Optional[str]:
        """The openSMILE feature set whose classifier is averaged with the model; None: none is."""
        return self.functionals_set if self.functionals_fusion == "late" else None


@dataclass(frozen=True)
class ObjectiveConfig:
    """Cross-entropy plus the center loss and the reconstruction loss."""

    lambda_center: float = 0.003
    lambda_recon: float = 0.1
    center_alpha: float = 0.5
    no_center: bool = False
    no_recon: bool = False
    ablation: bool = False

    @property
    def center_weight(self) -> float:
        """The center loss's weight in the joint loss: lambda_center, 0 with no_center."""
        return 0.0 if self.no_center else self.lambda_center

    @property
    def recon_weight(self) -> float:
        """The reconstruction loss's weight: lambda_recon, 0 with no_recon (no decoder is built)."""
        return 0.0 if self.no_recon else self.lambda_recon


@dataclass(frozen=True)
class OptimConfig:
    """The one-cycle AdamW schedule, early stopping, the crops, weight averaging and the seeds."""

    epochs: Optional[int] = None  # None: CORPUS_DEFAULTS by corpus
    patience: Optional[int] = None
    validation: Optional[bool] = None
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-3
    train_seconds: float = 3.0
    ema: Optional[tuple] = None
    seed: int = 0
    seeds: Optional[tuple] = None


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only changes of the input."""

    tempo: float = 0.0
    speed_perturb: Optional[tuple] = None
    noise: Optional[tuple] = None
    mixup: float = 0.0
    specaugment: bool = False
    # with --normalize speaker: the probability that a training item is normalised with other
    # statistics than its speaker's (the corpus's, its own, or k = 1, 3, 10 other clips' of its
    # speaker), as predict has them when enrollment audio is short or missing; None: 0.5 with
    # speaker statistics, else 0 (`resolved`)
    enrollment_dropout: Optional[float] = None


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run goes."""

    device: Optional[str] = field(default=None, metadata=RUN_OPTION)
    threads: Optional[int] = field(default=None, metadata=RUN_OPTION)
    amp: bool = False
    compile: bool = field(default=False, metadata=RUN_OPTION)
    cuda_graph: Optional[bool] = field(default=None, metadata=RUN_OPTION)  # None: on wherever a graph serves
    deterministic: bool = field(default=False, metadata=RUN_OPTION)
    out: Optional[str] = field(default=None, metadata=RUN_OPTION)
    resume: Optional[str] = field(default=None, metadata=RUN_OPTION)
    no_progress: bool = field(default=False, metadata=RUN_OPTION)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "augment": AugmentConfig,
    "run": RunConfig,
}
TUPLES = frozenset({"ema", "seeds", "speed_perturb", "noise"})  # JSON gives them back as lists


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- the flat view: what the command line, settings.json and checkpoints speak --------
    def settings(self) -> dict:
        """{setting: value} over every section, in declaration order."""
        return {f.name: getattr(getattr(self, s), f.name) for s in SECTIONS for f in _fields(s)}

    @classmethod
    def from_settings(cls, settings: dict) -> "TrainConfig":
        """From a flat {setting: value} (a stored run's: pass it through `migrated` first); a setting
        it lacks takes its default, a key that is no setting is an error."""
        unknown = sorted(set(settings) - set(SETTING_SECTION))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        values = {k: tuple(v) if k in TUPLES and isinstance(v, list) else v for k, v in settings.items()}
        return cls(
            **{s: SECTIONS[s](**{f.name: values[f.name] for f in _fields(s) if f.name in values}) for s in SECTIONS}
        )

    def replace(self, **changes) -> "TrainConfig":
        """A copy with settings (flat names) changed."""
        return TrainConfig.from_settings({**self.settings(), **changes})

    def resolved(self) -> "TrainConfig":
        """The defaults that depend on other settings filled in: epochs, patience, validation and the
        functionals on the corpus, enrollment dropout on the normalisation."""
        s = self.settings()
        filled = {k: v for k, v in corpus_defaults(self.data.corpus).items() if s[k] is None}
        if self.augment.enrollment_dropout is None:
            filled["enrollment_dropout"] = ENROLLMENT_DROPOUT_DEFAULTS.get(self.data.normalize, 0.0)
        return self.replace(**filled)

    def problems(self, name=lambda setting: setting) -> list:
        """What these settings get wrong, one sentence each (none: they can run). `name` spells a
        setting as the caller's user knows it: the library's `epochs`, the command line's `--epochs`.
        Call it on resolved settings (the corpus's defaults filled in)."""
        s, found = self.settings(), []
        counts = ("epochs", "patience", "batch_size", "folds", "width", "embed_dim", "max_folds", "threads", "n_mels")
        for key in counts:
            value = s[key]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                found.append(f"{name(key)} must be a positive integer, got {value}")
        for key in ("lr", "train_seconds", "max_seconds"):
            if not _finite(s[key]) or s[key] <= 0:
                found.append(f"{name(key)} must be a positive number, got {s[key]}")
        for key in ("weight_decay", "lambda_center", "lambda_recon", "center_alpha", "mixup"):
            if not _finite(s[key]) or s[key] < 0:
                found.append(f"{name(key)} must be a number >= 0, got {s[key]}")
        for key in ("tempo", "enrollment_dropout"):
            if not _finite(s[key]) or not 0 <= s[key] < 1:
                found.append(f"{name(key)} must be in [0, 1), got {s[key]}")
        rate = s["sample_rate"]
        if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 48000:
            found.append(f"{name('sample_rate')} must be an integer number of Hz in [8000, 48000], got {rate}")
        elif isinstance(s["n_mels"], int) and s["n_mels"] > 256 * rate // 16000 + 1:
            found.append(
                f"{name('n_mels')} {s['n_mels']} is more mel bands than the {256 * rate // 16000 + 1} "
                f"frequency bins of a 32 ms window at {rate} Hz (some bands would be empty)"
            )
        hop = s["hop_ms"]
        if not isinstance(hop, int) or isinstance(hop, bool) or not 5 <= hop <= 32:
            found.append(f"{name('hop_ms')} must be an integer number of milliseconds in [5, 32], got {hop}")
        elif isinstance(rate, int) and rate * hop % 1000:
            found.append(f"{name('hop_ms')} {hop} is not a whole number of samples at {rate} Hz")
        if s["functionals"] is not None and s["functionals"] not in FUNCTIONAL_SETS + ("none",):
            found.append(
                f"{name('functionals')} must be one of {', '.join(FUNCTIONAL_SETS)} or none, got {s['functionals']!r}"
            )
        if s["functionals_fusion"] not in FUSIONS:
            found.append(
                f"{name('functionals_fusion')} must be one of {', '.join(FUSIONS)}, got {s['functionals_fusion']!r}"
            )
        elif s["functionals_fusion"] == "input":
            if s["functionals"] in (None, "none"):
                found.append(
                    f"{name('functionals_fusion')} input needs a feature set: {name('functionals')} "
                    f"{' or '.join(FUNCTIONAL_SETS)}"
                )
            for key in ("speed_perturb", "noise", "specaugment"):
                if s[key]:
                    found.append(
                        f"{name('functionals_fusion')} input does not combine with {name(key)} (the "
                        f"functionals are extracted from the clips as recorded, one column per clip)"
                    )
        if s["seeds"] and s["ablation"]:
            found.append(f"{name('seeds')} and {name('ablation')} do not combine yet: run the ablation once per seed")
        if s["enrollment_dropout"] and s["normalize"] != "speaker":
            found.append(
                f"{name('enrollment_dropout')} needs {name('normalize')} speaker "
                f"(got {name('normalize')} {s['normalize']})"
            )
        return found

    def computed_settings(self) -> dict:
        """The settings that decide what a run computes (all but the RUN_OPTIONs)."""
        return {k: v for k, v in self.settings().items() if k not in RUN_OPTIONS}


def crop_frames(train_seconds: float, hop_ms: int) -> int:
    """Frames of a training crop of `train_seconds` at a frame every `hop_ms` milliseconds."""
    return int(train_seconds * (1000 / hop_ms))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fields(section: str):
    return dataclasses.fields(SECTIONS[section])


SETTING_SECTION = {f.name: s for s in SECTIONS for f in _fields(s)}
RUN_OPTIONS = frozenset(f.name for s in SECTIONS for f in _fields(s) if f.metadata.get("run_option"))


def migrated(stored: dict) -> dict:
    """The one reading of a stored run's settings (settings.json, a checkpoint's "settings" or, for
    runs older than those, its "config"): what it lacks that fastser did differently before recording
    it comes from BEFORE_RECORDED, lists read back as tuples, the schema marker goes. Schema 1 is the
    first: a later change of names or meanings is translated here, by the stored "schema"."""
    out = {**BEFORE_RECORDED, **{k: v for k, v in stored.items() if k != "schema"}}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}
