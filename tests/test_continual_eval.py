"""Continual evaluation: stability metrics by hand, and evaluation that leaves training alone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_experiment
from wandb_records import find_run_file, read_run

from cl_ema.continual_eval import Curve, stability_metrics
from cl_ema.report import write_report


def curve(*evals) -> Curve:
    c = Curve()
    for step, task, accs in evals:
        c.add(step, task, accs)
    return c


def test_metrics_by_hand_with_a_task_evaluated_only_once():
    c = curve(
        (0, 0, [0.1]),
        (10, 0, [0.9]),
        (10, 1, [0.9, 0.0]),  # start of task 2
        (20, 1, [0.5, 0.8]),
        (30, 2, [0.6, 0.7, 0.1]),  # task 3: a single evaluation, so no gap for it
    )
    m = stability_metrics(c)
    assert m["min_acc"] == pytest.approx((0.5 + 0.7) / 2)  # task 1: min(0.9, 0.5, 0.6); task 2: 0.7
    assert m["wc_acc"] == pytest.approx(0.1 / 3 + (2 / 3) * 0.6)
    assert m["aaa"] == pytest.approx((0.1 + 0.9 + 0.45 + 0.65 + (0.6 + 0.7 + 0.1) / 3) / 5)
    assert m["gap_per_task"] == [pytest.approx(0.4)]  # task 1 fell from 0.9 to 0.5 while training task 2
    assert m["stability_gap"] == pytest.approx(0.4)


def test_gap_is_the_largest_drop_over_previous_tasks():
    c = curve((0, 1, [0.9, 0.8, 0.0]), (5, 1, [0.2, 0.7, 0.3]), (9, 1, [0.6, 0.1, 0.9]))
    m = stability_metrics(c)
    assert m["gap_per_task"] == [pytest.approx(0.7)]  # task 1: 0.9 → 0.2 (task 2 is being trained)


def test_one_task_and_no_evaluations():
    m = stability_metrics(curve((0, 0, [0.1]), (5, 0, [0.8])))
    assert m["min_acc"] is None and m["stability_gap"] is None and m["gap_per_task"] == []
    assert m["wc_acc"] == pytest.approx(0.8) and m["aaa"] == pytest.approx(0.45)
    assert stability_metrics(Curve())["aaa"] is None


def test_periodic_evaluation_does_not_change_training(tmp_path):
    common = ["strategy=ema_replay", "model=cnn", "train.epochs=2", "ema.decays=[0.9,0.99]", "checkpoint=true"]
    with_eval, _ = run_experiment(tmp_path / "a", *common, "eval.every_n_steps=3")
    without, _ = run_experiment(tmp_path / "b", *common)
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # final live weights, BN included
    shadows = [state["plugins"]["ema"]["averages"]["shadows"] for state in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*shadows))
    assert with_eval.tracks == without.tracks
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    for track in ("live", "ema_0.9", "ema_0.99"):
        assert set(data["tracks"][track]["stability"]) == {"min_acc", "wc_acc", "aaa", "stability_gap", "gap_per_task"}
    curves = json.loads((tmp_path / "a" / "continual_eval.json").read_text())
    steps = curves["live"]["steps"]
    assert steps[0] == 0 and steps == sorted(steps) and len(curves["live"]["accuracies"][-1]) == 5
    assert (tmp_path / "a" / "continual_eval.png").read_bytes()[:4] == b"\x89PNG"


def test_continual_evaluation_is_logged_against_the_training_step_and_reported(tmp_path):
    results, _ = run_experiment(
        tmp_path / "run",
        "logger=wandb",
        "strategy=ema",
        "data.n_tasks=2",
        "eval.every_n_steps=30",
        "eval.subset_size=20",
    )
    logged = read_run(find_run_file(tmp_path / "run"))
    rows = [r for r in logged.history if "continual/ema_0.99/acc_task_1" in r]
    expected, start = [], 0
    for n in results.meta["steps_per_task"]:  # each task: its start, every 30 steps, its end
        expected += [start, *range(start + 30, start + n + 1, 30)] + ([start + n] if n % 30 else [])
        start += n
    assert [r["train_step"] for r in rows] == expected
    assert any(m.glob_name == "continual/*" and m.step_metric == "train_step" for m in logged.metrics)
    gap = results.stability["ema_0.99"]["stability_gap"]
    assert logged.summary["final/ema_0.99/continual/stability_gap"] == pytest.approx(gap)
    report = write_report(tmp_path, tmp_path / "report").read_text()
    assert "## Continual evaluation (stability gap)" in report
    row = next(line for line in report.splitlines() if "| ema_0.99 |" in line and line.count("|") == 10)
    assert f"{100 * gap:.2f}" in row
