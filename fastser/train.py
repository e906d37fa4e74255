"""Train the paper's model: `python -m fastser.train` (synthetic corpus, no arguments needed), or
`python -m fastser.train --corpus emodb --data-dir PATH --split loso`; the same under torchrun.

The command line only: its flags, their checks and --resume's settings make a TrainConfig, which
fastser.training.run trains (the run folder, the corpus and its features, the experiments) — see
fastser/training/fold.py for what happens in a fold, trainer.py in an epoch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fastser.config import (
    CORPUS_DEFAULTS,
    ENROLLMENT_DROPOUT_DEFAULTS,
    FUNCTIONAL_SETS,
    FUSIONS,
    RESOLVED_SETTINGS,
    RUN_OPTIONS,
    TrainConfig,
)
from fastser.cli import ArgumentParser, prog_name, run_cli
from fastser.errors import UserError
from fastser.memory import retain_freed_memory
from fastser.data import SPLITS
from fastser.models.cnn import DOWNSAMPLINGS, POOLINGS
from fastser.normalization import NORMALIZE
from fastser.checkpoints import SETTINGS_FILE, saved_settings
from fastser.training.run import train

CORPORA = ("synthetic", "iemocap", "emodb", "ravdess", "cremad", "tess", "emovo")


class _DefaultsOnce(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already speaks of its default, or
    there is none to show (flags that are off, options that are unset)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def _seed_list(text: str) -> list:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, e.g. 0,1,2; got {text!r}")
    return seeds


def _distinct_floats(ok, expected: str):
    """An argparse type: comma-separated distinct numbers, each passing `ok`."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(float(s) for s in text.split(",") if s.strip())
        except ValueError:
            values = ()
        if not values or len(set(values)) != len(values) or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return values

    return parse


