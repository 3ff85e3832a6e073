"""Checkpoints after each task, and resuming a run from one.

``checkpoints/last.pt`` (written atomically) holds everything that decides what happens next:
model, optimizer, EMA shadows and counters, replay memory, every random generator's state, the
accuracy matrices so far and the W&B run id. It contains only tensors and plain Python values,
so it loads with ``torch.load(weights_only=True)``: a checkpoint cannot run code.

Resuming restores all of it into a freshly built run, so the rest of the run is the same,
bit for bit on CPU, as if it had never stopped.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_ema.config import LAST_CHECKPOINT
from cl_ema.errors import UserError
from cl_ema.results import atomic_write

FORMAT = "cl_ema-checkpoint-1"
# keys that may differ between a run and its resumption
_MAY_DIFFER = ("resume", "logger", "device", "data.root", "data.download", "checkpoint", "deterministic")


def rng_state(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """States of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }  # fmt: skip
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
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with code in it, not a torch file, …
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable cl_ema checkpoint (truncated or foreign file: {first[:200]})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a cl_ema checkpoint (expected format {FORMAT})")
    return state


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ, ignoring those that may change on resume."""
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in _MAY_DIFFER:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{dotted}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{dotted}: {a!r} in the checkpoint, {b!r} now")
    return out


def resume_from(resume: str, out_dir: Path, config: dict) -> tuple[Path, dict[str, Any]]:
    """The run directory to continue and its checkpoint: ``resume=<run dir>``, or ``resume=true``
    for the newest run of the same configuration next to (or at) this run's directory."""
    if resume.lower() not in ("true", "latest"):
        run_dir = Path(resume).expanduser()  # config.check() made sure it holds a checkpoint
        state = load(run_dir / LAST_CHECKPOINT)
        differences = config_differences(state["config"], config)
        if differences:
            raise UserError(
                f"{run_dir / LAST_CHECKPOINT} was written by a different configuration ({'; '.join(differences[:3])})"
            )
        return run_dir, state
    candidates = sorted(
        (p for p in [out_dir, *out_dir.parent.glob("*")] if (p / LAST_CHECKPOINT).is_file()),
        key=lambda p: (p / LAST_CHECKPOINT).stat().st_mtime,
        reverse=True,
    )
    for run_dir in candidates:
        state = load(run_dir / LAST_CHECKPOINT)
        if not config_differences(state["config"], config):
            return run_dir, state
    raise UserError(f"resume=true: no checkpoint of this configuration in {out_dir.parent} (give resume=<run dir>)")


def restore_model(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)  # copies in place: the EMA engine's views stay valid
    except RuntimeError as err:
        raise UserError(f"{path}: the model in it does not fit this configuration") from err
