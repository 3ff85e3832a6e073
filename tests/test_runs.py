"""The tidy table of many runs (``cl_ema.runs``), on synthetic results.json files written by ``Results``.

``write_run`` (also used by test_report.py) writes a run of many tracks: ``live``, EMAs of given decays and
horizons, the other rule families, and post-hoc EMAs at many horizons, each with a known effect on
forgetting and a seed's noise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cl_ema.config import result_keys, setting_id
from cl_ema.metrics import METRICS, SETTINGS, STABILITY_METRICS
from cl_ema.plugins import LIVE
from cl_ema.results import Results
from cl_ema.runs import CONFIG, MATRIX_COLUMNS, RUN_COLUMNS, TRACK_COLUMNS, VALUE_COLUMNS, load, read

STEPS = 100  # optimizer steps of each task
POSTHOC_HORIZONS = (0.05, 0.1, 0.2, 0.25, 0.5, 1, 1.5, 2, 3, 4, 8, 16)  # in tasks
OTHER_TRACKS = {
    "swa": ("swa", "swa_task", "swa_linear", "swa_quadratic_task", "swa_linear_task"),
    "wise": ("wise_init_0.5", "wise_prev_task_0.5", "wise_init_0.8"),
    "merge_mean": ("merge_mean",),
    "magmax": ("magmax", "magmax_1"),
    "ties": ("ties", "ties_0.8"),
    "bema": ("bema",),
    "lines": ("lines_init_0.5", "lines_prev_task_0.5"),
}


def ema_info(decay: float | None = None, horizon_tasks: float | None = None, posthoc: bool = False) -> dict:
    """track_info of an EMA of ``decay`` or of ``horizon_tasks``, as the run (or ``cl_ema.posthoc``) writes it."""
    if decay is None:
        assert horizon_tasks is not None
        decay = 1 - 1 / (horizon_tasks * STEPS)
    info = {"rule": "ema", "decay": decay, "horizon": float(f"{1 / (1 - decay):.12g}"), "horizon_tasks": horizon_tasks}
    return info | ({"posthoc": True, "residual": 0.004} if posthoc else {})


def track_set(*, posthoc: bool = True, others: bool = True) -> dict[str, dict]:
    """track_info of live, 6 direct EMAs, 2 stochastic EMAs, 16 other averages (25 tracks with
    ``others``) and 12 post-hoc EMAs (with ``posthoc``)."""
    tracks: dict[str, dict] = {LIVE: {"rule": LIVE, "decay": None, "horizon": None}}
    tracks |= {f"ema_{d}": ema_info(d) for d in (0.9, 0.99, 0.995, 0.999)}
    tracks |= {f"ema_h{h}": ema_info(horizon_tasks=h) for h in (0.5, 2)}
    if others:
        tracks |= {
            name: ema_info(d) | {"rule": "stochastic_ema"}
            for name, d in (("ema_plastic", 0.999), ("ema_stable", 0.9995))
        }
        tracks |= {
            name: {"rule": rule, "decay": None, "horizon": None}
            for rule, names in OTHER_TRACKS.items()
            for name in names
        }
    if posthoc:
        tracks |= {f"posthoc_ema_h{h:g}": ema_info(horizon_tasks=h, posthoc=True) for h in POSTHOC_HORIZONS}
    return tracks


def gain(track: str, info: dict) -> float:
    """How much more of the previous tasks a track keeps than live: an EMA's peaks at 1.5 tasks."""
    if track == LIVE:
        return 0.0
    if info.get("rule") == "ema":
        horizon = info["horizon_tasks"] or info["horizon"] / STEPS
        return 0.1 * math.exp(-(math.log(horizon / 1.5) ** 2) / 2) - 0.02
    return (zlib.crc32(track.encode()) % 100) / 1000 - 0.03


def config(seed: int, strategy: str, num_tasks: int, **extra: Any) -> dict:
    """A resolved config as results.json records it (a plugin node, neutral keys)."""
    return {
        "seed": seed,
        "device": "cpu",
        "resume": None,
        "data": {"dataset": {"_target_": "cl_ema.data.sources.digits"}, "n_tasks": num_tasks, "download": True},
        "train": {"epochs": 1, "batch_size": 32},
        "choices": {"experiment": "split_digits", "strategy": strategy},
        "averages": {"_target_": "cl_ema.plugins.options.AveragingOptions", "rules": [{"rule": "ema"}]},
        **extra,
    }


