"""TensorBoard: the same scalars as W&B (per task and track), continual evaluation, the matrices as images.

Event files go to ``<run dir>/tensorboard``; view them with ``tensorboard --logdir outputs``. A
resumed run drops the events its killed predecessor wrote after the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cl_ema.loggers import RunInfo, eval_log, task_log
from cl_ema.metrics import STEP
from cl_ema.plots import heatmaps_figure
from cl_ema.results import Results


class TensorBoardLogger:
    def __init__(self, run: RunInfo, subdir: str = "tensorboard") -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after the first task still to train were written by a killed run
        self.writer = SummaryWriter(
            str(run.out_dir / subdir), purge_step=run.tasks_done + 1 if run.tasks_done else None
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def log_task(self, results: Results, task: int) -> None:
        row = task_log(results, task)
        step = int(row.pop(STEP))
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        matrices = {t: results.matrices[t, "class_il"] for t in results.tracks}
        self.writer.add_figure(
            "acc_matrix/class_il", heatmaps_figure(matrices, f"class-IL accuracy after task {step}"), step
        )
        self.writer.flush()

    def log_eval(self, step: int, task: int, accuracies: Mapping[str, list[float]]) -> None:
        for key, value in eval_log(accuracies).items():
            self.writer.add_scalar(key, value, step)

    def finish(self, results: Results) -> None:
        self.writer.close()
