"""The report (``python -m cl_ema.report``) on synthetic runs (``test_runs.write_run``): its tables, the runs it
leaves out, and its figures for a setting of 37 tracks (25 tracked during training, 12 post-hoc EMAs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
from test_runs import POSTHOC_HORIZONS, small_tracks, track_set, write_run

from cl_ema.errors import UserError
from cl_ema.metrics import HEADLINE
from cl_ema.plugins import LIVE
from cl_ema.report import main, mean_matrices, over_tasks, paired_interval, settings_of, write_report
from cl_ema.runs import read

SEEDS = (0, 1, 2)


def table_rows(report: str, track: str, section: str = "") -> list[list[str]]:
    """The cells of the rows of ``track`` in the report's first table, or in the section named ``section``."""
    text = report.split(f"## {section}")[1].split("\n## ")[0] if section else report.split("\n## ")[0]
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip("| ") for cell in row] for row in rows if row[3] == track]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """3 seeds of 37 tracks, an interrupted run, a broken file and one of an older format; and the report."""
    root = tmp_path_factory.mktemp("study")
    written = [write_run(root / "multirun" / f"seed={seed}", seed=seed) for seed in SEEDS]
    write_run(root / "multirun" / "seed=3", seed=3, status="interrupted")
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    (root / "older").mkdir()
    (root / "older" / "results.json").write_text(json.dumps(written[0] | {"format": "cl_ema-results-1"}))
    out = root / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's and matplotlib's warnings too
        report = write_report(root, out).read_text()
    return root, written, report, out


def test_the_tables_give_mean_and_std_over_seeds_and_the_paired_difference(study):
    root, written, report, _ = study
    assert report.count("| split_digits | averages |") == 2 * 37 - 1  # every track; every one but live paired
    (live,) = table_rows(report, LIVE)
    accuracies = [data["tracks"][LIVE]["avg_acc"] for data in written]
    assert live[4:6] == ["3", f"{100 * np.mean(accuracies):.2f} ± {100 * np.std(accuracies, ddof=1):.2f}"]
    (paired,) = table_rows(report, "ema_h2", "Effect of each track")
    assert paired[4] == "3" and all(" [" in cell for cell in paired[5:]), paired
    differences = [data["tracks"]["ema_h2"]["avg_acc"] - data["tracks"][LIVE]["avg_acc"] for data in written]
    mean, low, high = paired_interval(differences)
    star = " *" if low > 0 or high < 0 else ""
    assert paired[5] == f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]{star}"
    assert "| multirun/seed=3/results.json | interrupted after 2/5 tasks |" in report
    assert "| broken/results.json | unreadable (JSONDecodeError:" in report
    assert "| older/results.json | unreadable (ValueError: format 'cl_ema-results-1', not cl_ema-results-2" in report
    assert "3 completed runs in 1 setting;" in report


def test_the_report_links_each_figure_with_a_caption(study):
    _, _, report, out = study
    pngs = sorted(p.name for p in out.glob("*.png"))
    kinds = ("forest", "horizon", "matrices", "over_tasks")
    assert pngs == [f"00_split_digits_averages_{kind}.png" for kind in kinds]
    for name in pngs:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        link = re.search(rf"### (split_digits / averages.*)\n\n!\[\1\]\({name}\)\n\n(.+)\n", report)
        assert link and len(link[2]) > 80, name  # a caption: a sentence that says what the figure shows


