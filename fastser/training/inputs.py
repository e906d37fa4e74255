"""What a run trains on: its corpus, its feature table (cached on disk for real corpora, with the
training-only perturbed copies and the openSMILE functionals where the run uses them) and its folds.

    table = load_table(config, info)   # the corpus and its features
    folds = split_folds(config, table)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from fastser.config import TrainConfig
from fastser.data import load_corpus, make_folds
from fastser.data.cache import Perturbation, build_feature_table, with_copies
from fastser.errors import UserError
from fastser.features.featureset import KINDS, FeatureSet, canonical_kind
from fastser.functionals import CLIP_KINDS, INPUT_KIND, SIZES, corpus_functionals, input_columns


def default_cache_dir() -> str:
    """Where generated corpora are kept between runs: $XDG_CACHE_HOME/fastser (~/.cache/fastser)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastser")


def corpus_options(config: TrainConfig) -> dict:
    """fastser.data.load_corpus's options for the corpus `config` names (the synthetic corpus's
    size and seed, IEMOCAP's subset)."""
    data = config.data
    if data.corpus == "synthetic":
        return {
            "seed": config.optim.seed,
            "n_speakers": data.synthetic_speakers,
            "per_class": data.synthetic_per_class,
            "sr": data.sample_rate,
            "cache_dir": None if data.no_cache else data.cache_dir or default_cache_dir(),
        }
    return {"subset": data.iemocap_subset} if data.corpus == "iemocap" else {}


def feature_set(config: TrainConfig, kinds) -> FeatureSet:
    """The model's frame features as `config` sets them (rate, log-mel bands, hop), for these kinds
    (a table's kinds: its functionals column, one per clip, is no frame feature and is left out)."""
    model = config.model
    return FeatureSet.paper(
        [k for k in kinds if k not in CLIP_KINDS], sr=config.data.sample_rate, n_mels=model.n_mels, hop_ms=model.hop_ms
    )


def load_table(config: TrainConfig, info):
    """The corpus's feature table for `config` (its `phase_seconds`: the corpus read or generated,
    the features computed or read from the cache)."""
    t0 = time.perf_counter()
    data, model = config.data, config.model
    kinds = list(KINDS) if model.features == "both" else [canonical_kind(model.features)]
    if model.prosody:
        kinds.append("prosody")
    corpus = load_corpus(data.corpus, data.data_dir, **corpus_options(config))
    corpus = corpus.with_classes(data.classes)
    corpus_seconds = time.perf_counter() - t0
    cache_dir = None
    if data.corpus != "synthetic" and not data.no_cache:
        cache_dir = data.cache_dir or os.path.join(data.data_dir, ".fastser-cache")
        if not os.access(os.path.dirname(os.path.abspath(cache_dir)) or ".", os.W_OK):
            cache_dir = os.path.join(tempfile.gettempdir(), "fastser-cache")
    build = dict(
        cache_dir=cache_dir,
        strict=data.strict,
        max_seconds=data.max_seconds,
        progress=info.is_main and not config.run.no_progress,
        is_builder=info.is_main,
        wait=info.barrier,
    )
    table = build_feature_table(corpus, feature_set(config, kinds), info.device, **build)
    if table.corpus.skipped and info.is_main:
        listing = "\n  ".join(f"{p}: {r}" for p, r in table.corpus.skipped[:50])
        more = f"\n  ... and {len(table.corpus.skipped) - 50} more" if len(table.corpus.skipped) > 50 else ""
        print(
            f"warning: skipped {len(table.corpus.skipped)} bad files (listed in metrics.json; --strict makes "
            f"them an error):\n  {listing}{more}",
            file=sys.stderr,
        )
    # training-only copies, appended after the originals (folds index only those)
    copies = [Perturbation("speed", s) for s in config.augment.speed_perturb or ()] + [
        Perturbation("noise", snr) for snr in config.augment.noise or ()
    ]
    table = with_copies(table, feature_set(config, kinds), info.device, copies, **build)
    if model.functionals_late:
        table.functionals = table_functionals(table, config, cache_dir, info)
    elif model.functionals_input:  # one more input kind of the table: normalised, batched, fed like the others
        x = table_functionals(table, config, cache_dir, info)
        expected = SIZES[model.functionals_input]
        if x.shape[1] != expected:
            raise UserError(
                f"openSMILE gave {x.shape[1]} {model.functionals_input} functionals a clip, the model "
                f"expects {expected} (another openSMILE version?)"
            )
        table.feats[INPUT_KIND] = input_columns(x)
    table.phase_seconds = {"corpus": corpus_seconds, "features": time.perf_counter() - t0 - corpus_seconds}
    return table


def table_functionals(table, config: TrainConfig, cache_dir, info):
    """The corpus's openSMILE functionals; with a cache, rank 0 builds it and the others read it."""
    args = (table.corpus, config.model.functionals_set, config.data.sample_rate, config.data.max_seconds, cache_dir)
    if cache_dir is None:
        return corpus_functionals(*args)
    x = corpus_functionals(*args) if info.is_main else None
    info.barrier()
    return x if x is not None else corpus_functionals(*args)


def split_folds(config: TrainConfig, table, seed=None) -> list:
    """The run's test folds: its split (the corpus's own when unset) for `seed` (the run's when
    None), cut to its max_folds."""
    data = config.data
    split = data.split or table.corpus.default_split
    folds = make_folds(table.corpus, split, n_folds=data.folds, seed=config.optim.seed if seed is None else seed)
    return folds[: data.max_folds] if data.max_folds else folds
