"""Where results go: the console, Weights & Biases, and the files in the run directory.

This module owns the metric names logged anywhere. W&B keys, all against the step ``task``
(1-based, the number of tasks trained so far)::

    <track>/<setting>/acc_task_<j>         accuracy on test task j
    <track>/<setting>/forgetting_task_<j>  R[j, j] − R[i, j], for j < i
    <track>/<setting>/<metric>             avg_acc, avg_forgetting, max_forgetting, bwt, learning_acc, fwt
    final/<track>/<metric>                 run summary after the last task (class-IL)
    final/<track>/task_il/<metric>         the same, task-IL
    final/ema/<metric>                     with a single EMA decay: that track again, so a decay sweep
                                           optimizes one metric name whatever the decay
    continual/<track>/acc_task_<j>         with eval.every_n_steps: accuracy during training, against
                                           the step ``train_step`` (optimizer steps so far)
    final/<track>/continual/<metric>       min_acc, wc_acc, aaa, stability_gap

with ``<track>`` ``live`` or ``ema_<decay>`` and ``<setting>`` ``class_il`` or ``task_il``.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cl_ema.metrics import METRICS
from cl_ema.plots import continual_png, heatmaps_png
from cl_ema.results import SETTINGS, Results, atomic_write

STEP = "task"
TRAIN_STEP = "train_step"


def task_log(results: Results, task: int) -> dict[str, float]:
    """Everything logged after training ``task`` (0-based), keyed by W&B metric name."""
    row: dict[str, float] = {STEP: task + 1}
    for track in results.tracks:
        for setting in SETTINGS:
            prefix = f"{track}/{setting}"
            for j, acc in enumerate(results.row(track, task, setting)[: task + 1]):
                row[f"{prefix}/acc_task_{j + 1}"] = acc
            for j, value in enumerate(results.forgetting(track, task, setting)):
                row[f"{prefix}/forgetting_task_{j + 1}"] = value
            for name, value in results.metrics(track, task, setting).items():
                if value is not None:
                    row[f"{prefix}/{name}"] = value
    return row


def final_summary(results: Results) -> dict[str, float]:
    last = results.tasks_done - 1
    ema_tracks = [t for t in results.tracks if t.startswith("ema_")]
    aliases = {ema_tracks[0]: "ema"} if len(ema_tracks) == 1 else {}
    summary: dict[str, float] = {}
    for track in results.tracks:
        for setting in SETTINGS:
            for name, value in results.metrics(track, last, setting).items():
                if value is None:
                    continue
                for label in (track, aliases.get(track)):
                    if label:
                        suffix = name if setting == "class_il" else f"{setting}/{name}"
                        summary[f"final/{label}/{suffix}"] = value
        for name, value in results.continual.get(track, {}).items():
            if isinstance(value, float):
                summary[f"final/{track}/continual/{name}"] = value
    return summary


def save_outputs(results: Results, out_dir: Path, curves: dict | None = None) -> None:
    """results.json, CSV matrices and the heatmap PNG (and continual-evaluation curves), atomically."""
    results.save(out_dir)
    matrices = {t: results.matrices[t, "class_il"] for t in results.tracks}
    atomic_write(out_dir / "acc_matrix.png", heatmaps_png(matrices, "class-IL accuracy"))
    if curves:
        atomic_write(out_dir / "continual_eval.json", json.dumps({t: c.to_dict() for t, c in curves.items()}) + "\n")
        atomic_write(out_dir / "continual_eval.png", continual_png(curves, "accuracy on each task during training"))


class Console:
    """Per-task table of accuracies on every task seen, then the final metrics."""

    def __init__(self, stream=None) -> None:
        self.out = stream or sys.stdout

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def task(self, results: Results, task: int, steps: int, classes: list[int]) -> None:
        width = max(len(t) for t in results.tracks) + 2
        self.print(f"\ntask {task + 1}/{results.num_tasks} (classes {classes}): {steps} optimizer steps")
        head = "".join(f"{'T' + str(j + 1):>7}" for j in range(task + 1))
        self.print(f"{'class-IL %':<{width}}{head}{'ACC':>8}{'task-IL ACC':>13}")
        for track in results.tracks:
            row = results.row(track, task)[: task + 1]
            cells = "".join(f"{100 * a:7.1f}" for a in row)
            til = results.metrics(track, task, "task_il")["avg_acc"]
            self.print(f"{track:<{width}}{cells}{100 * np.mean(row):8.1f}{100 * til:13.1f}")

    def final(self, results: Results) -> None:
        last = results.tasks_done - 1
        width = max(len(t) for t in results.tracks) + 2
        labels = {
            "avg_acc": "ACC",
            "avg_forgetting": "forget",
            "max_forgetting": "max-fgt",
            "bwt": "BWT",
            "learning_acc": "LA",
            "fwt": "FWT",
        }
        self.print(f"\nfinal metrics, class-IL (task-IL ACC last), % after {results.tasks_done} tasks")
        self.print(f"{'track':<{width}}" + "".join(f"{labels[m]:>9}" for m in METRICS) + f"{'TIL-ACC':>9}")
        for track in results.tracks:
            values = results.metrics(track, last)
            cells = "".join(f"{'-':>9}" if values[m] is None else f"{100 * values[m]:9.2f}" for m in METRICS)
            til = results.metrics(track, last, "task_il")["avg_acc"]
            self.print(f"{track:<{width}}{cells}{100 * til:9.2f}")
        if results.continual:
            keys = ("min_acc", "wc_acc", "aaa", "stability_gap")
            self.print("\ncontinual evaluation, % (min-ACC, WC-ACC, average anytime accuracy, mean stability gap)")
            self.print(f"{'track':<{width}}" + "".join(f"{k:>15}" for k in keys))
            for track in results.tracks:
                values = results.continual[track]
                cells = "".join(f"{'-':>15}" if values[k] is None else f"{100 * values[k]:15.2f}" for k in keys)
                self.print(f"{track:<{width}}{cells}")


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str) -> str | None:
    """Resolve logger.mode=auto; None leaves the choice to wandb (WANDB_MODE is set)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_SWEEP_ID") or wandb_logged_in():
        return "online"
    return "offline"


