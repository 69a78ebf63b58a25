"""CLI flags generated from config dataclasses, so each field's doc is its flag's help.

`command_with_options(fn, TrainConfig, ...)` gives `fn` a signature with one typer option
per dataclass field (`lora_r` -> `--lora-r`, booleans as `--x/--no-x`, allowed values in
the help), in addition to the command's own parameters. Typer reads that signature, so
adding a field to the dataclass adds the flag, with no second list to keep in step.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer


def flag_name(field_name: str) -> str:
    """`lora_r` -> `--lora-r`."""
    return "--" + field_name.replace("_", "-")


def dataclass_parameters(
    cls: type, aliases: dict[str, tuple[str, ...]] | None = None, group: str | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter with a `typer.Option` default per field of `cls` (help panel `group` by default)."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" (one of: {', '.join(choices)})"
        annotation = hints[f.name]
        flag = flag_name(f.name)
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}" if annotation is bool else flag]
        decls += list((aliases or {}).get(f.name, ()))
        default = f.default if f.default is not dataclasses.MISSING else None
        option = typer.Option(
            default, *decls, help=help_text, rich_help_panel=f.metadata.get("group") or group or "Training"
        )
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def command_with_options(
    fn: Callable[..., Any],
    *config_classes: type,
    aliases: dict[str, tuple[str, ...]] | None = None,
    groups: dict[type, str] | None = None,
) -> Callable[..., Any]:
    """Appends every config field as a keyword option to `fn`'s signature (for typer).

    A field name that two classes share becomes one flag (the first class's).
    """
    own = inspect.signature(fn, eval_str=True)
    # The function takes the config fields through its **kwargs; typer sees them as named options.
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    seen = {p.name for p in params}
    for cls in config_classes:
        for p in dataclass_parameters(cls, aliases, (groups or {}).get(cls)):
            if p.name not in seen:
                params.append(p)
                seen.add(p.name)
    fn.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def given_options(values: dict[str, Any], *config_classes: type) -> dict[str, Any]:
    """The options of `values` that differ from their field's default, i.e. what the user set."""
    defaults = {}
    for cls in reversed(config_classes):
        defaults.update({f.name: f.default for f in dataclasses.fields(cls)})
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}
