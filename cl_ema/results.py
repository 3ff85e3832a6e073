"""Accuracy matrices of every track, the metrics derived from them, and the run's result files.

``results.json`` (written atomically after every task) holds a top-level ``"tracks"`` object::

    {"status": "running" | "completed" | "failed" | "interrupted", "tasks_done": 3, ...,
     "tracks": {"live": {"acc_matrix": T×T, "avg_acc": …, "avg_forgetting": …, "bwt": …, …,
                         "task_il": {"acc_matrix": …, "avg_acc": …, …}},
                "ema_0.999": {…}}}

Rows not trained yet are ``null``; metrics are those after the last finished task. With continual
evaluation each track also has ``"stability"`` (``cl_ema.metrics.STABILITY_METRICS``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cl_ema.files import atomic_write
from cl_ema.metrics import METRICS, SETTINGS, metrics_after, task_forgetting

if TYPE_CHECKING:  # the report reads results without importing torch or Avalanche
    from cl_ema.continual_eval import Curve
    from cl_ema.evaluation import Accuracies


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
        self.stability: dict[str, dict[str, Any]] = {}  # track → stability metrics, with continual evaluation

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
                    values.update(dict.fromkeys(m.key for m in METRICS))
                if setting == "class_il":
                    entry.update(values)
                else:
                    entry[setting] = values
            if track in self.stability:
                entry["stability"] = self.stability[track]
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
        if list(saved["tracks"]) != self.tracks or saved["num_tasks"] != self.num_tasks:
            raise ValueError(f"tracks {list(saved['tracks'])} / {saved['num_tasks']} tasks do not match this run")
        for track, entry in saved["tracks"].items():
            for setting in SETTINGS:
                values = entry["acc_matrix"] if setting == "class_il" else entry[setting]["acc_matrix"]
                matrix = np.array(values, dtype=float)  # None → nan
                if matrix.shape != (self.num_tasks, self.num_tasks):
                    raise ValueError(f"{track} {setting} matrix has shape {matrix.shape}")
                self.matrices[track, setting] = matrix
        self.baseline = saved["baseline"]
        self.tasks_done = saved["tasks_done"]
        for key in ("steps_per_task", "train_s", "elapsed_s"):
            self.meta[key] = saved[key]


def save_outputs(results: Results, out_dir: Path, curves: dict[str, Curve] | None = None) -> None:
    """results.json, one CSV per track and setting, the heatmaps, and continual-evaluation curves."""
    from cl_ema.plots import continual_png, heatmaps_png

    atomic_write(out_dir / "results.json", json.dumps(results.to_dict(), indent=2) + "\n")
    for (track, setting), matrix in results.matrices.items():
        atomic_write(out_dir / "matrices" / f"{track}.{setting}.csv", matrix_csv(matrix))
    matrices = {t: results.matrices[t, "class_il"] for t in results.tracks}
    atomic_write(out_dir / "acc_matrix.png", heatmaps_png(matrices, "class-IL accuracy"))
    if curves:
        atomic_write(out_dir / "continual_eval.json", json.dumps({t: c.to_dict() for t, c in curves.items()}) + "\n")
        atomic_write(out_dir / "continual_eval.png", continual_png(curves, "accuracy on each task during training"))


def matrix_csv(matrix: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trained_through"] + [f"task_{j + 1}" for j in range(matrix.shape[1])])
    for i, row in enumerate(matrix):
        writer.writerow([f"task_{i + 1}"] + ["" if np.isnan(v) else f"{v:.6f}" for v in row])
    return buffer.getvalue()


def _nan_to_none(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]