def _float_in(ok, expected: str):
    """An argparse type: one number passing `ok`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


_tempo = _float_in(lambda t: 0 <= t < 1, "a relative rate change in [0, 1), e.g. 0.1")
_probability = _float_in(lambda q: 0 <= q < 1, "a probability in [0, 1), e.g. 0.5")
_mixup_alpha = _float_in(lambda a: 0 < a <= 10, "a Beta(alpha, alpha) parameter in (0, 10], e.g. 0.2")
_speeds = _distinct_floats(
    lambda s: 0.5 <= s <= 2.0 and s != 1.0, "distinct speeds in [0.5, 2] other than 1, e.g. 0.9,1.1"
)
_snrs = _distinct_floats(lambda s: -5 <= s <= 60, "distinct signal-to-noise ratios in dB in [-5, 60], e.g. 20,10")
_decays = _distinct_floats(lambda d: 0 < d < 1, "distinct decays in (0, 1), e.g. 0.998")


def _by_corpus(setting: str) -> str:
    """A corpus-dependent default as the help says it, from fastser.config.CORPUS_DEFAULTS."""
    where = {"synthetic": "the synthetic corpus", "real": "real corpora"}

    def text(value) -> str:
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{setting.replace('_', '-')}"
        return str(value)

    return ", ".join(f"{text(row[setting])} on {where[name]}" for name, row in reversed(CORPUS_DEFAULTS.items()))


def _corpus_flags(p: ArgumentParser) -> None:
    """The corpus, its folds and its input statistics (DataConfig)."""
    corpus = p.add_argument_group("corpus and folds")
    corpus.add_argument(
        "--corpus", choices=CORPORA, help="which corpus; 'synthetic' is generated, the others are read from --data-dir"
    )
    corpus.add_argument("--data-dir", help="corpus root, in the layout the corpus ships in (docs/guide.md)")
    corpus.add_argument(
        "--split", choices=SPLITS, help="speaker-independent folds (default: the corpus's own, see docs/guide.md)"
    )
    corpus.add_argument("--folds", type=int, help="number of folds for --split kfold")
    corpus.add_argument("--max-folds", type=int, help="run only the first N folds (smoke runs)")
    corpus.add_argument("--classes", help='restrict/map labels, e.g. "neutral,happy=happy+excited,sad,angry"')
    corpus.add_argument("--iemocap-subset", choices=("all", "improvised", "scripted"), help="IEMOCAP sessions to use")
    corpus.add_argument("--strict", action="store_true", help="a bad audio file is an error, not a skip")
    corpus.add_argument("--max-seconds", type=float, help="longer utterances are cut")
    corpus.add_argument(
        "--sample-rate",
        type=int,
        help="Hz the audio is resampled to (the features' 32 ms windows and --hop-ms hops scale with it)",
    )
    corpus.add_argument(
        "--cache-dir",
        help="feature cache (default: <data-dir>/.fastser-cache; the synthetic corpus's audio: ~/.cache/fastser)",
    )
    corpus.add_argument(
        "--no-cache",
        action="store_true",
        help="compute the features (and generate the synthetic corpus) without reading or writing a cache",
    )
    corpus.add_argument("--synthetic-speakers", type=int, help="speakers of the synthetic corpus")
    corpus.add_argument("--synthetic-per-class", type=int, help="synthetic utterances per speaker and class")
    corpus.add_argument(
        "--normalize",
        choices=NORMALIZE,
        help="input statistics: each speaker's own (from its unlabelled audio; predict takes "
        "enrollment audio), each utterance's own, or the training fold's",
    )


def _model_flags(p: ArgumentParser) -> None:
    """The inputs, the network and the loss weights (ModelConfig, ObjectiveConfig)."""
    model = p.add_argument_group("model and objective")
    model.add_argument(
        "--features",
        choices=("logmel", "spectrogram", "mfcc", "both"),
        help="input branches: the log-mel CNN ('spectrogram' names it too), the MFCC CNN, or both",
    )
    model.add_argument(
        "--prosody",
        action=argparse.BooleanOptionalAction,
        help="the prosody branch (F0, voicing, HNR, level contours) fused before the embedding",
    )
    model.add_argument(
        "--functionals",
        choices=FUNCTIONAL_SETS + ("none",),
        help="also score each clip with openSMILE functionals (eGeMAPS or ComParE_2016) and a linear "
        "classifier fitted on the training speakers, its probabilities averaged with the model's; "
        "predict extracts them too, export holds them as an input (or --model-only); 'none': the model "
        f"alone (default: {_by_corpus('functionals')})",
    )
    model.add_argument(
        "--functionals-fusion",
        choices=FUSIONS,
        help="where the functionals meet the model: 'late' (default) averages the linear classifier's "
        "probabilities with the model's; 'input' feeds them to a branch of the network fused before "
        "the embedding (the center loss and the reconstruction then act on it; predict extracts them, "
        "export refuses such a model)",
    )
    model.add_argument(
        "--bin-stats",
        action=argparse.BooleanOptionalAction,
        help="feed each spectral bin's mean and std over the utterance to the embedding, "
        "beside the CNN's pooled features",
    )
    model.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="how each CNN's last map becomes a vector: mean and max over time per frequency band "
        "('time': keeps where in the spectrum), or over time and frequency ('global')",
    )
    model.add_argument(
        "--downsample",
        choices=DOWNSAMPLINGS,
        help="where each CNN's three 2x2 downsamplings sit: after each conv ('pool', the paper's order), "
        "in a stride-2 first conv ('stem'), or that and max-pooling before the other convs ('early': each "
        "conv at the coarser resolution, a quarter of the FLOPs); the same map sizes in all three",
    )
    model.add_argument("--n-mels", type=int, help="bands of the log-mel branch's input (the MFCC branch keeps 40)")
    model.add_argument(
        "--hop-ms",
        type=int,
        help="milliseconds between the input frames of every kind (32 ms windows; 20 halves every convolution's work)",
    )
    model.add_argument("--width", type=int, help="channels per stem branch (model size)")
    model.add_argument("--embed-dim", type=int, help="size of the embedding the center loss acts on")
    model.add_argument("--lambda-center", type=float, help="weight of the center loss")
    model.add_argument("--lambda-recon", type=float, help="weight of the reconstruction loss")
    model.add_argument("--center-alpha", type=float, help="Wen et al.'s center update rate")
    model.add_argument("--no-center", action="store_true", help="train without the center loss")
    model.add_argument("--no-recon", action="store_true", help="train without the reconstruction decoder")
    model.add_argument("--ablation", action="store_true", help="CE only, +center, +recon, both on the same folds")


def _optim_flags(p: ArgumentParser) -> None:
    """The schedule, early stopping, the crops, augmentation, the seeds (OptimConfig, AugmentConfig)."""
    opt = p.add_argument_group("optimisation")
    opt.add_argument(
        "--epochs",
        type=int,
        help=f"maximum epochs per fold: the one-cycle schedule's length (default: {_by_corpus('epochs')})",
    )
    opt.add_argument(
        "--patience",
        type=int,
        help=f"early stopping: epochs without a better validation UA (default: {_by_corpus('patience')})",
    )
    opt.add_argument(
        "--validation",
        action=argparse.BooleanOptionalAction,
        help="early stopping on each fold's validation speakers; --no-validation trains on them "
        f"too and keeps the last epoch (default: {_by_corpus('validation')})",
    )
    opt.add_argument("--batch-size", type=int, help="global batch (split across ranks under torchrun)")
    opt.add_argument("--lr", type=float, help="peak learning rate of the one-cycle AdamW schedule")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    opt.add_argument("--train-seconds", type=float, help="random crop length for training (also predict's window)")
    opt.add_argument(
        "--tempo",
        type=_tempo,
        help="tempo perturbation: each training crop played at a random rate in [1-x, 1+x] "
        "(frames dropped or repeated; default 0: off)",
    )
    opt.add_argument(
        "--speed-perturb",
        type=_speeds,
        metavar="S,S",
        help="speed perturbation: a copy of every utterance played at each of these speeds, e.g. "
        "0.9,1.1 (pitch, formants and tempo change together, as by another speaker); each "
        "training step draws an original or a copy, so an epoch costs the same (default: off)",
    )
    opt.add_argument(
        "--noise",
        type=_snrs,
        metavar="SNR,SNR",
        help="additive noise: a copy of every utterance with white, pink or brown noise at each "
        "of these SNRs in dB, e.g. 20,10 (fixed per utterance, so cached); drawn like "
        "--speed-perturb copies, which it combines with (default: off)",
    )
    opt.add_argument(
        "--ema",
        type=_decays,
        metavar="D[,D]",
        help="keep an exponential moving average of the weights (bias-corrected, per step) and "
        "test and save it instead of the last weights, e.g. 0.998; further decays and the "
        "trained weights are scored beside it (metrics.json: weights) (default: off)",
    )
    opt.add_argument(
        "--mixup",
        type=_mixup_alpha,
        metavar="ALPHA",
        help="mixup: each training item mixed with another of its batch, weight ~ Beta(ALPHA, "
        "ALPHA) folded to [0.5, 1], cross-entropy on both labels, center loss on the "
        "dominant one, e.g. 0.2 (default: off)",
    )
    opt.add_argument(
        "--enrollment-dropout",
        type=_probability,
        metavar="P",
        help="with --normalize speaker: each training item, with probability P, normalised with "
        "the statistics predict has without enough enrollment audio (the training speakers', its "
        "own, or 1, 3 or 10 other clips of its speaker) instead of its speaker's (default: "
        + ", ".join(f"{v:g} with --normalize {k}" for k, v in ENROLLMENT_DROPOUT_DEFAULTS.items())
        + ", else 0)",
    )
    opt.add_argument(
        "--specaugment",
        action="store_true",
        help="time/frequency masks in training (off by default: they lowered UA in the sweep)",
    )
    opt.add_argument("--seed", type=int, help="seeds the folds, the weights, the batches and dropout")
    opt.add_argument(
        "--seeds",
        type=_seed_list,
        help="several seeds, e.g. 0,1,2: one experiment each in seed-N/, metrics.json with mean "
        "and std over seeds (the protocol for judging a change on a small corpus)",
    )


def _run_flags(p: ArgumentParser) -> None:
    """Where and how the run goes (RunConfig)."""
    run = p.add_argument_group("running")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch and fastser's kernels (default: the cores not busy with other work "
        "when the run starts); a CPU run's result is decided by the seed, the processor and this count",
    )
    run.add_argument("--amp", action="store_true", help="bf16 autocast")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the whole training step (batch, forward, loss, backward, clipping, AdamW, "
        "running sums) in a CUDA graph once and replay it: the default on one GPU; without a GPU, "
        "under torchrun or with --compile the step runs eagerly",
    )
    run.add_argument(
        "--deterministic",
        action="store_true",
        help="bit-identical runs for a seed on one device (deterministic kernels and center "
        "update, torch.use_deterministic_algorithms; slower on a GPU)",
    )
    run.add_argument("--out", help="output folder (default: runs/<timestamp>/)")
    run.add_argument(
        "--resume",
        help="a run folder (or its checkpoint.pt) to continue with the settings it was started "
        "with; a flag given beside it must agree with them, except where and how the run goes "
        "on (--out, --device, --threads, --max-folds, --data-dir, --cache-dir, ...)",
    )
    run.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=prog_name("fastser.train"), description=__doc__.split("\n\n")[0], formatter_class=_DefaultsOnce
    )
    for add_flags in (_corpus_flags, _model_flags, _optim_flags, _run_flags):
        add_flags(p)
    p.set_defaults(**TrainConfig().settings())  # every default is fastser.config's
    return p


# --resume: the flags that may differ from the run's own settings are fastser.config's RUN_OPTIONS
# (where and how it goes on, not what it computes); these are never taken from the run (where this
# process runs and how it reports)
NOT_RESTORED = frozenset({"out", "resume", "no_progress", "device"})


def parse_config(argv=None) -> TrainConfig:
    """The command line as a TrainConfig (--resume's settings restored, the corpus's defaults in)."""
    return TrainConfig.from_settings(vars(parse_args(argv)))


def config_from_flags(flags) -> TrainConfig:
    """`python -m fastser.train` flags as the resolved TrainConfig they give, checked as the command
    line checks them; a flag or value it refuses raises a UserError with its one line (where the
    command line exits 2).

    Example:
        >>> config_from_flags(["--corpus", "emovo", "--data-dir", "d", "--epochs", "8"]).optim.epochs
        8
    """

    def refuse(message: str):
        raise UserError(message)

    return TrainConfig.from_settings(vars(parse_args(list(flags), on_error=refuse))).resolved()


def parse_args(argv=None, on_error=None) -> argparse.Namespace:
    """The command line's namespace; `on_error(message)`: called for a refused flag or value instead
    of argparse's exit 2 (it must raise)."""
    p = build_parser()
    if on_error is not None:
        p.error = on_error
    args = p.parse_args(argv)
    if args.resume is not None:
        restore_settings(args, p, given_flags(argv))
    config = TrainConfig.from_settings(vars(args)).resolved()
    resolved = config.settings()
    for key in RESOLVED_SETTINGS:
        setattr(args, key, resolved[key])
    problems = config.problems(name=lambda setting: "--" + setting.replace("_", "-"))
    if problems:
        p.error(problems[0])  # the same checks as the library's (TrainConfig.problems), named as flags
    return args


