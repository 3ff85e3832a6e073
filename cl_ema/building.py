"""Config nodes with a ``_target_`` → checked specs → objects: checked once, built once.

``check_node(node, key, given)`` checks a node against the code it reaches, by the one validator of
``cl_ema.options`` (pydantic): every key must be a typed parameter of the target and fit its type and
range. A target that is an *options class* (a class with ``builds``, the dotted path of the code it
configures, as every plugin of cl_ema has in ``cl_ema.plugins.options``) is checked by constructing it,
without importing that code: a plugin's bad value is refused before torch is loaded. Any other target
(a model, a dataset, a ``torch.optim`` class, a plugin of the user's) is checked against its signature.
A problem is one ``UserError`` naming the key as the user typed it: ``model.hidden='abc': Input should be
a valid integer``.

The ``Spec`` that comes back builds the object once: ``spec.build(**context)`` passes the context values
(the data spec, the run directory, the seed, …) that the target's signature names, so a model asks for
``spec`` and a logger for ``run`` without the config repeating them.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from cl_ema.errors import UserError, first_line
from cl_ema.options import OptionError, arguments, fields_of

_RESERVED = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


@dataclass
class Spec:
    """A checked config node: what it builds, with which arguments (converted), ready to build once."""

    key: str
    target: Callable[..., Any]
    arguments: dict[str, Any]
    options: Any = None  # the options object, when the target is an options class

    def recorded(self) -> dict[str, Any]:
        """The node's values as the run uses them, for the config a run records (JSON values only)."""
        values = fields_of(self.options) if self.options is not None else self.arguments
        return {k: v for k, v in values.items() if _is_json(v)}

    def build(self, **context: Any) -> Any:
        """The object, given the ``context`` values its target's signature asks for."""
        target = self.target
        if self.options is not None:
            target = _locate(type(self.options).builds, f"{self.key} (built by {type(self.options).__name__})")
        parameters = _parameters(target)
        passed = {name: value for name, value in context.items() if name in parameters}
        args = [self.options] if self.options is not None else []
        try:
            return target(*args, **self.arguments, **passed)
        except OptionError as err:  # an option only the run can check (a horizon in tasks needs the steps)
            raise UserError(str(err.renamed(self.key))) from None
        except (ValueError, OverflowError) as err:  # the range checks of others' code (torch.optim's)
            raise UserError(f"{self.key}: {first_line(err)}") from err


def check_node(node: DictConfig | Mapping, key: str, given: Iterable[str] = ()) -> Spec:
    """Check ``node`` (a config with ``_target_``) named ``key``; ``given``: the context its build will pass."""
    if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
        raise UserError(f"{key}: needs a _target_ (the class or function it builds), got {node!r}")
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(values, dict)
    target = _locate(values["_target_"], key)
    kwargs = {str(k): v for k, v in values.items() if k not in _RESERVED}
    try:
        if isinstance(getattr(target, "builds", None), str):  # an options class: constructing it checks it
            return Spec(key, target, {}, options=target(**kwargs))
        checked = arguments(target, kwargs, given=tuple(given))
    except OptionError as err:
        raise UserError(str(err.renamed(key))) from None
    return Spec(key, target, {k: v for k, v in checked.items() if k in kwargs})


def _locate(path: Any, key: str) -> Callable:
    try:
        target = get_object(str(path))
    except Exception as err:  # noqa: BLE001 - import errors of any kind
        raise UserError(f"{key}._target_={path}: cannot import it ({first_line(err)})") from None
    if not callable(target):
        raise UserError(f"{key}._target_={path}: not a class or function")
    return target


def _parameters(target: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return {}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
