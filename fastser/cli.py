"""The one error path of every fastser command (`python -m fastser.X` and the installed `fastser-X`).

A bad input — a missing or malformed corpus, file or checkpoint, an unusable device, a bad
argument value — ends the command with one line on stderr naming the problem and exit status 2;
success is exit status 0; Ctrl-C prints one line (and how to continue, where there is a way) and
exits 130. Programming errors still show their traceback: they are bugs to report, not input to fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from fastser.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' one error line: a bad flag or value prints
    "<prog>: error: <what>; --help lists the options" and exits 2, without argparse's usage block
    (a screen of flags that buries the one line that matters)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; --help lists the options\n")


def input_errors() -> tuple:
    """The exception types that mean "bad input" (imported lazily: the corpora pull in soundfile)."""
    from fastser.audio import AudioError
    from fastser.data import CorpusError

    return (
        UserError,
        CorpusError,
        AudioError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


def prog_name(module: str) -> str:
    """What the user typed: `fastser-train` for the installed script, `python -m fastser.train` for -m."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name in ("-m", "-c"):
        return f"python -m {module}"
    return name


def run_cli(
    main: Callable[[Optional[Sequence[str]]], object],
    module: str,
    argv: Optional[Sequence[str]] = None,
    interrupted_hint: Callable[[KeyboardInterrupt], str] = lambda interrupt: "",
) -> int:
    """Run `main(argv)` behind the common error path and return the process exit status;
    `interrupted_hint(interrupt)`: what to add to the line Ctrl-C prints (e.g. how to continue)."""
    prog = prog_name(module)
    errors = input_errors()
    try:
        result = main(argv)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as interrupt:
        hint = interrupted_hint(interrupt)
        print(f"{prog}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except errors as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
