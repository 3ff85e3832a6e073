"""Config nodes with a ``_target_`` → objects, each value checked against the code that takes it.

``build(node, key, **context)`` instantiates ``node`` with Hydra. Before that, every key of the
node is checked against the target's signature: it must be a parameter, of the annotated type,
and finite if it is a float. *Context* values (the data spec, the run directory, the seed, …)
are passed to the targets whose signature names them, so a model asks for ``spec`` and a logger
for ``run`` without the config repeating them. A problem is one ``UserError`` naming the key,
e.g. ``model.hidden='abc': must be int``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from cl_ema.errors import UserError, first_line
from cl_ema.options import OptionError

_RESERVED = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def build(node: DictConfig | Mapping, key: str, **context: Any) -> Any:
    """Instantiate ``node`` (a config with ``_target_``) named ``key`` in the config."""
    if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
        raise UserError(f"{key}: needs a _target_ (the class or function it builds), got {node!r}")
    for name in node:
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, name):
            raise UserError(f"{key}.{name}: needs a value (set {key}.{name}=…)")
    target = _locate(node["_target_"], key)
    parameters, hints = _signature(target)
    kwargs = {k: node[k] for k in node if k not in _RESERVED}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name, value in kwargs.items():
        if name not in parameters and not takes_any:
            accepted = ", ".join(n for n, p in parameters.items() if p.kind is not p.VAR_POSITIONAL) or "nothing"
            raise UserError(f"{key}.{name}: {_name(target)} takes no argument {name!r} (it takes {accepted})")
        _check_value(f"{key}.{name}", _plain(value), hints.get(name, Any))
    passed = {name: value for name, value in context.items() if name in parameters and name not in kwargs}
    partial = bool(node.get("_partial_", False))
    required = [
        n for n, p in parameters.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for name in [] if partial else required:
        if name not in kwargs and name not in passed:
            raise UserError(f"{key}: {_name(target)} needs {name!r} (set {key}.{name})")
    try:  # the config's arguments, converted to plain objects; context objects are passed as they are
        factory = instantiate(node, _partial_=True, _convert_="object")
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise
    if partial:
        return functools.partial(factory, **passed) if passed else factory
    try:
        return factory(**passed)
    except OptionError as err:  # the target's own range checks, naming its parameter
        raise UserError(str(err.renamed(key))) from None
    except (ValueError, OverflowError) as err:  # the range checks of others' code (torch.optim's)
        raise UserError(f"{key}: {err}") from err


def _locate(path: Any, key: str) -> Callable:
    try:
        target = get_object(str(path))
    except Exception as err:  # noqa: BLE001 - import errors of any kind
        detail = first_line(err)
        raise UserError(f"{key}._target_={path}: cannot import it ({detail})") from None
    if not callable(target):
        raise UserError(f"{key}._target_={path}: not a class or function")
    return target


def _signature(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    # a dataclass's generated __init__ has the fields' annotations; get_type_hints resolves them on the class
    function = target if dataclasses.is_dataclass(target) else target.__init__ if inspect.isclass(target) else target
    try:
        parameters = dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return {}, {}
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        hints = {}
    return parameters, hints


def _name(target: Callable) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_value(key: str, value: Any, annotation: Any) -> None:
    for number in _floats(value):
        if not math.isfinite(number):
            raise UserError(f"{key}={value!r}: must be a finite number")
    if not _matches(value, annotation):
        raise UserError(f"{key}={value!r}: must be {_describe(annotation)}")


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _floats(item)]
    return []


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a config value fits an annotation (unknown annotations accept anything)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or isinstance(value, annotation)
    if inspect.isclass(annotation) and dataclasses.is_dataclass(annotation):
        return isinstance(value, (Mapping, annotation))
    if origin in (list, tuple, Sequence, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return all(_matches(v, inner) for v in value)
    if origin in (dict, Mapping) or annotation is dict:
        return isinstance(value, Mapping)
    if inspect.isclass(annotation) and issubclass(annotation, os.PathLike):
        return isinstance(value, (str, os.PathLike))
    if inspect.isclass(annotation):  # a tensor, a module: no config value is one
        return isinstance(value, annotation)
    return True  # annotations this check does not understand


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation is None or annotation is type(None):
        return "null"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))
