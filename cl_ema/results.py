"""Accuracy matrices of every track, the metrics derived from them, and the run's result files.

``results.json`` (written atomically after every task) holds a top-level ``"tracks"`` object::

    {"format": "cl_ema-results-2", "status": "running" | "completed" | "failed" | "interrupted",
     "tasks_done": 3, ...,
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
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cl_ema.files import atomic_write
from cl_ema.metrics import METRICS, SETTINGS, metrics_after, task_forgetting

FORMAT = "cl_ema-results-2"  # results.json's layout; the report reads this version

if TYPE_CHECKING:  # the report reads results without importing torch or Avalanche
    from cl_ema.continual_eval import Curve
    from cl_ema.evaluation import Accuracies


_STATE = ("format", "status", "tasks_done", "num_tasks", "baseline", "tracks")  # to_dict's keys that are not meta


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

    def add_track(self, track: str) -> None:
        """A track evaluated after the run (a post-hoc average): its matrices start empty."""
        self.tracks.append(track)
        for setting in SETTINGS:
            self.matrices[track, setting] = np.full((self.num_tasks, self.num_tasks), np.nan)

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
            "format": FORMAT,
            **self.meta,
            "status": self.status,
            "tasks_done": self.tasks_done,
            "num_tasks": self.num_tasks,
            "baseline": self.baseline,
            "tracks": tracks,
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Results:
        """The results ``to_dict()`` wrote (a run's results.json), status and stability included; ValueError
        (as ``load``), KeyError or TypeError if it is not such a dict."""
        results = cls(list(saved["tracks"]), saved["num_tasks"], {k: v for k, v in saved.items() if k not in _STATE})
        results.load(saved)
        results.status = str(saved["status"])
        results.stability = {t: e["stability"] for t, e in saved["tracks"].items() if "stability" in e}
        return results

    def load(self, saved: dict[str, Any]) -> None:
        """Continue from ``to_dict()`` output (of a run with the same tracks and tasks); ValueError if it
        does not fit: other tracks or task counts, misshapen matrices, rows missing for finished tasks,
        values of the wrong kind."""
        tracks, done = saved.get("tracks"), saved.get("tasks_done")
        if not isinstance(tracks, dict) or list(tracks) != self.tracks or saved.get("num_tasks") != self.num_tasks:
            raise ValueError(f"tracks {list(tracks or [])} / {saved.get('num_tasks')} tasks do not match this run")
        if not isinstance(done, int) or not _is_count(done) or not 1 <= done <= self.num_tasks:
            raise ValueError(f"tasks_done={done!r} is not a task count of this run")
        matrices = {}
        for track, entry in tracks.items():
            for setting in SETTINGS:
                values = (
                    entry.get("acc_matrix") if setting == "class_il" else (entry.get(setting) or {}).get("acc_matrix")
                )
                try:
                    matrix = np.array(values, dtype=float)  # None → nan
                except (TypeError, ValueError):
                    raise ValueError(
                        f"the {track} {setting} accuracy matrix holds values that are not numbers"
                    ) from None
                if matrix.shape != (self.num_tasks, self.num_tasks):
                    raise ValueError(f"the {track} {setting} accuracy matrix has shape {matrix.shape}")
                if not np.isfinite(matrix[:done]).all() or ((matrix[:done] < 0) | (matrix[:done] > 1)).any():
                    raise ValueError(
                        f"the {track} {setting} accuracy matrix lacks rows of finished tasks, or holds "
                        "values outside [0, 1]"
                    )
                matrices[track, setting] = matrix
        baseline = saved.get("baseline")
        if not isinstance(baseline, dict) or not all(_is_numbers(baseline.get(s), self.num_tasks) for s in SETTINGS):
            raise ValueError("its baseline accuracies are not one number per task and setting")
        steps = saved.get("steps_per_task")
        if not (isinstance(steps, list) and len(steps) == done and all(_is_count(n) for n in steps)):
            raise ValueError(f"steps_per_task={steps!r} is not one step count per finished task")
        times = [saved.get(key) for key in ("train_s", "elapsed_s")]
        if not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0 for t in times
        ):
            raise ValueError(f"its times {times} are not durations")
        self.matrices.update(matrices)
        self.baseline = {s: [float(v) for v in baseline[s]] for s in SETTINGS}
        self.tasks_done = done
        self.meta["steps_per_task"] = list(steps)
        self.meta["train_s"], self.meta["elapsed_s"] = times


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_numbers(values: Any, length: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def save_outputs(results: Results, out_dir: Path, curves: dict[str, Curve] | None = None, final: bool = True) -> None:
    """results.json and the continual-evaluation curves; at the end of the run (``final``) also one CSV per
    track and setting and the figures, which only repeat results.json (rendering twenty tracks' heatmaps
    after every task would cost more than evaluating them)."""
    # strict JSON: no NaN or Infinity, which strict parsers refuse
    atomic_write(out_dir / "results.json", json.dumps(results.to_dict(), indent=2, allow_nan=False) + "\n")
    if curves:
        atomic_write(out_dir / "continual_eval.json", json.dumps({t: c.to_dict() for t, c in curves.items()}) + "\n")
    if not final:
        return
    from cl_ema.plots import continual_png, heatmaps_png

    for (track, setting), matrix in results.matrices.items():
        atomic_write(out_dir / "matrices" / f"{track}.{setting}.csv", matrix_csv(matrix))
    matrices = {t: results.matrices[t, "class_il"] for t in results.tracks}
    atomic_write(out_dir / "acc_matrix.png", heatmaps_png(matrices, "class-IL accuracy"))
    if curves:
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
