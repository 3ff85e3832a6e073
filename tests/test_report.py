"""The report on a small Hydra multirun of split digits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

from cl_ema.errors import UserError
from cl_ema.report import write_report


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """2 decays × 2 seeds, plus plain × 2 seeds, through `python -m cl_ema -m` (W&B offline)."""
    root = tmp_path_factory.mktemp("multirun")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for args in (["strategy=ema", "ema.decay=0.9,0.99"], ["strategy=plain"]):
        proc = subprocess.run(
            [sys.executable, "-m", "cl_ema", "-m", "seed=0,1", "train.epochs=3", *args,
             f"hydra.sweep.dir={root / args[0].split('=')[1]}"],
            cwd=root, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
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
    rows = [line for line in report.splitlines() if line.startswith("| split_digits")]
    # ema: 2 settings (decays) × 2 tracks; plain: 1 setting × 1 track
    assert len(rows) == 5, report
    ema_rows = [r for r in rows if "| ema |" in r and "ema_0.9 |" in r]
    assert len(ema_rows) == 1 and "ema.decay=0.9" in ema_rows[0] and "| 2 |" in ema_rows[0]
    assert " ± " in ema_rows[0]
    assert "interrupted/results.json | running after 2/5 tasks" in report
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


def test_report_cli_errors_on_an_empty_directory(tmp_path):
    with pytest.raises(UserError, match="no results.json"):
        write_report(tmp_path, tmp_path / "r")
    proc = subprocess.run(
        [sys.executable, "-m", "cl_ema.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert (
        proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    )
