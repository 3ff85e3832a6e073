"""Continual evaluation: every track on every seen task during training, and the stability gap.

With ``eval.every_n_steps=N`` each track (``live``, every ``ema_<decay>``) is evaluated on a fixed,
seeded subset of each seen task's test set at the start of every task, every N optimizer steps,
and at the end of every task. From each track's curve ``a_k(e)`` (class-IL accuracy on task k at
evaluation e, made while training task ``t_e``), with ``T`` tasks:

- min-ACC (De Lange et al. 2023): ``1/(T−1) Σ_{k<T−1} min_{e: t_e > k} a_k(e)`` — the worst
  accuracy on each previous task once it was learned;
- WC-ACC (De Lange et al. 2023): ``1/T · a_{T−1}(last) + (1 − 1/T) · min-ACC``;
- average anytime accuracy AAA (Caccia et al. 2022): ``mean_e mean_{k ≤ t_e} a_k(e)``;
- stability gap of task t ≥ 1: ``max_{k<t} (a_k(start of t) − min_{e during t} a_k(e))``, the
  largest drop on a previous task while training task t; ``stability_gap`` is its mean over tasks.

Tasks with no evaluation after they were learned are left out of min-ACC; with one task the
metrics over previous tasks are ``None``. Evaluation draws no random numbers and leaves BatchNorm
statistics alone, so training is the same with or without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_ema.data.stream import TaskStream
from cl_ema.evaluation import evaluate_tracks
from cl_ema.metrics import STABILITY_METRICS
from cl_ema.plugins import Track


@dataclass
class Curve:
    """One track's evaluations: global step, task being trained, accuracy on tasks 0..task."""

    steps: list[int] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    accuracies: list[list[float]] = field(default_factory=list)

    def add(self, step: int, task: int, accuracies: Sequence[float]) -> None:
        self.steps.append(step)
        self.tasks.append(task)
        self.accuracies.append(list(accuracies))

    def to_dict(self) -> dict:
        return {"steps": self.steps, "tasks": self.tasks, "accuracies": self.accuracies}

    @classmethod
    def from_dict(cls, data: dict) -> Curve:
        return cls(list(data["steps"]), list(data["tasks"]), [list(a) for a in data["accuracies"]])


def stability_metrics(curve: Curve) -> dict[str, float | list[float] | None]:
    """min-ACC, WC-ACC, AAA and the stability gap of one track (see the module docstring)."""
    if not curve.steps:
        return {**dict.fromkeys(m.key for m in STABILITY_METRICS), "gap_per_task": []}
    last_task = max(curve.tasks)
    minima = []
    for k in range(last_task):
        after = [acc[k] for acc, t in zip(curve.accuracies, curve.tasks) if t > k]
        if after:
            minima.append(min(after))
    min_acc = float(np.mean(minima)) if minima else None
    final = curve.accuracies[-1][last_task]
    wc_acc = final if min_acc is None else final / (last_task + 1) + (1 - 1 / (last_task + 1)) * min_acc
    aaa = float(np.mean([np.mean(acc) for acc in curve.accuracies]))
    gaps = []
    for t in range(1, last_task + 1):
        during = [acc for acc, task in zip(curve.accuracies, curve.tasks) if task == t]
        if len(during) >= 2:  # the start of the task and at least one evaluation after it
            start = during[0]
            gaps.append(float(max(start[k] - min(acc[k] for acc in during) for k in range(t))))
    return {
        "min_acc": min_acc,
        "wc_acc": float(wc_acc),
        "aaa": aaa,
        "stability_gap": float(np.mean(gaps)) if gaps else None,
        "gap_per_task": gaps,
    }


def fixed_subsets(stream: TaskStream, size: int, seed: int) -> list[Tensor]:
    """Per task, ``size`` test indices drawn once from ``seed`` (not from the training RNG)."""
    rng = np.random.RandomState(seed)
    subsets = []
    for index in stream.test_indices:
        pick = rng.permutation(len(index))[: min(size, len(index))]
        subsets.append(index[torch.as_tensor(np.sort(pick), device=index.device)])
    return subsets


class ContinualEvalPlugin(SupervisedPlugin):
    """Evaluates every track on the seen tasks' subsets during training (see module docstring)."""

    def __init__(
        self,
        stream: TaskStream,
        tracks: list[Track],
        every_n_steps: int,
        subset_size: int,
        seed: int,
        batch_size: int = 1024,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.tracks = tracks
        self.every = every_n_steps
        self.subsets = fixed_subsets(stream, subset_size, seed)
        self.batch_size = batch_size
        self.curves = {track.name: Curve() for track in tracks}

    def _evaluate(self, strategy) -> None:
        task = strategy.experience.current_experience
        step = strategy.clock.train_iterations
        model = strategy.model  # the tracks swap into the model itself, not its data-parallel wrapper
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        evaluated = evaluate_tracks(
            model, self.tracks, self.stream, task, range(task + 1), self.subsets, self.batch_size
        )
        for name, result in evaluated.items():
            self.curves[name].add(step, task, result.class_il)

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._evaluate(strategy)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_iterations % self.every == 0:
            self._evaluate(strategy)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_iterations % self.every:  # not just evaluated
            self._evaluate(strategy)

    def points(self, start: int = 0) -> list[tuple[int, int, dict[str, list[float]]]]:
        """Evaluations ``start``, ``start + 1``, …: (step, task, accuracies of each track on the tasks seen)."""
        reference = next(iter(self.curves.values()))
        return [
            (reference.steps[e], reference.tasks[e], {name: curve.accuracies[e] for name, curve in self.curves.items()})
            for e in range(start, len(reference.steps))
        ]

    def state_dict(self) -> dict:
        return {name: curve.to_dict() for name, curve in self.curves.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.curves):
            raise ValueError(
                f"the continual evaluation's curves are of tracks {sorted(state)}, not {sorted(self.curves)}"
            )
        try:
            self.curves = {name: Curve.from_dict(data) for name, data in state.items()}
        except (KeyError, TypeError) as err:
            raise ValueError(f"a continual evaluation curve is incomplete ({err})") from None