class WandbLogger:
    """Logs to W&B; any W&B failure is reported once and the run goes on with local outputs."""

    def __init__(
        self,
        settings: Any,
        out_dir: Path,
        config: dict,
        name: str,
        group: str,
        tags: list[str],
        tracks: list[str],
        run_id: str | None = None,
    ) -> None:
        self.run = None
        self.failed = False
        try:
            import wandb

            self.wandb = wandb
            mode = wandb_mode(settings.mode)
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                group=settings.group or group,
                tags=list(settings.tags) + tags,
                name=name,
                config=config,
                dir=str(out_dir),
                mode=mode,
                reinit="finish_previous",  # one run per job under Hydra multirun
                id=run_id,
                resume="allow" if run_id else None,  # a resumed cl_ema run continues its W&B run
                settings=wandb.Settings(quiet=True),  # cl_ema prints its own tables
            )
            self.run.define_metric(STEP)
            self.run.define_metric(TRAIN_STEP)
            for track in tracks:  # per-prefix step metrics: continual evaluation uses its own step
                self.run.define_metric(f"{track}/*", step_metric=STEP)
            self.run.define_metric("continual/*", step_metric=TRAIN_STEP)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        if not self.failed:
            warnings.warn(
                f"W&B logging disabled ({type(err).__name__}: {err}); local outputs are still written", stacklevel=2
            )
        self.failed = True
        self.run = None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def offline_dir(self) -> str | None:
        if self.run is not None and self.run.settings.mode == "offline":
            return str(Path(self.run.dir).parent)
        return None

    def log_task(self, results: Results, task: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(task_log(results, task))
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def log_eval(self, step: int, task: int, accuracies: dict[str, list[float]]) -> None:
        """One continual evaluation: accuracy of each track on the tasks seen so far."""
        if self.run is None:
            return
        row: dict[str, float] = {TRAIN_STEP: step}
        for track, values in accuracies.items():
            for j, acc in enumerate(values):
                row[f"continual/{track}/acc_task_{j + 1}"] = acc
        try:
            self.run.log(row)
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def finish(self, results: Results, out_dir: Path) -> None:
        if self.run is None:
            return
        try:
            wandb = self.wandb
            if results.tasks_done:
                self.run.summary.update(final_summary(results))
                for track in results.tracks:
                    table = wandb.Table(columns=["trained_through", "test_task", "setting", "accuracy"])
                    for setting in SETTINGS:
                        for (i, j), acc in np.ndenumerate(results.matrices[track, setting][: results.tasks_done]):
                            table.add_data(i + 1, j + 1, setting, float(acc))
                    self.run.log({f"{track}/acc_matrix": table})
                self.run.log({"acc_matrix": wandb.Image(str(out_dir / "acc_matrix.png"))})
                if (out_dir / "continual_eval.png").exists():
                    self.run.log({"continual_eval": wandb.Image(str(out_dir / "continual_eval.png"))})
            self.run.finish(exit_code=0 if results.status == "completed" else 1)
        except Exception as err:  # noqa: BLE001
            self._fail(err)