def test_every_figure_reads_with_37_tracks(study):
    from cl_ema import plots

    root = study[0]
    (setting,) = settings_of(read(root))
    track_effects = setting.effects
    try:
        matrices = plots.heatmaps_figure(mean_matrices(setting), "t")
        panels = [ax for ax in matrices.axes if ax.get_title()]  # not the colour bar
        assert len(panels) == 37 and len({round(ax.get_position().x0, 3) for ax in panels}) == plots.HEATMAPS_PER_ROW

        over = plots.over_tasks_figure(over_tasks(setting), "t")
        over.canvas.draw()
        (legend,) = over.legends
        box = legend.get_window_extent()
        assert all(not box.overlaps(ax.get_window_extent()) for ax in over.axes)  # beside the curves, not on them
        lines = {line.get_label(): line for line in over.axes[0].get_lines()}
        assert len(lines) == 37 and lines[LIVE].get_color() == "#000000" and lines[LIVE].get_linestyle() == "--"
        one_per_family = {
            plots.family_of(info["rule"], info.get("posthoc")): name for name, info in track_set().items()
        }
        styles = {
            (lines[name].get_marker(), plots.FAMILY_STYLES[family].color) for family, name in one_per_family.items()
        }
        assert len(styles) == len(one_per_family) == 11  # a marker and a colour per family, live's included
        assert lines[LIVE].get_color() != lines["swa_quadratic_task"].get_color()

        horizon = plots.horizon_figure(track_effects, "t")
        assert horizon is not None and len(horizon.axes) == len(HEADLINE)
        for ax in horizon.axes:
            assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("EMA horizon (tasks")
            (curve,) = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() == "-"]
            assert sorted(curve.get_xdata()) == sorted(POSTHOC_HORIZONS)  # the post-hoc EMAs, a continuous curve
            assert len(ax.collections) >= 2  # the band, and the tracked EMAs' intervals

        forest = plots.forest_figure(track_effects, "t")
        labels = [tick.get_text() for tick in forest.axes[0].get_yticklabels()]
        accuracy = track_effects[track_effects["metric"] == "ACC"].set_index("track")["mean"]
        assert labels == list(accuracy.sort_values(ascending=False).index)  # every track, the best on top
    finally:
        plt.close("all")


def test_differences_without_spread_say_so_without_a_warning_or_a_star(tmp_path):
    for seed in SEEDS:  # every seed: the same shift of each track against live
        write_run(tmp_path / f"seed{seed}", seed=seed, tracks=small_tracks(), noise=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = write_report(tmp_path, tmp_path / "report", figures=False).read_text()
        rounded = paired_interval([0.85 - 0.80, 0.75 - 0.70, 0.65 - 0.60])  # 0.05 each, but for the rounding
    assert rounded[0] == pytest.approx(0.05) and np.isnan(rounded[1:]).all()
    (paired,) = table_rows(report, "ema_0.99", "Effect of each track")
    assert all(cell.endswith(" (no spread)") and "[" not in cell for cell in paired[5:]), paired


def test_the_seeds_column_counts_the_runs_that_have_the_metric(tmp_path):
    stability = {"min_acc": 0.5, "wc_acc": 0.55, "aaa": 0.7, "stability_gap": 0.1, "gap_per_task": [0.1]}
    for seed in SEEDS:
        data = write_run(tmp_path / f"seed{seed}", seed=seed, tracks=small_tracks())
        if seed:
            data["tracks"]["ema_0.99"]["stability"] = stability  # continual evaluation in two runs of three
        else:
            data["tracks"]["swa"]["fwt"] = None  # a metric one run lacks
            data["tracks"]["swa"]["avg_acc"] = None
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(data))
    report = write_report(tmp_path, tmp_path / "report", figures=False).read_text()
    (swa,) = table_rows(report, "swa")
    assert swa[4] == "3" and swa[5].endswith(" (n=2)") and swa[10].endswith(" (n=2)") and "(n=" not in swa[6]
    (stable,) = table_rows(report, "ema_0.99", "Continual evaluation")
    assert stable[4:6] == ["2", "50.00 ± 0.00"]
    assert not table_rows(report, "swa", "Continual evaluation")
    (paired,) = table_rows(report, "swa", "Effect of each track")
    assert paired[4] == "3" and paired[5].endswith(" (n=2)") and "(n=" not in paired[6]


def test_settings_that_differ_only_in_their_tracks_get_labels_apart(tmp_path):
    posthoc = small_tracks() | {name: info for name, info in track_set().items() if name.startswith("posthoc_ema_h0")}
    for seed in (0, 1):
        write_run(tmp_path / "plain" / str(seed), seed=seed, tracks=small_tracks())
        write_run(tmp_path / "posthoc" / str(seed), seed=seed, tracks=posthoc)
    report = write_report(tmp_path, tmp_path / "report", figures=False).read_text()
    labels = {row[2] for row in table_rows(report, "swa")}
    assert labels == {
        "with 4 tracks: posthoc_ema_h0.05 … posthoc_ema_h0.5",
        "without 4 tracks: posthoc_ema_h0.05 … posthoc_ema_h0.5",
    }