def write_run(
    folder: Path,
    *,
    seed: int = 0,
    tracks: dict[str, dict] | None = None,
    strategy: str = "averages",
    num_tasks: int = 5,
    noise: float = 0.01,
    status: str = "completed",
    **extra: Any,
) -> dict:
    """Write ``folder/results.json`` of a run of ``tracks`` (``track_set()``) and return what it holds:
    each track's accuracy on the previous tasks is live's plus its ``gain`` plus the seed's ``noise``."""
    tracks = track_set() if tracks is None else tracks
    rng = np.random.default_rng(seed)
    live = 0.1 + 0.02 * rng.random((num_tasks, num_tasks))  # tasks not trained yet: chance
    diagonal = 0.95 + 0.03 * rng.random(num_tasks)
    for i in range(num_tasks):
        live[i, : i + 1] = diagonal[: i + 1] - 0.12 * (i - np.arange(i + 1))
    previous = np.tril_indices(num_tasks, -1)
    meta = {
        "experiment": "split_digits",
        "strategy": strategy,
        "seed": seed,
        "track_info": tracks,
        "steps_per_task": [STEPS] * num_tasks,
        "train_s": 1.0,
        "elapsed_s": 2.0,
        "config": config(seed, strategy, num_tasks, **extra),
    }
    results = Results(list(tracks), num_tasks, meta)
    for track, info in tracks.items():
        matrix = live.copy()
        shift = gain(track, info) + (noise * rng.standard_normal() if track != LIVE else 0.0)
        matrix[previous] = np.clip(live[previous] + shift, 0, 1)
        results.matrices[track, "class_il"][:] = matrix
        results.matrices[track, "task_il"][:] = 0.5 + 0.5 * matrix
    results.baseline = {s: [0.1] * num_tasks for s in SETTINGS}
    results.tasks_done = num_tasks if status == "completed" else 2
    results.status = status
    data = results.to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data))
    return data


def small_tracks() -> dict[str, dict]:
    return {
        name: info
        for name, info in track_set().items()
        if name in (LIVE, "ema_0.99", "ema_h0.5", "swa", "posthoc_ema_h0.25")
    }


def test_one_row_per_run_track_setting_and_metric_with_the_values_written(tmp_path):
    written = {seed: write_run(tmp_path / f"seed{seed}", seed=seed, tracks=small_tracks()) for seed in (0, 1)}
    stability = {"min_acc": 0.5, "wc_acc": 0.55, "aaa": 0.7, "stability_gap": None, "gap_per_task": [0.1]}
    written[1]["tracks"]["ema_0.99"]["stability"] = stability  # a run with continual evaluation
    (tmp_path / "seed1" / "results.json").write_text(json.dumps(written[1]))
    table = load(tmp_path)

    config_columns = sorted(CONFIG + key for key in result_keys(written[0]["config"]))
    assert list(table.columns) == [*RUN_COLUMNS, *TRACK_COLUMNS, *VALUE_COLUMNS, *config_columns]
    assert len(table) == 2 * 5 * len(SETTINGS) * len(METRICS) + len(STABILITY_METRICS)
    for row in table.itertuples():
        data = written[row.seed]
        entry = data["tracks"][row.track]
        if row.metric in stability and row.metric not in {m.key for m in METRICS}:
            expected = entry["stability"][row.metric]
        else:
            expected = (entry if row.setting == "class_il" else entry["task_il"])[row.metric]
        assert row.value == expected or (expected is None and math.isnan(row.value)), row
        assert row.run == f"seed{row.seed}" and row.status == "completed" and row.tasks_done == row.num_tasks == 5
        assert row.setting_id == setting_id(data["config"]) and row.experiment == "split_digits"
    assert table.loc[table["metric"] == "stability_gap", "value"].isna().all()  # null: NaN

    tracks = table.drop_duplicates(["run", "track"]).set_index(["run", "track"])
    assert tracks.loc[("seed0", "ema_0.99"), "horizon_tasks"] == pytest.approx(100 / STEPS)  # from the horizon
    assert tracks.loc[("seed0", "ema_h0.5"), "horizon_tasks"] == 0.5  # recorded
    posthoc = tracks.loc[("seed0", "posthoc_ema_h0.25")]
    assert (posthoc["rule"], posthoc["posthoc"], posthoc["horizon_tasks"], posthoc["residual"]) == (
        "ema",
        True,
        0.25,
        0.004,
    )
    assert tracks.loc[("seed0", LIVE), "rule"] == LIVE and not tracks.loc[("seed0", "swa"), "posthoc"]
    assert tracks[["decay", "horizon", "horizon_tasks", "residual"]].loc[("seed0", "swa")].isna().all()
    assert tracks.loc[("seed0", "ema_0.99"), "decay"] == 0.99 and tracks.loc[("seed0", "ema_0.99"), "horizon"] == 100

    first = table[table["seed"] == 0].iloc[0]
    assert first["cfg.data.n_tasks"] == 5 and first["cfg.averages.rules"] == [{"rule": "ema"}]  # decoded JSON
    assert first["cfg.seed"] == 0 and "cfg.device" not in table and "cfg.resume" not in table  # neutral keys left out
    assert table["group"].nunique() == 1  # the two seeds average together


