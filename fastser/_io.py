"""Atomic writes: a temp file in the same folder, then a rename, so readers see the old file or the
whole new one — never half of one (checkpoints, the feature cache, a run's settings, the synthetic
corpus)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes the whole file at the temporary path `tmp`; then it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        write(tmp)
        os.replace(tmp, path)  # the old file stays intact until the new one is complete
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
