"""Accuracy of the model's current weights on test tasks, class-IL and task-IL at once.

Class-IL: the prediction is the arg-max over every class seen so far (the classes of tasks
0..i after training task i), as Mammoth reports it. Task-IL: the arg-max over the classes of the
test task itself (the task identity is given at test time).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl_ema.data import TaskStream
from cl_ema.distributed import my_share, sum_over_processes


@dataclass
class Accuracies:
    class_il: list[float]
    task_il: list[float]


def class_masks(stream: TaskStream, device: torch.device) -> tuple[Tensor, Tensor]:
    """(T, C) boolean masks: classes seen after each task, and classes of each task."""
    seen = torch.zeros(stream.num_tasks, stream.num_classes, dtype=torch.bool, device=device)
    own = torch.zeros_like(seen)
    for t, classes in enumerate(stream.task_classes):
        own[t, classes] = True
        seen[t] = own[: t + 1].any(0)
    return seen, own


@torch.no_grad()
def evaluate(
    model: nn.Module,
    stream: TaskStream,
    trained_through: int,
    tasks: Sequence[int] | None = None,
    indices: Sequence[Tensor] | None = None,
    batch_size: int = 1024,
) -> Accuracies:
    """Accuracy on each test task in ``tasks`` (default: all) after training ``trained_through``.

    ``indices`` overrides the test samples of each task (subsets for continual evaluation).
    ``trained_through=-1`` evaluates an untrained model over all classes. With several processes
    each evaluates its share of every test set and the counts are summed.
    """
    tasks = range(stream.num_tasks) if tasks is None else tasks
    device = stream.test.device
    seen, own = class_masks(stream, device)
    seen_now = seen[trained_through] if trained_through >= 0 else torch.ones_like(seen[0])
    was_training = model.training
    model.eval()
    result = Accuracies([], [])
    try:
        for task in tasks:
            index = stream.test_indices[task] if indices is None else indices[task]
            correct = torch.zeros(2, dtype=torch.long, device=device)
            for logits, labels in _logits(model, stream, my_share(index), batch_size):
                correct[0] += _correct(logits, labels, seen_now)
                correct[1] += _correct(logits, labels, own[task])
            cil, til = sum_over_processes(correct).tolist()
            n = max(len(index), 1)
            result.class_il.append(cil / n)
            result.task_il.append(til / n)
    finally:
        model.train(was_training)
    return result


def _logits(model: nn.Module, stream: TaskStream, index: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in index.split(batch_size):
        labels = stream.test.targets_at(batch)
        yield model(stream.test.batch(batch)), labels


def _correct(logits: Tensor, labels: Tensor, allowed: Tensor) -> Tensor:
    predictions = logits.masked_fill(~allowed, float("-inf")).argmax(1)
    return (predictions == labels).sum()
