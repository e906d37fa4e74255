"""Log lines of a run, printed beside its progress bar without breaking it."""

from __future__ import annotations

import sys


def log(msg: str, quiet_bar: bool) -> None:
    """One line: printed plainly with --no-progress, else through tqdm so the bar stays below it."""
    if quiet_bar:
        print(msg, flush=True)
    else:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
