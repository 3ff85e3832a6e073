"""Where results are logged besides the console and the run directory: a list behind one interface.

``logger=`` selects config files of ``conf/logger/`` (``logger=wandb``, the default;
``logger=[wandb,tensorboard]`` for several; ``logger=none``). Each is built from its ``_target_``
with the run's ``RunInfo`` (and its own saved state when a run resumes), and implements
``Logger``: a row of metrics after every task, a point per continual evaluation, and the end of
the run. Logging must never stop training: a logger that fails warns once and goes quiet.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cl_ema.errors import UserError, first_line, warn
from cl_ema.metrics import SETTINGS, STEP, continual_key, per_task, task_key
from cl_ema.results import Results


@dataclass
class RunInfo:
    """What loggers know about the run."""

    out_dir: Path
    config: dict[str, Any]  # resolved
    experiment: str
    strategy: str
    seed: int
    tracks: list[str]
    setting_id: str  # equal for runs that differ only in seed and in keys that do not change results
    tasks_done: int = 0  # > 0 when resuming
    world_size: int = 1  # processes that trained the run (data parallel)
    tags: list[str] = field(default_factory=list)

    @property
    def group(self) -> str:
        """Runs of one setting (its seeds) share a group."""
        return "-".join([self.experiment, self.strategy, *self.tracks[1:], self.setting_id])

    @property
    def name(self) -> str:
        return f"{self.experiment}-{self.strategy}-seed{self.seed}"


class Logger(Protocol):
    def log_task(self, results: Results, task: int) -> None: ...

    def log_eval(self, step: int, task: int, accuracies: Mapping[str, list[float]]) -> None: ...

    def finish(self, results: Results) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...


def task_log(results: Results, task: int) -> dict[str, float]:
    """Everything logged after training ``task`` (0-based), by metric name (``cl_ema.metrics``)."""
    row: dict[str, float] = {STEP: float(task + 1)}
    for track in results.tracks:
        for setting in SETTINGS:
            for j, acc in enumerate(results.row(track, task, setting)[: task + 1]):
                row[task_key(track, setting, per_task("acc", j))] = acc
            for j, value in enumerate(results.forgetting(track, task, setting)):
                row[task_key(track, setting, per_task("forgetting", j))] = value
            for name, metric in results.metrics(track, task, setting).items():
                if metric is not None:
                    row[task_key(track, setting, name)] = metric
    return row


def eval_log(accuracies: Mapping[str, list[float]]) -> dict[str, float]:
    """One continual evaluation: each track's accuracy on the tasks seen so far."""
    return {continual_key(track, j): acc for track, values in accuracies.items() for j, acc in enumerate(values)}


def warn_disabled(name: str, err: BaseException) -> None:
    """The one warning a failing logger gets (training goes on without it)."""
    warn(f"logger {name} disabled ({first_line(err, with_type=True)}); local outputs are still written")


class Loggers:
    """Calls every logger; one that raises is reported once and dropped, the others go on.

    That net hides a logger's bugs too, so the tests take it away (``STRICT = True``): there a
    failing logger fails the test.
    """

    STRICT = bool(os.environ.get("CL_EMA_STRICT_LOGGERS"))

    def __init__(self, loggers: dict[str, Logger]) -> None:
        self.loggers = dict(loggers)

    @classmethod
    def start(cls, factories: dict[str, Callable[[], Logger]]) -> Loggers:
        """Each logger built by its factory; one that cannot start is a warning (a UserError stops the run)."""
        loggers = {}
        for name, make in factories.items():
            try:
                loggers[name] = make()
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - a logger must never stop training
                if cls.STRICT:
                    raise
                warn_disabled(name, err)
        return cls(loggers)

    def _each(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, method)(*args)
            except Exception as err:  # noqa: BLE001 - logging must never stop training
                if self.STRICT:
                    raise
                warn_disabled(name, err)
                del self.loggers[name]

    def log_task(self, results: Results, task: int) -> None:
        self._each("log_task", results, task)

    def log_eval(self, step: int, task: int, accuracies: Mapping[str, list[float]]) -> None:
        self._each("log_eval", step, task, accuracies)

    def finish(self, results: Results) -> None:
        self._each("finish", results)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: logger.state_dict() for name, logger in self.loggers.items()}
