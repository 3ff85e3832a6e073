"""Accuracy matrices of every track, the metrics derived from them, and the run's result files.

``results.json`` (written atomically after every task) holds a top-level ``"tracks"`` object::

    {"status": "running" | "completed" | "failed", "tasks_done": 3, ...,
     "tracks": {"live": {"acc_matrix": T×T, "avg_acc": …, "avg_forgetting": …, "bwt": …, …,
                         "task_il": {"acc_matrix": …, "avg_acc": …, …}},
                "ema_0.999": {…}}}

Rows not trained yet are ``null``; metrics are those after the last finished task.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cl_ema.metrics import METRICS, metrics_after, task_forgetting

if TYPE_CHECKING:  # the report reads results without importing torch or Avalanche
    from cl_ema.evaluation import Accuracies

SETTINGS = ("class_il", "task_il")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Results:
    """Accuracy matrices (class-IL and task-IL) per track, filled row by row."""

    def __init__(self, tracks: list[str], num_tasks: int, meta: dict[str, Any]) -> None:
        self.tracks = tracks
        self.num_tasks = num_tasks
        self.meta = meta
        self.matrices = {(t, s): np.full((num_tasks, num_tasks), np.nan) for t in tracks for s in SETTINGS}
        self.baseline: dict[str, list[float]] = {}  # setting → accuracies of the untrained model
        self.tasks_done = 0
        self.status = "running"
        self.continual: dict[str, dict[str, Any]] = {}  # track → stability metrics, when measured

    def record(self, track: str, task: int, accuracies: Accuracies) -> None:
        self.matrices[track, "class_il"][task] = accuracies.class_il
        self.matrices[track, "task_il"][task] = accuracies.task_il

    def record_baseline(self, accuracies: Accuracies) -> None:
        self.baseline = {"class_il": accuracies.class_il, "task_il": accuracies.task_il}

    def row(self, track: str, task: int, setting: str = "class_il") -> list[float]:
        return self.matrices[track, setting][task].tolist()

    def metrics(self, track: str, task: int, setting: str = "class_il") -> dict[str, float | None]:
        return metrics_after(self.matrices[track, setting], task, self.baseline.get(setting))

    def forgetting(self, track: str, task: int, setting: str = "class_il") -> list[float]:
        return task_forgetting(self.matrices[track, setting], task)

    def to_dict(self) -> dict[str, Any]:
        last = self.tasks_done - 1
        tracks: dict[str, Any] = {}
        for track in self.tracks:
            entry: dict[str, Any] = {}
            for setting in SETTINGS:
                values: dict[str, Any] = {"acc_matrix": _nan_to_none(self.matrices[track, setting])}
                if last >= 0:
                    values.update(self.metrics(track, last, setting))
                    values["per_task_forgetting"] = self.forgetting(track, last, setting)
                else:
                    values.update(dict.fromkeys(METRICS))
                if setting == "class_il":
                    entry.update(values)
                else:
                    entry[setting] = values
            if track in self.continual:
                entry["continual"] = self.continual[track]
            tracks[track] = entry
        return {
            **self.meta,
            "status": self.status,
            "tasks_done": self.tasks_done,
            "num_tasks": self.num_tasks,
            "baseline": self.baseline,
            "tracks": tracks,
        }

    def load(self, saved: dict[str, Any]) -> None:
        """Continue from ``to_dict()`` output (of a run with the same tracks and tasks)."""
        if set(saved["tracks"]) != set(self.tracks) or saved["num_tasks"] != self.num_tasks:
            raise ValueError(f"tracks {sorted(saved['tracks'])} / {saved['num_tasks']} tasks do not match this run")
        for track, entry in saved["tracks"].items():
            for setting in SETTINGS:
                values = entry["acc_matrix"] if setting == "class_il" else entry[setting]["acc_matrix"]
                self.matrices[track, setting] = np.array(values, dtype=float)  # None → nan
        self.baseline = saved["baseline"]
        self.tasks_done = saved["tasks_done"]
        for key in ("steps_per_task", "elapsed_s"):
            self.meta[key] = saved[key]

    def save(self, out_dir: Path) -> None:
        """results.json, and one CSV per track and setting under matrices/."""
        atomic_write(out_dir / "results.json", json.dumps(self.to_dict(), indent=2) + "\n")
        for (track, setting), matrix in self.matrices.items():
            atomic_write(out_dir / "matrices" / f"{track}.{setting}.csv", matrix_csv(matrix))


def matrix_csv(matrix: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trained_through"] + [f"task_{j + 1}" for j in range(matrix.shape[1])])
    for i, row in enumerate(matrix):
        writer.writerow([f"task_{i + 1}"] + ["" if np.isnan(v) else f"{v:.6f}" for v in row])
    return buffer.getvalue()


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]
