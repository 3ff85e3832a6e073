"""What a run prints: the accuracy on every task seen after each task, then the final metrics."""

from __future__ import annotations

import sys
from typing import TextIO

from cl_ema.metrics import ACC, METRICS, STABILITY_METRICS, TASK_IL_ACC
from cl_ema.results import Results


class Console:
    """Per-task table of accuracies on every task seen, then the final metrics."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stdout

    def print(self, text: str = "") -> None:
        print(text, file=self.file, flush=True)

    def task(self, results: Results, task: int, steps: int, classes: list[int]) -> None:
        width = _width(results)
        self.print(f"\ntask {task + 1}/{results.num_tasks} (classes {classes}): {steps} optimizer steps")
        head = "".join(f"{'T' + str(j + 1):>7}" for j in range(task + 1))
        self.print(f"{'class-IL %':<{width}}{head}{ACC.label:>8}{TASK_IL_ACC.label:>10}")
        for track in results.tracks:
            row = results.row(track, task)[: task + 1]
            cells = "".join(f"{100 * a:7.1f}" for a in row)
            acc = results.metrics(track, task)[ACC.key]
            til = results.metrics(track, task, "task_il")[TASK_IL_ACC.key]
            self.print(f"{track:<{width}}{cells}{_cell(acc, 8, 1)}{_cell(til, 10, 1)}")

    def final(self, results: Results) -> None:
        last = results.tasks_done - 1
        width = _width(results)
        self.print(f"\nfinal metrics, class-IL ({TASK_IL_ACC.label} last), % after {results.tasks_done} tasks")
        self.print(f"{'track':<{width}}" + "".join(f"{m.label:>9}" for m in (*METRICS, TASK_IL_ACC)))
        for track in results.tracks:
            values = results.metrics(track, last)
            til = results.metrics(track, last, "task_il")[TASK_IL_ACC.key]
            self.print(f"{track:<{width}}" + "".join(_cell(values[m.key], 9) for m in METRICS) + _cell(til, 9))
        if results.stability:
            titles = ", ".join(m.title for m in STABILITY_METRICS)
            self.print(f"\ncontinual evaluation, % ({titles})")
            self.print(f"{'track':<{width}}" + "".join(f"{m.label:>15}" for m in STABILITY_METRICS))
            for track in results.tracks:
                values = results.stability[track]
                self.print(f"{track:<{width}}" + "".join(_cell(values[m.key], 15) for m in STABILITY_METRICS))


def _width(results: Results) -> int:
    """The track column: wide enough for every name and for the headers of the tables."""
    return max(len(name) for name in (*results.tracks, "class-IL %", "track")) + 2


def _cell(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{100 * value:{width}.{digits}f}"
