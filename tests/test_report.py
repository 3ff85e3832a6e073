"""The report on a small Hydra multirun of split digits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, cli_in_process

from cl_ema.errors import UserError
from cl_ema.report import write_report


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """2 decays × 2 seeds, plus plain × 2 seeds, through `python -m cl_ema -m` (W&B offline)."""
    root = tmp_path_factory.mktemp("multirun")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        for args in (["strategy=ema", "ema.decay=0.9,0.99"], ["strategy=plain"]):
            sweep = root / args[0].split("=")[1]
            status, _, err = cli_in_process("-m", "seed=0,1", "train.epochs=3", *args, f"hydra.sweep.dir={sweep}",
                                            cwd=root)  # fmt: skip
            assert status == 0, err[-3000:]
    finally:
        mp.undo()
    return root


def test_multirun_jobs_are_separate_wandb_runs(multirun):
    runs = list(multirun.rglob("offline-run-*"))
    assert len(runs) == 6  # wandb.finish between Hydra jobs: one W&B run per job


def test_report_tables_and_plots(multirun, tmp_path):
    shutil.copytree(multirun, tmp_path / "runs")
    root = tmp_path / "runs"
    # an interrupted run and an unreadable file are listed, not dropped
    job = next(root.rglob("results.json"))
    interrupted = json.loads(job.read_text()) | {"status": "running", "tasks_done": 2}
    (root / "interrupted").mkdir()
    (root / "interrupted" / "results.json").write_text(json.dumps(interrupted))
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")

    report = write_report(root, tmp_path / "report").read_text()
    main, paired = report.split("## Effect of each track against live")
    rows = [line for line in main.splitlines() if line.startswith("| split_digits")]
    # ema: 2 settings (decays) × 2 tracks; plain: 1 setting × 1 track
    assert len(rows) == 5, report
    ema_rows = [r for r in rows if "| ema |" in r and "ema_0.9 |" in r]
    assert len(ema_rows) == 1 and "ema.decay=0.9" in ema_rows[0] and "| 2 |" in ema_rows[0]
    assert " ± " in ema_rows[0]
    assert "interrupted/results.json | running after 2/5 tasks" in report
    differences = [line for line in paired.splitlines() if line.startswith("| split_digits | ema |")]
    assert len(differences) == 2 and all(line.count(" [") == 3 for line in differences), paired  # ΔACC, Δforget, ΔTIL
    assert "broken/results.json | unreadable" in report
    for png in ("decay_vs_metrics.png",):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "report").glob("*_matrices.png"))) == 3
    assert len(list((tmp_path / "report").glob("*_over_tasks.png"))) == 3


def test_report_mean_and_std_are_over_seeds(multirun, tmp_path):
    import numpy as np

    report = write_report(multirun, tmp_path).read_text()
    values = []
    for path in multirun.rglob("results.json"):
        data = json.loads(path.read_text())
        if data["strategy"] == "plain":
            values.append(data["tracks"]["live"]["avg_acc"])
    row = next(r for r in report.splitlines() if "| plain |" in r)
    acc = row.split("|")[6].strip()
    assert acc == f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"


def test_a_seed_run_again_counts_once(multirun, tmp_path):
    shutil.copytree(multirun, tmp_path / "runs")
    before = write_report(tmp_path / "runs", tmp_path / "before").read_text()
    plain_seed_1 = next(p.parent for p in (tmp_path / "runs" / "plain").rglob("results.json") if "seed=1" in str(p))
    shutil.copytree(plain_seed_1, tmp_path / "runs" / "again")  # the same command run twice
    (tmp_path / "runs" / "again" / "results.json").touch()  # later (copytree keeps the times)
    after = write_report(tmp_path / "runs", tmp_path / "after").read_text()

    def plain_row(report: str) -> str:
        return next(r for r in report.splitlines() if "| plain |" in r)

    assert plain_row(after) == plain_row(before)  # still 2 seeds, same mean ± std
    repeat = "seed 1 again; the newer run again counts"
    assert f"| {plain_seed_1.relative_to(tmp_path / 'runs')}/results.json | {repeat} |" in after


def test_report_cli_errors_on_an_empty_directory(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        write_report(tmp_path, tmp_path / "r")
    proc = subprocess.run(
        [sys.executable, "-m", "cl_ema.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    )


def test_wrongly_shaped_results_are_listed_not_fatal(tmp_path):
    from helpers import run_experiment

    run_experiment(tmp_path / "good", "data.n_tasks=2")
    good = json.loads((tmp_path / "good" / "results.json").read_text())
    shapes = {
        "list": [1, 2],
        "no_tracks": {"status": "completed"},
        "bad_matrix": {**good, "tracks": {"live": {**good["tracks"]["live"], "acc_matrix": [[0.5]]}}},
        "bad_counts": {**good, "tasks_done": "two"},
        "bad_metric": {**good, "tracks": {"live": {**good["tracks"]["live"], "avg_acc": "high"}}},
        "nan_metric": {**good, "tracks": {"live": {**good["tracks"]["live"], "avg_acc": float("nan")}}},
        "bad_seed": {**good, "seed": "zz"},
    }
    for name, data in shapes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    report = write_report(tmp_path, tmp_path / "report").read_text()
    for name in shapes:
        assert f"| {name}/results.json | unreadable (" in report, name
    assert "1 completed run in 1 setting;" in report


def test_settings_group_by_what_runs_used_and_a_resumed_run_joins_its_seeds(tmp_path, monkeypatch):
    from helpers import run_experiment, stop_and_resume

    common = ["strategy=lwf", "data.n_tasks=2", "train.epochs=2"]
    run_experiment(tmp_path / "seed0", *common, "seed=0")
    stop_and_resume(tmp_path / "seed1", monkeypatch, *common, "seed=1", task=1, step=3)  # resumed, with resume=<dir>
    shutil.rmtree(tmp_path / "seed1" / "whole")  # keep only the resumed run of seed 1
    run_experiment(tmp_path / "alpha", *common, "lwf.alpha=0.5")  # an option of the plugin
    run_experiment(tmp_path / "ema", "strategy=ema", "data.n_tasks=2", "train.epochs=2")
    report = write_report(tmp_path, tmp_path / "report").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| split_digits | lwf |")]
    by_label = {row.split(" | ")[2]: row.split(" | ")[4] for row in rows}
    # seed 0 and the resumed seed 1 (its config says resume=<dir>): one setting of two seeds
    assert by_label == {"lwf.alpha=1.0": "2", "lwf.alpha=0.5": "1"}, rows
    assert "| split_digits | ema | - | ema_0.99 |" in report


def test_plots_read_at_a_glance(multirun):
    import matplotlib.pyplot as plt

    from cl_ema.report import collect, group, horizons_figure, over_tasks_figure

    settings = group(collect(multirun)[0])
    fig = over_tasks_figure(settings[0])
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)  # whole tasks, never 1.5
    fig = horizons_figure(settings)
    assert all(ax.get_xlabel() == "" for ax in fig.axes)  # one shared label, not one per panel overlapping
    assert fig.get_supxlabel().startswith("EMA horizon")
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "log"]
    plt.close("all")


def test_the_paired_interval_is_students_t_over_the_seeds_differences():
    from cl_ema.report import paired_interval

    differences = [0.031, 0.052, 0.018, 0.044, 0.027]
    mean = sum(differences) / 5
    sd = (sum((d - mean) ** 2 for d in differences) / 4) ** 0.5
    half = 2.7764451051977987 * sd / 5**0.5  # t(0.975, 4 degrees of freedom), from a table
    got = paired_interval(differences)
    assert got == pytest.approx((mean, mean - half, mean + half), rel=1e-9)
    assert paired_interval([0.02, 0.02]) == (0.02, 0.02, 0.02)  # no spread
    one = paired_interval([0.03])
    assert one[0] == 0.03 and one[1] != one[1]  # one seed: no interval (nan)
