"""Continual-learning metrics from an accuracy matrix, and the one list of metric names and labels.

``R[i, j]`` is the accuracy on test task ``j`` after training tasks ``0..i`` (values in [0, 1]);
metrics "after task i" use rows and columns ``0..i``. With ``i`` the last task, ``T = i + 1``:

- average accuracy (ACC, Lopez-Paz & Ranzato 2017):   ACC = 1/T Σ_j R[i, j]
- average forgetting (Avalanche's StreamForgetting):   F = 1/(T−1) Σ_{j<i} (R[j, j] − R[i, j])
- max forgetting (Chaudhry et al. 2018):              F* = 1/(T−1) Σ_{j<i} (max_{j≤l<i} R[l, j] − R[i, j])
- backward transfer (BWT, Lopez-Paz & Ranzato 2017):  BWT = 1/(T−1) Σ_{j<i} (R[i, j] − R[j, j]) = −F
- learning accuracy (LA, Riemer et al. 2019):          LA = 1/T Σ_j R[j, j]
- forward transfer (FWT, Lopez-Paz & Ranzato 2017):   FWT = 1/(T−1) Σ_{0<j≤i} (R[j−1, j] − b_j),
  with ``b`` the accuracies of the untrained model.

Metrics over previous tasks are ``None`` after the first task (nothing to forget yet).

Names: ``METRICS`` and ``STABILITY_METRICS`` (``cl_ema.continual_eval``) are the keys of
results.json and the logged metric names; console, CSV, W&B, TensorBoard and the report take
their keys, labels and titles from here. Logged keys, against the step ``task`` (tasks trained)::

    <track>/<setting>/acc_task_<j>          accuracy on test task j
    <track>/<setting>/forgetting_task_<j>   R[j, j] − R[i, j], for j < i
    <track>/<setting>/<metric>              every metric in METRICS
    final/<track>/<metric>                  run summary after the last task (class-IL)
    final/<track>/task_il/<metric>          the same, task-IL
    final/ema/<metric>                      with a single EMA track: that track again, so a decay
                                            sweep optimizes one metric name whatever the decay
    final/<track>/diff_live/<metric>        the track's metric minus the live weights' (task-IL:
                                            final/<track>/task_il/diff_live/<metric>)
    continual/<track>/acc_task_<j>          continual evaluation, against the step ``train_step``
    final/<track>/continual/<metric>        every metric in STABILITY_METRICS
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SETTINGS = ("class_il", "task_il")  # arg-max over the classes seen so far / over the test task's classes
STEP = "task"  # the step of per-task metrics: tasks trained so far
TRAIN_STEP = "train_step"  # the step of continual evaluation: optimizer steps so far
CONTINUAL = "continual"


@dataclass(frozen=True)
class Metric:
    key: str  # results.json and logged name
    label: str  # short column header
    title: str  # long name, for plots and reports


ACC = Metric("avg_acc", "ACC", "average accuracy")
FORGETTING = Metric("avg_forgetting", "forget", "average forgetting")
METRICS = (
    ACC,
    FORGETTING,
    Metric("max_forgetting", "max-fgt", "max forgetting"),
    Metric("bwt", "BWT", "backward transfer"),
    Metric("learning_acc", "LA", "learning accuracy"),
    Metric("fwt", "FWT", "forward transfer"),
)
STABILITY_METRICS = (
    Metric("min_acc", "min-ACC", "worst accuracy on each previous task"),
    Metric("wc_acc", "WC-ACC", "worst-case accuracy"),
    Metric("aaa", "AAA", "average anytime accuracy"),
    Metric("stability_gap", "gap", "stability gap"),
)
TASK_IL_ACC = Metric("avg_acc", "TIL-ACC", "task-IL average accuracy")
# what tables compare tracks by: (metric, setting)
HEADLINE = ((ACC, "class_il"), (FORGETTING, "class_il"), (TASK_IL_ACC, "task_il"))
DIFF = "diff_live"  # W&B summary: final/<track>/diff_live/<metric>, the track's metric minus live's


def task_key(track: str, setting: str, name: str) -> str:
    return f"{track}/{setting}/{name}"


def final_key(track: str, name: str, setting: str = "class_il") -> str:
    return f"final/{track}/{name}" if setting == "class_il" else f"final/{track}/{setting}/{name}"


def per_task(name: str, task: int) -> str:
    """``acc_task_1`` for ``("acc", 0)``: in logged names tasks count from 1, as on the console."""
    return f"{name}_task_{task + 1}"


def continual_key(track: str, task: int) -> str:
    return f"{CONTINUAL}/{track}/{per_task('acc', task)}"


def task_forgetting(matrix: np.ndarray, i: int) -> list[float]:
    """Forgetting of each task ``j < i`` after training task ``i``: ``R[j, j] − R[i, j]``."""
    return [float(matrix[j, j] - matrix[i, j]) for j in range(i)]


def metrics_after(
    matrix: np.ndarray | Sequence[Sequence[float]], i: int, baseline: Sequence[float] | None = None
) -> dict[str, float | None]:
    """Every metric in ``METRICS`` after training task ``i``."""
    r = np.asarray(matrix, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or not 0 <= i < r.shape[0]:
        raise ValueError(f"need a square accuracy matrix and a row in it, got {r.shape} and {i}")
    previous = range(i)
    forgetting = task_forgetting(r, i)
    result: dict[str, float | None] = {
        "avg_acc": float(r[i, : i + 1].mean()),
        "avg_forgetting": float(np.mean(forgetting)) if i else None,
        "max_forgetting": float(np.mean([r[j:i, j].max() - r[i, j] for j in previous])) if i else None,
        "bwt": float(np.mean([r[i, j] - r[j, j] for j in previous])) if i else None,
        "learning_acc": float(np.mean(np.diag(r)[: i + 1])),
        "fwt": None,
    }
    if baseline is not None and i:
        b = np.asarray(baseline, dtype=np.float64)
        result["fwt"] = float(np.mean([r[j - 1, j] - b[j] for j in range(1, i + 1)]))
    return result


def final_metrics(
    matrix: np.ndarray | Sequence[Sequence[float]], baseline: Sequence[float] | None = None
) -> dict[str, float | None]:
    """Metrics after the last task."""
    return metrics_after(matrix, len(matrix) - 1, baseline)
