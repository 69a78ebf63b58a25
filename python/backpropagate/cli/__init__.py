"""The `backprop` command: one typer app, one module per command group.

`main()` owns the process boundary: it sets up logging and redaction of stdout and
stderr, turns every `BackpropagateError` into `[CODE]: message` plus a hint on stderr,
and exits with the family's status (see `errors.FAMILY_EXIT`).
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn, TextIO, cast

import typer

from backpropagate import log
from backpropagate.errors import CATALOG, EXIT_INTERRUPTED, EXIT_USAGE, BackpropagateError, ConfigError
from backpropagate.log import redact, redaction_enabled

app = typer.Typer(
    name="backprop",
    help="Fine-tune a language model on your own data, then run it locally.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# The global --log-format of this invocation: coded errors are printed in the same form.
_log_format = "text"
# The arguments of this invocation (`backprop train --gpus N` starts N processes with them).
_argv: list[str] = []


@app.callback()
def _global_options(
    log_format: str = typer.Option("text", "--log-format", help="Log line format: text or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, and no redaction of secrets."),
) -> None:
    global _log_format
    if log_format not in ("text", "json"):
        raise typer.BadParameter("must be 'text' or 'json'", param_hint="--log-format")
    _log_format = log_format
    # main() already left stderr unwrapped when verbose output was asked for.
    log.configure(log_format=log_format, verbose=verbose)


def _register_commands() -> None:
    # Imported here so each command module can import `app` from this one.
    from backpropagate.cli import (  # noqa: F401
        estimate_cmd,
        eval_cmd,
        export_cmd,
        generate_cmd,
        info_cmd,
        multi_run_cmd,
        push_cmd,
        runs_cmd,
        train_cmd,
        ui_cmd,
        validate_cmd,
    )


def print_error(err: BackpropagateError) -> None:
    """Writes the user-facing form of `err` to stderr (one JSON object under `--log-format json`)."""
    if _log_format == "json":
        sys.stderr.write(json.dumps(err.to_dict()) + "\n")
        return
    retry = " (retryable)" if err.retryable else ""
    sys.stderr.write(f"{err}\nhint: {err.hint}{retry}\n")


def fail_as_json(err: BackpropagateError, **fields: Any) -> NoReturn:
    """Ends a command run with `--json`: prints `{...fields, "ok": false, "error": {...}}` on stdout."""
    typer.echo(json.dumps({**fields, "ok": False, "error": err.to_dict()}))
    raise typer.Exit(err.exit_status) from err


def invocation() -> list[str]:
    """The arguments `backprop` was called with (after the program name)."""
    return list(_argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `backprop` script."""
    global _argv
    _argv = list(argv if argv is not None else sys.argv[1:])
    verbose = any(a in ("-v", "--verbose") for a in (argv if argv is not None else sys.argv[1:]))
    if redaction_enabled(verbose):
        # Both streams: a secret in a path the user typed (--output) is echoed on stdout too.
        sys.stderr = cast(TextIO, log.RedactingStream(sys.stderr))
        sys.stdout = cast(TextIO, log.RedactingStream(sys.stdout))
    _register_commands()
    try:
        status = app(args=argv, standalone_mode=False)
    except BackpropagateError as err:
        print_error(err)
        sys.exit(err.exit_status)
    except (KeyboardInterrupt, typer.Abort):
        status = EXIT_INTERRUPTED
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", None) or getattr(done, "code", 0) or 0)
    except Exception as exc:
        # Errors of the CLI framework carry their exit status; 2 is a mistyped flag or value,
        # a setting error like any other, so it gets the same code.
        exit_code = getattr(exc, "exit_code", None)
        if not (hasattr(exc, "format_message") and isinstance(exit_code, int)):
            raise
        if exit_code != EXIT_USAGE:
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exit_code)
        usage = ConfigError("CONFIG_INVALID_SETTING", exc.format_message())
        # The command never parsed its options, so a --json on the line is taken at its word.
        if "--json" in (argv if argv is not None else sys.argv[1:]):
            typer.echo(json.dumps({"ok": False, "error": usage.to_dict()}))
        else:
            print_error(usage)
        sys.exit(usage.exit_status)
    # The framework turns Ctrl-C into a returned status instead of an exception.
    if status == EXIT_INTERRUPTED:
        print_error(BackpropagateError("RUNTIME_INTERRUPTED", "interrupted by the user"))
    if isinstance(status, int) and status:
        sys.exit(status)


__all__ = ["CATALOG", "app", "main", "redact"]
