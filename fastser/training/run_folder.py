"""A run's folder: --out, the resumed run's folder, or runs/<timestamp>/, decided and made once;
--resume A --out B continues a copy of A in B."""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
from pathlib import Path

import torch.distributed as dist

from fastser.checkpoints import SETTINGS_FILE
from fastser.config import TrainConfig
from fastser.errors import UserError


def with_out_dir(config: TrainConfig, info) -> TrainConfig:
    """The config with its run folder decided (and made): --out, the resumed run's folder, or
    runs/<timestamp>/; --resume A --out B continues A's copy in B."""
    out, resume = config.run.out, config.run.resume
    if resume is not None:
        res = Path(resume)
        folder = res if res.is_dir() else res.parent
        out = out or str(folder)
        if Path(out).resolve() != folder.resolve():
            if info.is_main:
                fork_run(folder, Path(out))
            info.barrier()  # under torchrun the other ranks read the copy
            resume = out  # continued in the new folder; the original stays as it was
    elif out is not None and holds_run(Path(out)):
        raise UserError(
            f"--out {out}: already holds a run; continue it with --resume {shlex.quote(out)}, "
            f"or give a new folder to --out"
        )
    if out is None:
        stamp = [dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
        if info.enabled:
            dist.broadcast_object_list(stamp, src=0)  # one folder for all ranks
        out = str(Path("runs") / stamp[0])
    if info.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
    return config.replace(out=out, resume=resume)


def holds_run(folder: Path) -> bool:
    """A folder a run has written to (its settings, a checkpoint or its metrics, or a part's)."""
    return folder.is_dir() and any(
        next(folder.rglob(name), None) is not None for name in (SETTINGS_FILE, "checkpoint.pt", "metrics.json")
    )


def fork_run(source: Path, target: Path) -> None:
    """--resume A --out B: B starts as a copy of A's checkpoints and settings (A is left untouched),
    so the continued run and everything it writes, checkpoint.pt included, are in B."""
    if target.exists() and any(target.rglob("checkpoint.pt")):
        raise UserError(
            f"--out {target}: already holds a run's checkpoint; give an empty or new folder to continue {source} in"
        )
    copied = 0
    for name in ("checkpoint.pt", SETTINGS_FILE):
        for path in sorted(source.rglob(name)):
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            copied += 1
    if not copied:
        raise FileNotFoundError(f"--resume: no checkpoint in {source}")