def test_settings_group_by_what_runs_used(tmp_path):
    def lwf(alpha: float) -> dict:
        return {"_target_": "cl_ema.plugins.options.LwFOptions", "alpha": alpha}

    write_run(tmp_path / "seed0", seed=0, tracks=small_tracks(), lwf=lwf(1.0))
    write_run(tmp_path / "seed1", seed=1, tracks=small_tracks(), lwf=lwf(1.0), resume="seed1_before", device="cuda")
    write_run(tmp_path / "alpha", seed=0, tracks=small_tracks(), lwf=lwf(0.5))
    write_run(tmp_path / "ema", seed=0, tracks=small_tracks(), strategy="ema")
    report = write_report(tmp_path, tmp_path / "report", figures=False).read_text()
    by_label = {row[2]: row[4] for row in table_rows(report, LIVE) if row[1] == "averages"}
    assert by_label == {"lwf.alpha=1.0": "2", "lwf.alpha=0.5": "1"}  # resume and device never change results
    assert table_rows(report, LIVE)[-1][1:3] == ["ema", "-"]


def test_counts_are_pluralised(tmp_path):
    write_run(tmp_path, tracks=small_tracks())
    report = write_report(tmp_path, tmp_path / "report").read_text()
    assert "1 completed run in 1 setting;" in report and "mean over 1 seed." in report
    assert "1 seeds" not in report and "1 runs" not in report and "1 settings" not in report
    (paired,) = table_rows(report, "swa", "Effect of each track")
    assert "[" not in paired[5] and "(no spread)" not in paired[5]  # one seed: a difference, no interval


def test_a_seed_run_again_counts_once(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"seed{seed}", seed=seed, tracks=small_tracks())
    before = write_report(tmp_path / "runs", tmp_path / "before", figures=False).read_text()
    shutil.copytree(tmp_path / "runs" / "seed1", tmp_path / "runs" / "again")  # the same command run twice
    os.utime(tmp_path / "runs" / "seed1" / "results.json", (1_000_000_000, 1_000_000_000))
    after = write_report(tmp_path / "runs", tmp_path / "after", figures=False).read_text()
    assert table_rows(after, LIVE) == table_rows(before, LIVE)  # still 2 seeds, the same mean ± std
    assert "| seed1/results.json | seed 1 again; the newer run again counts |" in after


def test_wrongly_shaped_results_are_listed_not_fatal(tmp_path):
    good = write_run(tmp_path / "good", tracks=small_tracks())
    shapes = {
        "list": [1, 2],
        "no_tracks": {"format": good["format"], "status": "completed"},
        "bad_matrix": {**good, "tracks": {LIVE: {**good["tracks"][LIVE], "acc_matrix": [[0.5]]}}},
        "bad_counts": {**good, "tasks_done": "two"},
        "bad_metric": {**good, "tracks": {**good["tracks"], LIVE: {**good["tracks"][LIVE], "avg_acc": "high"}}},
        "nan_metric": {**good, "tracks": {**good["tracks"], LIVE: {**good["tracks"][LIVE], "avg_acc": float("nan")}}},
        "bad_seed": {**good, "seed": "zz"},
    }
    for name, data in shapes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    report = write_report(tmp_path, tmp_path / "report", figures=False).read_text()
    for name in shapes:
        assert f"| {name}/results.json | unreadable (" in report, name
    assert "1 completed run in 1 setting;" in report


def test_the_cli_prints_the_tables_and_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no results.json"):
        write_report(tmp_path, tmp_path / "r")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    write_run(tmp_path / "run", tracks=small_tracks(), status="failed")
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert capsys.readouterr().err == (
        f"error: {tmp_path}: no completed run to report (run/results.json: failed after 2/5 tasks)\n"
    )
    write_run(tmp_path / "done", tracks=small_tracks())
    main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures"])
    printed = capsys.readouterr().out
    assert "| split_digits | averages | - | live | 1 |" in printed and "## Figures" not in printed
    assert printed.endswith(f"report: {tmp_path / 'out' / 'report.md'}\n")


def test_the_paired_interval_is_students_t_over_the_seeds_differences():
    differences = [0.031, 0.052, 0.018, 0.044, 0.027]
    mean = sum(differences) / 5
    sd = (sum((d - mean) ** 2 for d in differences) / 4) ** 0.5
    half = 2.7764451051977987 * sd / 5**0.5  # t(0.975, 4 degrees of freedom), from a table
    assert paired_interval(differences) == pytest.approx((mean, mean - half, mean + half), rel=1e-9)
    for no_interval in ([0.02, 0.02], [0.03]):  # no spread, one seed
        got = paired_interval(no_interval)
        assert got[0] == no_interval[0] and np.isnan(got[1:]).all()
