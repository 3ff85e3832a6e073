"""Every run below a folder as one tidy table: ``load(folder)`` (pandas), for notebooks and the report.

``load`` reads every ``results.json`` below ``folder`` (the folder itself may be a run folder) and returns
one row per run, track, setting and metric, with the columns

- of the run: ``run`` (its folder relative to ``folder``), ``experiment``, ``strategy``, ``seed``,
  ``status``, ``tasks_done``, ``num_tasks``, ``setting_id`` (``cl_ema.config.setting_id``: what its seeds
  average over), ``group`` (the runs whose seeds the report averages: one setting, task count and list of
  tracks; a run that a post-hoc pass gave more tracks is another group);
- of the track (its ``track_info``): ``track``, ``rule`` (the rule family, ``live`` for live), ``posthoc``
  (computed after the run from saved weights), ``decay``, ``horizon`` (optimizer steps), ``horizon_tasks``
  (recorded, else the horizon over the first task's steps), ``residual`` (of a post-hoc fit);
- of the value: ``setting`` (``class_il``, ``task_il``), ``metric`` (a ``Metric.key`` of
  ``cl_ema.metrics.METRICS``, and of ``STABILITY_METRICS`` where the run evaluated continually, class-IL),
  ``value`` (a float; NaN where the metric is undefined, forgetting after one task say);
- ``cfg.<dotted key>``: the run's config keys that decide results (``cl_ema.config.result_keys``), decoded.

Only completed runs count: ``read`` also gives each results.json left out and why (not readable, not of
format ``cl_ema.results.FORMAT``, values out of range, not completed), and the accuracy matrices as a
tidy table too. A seed run again in the same group counts once: the newest results.json (a repeat would
shrink the spread over seeds). Torch-free, like every module it imports.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cl_ema.config import result_keys, setting_id
from cl_ema.errors import UserError
from cl_ema.metrics import METRICS, SETTINGS, STABILITY_METRICS
from cl_ema.plugins import LIVE
from cl_ema.results import FORMAT, Results

CONFIG = "cfg."  # prefix of the config columns
RUN_COLUMNS = ("run", "experiment", "strategy", "seed", "status", "tasks_done", "num_tasks", "setting_id", "group")
TRACK_COLUMNS = ("track", "rule", "posthoc", "decay", "horizon", "horizon_tasks", "residual")
VALUE_COLUMNS = ("setting", "metric", "value")
MATRIX_COLUMNS = ("run", "track", "setting", "trained", "task", "value")


@dataclass
class Runs:
    """What ``read`` found below a folder."""

    table: pd.DataFrame  # load's tidy table: one row per run, track, setting and metric
    # R[i, j] of every track: one row per run, track, setting, tasks ``trained`` (from 1) and test ``task`` (from 1)
    matrices: pd.DataFrame
    skipped: list[tuple[Path, str]]  # results.json files left out, and why


def load(folder: Path | str) -> pd.DataFrame:
    """Every completed run below ``folder`` as one tidy table (the columns: the module docstring)."""
    return read(folder).table


def read(folder: Path | str) -> Runs:
    """The tidy table of the completed runs below ``folder``, their accuracy matrices, and the results.json
    files left out with the reason; UserError if ``folder`` is not a folder or holds no results.json."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    files = sorted(root.rglob("results.json"))
    if not files:
        raise UserError(f"{root}: no results.json below this directory (point at an outputs/ or multirun/ folder)")
    completed: list[_Run] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        run_or_reason = _read_run(path, root)
        if isinstance(run_or_reason, str):
            skipped.append((path, run_or_reason))
        else:
            completed.append(run_or_reason)
    counted, repeats = _one_run_per_seed(completed)
    runs: list[dict[str, Any]] = []
    tracks: list[dict[str, Any]] = []
    values: list[dict[str, Any]] = []
    for run in counted:
        run_record, track_records, value_records = _records(run)
        runs.append(run_record)
        tracks += track_records
        values += value_records
    matrices = [_matrix_rows(run.name, run.results) for run in counted]
    return Runs(
        _table(runs, tracks, values),
        pd.concat(matrices, ignore_index=True) if matrices else pd.DataFrame(columns=MATRIX_COLUMNS),
        skipped + repeats,
    )


