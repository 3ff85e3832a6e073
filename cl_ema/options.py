"""Checking an option's value, in one way for the engine, the plugins and the command line.

Pure Python (no torch, no Hydra), so that the EMA engine and the config schema can both use it.
A failed check raises ``OptionError`` naming the option as its owner calls it (``decay``,
``mem_size``); whoever built the owner from a config prefixes the config key, so the user reads
``ema.decay=1.5: must be a number in [0, 1]`` whatever the plugin's node is called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

INT32_MAX = 2**31 - 1  # sizes and counts: torch indexes with int64, but no sane run needs more


class OptionError(ValueError):
    """``name=value: expected``. ``name`` is the option's own name; ``renamed`` puts a key before it."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"{name}={value!r}: {expected}")
        self.name, self.value, self.expected = name, value, expected

    def renamed(self, prefix: str) -> OptionError:
        """The same error for the option as a config key: ``<prefix>.<name>``."""
        return OptionError(f"{prefix}.{self.name}" if prefix else self.name, self.value, self.expected)


class Choice(str, Enum):
    """An option with a fixed set of values; compares equal to its value, prints as it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choice(name: str, value: Any, kind: type[Choice]) -> Any:
    """``value`` as a member of ``kind`` (given as the member or its value)."""
    try:
        return kind(value)
    except ValueError:
        raise OptionError(name, value, "must be one of " + ", ".join(m.value for m in kind)) from None


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, value, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(name, value, "must be a finite number")


def at_least(name: str, value: Any, low: float, high: float = INT32_MAX) -> None:
    """``low <= value <= high``, a finite number."""
    _number(name, value)
    if value < low:
        raise OptionError(name, value, f"must be >= {low:g}")
    if value > high:
        raise OptionError(name, value, f"must be <= {high:,}" if isinstance(high, int) else f"must be <= {high:g}")


def count(name: str, value: Any, low: int = 1, high: int = INT32_MAX) -> None:
    """An integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, value, "must be an integer")
    at_least(name, value, low, high)


def positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise OptionError(name, value, "must be a finite number > 0")


def probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:  # NaN fails too
        raise OptionError(name, value, "must be a number in [0, 1]")


def fraction(name: str, value: Any) -> float:
    """A number in [0, 1] as a float (``-0.0`` becomes ``0.0``): a decay, an interpolation weight."""
    probability(name, value)
    return float(value) + 0.0


def fractions(name: str, values: Any, distinct: bool = True) -> list[float]:
    """A non-empty list of numbers in [0, 1], distinct unless told otherwise (each names a track)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise OptionError(name, values, "give a non-empty list of numbers in [0, 1]")
    checked = [fraction(name, v) for v in values]
    if distinct and len(set(checked)) != len(checked):
        raise OptionError(name, list(values), "the values must be distinct")
    return checked


def positives(name: str, values: Any) -> list[float]:
    """A non-empty list of distinct finite numbers > 0."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise OptionError(name, values, "give a non-empty list of numbers > 0")
    for value in values:
        positive(name, value)
    if len(set(values)) != len(values):
        raise OptionError(name, list(values), "the values must be distinct")
    return [float(v) for v in values]


def choices(name: str, values: Any, kind: type[Choice]) -> list[Any]:
    """A non-empty list of distinct members of ``kind``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise OptionError(name, values, "give a non-empty list of " + ", ".join(m.value for m in kind))
    members = [choice(name, v, kind) for v in values]
    if len(set(members)) != len(members):
        raise OptionError(name, [str(m) for m in members], "the values must be distinct")
    return members
