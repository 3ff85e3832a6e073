"""Weights & Biases: metrics after every task, continual-evaluation curves, matrices, run summary.

Metric names are ``cl_ema.metrics``'s; per-task metrics use the step ``task``, continual
evaluation the step ``train_step``. The run summary holds ``final/<track>/<metric>`` and, with a
single EMA track, ``final/ema/<metric>`` too, so a decay sweep optimizes one metric name. Runs
of one setting share a group, so the seeds aggregate; a resumed cl_ema run continues its W&B run.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cl_ema.errors import first_line, warn
from cl_ema.loggers import RunInfo, eval_log, task_log
from cl_ema.metrics import CONTINUAL, DIFF, SETTINGS, STEP, TRAIN_STEP, final_key
from cl_ema.options import Positive
from cl_ema.plugins import LIVE
from cl_ema.results import Results

Mode = Literal["auto", "online", "offline", "disabled"]


def final_summary(results: Results) -> dict[str, float]:
    """The run summary: every metric after the last task, per track and setting, and each track's
    difference to the live weights (``final/<track>/diff_live/<metric>``)."""
    last = results.tasks_done - 1
    ema_tracks = [t for t in results.tracks if results.meta["track_info"][t]["rule"] == "ema"]
    aliases = {ema_tracks[0]: "ema"} if len(ema_tracks) == 1 else {}
    summary: dict[str, float] = {}
    for track in results.tracks:
        for label in filter(None, (track, aliases.get(track))):
            for setting in SETTINGS:
                live = results.metrics(LIVE, last, setting)
                for name, value in results.metrics(track, last, setting).items():
                    if value is None:
                        continue
                    summary[final_key(label, name, setting)] = value
                    reference = live[name]
                    if track != LIVE and reference is not None:
                        summary[final_key(label, f"{DIFF}/{name}", setting)] = value - reference
            for name, value in results.stability.get(track, {}).items():
                if isinstance(value, float):
                    summary[final_key(label, f"{CONTINUAL}/{name}")] = value
    return summary


def logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(requested: Mode) -> str | None:
    """``auto``: online when logged in or under `wandb agent`, else offline; None leaves it to WANDB_MODE."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if os.environ.get("WANDB_SWEEP_ID") or logged_in() else "offline"


def init_own_run(wandb: Any, **init: Any) -> Any:
    """``wandb.init``; when the run id is still open in a W&B service this process inherited
    (``WANDB_SERVICE``: a parent that uses wandb, a `wandb beta core start` service), the run
    continues through a service of its own, with one warning.

    A run killed while logging through a shared service leaves its stream open there, so its
    resume would otherwise fail with "run ID … is in use" until that service exits.
    """
    try:
        return wandb.init(**init)
    except Exception as err:
        if "is in use" not in str(err) or not os.environ.pop(wandb.env.SERVICE, None):
            raise
    warn(
        f"W&B run {init['id']} is still open in the W&B service named by {wandb.env.SERVICE} "
        "(a killed run's); this run continues it through a W&B service of its own"
    )
    wandb.teardown()  # drops the connection to the shared service, which keeps running
    return wandb.init(**init)


class WandbLogger:
    """Logs to W&B; an unreachable server costs at most ``init_timeout`` seconds and one warning."""

    def __init__(
        self,
        run: RunInfo,
        resumed: dict[str, Any] | None = None,
        project: str = "cl_ema",
        entity: str | None = None,
        mode: Mode = "auto",
        group: str | None = None,
        tags: list[str] | None = None,
        init_timeout: Positive = 15.0,
    ) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")  # cl_ema prints its own tables and warnings
        self.wandb = wandb
        self.out_dir = run.out_dir
        run_id = (resumed or {}).get("run_id")
        try:
            self.run = init_own_run(
                wandb,
                project=project,
                entity=entity,
                group=group or run.group,
                tags=[*(tags or []), run.experiment, run.strategy, *run.tags],
                name=run.name,
                config={**run.config, "world_size": run.world_size},
                dir=str(run.out_dir),
                mode=resolve_mode(mode),
                reinit="finish_previous",  # one run per job under Hydra multirun
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(quiet=True, silent=True, init_timeout=init_timeout),
            )
        except Exception as err:
            raise RuntimeError(first_line(err)) from None
        self.run.define_metric(STEP)
        self.run.define_metric(TRAIN_STEP)
        for track in run.tracks:  # per-prefix step metrics: continual evaluation uses its own step
            self.run.define_metric(f"{track}/*", step_metric=STEP)
        self.run.define_metric(f"{CONTINUAL}/*", step_metric=TRAIN_STEP)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run.id}

    @property
    def offline_dirs(self) -> list[str]:
        """The offline run folders to upload with `wandb sync`, oldest first: a resumed run has one per
        session, all of one run id (none when online). A folder W&B names ``…-<id>-1`` (two
        sessions in one second) counts; one without records (an init that failed) does not."""
        if self.run.settings.mode != "offline":
            return []
        here = Path(os.path.dirname(self.run.dir))
        records = here.parent.glob(f"offline-run-*-{self.run.id}*/run-{self.run.id}.wandb")
        return sorted({str(p.parent) for p in records} | {str(here)})

    def log_task(self, results: Results, task: int) -> None:
        self.run.log(task_log(results, task))

    def log_eval(self, step: int, task: int, accuracies: Mapping[str, list[float]]) -> None:
        self.run.log({TRAIN_STEP: step, **eval_log(accuracies)})

    def finish(self, results: Results) -> None:
        wandb = self.wandb
        if results.tasks_done:
            self.run.summary.update(final_summary(results))
            for track in results.tracks:
                table = wandb.Table(columns=["trained_through", "test_task", "setting", "accuracy"])
                for setting in SETTINGS:
                    for (i, j), acc in np.ndenumerate(results.matrices[track, setting][: results.tasks_done]):
                        table.add_data(i + 1, j + 1, setting, float(acc))
                self.run.log({f"{track}/acc_matrix": table})
            self.run.log({"acc_matrix": wandb.Image(str(self.out_dir / "acc_matrix.png"))})
            if (self.out_dir / "continual_eval.png").exists():
                self.run.log({"continual_eval": wandb.Image(str(self.out_dir / "continual_eval.png"))})
        offline = " ".join(self.offline_dirs)
        self.run.finish(exit_code=0 if results.status == "completed" else 1)
        if offline:
            print(f"W&B offline run: {offline} (upload with: wandb sync {offline})", flush=True)