@dataclass
class _Run:
    path: Path
    name: str  # the run's folder relative to the folder read
    data: dict[str, Any]
    results: Results
    mtime: float  # of results.json: the newest run of a repeated seed counts
    group: str  # the runs whose seeds average together: one setting, task count and list of tracks


def _group(data: dict[str, Any]) -> str:
    key = [setting_id(data.get("config", {})), data["num_tasks"], list(data["tracks"])]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]


def _read_run(path: Path, root: Path) -> _Run | str:
    """The completed run of ``path``, or why it is left out."""
    if not path.is_file():  # a folder, a FIFO (reading it would wait forever), a device
        return "unreadable (not a regular file)"
    try:
        data, mtime = json.loads(path.read_text()), path.stat().st_mtime
        check_shape(data)
        if data["status"] != "completed":
            return f"{data['status']} after {data['tasks_done']}/{data['num_tasks']} tasks"
        results = Results.from_dict(data)  # the checks of a resume: baseline, steps, times, matrices
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return _Run(path, str(path.parent.relative_to(root)), data, results, mtime, _group(data))


def _number(value: Any, low: float = -1.0, high: float = 1.0) -> bool:
    """A finite number in [low, high]: accuracies and their differences (forgetting, BWT, FWT) lie in [-1, 1]."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (low <= value <= high)
    )


# ranges of the numbers of a track's track_info (None: not given)
_TRACK_NUMBERS = (
    ("decay", 0.0, 1.0),
    ("horizon", 0.0, math.inf),
    ("horizon_tasks", 0.0, math.inf),
    ("residual", -math.inf, math.inf),
)


def check_shape(data: Any) -> None:
    """Raise ValueError unless ``data`` is a cl_ema results.json of format ``FORMAT``, shaped as it should be,
    its values in their ranges."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"format {data.get('format')!r}, not {FORMAT} (another version of cl_ema wrote it)")
    if not isinstance(data.get("tracks"), dict) or not data["tracks"]:
        raise ValueError("no tracks")
    num_tasks, done = data.get("num_tasks"), data.get("tasks_done")
    if not (isinstance(num_tasks, int) and isinstance(done, int) and 0 <= done <= num_tasks):
        raise ValueError("task counts")
    if data.get("status") == "completed" and done != num_tasks:
        raise ValueError(f"completed after {done} of {num_tasks} tasks")
    if not all(isinstance(data.get(key), str) for key in ("status", "experiment", "strategy")):
        raise ValueError("status, experiment or strategy is not a string")
    if not isinstance(data.get("config", {}), dict):
        raise ValueError("config")
    for track, entry in data["tracks"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"track {track}")
        for setting_name in SETTINGS:
            values = entry if setting_name == "class_il" else entry.get(setting_name)
            if not isinstance(values, dict):
                raise ValueError(f"{track} {setting_name}")
            matrix = np.array(values.get("acc_matrix"), dtype=float)
            if matrix.shape != (num_tasks, num_tasks) or not ((matrix[:done] >= 0) & (matrix[:done] <= 1)).all():
                raise ValueError(f"{track} accuracy matrix (shape {matrix.shape}, or values outside [0, 1])")
            for metric in METRICS:
                value = values.get(metric.key)
                if value is not None and not _number(value):
                    raise ValueError(f"{track} {metric.key}={value!r}")
        stability = entry.get("stability", {})
        if not isinstance(stability, dict) or not all(
            stability.get(m.key) is None or _number(stability.get(m.key)) for m in STABILITY_METRICS
        ):
            raise ValueError(f"{track} stability")
    track_info = data.get("track_info", {})
    if not isinstance(track_info, dict):
        raise ValueError("track_info")
    for track, info in track_info.items():
        if not isinstance(info, dict) or not isinstance(info.get("rule", ""), str):
            raise ValueError(f"{track} track_info")
        for key, low, high in _TRACK_NUMBERS:
            if info.get(key) is not None and not _number(info[key], low, high):
                raise ValueError(f"{track} {key}={info[key]!r}")
        if not isinstance(info.get("posthoc", False), bool):
            raise ValueError(f"{track} posthoc={info['posthoc']!r}")
    if not isinstance(data.get("seed", 0), int):
        raise ValueError("seed")


