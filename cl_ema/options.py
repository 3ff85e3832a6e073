"""Option types: each option's type and range declared once, as an annotation, and checked by pydantic.

Pure Python (pydantic; no torch, no Hydra), so the config schema, the plugins' options and the
EMA engine can all use it, and a bad value is refused before torch is imported::

    @options
    class ReplayOptions:
        mem_size: Count = 200          # an integer in [1, 2³¹ − 1]
        decay: Fraction = 0.999        # a finite number in [0, 1]

An ``@options`` class is a pydantic dataclass: constructing it checks every field (types, ranges,
choices, unknown names) and converts what it can (``1`` → ``1.0``, ``"task"`` → ``Scope.task``).
``check(name, value, kind)`` checks one value (the engine's arguments). A failure is an
``OptionError`` naming the option as its owner calls it (``decay``, ``merges[0]``); whoever built
the owner from a config puts the key before it, so the user reads
``ema.decay=1.5: Input should be less than or equal to 1`` whatever the plugin's node is called.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from functools import cache
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import AfterValidator, ConfigDict, Field, Strict, StrictBool, TypeAdapter, ValidationError
from typing_extensions import dataclass_transform

INT32_MAX = 2**31 - 1  # sizes and counts: torch indexes with int64, but no sane run needs more

# how every options class and config section is checked: no unknown names, no NaN or infinity
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("the values must be distinct (each names a track)")
    return values


# the types of options: numbers are never bools or strings (``Strict``), and lie in their range
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]  # a decay, a probability, an interpolation weight
Positive = Annotated[float, Strict(), Field(gt=0)]
Share = Annotated[float, Strict(), Field(gt=0, le=1)]  # a part of a whole that is not nothing
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Count = Annotated[int, Strict(), Field(ge=1, le=INT32_MAX)]
Size = Annotated[int, Strict(), Field(ge=1, le=1 << 24)]  # a batch size
MemorySize = Annotated[int, Strict(), Field(ge=1, le=1 << 28)]  # samples kept in a replay memory
Flag = StrictBool  # true or false, never 1 or "yes"
Fractions = Annotated[list[Fraction], Field(min_length=1), AfterValidator(_distinct)]
Positives = Annotated[list[Positive], Field(min_length=1), AfterValidator(_distinct)]

T = TypeVar("T")


class Choice(str, Enum):
    """An option with a fixed set of values; compares equal to its value, prints as it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def Choices(kind: type[Choice]) -> Any:  # noqa: N802 - a type, spelled like one
    """A non-empty list of distinct members of ``kind``."""
    return Annotated[list[kind], Field(min_length=1), AfterValidator(_distinct)]  # type: ignore[valid-type]


UNSEEN = object()  # a value an error does not know (pydantic reports a tuple's missing item, not the tuple)


class OptionError(ValueError):
    """``name=value: expected``. ``name`` is the option's own name; ``renamed`` puts a key before it."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        super().__init__(f"{name}: {expected}" if value is UNSEEN else f"{name}={value!r}: {expected}")
        self.name, self.value, self.expected = name, value, expected

    def renamed(self, prefix: str) -> OptionError:
        """The same error for the option as a config key: ``<prefix>.<name>``."""
        return OptionError(f"{prefix}.{self.name}" if prefix else self.name, self.value, self.expected)

    @classmethod
    def first(cls, err: ValidationError, prefix: str = "") -> OptionError:
        """The first problem pydantic found, named by where it is (``merges[0]``, ``train.batch_size``)."""
        found = err.errors(include_url=False)[0]
        name = prefix
        for part in found["loc"]:
            if isinstance(part, int):
                name += f"[{part}]"
            elif not _is_type_tag(part):  # a union's member, not a name: ``lr.float``
                name += f"{'.' if name else ''}{part}"
        raised = found.get("ctx", {}).get("error")
        if isinstance(raised, OptionError):  # a rule between options, raised by a __post_init__
            return raised.renamed(name)
        if found["type"] == "missing" and isinstance(found["loc"][-1], int):  # a tuple given too few items
            return cls(name.rpartition("[")[0], UNSEEN, f"must have {found['loc'][-1] + 1} items")
        if found["type"] == "missing":
            return cls(name, "???", "needs a value")
        return cls(name or "value", found.get("input"), found["msg"].removeprefix("Value error, "))


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("float", "int", "str", "bool", "none", "bytes", "enum", "list", "dict", "tuple")


@cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind, config=None if dataclasses.is_dataclass(kind) else STRICT)


def check(name: str, value: Any, kind: Any) -> Any:
    """``value`` as an option of type ``kind`` (an annotation of this module), converted; OptionError if not."""
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as err:
        raise OptionError.first(err, name) from None


@dataclass_transform(field_specifiers=(dataclasses.field, Field))
def options(cls: type[T]) -> type[T]:
    """Make ``cls`` an options class: a dataclass whose construction checks every field (see the module
    docstring), raising ``OptionError`` for the first field that does not fit."""
    checked = pydantic.dataclasses.dataclass(config=STRICT)(cls)
    init = checked.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as err:
            raise OptionError.first(err) from None

    __init__.__doc__ = init.__doc__
    checked.__init__ = __init__  # type: ignore[method-assign]
    return checked  # type: ignore[return-value]  # the same class, made a pydantic dataclass


def fields_of(instance: Any) -> dict[str, Any]:
    """An options object's fields as plain values (choices as strings): what a config records of it."""
    return TypeAdapter(type(instance)).dump_python(instance, mode="json")


def arguments(function: Callable, values: Mapping[str, Any], given: Iterable[str] = ()) -> dict[str, Any]:
    """``values`` checked against the typed parameters of ``function`` (a class: its constructor's), converted,
    with the defaults of those not given; ``given``: parameters the caller supplies (left out). OptionError
    naming the first argument that does not fit, or that ``function`` does not take."""
    adapter, names = _signature(function, tuple(given))
    unknown = sorted(set(values) - set(names))
    if unknown:
        takes = ", ".join(names) or "nothing"
        raise OptionError(unknown[0], values[unknown[0]], f"not an option here (the options are: {takes})")
    try:
        checked = adapter.validate_python(dict(values))
    except ValidationError as err:
        raise OptionError.first(err) from None
    return {name: getattr(checked, name) for name in names}


@cache
def _signature(function: Callable, given: tuple[str, ...]) -> tuple[TypeAdapter, list[str]]:
    """A pydantic model of ``function``'s parameters but ``given`` (and ``*args``, ``**kwargs``), and their names."""
    target = function.__init__ if inspect.isclass(function) and not dataclasses.is_dataclass(function) else function
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name in given or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (_annotation(target, parameter.annotation), default)
    name = getattr(function, "__name__", "options")
    return TypeAdapter(pydantic.create_model(f"{name}_arguments", __config__=STRICT, **fields)), list(fields)


def _annotation(function: Callable, annotation: Any) -> Any:
    """A parameter's annotation as a type (``Any`` where there is none, or where it names what only a type
    checker sees)."""
    if annotation is inspect.Parameter.empty:
        return Any
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, getattr(inspect.unwrap(function), "__globals__", {}))  # noqa: S307 - the code's own text
    except Exception:  # noqa: BLE001 - a name imported for type checking only
        return Any
