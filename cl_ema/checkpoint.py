"""Checkpoint files: writing, reading and validating them.

``checkpoints/last.pt`` (written atomically after every task) holds what ``Run.state_dict()``
(``cl_ema.assembly``) gives: everything that decides what happens next. It contains only tensors
and plain Python values, so it loads with ``torch.load(weights_only=True)``: a checkpoint cannot
run code. It is validated before anything is restored, and a checkpoint that does not fit is one
``UserError`` naming the file, with nothing written.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_ema.config import result_keys
from cl_ema.errors import UserError, first_line
from cl_ema.files import atomic_write

FORMAT = "cl_ema-checkpoint-3"
# field → type every checkpoint has (checked before anything is restored)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "config": dict,
    "world_size": int,
    "model": dict,
    "optimizer": dict,
    "plugins": dict,
    "continual": dict,
    "loggers": dict,
    "rng": dict,
    "results": dict,
    "train_iterations": int,
}


def rng_state(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """States of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state | (extra or {})


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    """Read and validate a checkpoint; a missing, truncated, foreign or ill-formed file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with code in it, not a torch file, …
        raise UserError(
            f"{path}: not a readable cl_ema checkpoint (truncated or foreign file: {first_line(err)})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a cl_ema checkpoint of this version (format {found!r}, expected {FORMAT})")
    for name, kind in _FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise UserError(f"{path}: field {name!r} is missing or not a {getattr(kind, '__name__', kind)}")
    results = state["results"]
    done, total = results.get("tasks_done"), results.get("num_tasks")
    if not (_count(done) and _count(total) and 1 <= done <= total):
        raise UserError(f"{path}: impossible task counts (tasks_done={done!r} of num_tasks={total!r})")
    if state["train_iterations"] < 0 or state["world_size"] < 1:
        raise UserError(f"{path}: impossible counters (train_iterations={state['train_iterations']})")
    return state


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_optimizer_state(saved: Any, fresh: dict[str, Any]) -> None:
    """The saved optimizer state has the groups of the fresh one, each hyperparameter of the same kind
    (a hand-edited ``lr='abc'`` would otherwise fail only at the first step)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(fresh["param_groups"]):
        raise UserError(
            f"the optimizer state has {len(groups or [])} parameter groups, this run's optimizer has "
            f"{len(fresh['param_groups'])}"
        )
    for group, expected in zip(groups, fresh["param_groups"]):
        for key, value in expected.items():
            got = group.get(key) if isinstance(group, dict) else None
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and not (isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got)):
                raise UserError(f"the optimizer's {key}={got!r} is not a finite number")
            if isinstance(value, bool) and not isinstance(got, bool):
                raise UserError(f"the optimizer's {key}={got!r} is not true or false")


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ, leaving out those that never change results; values compare by value
    (``1`` is ``1.0``, ``[1, 2]`` is ``[1.0, 2.0]``)."""
    a, b = result_keys(saved), result_keys(current)
    return [
        f"{k}: {a.get(k, 'absent')} in the checkpoint, {b.get(k, 'absent')} now"
        for k in sorted(set(a) | set(b))
        if _value(a.get(k)) != _value(b.get(k))
    ]


def _value(text: str | None) -> Any:
    return None if text is None else json.loads(text)