def given_flags(argv) -> set:
    """The dests of the flags on the command line itself (not their defaults)."""
    p = build_parser()
    p._defaults.clear()  # the parser-level defaults (set_defaults) would count as given
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _flag_text(p: argparse.ArgumentParser, dest: str, value) -> str:
    """How the command line says dest=value: --epochs 3, --no-prosody, --speed-perturb 0.9,1.1."""
    action = next(a for a in p._actions if a.dest == dest)
    name = (
        action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction)
        else max(action.option_strings, key=len)
    )
    if isinstance(action, argparse.BooleanOptionalAction):
        return name if value else "--no-" + name[2:]
    if action.nargs == 0 or value is None:
        return name if value else f"without {name}"
    if isinstance(value, (tuple, list)):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{name} {value}"


def restore_settings(args: argparse.Namespace, p: argparse.ArgumentParser, given: set) -> None:
    """--resume RUN: every setting the run was started with comes back from the run folder, so the
    folder alone continues it. A flag given beside --resume must agree with the run's setting
    (outside RUN_OPTIONS): a resumed run never mixes two settings, it says which flag differs."""
    found = saved_settings(args.resume)
    if found is None:
        return  # no checkpoint there: _train says so, naming the path
    saved, complete = found
    if saved.get("seeds") or saved.get("ablation"):
        # the parts of a --seeds or --ablation run hold its checkpoints, the run's folder holds the parts:
        # resumed from a part, the whole run would start again nested inside it
        part = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        if (part / "checkpoint.pt").is_file():
            what = "--seeds" if saved.get("seeds") else "--ablation"
            raise UserError(
                f"--resume {args.resume}: one part ({part.name}) of the {what} run in {part.parent}; "
                f"continue the whole run with --resume {part.parent}"
            )
    dests = {a.dest for a in p._actions if a.option_strings and a.dest != "help"}
    skip = NOT_RESTORED | ({"lambda_center", "lambda_recon"} if not complete and saved.get("ablation") else set())
    norm = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    for dest in sorted(dests & set(saved) - skip):
        value = saved[dest]
        if dest not in given:
            setattr(args, dest, value)
        elif dest not in RUN_OPTIONS and norm(getattr(args, dest)) != value:
            raise UserError(
                f"--resume {args.resume}: the run was made with {_flag_text(p, dest, value)}; "
                f"{_flag_text(p, dest, getattr(args, dest))} would change "
                f"what it computes — drop the flag to continue the run as it was, or start a new "
                f"run (without --resume)"
            )


# ----------------------------------------------------------------------------- entry point


def main(argv=None) -> dict:
    """Train as the command line would and return the metrics (the CLI itself is `cli`)."""
    return train(parse_config(argv))


def _resume_hint(interrupt: KeyboardInterrupt) -> str:
    """The exact command that continues the interrupted run (its settings come from the folder)."""
    out = getattr(interrupt, "out", None)  # a RunInterrupted names its run's folder
    if out is None or not (out / SETTINGS_FILE).is_file():
        return ""
    return f"continue it with:\n  {prog_name('fastser.train')} --resume {shlex.quote(str(out))}"


def cli(argv=None) -> int:
    """`fastser-train` / `python -m fastser.train`: exit 0, or 2 with one line naming a bad input.
    The command owns its process, so it also keeps freed memory for reuse (fastser.memory)."""
    retain_freed_memory()
    return run_cli(main, "fastser.train", argv, interrupted_hint=_resume_hint)


if __name__ == "__main__":
    sys.exit(cli())
