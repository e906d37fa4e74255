"""Where a run's text goes, the same with or without the progress bar: progress and log lines on
stderr (the bar redrawn below them), results on stdout, so `fastser-train ... > result.txt` keeps
the results and a terminal still shows the progress."""

from __future__ import annotations

import sys


def log(msg: str, quiet_bar: bool) -> None:
    """One progress or log line on stderr: printed plainly with --no-progress, else through tqdm so
    the bar stays below it."""
    if quiet_bar:
        print(msg, file=sys.stderr, flush=True)
    else:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)


def result(msg: str) -> None:
    """A result line (the run's scores) on stdout."""
    print(msg, flush=True)


def progress_bar(total: int, desc: str, shown: bool):
    """A transient tqdm bar on stderr (None when not shown: --no-progress, or not the main rank)."""
    if not shown:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
