"""How a setting is declared once and checked once: default, help, allowed values or range.

`TrainConfig` and `DataConfig` declare each field with `option(...)`; its metadata is the
CLI flag's help (`cli/options.py`), the UI's form, and the only statement of what values
are allowed. `check_fields` enforces it for every caller (API, CLI, presets, `validate`),
so a value the user gave is either accepted as it is or refused naming its range: never
swapped for a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from backpropagate.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A numeric interval; `low_open` / `high_open` exclude the end points."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        """Whether `value` lies in the interval."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """The interval in words, as error messages and help texts state it."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{kind} {'more than' if self.low_open else 'at least'} {_num(self.low)}"
        if self.high is not None:
            return f"{kind} {'less than' if self.high_open else 'at most'} {_num(self.high)}"
        return kind


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def at_least(low: float) -> Range:
    """Integers from `low` up (counts, steps, sizes)."""
    return Range(low=low, integer=True)


def positive() -> Range:
    """Numbers above zero (learning rates, betas, weights)."""
    return Range(low=0, low_open=True)


def non_negative() -> Range:
    """Numbers from zero up (decays, norms, margins)."""
    return Range(low=0)


# Tokens in a packed row: one input and its target at the least.
SEQ_LENGTH = Range(2, 1 << 20, integer=True)


def option(
    default: Any,
    help: str,
    *,
    group: str | None = None,
    choices: tuple[str, ...] | None = None,
    bounds: Range | None = None,
) -> Any:
    """A dataclass field carrying its CLI help text, help panel, and allowed values or range."""
    if bounds is not None:
        help = f"{help} [{bounds.describe()}]"
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "bounds": bounds})


def invalid(name: str, value: Any, expected: str) -> ConfigError:
    """The one form of a refused setting: its name, the value given, what is allowed."""
    return ConfigError("CONFIG_INVALID_SETTING", f"{name}={value!r} is invalid: expected {expected}")


def check_value(name: str, value: Any, bounds: Range) -> None:
    """Refuses `value` unless it is a number (an integer where asked) inside `bounds`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, value, bounds.describe())
    if (bounds.integer and not float(value).is_integer()) or not bounds.contains(value):
        raise invalid(name, value, bounds.describe())


def check_fields(obj: Any) -> None:
    """Refuses the first field of dataclass `obj` outside its declared choices or range (None = unset)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise invalid(f.name, value, "one of " + ", ".join(choices))
        bounds: Range | None = f.metadata.get("bounds")
        if bounds is not None:
            check_value(f.name, value, bounds)
