"""The training form, generated from `TrainConfig` and `DataConfig` like the CLI's flags.

Each dataclass field becomes one input (choices -> a select, booleans -> a checkbox,
numbers and text -> a text box, so that a bad value reaches `resolve_settings` and comes
back as the same CONFIG_INVALID_SETTING message the CLI prints). A new field shows up in
the CLI and here at once. Fields the UI itself decides (the output folder, resume, the
progress bar) are not on the form.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from backpropagate.config import TrainConfig, resolve_settings
from backpropagate.data.config import DataConfig
from backpropagate.errors import ConfigError
from backpropagate.settings import invalid

# Set by the UI itself: runs/<name> is the output folder, Resume is a button, no progress bar.
UI_MANAGED = ("output_dir", "resume", "progress")


@dataclass(frozen=True)
class Field:
    """One form input."""

    name: str
    kind: str  # "select", "checkbox", "int", "float" or "text"
    help: str
    group: str
    default: Any
    choices: tuple[str, ...] = ()
    placeholder: str = ""


def _kind(annotation: Any, choices: tuple[str, ...] | None) -> str:
    if choices:
        return "select"
    if annotation is bool:
        return "checkbox"
    args = set(typing.get_args(annotation)) - {type(None)} or {annotation}
    if int in args and float not in args:
        return "int"
    return "float" if float in args else "text"


def form_fields(model: str) -> list[Field]:
    """Every setting of `TrainConfig` then `DataConfig` (shared names once), placeholders from `model`'s preset."""
    resolved = _resolved_defaults(model)
    fields: list[Field] = []
    seen = set(UI_MANAGED)
    for cls, panel in ((TrainConfig, "Training"), (DataConfig, "Data")):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            choices = f.metadata.get("choices")
            default = None if f.default is dataclasses.MISSING else f.default
            fields.append(
                Field(
                    name=f.name,
                    kind=_kind(hints[f.name], choices),
                    help=f.metadata.get("help", ""),
                    group=f.metadata.get("group") or panel,
                    default=default,
                    choices=tuple(choices or ()),
                    placeholder=_placeholder(resolved.get(f.name)) if default is None else "",
                )
            )
    return fields


def _placeholder(value: Any) -> str:
    """What an unset field will be: the preset's value, or "unset" (the run decides, e.g. from the data)."""
    return "unset" if value is None else str(value)


def _resolved_defaults(model: str) -> dict[str, Any]:
    """What `resolve_settings` fills in for `model` when nothing is given (the preset's values)."""
    try:
        settings = resolve_settings(model, {})
    except ConfigError:
        return {}
    return {**dataclasses.asdict(settings.data), **dataclasses.asdict(settings.train)}


def parse_options(form: dict[str, str], fields: list[Field]) -> dict[str, Any]:
    """The settings the form sets (values that differ from the field's default), typed.

    Raises:
        ConfigError: CONFIG_INVALID_SETTING naming the field, for a number that does not parse.
    """
    options: dict[str, Any] = {}
    for f in fields:
        if f.kind == "checkbox":
            value: Any = form.get(f.name) == "on"
        else:
            text = (form.get(f.name) or "").strip()
            if not text:
                continue  # left empty: the default (or the preset's value)
            value = _number(f, text) if f.kind in ("int", "float") else text
        if value != f.default:
            options[f.name] = value
    return options


def _number(f: Field, text: str) -> int | float:
    try:
        return int(text) if f.kind == "int" else float(text)
    except ValueError:
        raise invalid(f.name, text, "an integer" if f.kind == "int" else "a number") from None


def check_options(model: str, options: dict[str, Any]) -> None:
    """Resolves `options` for `model` exactly as `backprop train` will, refusing what it would refuse."""
    resolve_settings(model, options)
