"""Runs the `backprop` CLI in-process and captures what a user would see."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """Calls `backpropagate.cli.main(args)`, returning exit status, stdout and stderr."""
    from backpropagate.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stderr
    sys.stderr = err
    status = 0
    try:
        with redirect_stdout(out):
            main(list(args))
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.stderr = saved
    return CliResult(status, out.getvalue(), err.getvalue())