def test_the_accuracy_matrices_read_back_as_a_table(tmp_path):
    written = write_run(tmp_path, tracks=small_tracks(), num_tasks=3)
    matrices = read(tmp_path).matrices
    assert list(matrices.columns) == list(MATRIX_COLUMNS) and set(matrices["run"]) == {"."}  # the folder is the run
    for setting_name in SETTINGS:
        cells = matrices[(matrices["track"] == "swa") & (matrices["setting"] == setting_name)]
        matrix = cells.pivot(index="trained", columns="task", values="value").to_numpy()
        entry = written["tracks"]["swa"]
        expected = (entry if setting_name == "class_il" else entry["task_il"])["acc_matrix"]
        assert matrix.tolist() == expected


def test_files_left_out_are_listed_with_their_reason(tmp_path):
    good = write_run(tmp_path / "good", tracks=small_tracks())
    write_run(tmp_path / "stopped", tracks=small_tracks(), seed=1, status="interrupted")
    files = {
        "broken": "{not json",
        "older": json.dumps(good | {"format": "cl_ema-results-1"}),
        "unformatted": json.dumps({k: v for k, v in good.items() if k != "format"}),
        "range": json.dumps(good | {"tracks": {**good["tracks"], LIVE: {**good["tracks"][LIVE], "avg_acc": 1.5}}}),
        "horizon": json.dumps(good | {"track_info": {**good["track_info"], "swa": {"rule": "swa", "horizon": -1}}}),
        "posthoc": json.dumps(good | {"track_info": {**good["track_info"], "swa": {"rule": "swa", "posthoc": "y"}}}),
        "steps": json.dumps(good | {"steps_per_task": [STEPS]}),  # Results.from_dict's checks
    }
    for name, text in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
    runs = read(tmp_path)
    reasons = {str(path.parent.relative_to(tmp_path)): why for path, why in runs.skipped}
    assert set(runs.table["run"]) == {"good"}
    assert reasons.pop("stopped") == "interrupted after 2/5 tasks"
    assert reasons.pop("older") == (
        "unreadable (ValueError: format 'cl_ema-results-1', not cl_ema-results-2 (another version of cl_ema wrote it))"
    )
    assert "format None, not cl_ema-results-2" in reasons.pop("unformatted")
    assert "swa horizon=-1" in reasons["horizon"] and "swa posthoc='y'" in reasons["posthoc"]
    assert "steps_per_task" in reasons["steps"] and "live avg_acc=1.5" in reasons["range"]
    assert all(why.startswith("unreadable (") for why in reasons.values()), reasons


def test_a_seed_run_again_counts_once_the_newest(tmp_path):
    write_run(tmp_path / "first", seed=1, tracks=small_tracks())
    newer = write_run(tmp_path / "again", seed=1, tracks=small_tracks(), noise=0.03)
    os.utime(tmp_path / "first" / "results.json", (1_000_000_000, 1_000_000_000))  # older
    write_run(tmp_path / "other", seed=2, tracks=small_tracks())
    runs = read(tmp_path)
    assert set(runs.table["run"]) == {"again", "other"}
    assert runs.skipped == [(tmp_path / "first" / "results.json", "seed 1 again; the newer run again counts")]
    acc = runs.table.query("run == 'again' and track == 'swa' and setting == 'class_il' and metric == 'avg_acc'")
    assert acc["value"].item() == newer["tracks"]["swa"]["avg_acc"]


def test_a_seed_with_other_tracks_is_another_group_not_a_repeat(tmp_path):
    write_run(tmp_path / "plain", tracks=small_tracks())
    write_run(tmp_path / "posthoc", tracks=track_set())  # the same run after a post-hoc pass, copied
    runs = read(tmp_path)
    assert not runs.skipped and runs.table.groupby("run")["group"].first().nunique() == 2
    assert runs.table["setting_id"].nunique() == 1


def test_an_empty_folder_is_a_user_error(tmp_path):
    from cl_ema.errors import UserError

    with pytest.raises(UserError, match="no results.json"):
        load(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        load(tmp_path / "missing")


def test_the_table_and_the_report_import_no_torch():
    code = "import sys, cl_ema.runs, cl_ema.report; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