def _one_run_per_seed(runs: list[_Run]) -> tuple[list[_Run], list[tuple[Path, str]]]:
    """The newest run of each seed in each group, and (path, why) for the repeats left out."""

    def seed_of(run: _Run) -> tuple[str, str]:
        return run.group, json.dumps(run.data.get("seed"))

    newest: dict[tuple[str, str], _Run] = {}
    for run in sorted(runs, key=lambda r: r.mtime, reverse=True):
        newest.setdefault(seed_of(run), run)
    repeats = [
        (run.path, f"seed {run.data.get('seed')} again; the newer run {newest[seed_of(run)].name} counts")
        for run in runs
        if newest[seed_of(run)] is not run
    ]
    return [run for run in runs if newest[seed_of(run)] is run], repeats


def _records(run: _Run) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A run's record, its tracks' records and its values' records."""
    data, results = run.data, run.results
    config = data.get("config", {})
    record = {
        "run": run.name,
        "experiment": data["experiment"],
        "strategy": data["strategy"],
        "seed": data.get("seed"),
        "status": data["status"],
        "tasks_done": data["tasks_done"],
        "num_tasks": data["num_tasks"],
        "setting_id": setting_id(config),
        "group": run.group,
        **{CONFIG + key: json.loads(value) for key, value in result_keys(config).items()},
    }
    first_task_steps = results.meta["steps_per_task"][0]
    tracks = []
    values = []
    for track, entry in data["tracks"].items():
        info = data.get("track_info", {}).get(track, {})
        horizon, horizon_tasks = info.get("horizon"), info.get("horizon_tasks")
        if horizon_tasks is None and horizon is not None and first_task_steps:
            horizon_tasks = horizon / first_task_steps
        tracks.append(
            {
                "run": run.name,
                "track": track,
                "rule": info.get("rule", LIVE if track == LIVE else None),
                "posthoc": info.get("posthoc", False),
                "decay": info.get("decay"),
                "horizon": horizon,
                "horizon_tasks": horizon_tasks,
                "residual": info.get("residual"),
            }
        )
        for setting_name in SETTINGS:
            metrics = entry if setting_name == "class_il" else entry[setting_name]
            values += [
                {"run": run.name, "track": track, "setting": setting_name, "metric": m.key, "value": metrics.get(m.key)}
                for m in METRICS
            ]
        stability = entry.get("stability", {})
        values += [
            {"run": run.name, "track": track, "setting": "class_il", "metric": m.key, "value": stability.get(m.key)}
            for m in STABILITY_METRICS
            if m.key in stability
        ]
    return record, tracks, values


def _matrix_rows(run: str, results: Results) -> pd.DataFrame:
    size = results.num_tasks
    keys = [(track, setting_name) for track in results.tracks for setting_name in SETTINGS]
    trained, task = np.meshgrid(np.arange(1, size + 1), np.arange(1, size + 1), indexing="ij")
    return pd.DataFrame(
        {
            "run": run,
            "track": np.repeat([track for track, _ in keys], size * size),
            "setting": np.repeat([setting_name for _, setting_name in keys], size * size),
            "trained": np.tile(trained.ravel(), len(keys)),
            "task": np.tile(task.ravel(), len(keys)),
            "value": np.stack([results.matrices[key] for key in keys]).ravel(),
        }
    )


def _table(runs: list[dict[str, Any]], tracks: list[dict[str, Any]], values: list[dict[str, Any]]) -> pd.DataFrame:
    run_frame = pd.DataFrame(runs, columns=None if runs else list(RUN_COLUMNS))
    track_frame = pd.DataFrame(tracks, columns=["run", *TRACK_COLUMNS])
    value_frame = pd.DataFrame(values, columns=["run", "track", *VALUE_COLUMNS])
    value_frame["value"] = value_frame["value"].astype(float)  # None → NaN
    for column in ("decay", "horizon", "horizon_tasks", "residual"):
        track_frame[column] = track_frame[column].astype(float)
    track_frame["posthoc"] = track_frame["posthoc"].astype(bool)
    table = value_frame.merge(track_frame, on=["run", "track"]).merge(run_frame, on="run")
    config_columns = sorted(c for c in run_frame.columns if c.startswith(CONFIG))
    return table[[*RUN_COLUMNS, *TRACK_COLUMNS, *VALUE_COLUMNS, *config_columns]]
