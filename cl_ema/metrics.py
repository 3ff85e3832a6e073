"""Continual-learning metrics from an accuracy matrix.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("avg_acc", "avg_forgetting", "max_forgetting", "bwt", "learning_acc", "fwt")


def task_forgetting(matrix: np.ndarray, i: int) -> list[float]:
    """Forgetting of each task ``j < i`` after training task ``i``: ``R[j, j] − R[i, j]``."""
    return [float(matrix[j, j] - matrix[i, j]) for j in range(i)]


def metrics_after(
    matrix: np.ndarray | Sequence[Sequence[float]], i: int, baseline: Sequence[float] | None = None
) -> dict[str, float | None]:
    """All metrics in ``METRICS`` after training task ``i``."""
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
