"""Many runs → tables and plots: ``python -m cl_ema.report <outputs or multirun dir> [--out DIR]``.

Reads every ``results.json`` below the directory and groups the runs into *settings*: runs whose
resolved configs agree up to the seed and the keys that never change results
(``cl_ema.config.setting``) and that evaluated the same tracks. For each setting and track it
writes the mean ± std over seeds of the final metrics to ``report.md``, and PNG plots: EMA
horizon vs final accuracy and forgetting, mean accuracy matrices, and accuracy over tasks (live
vs EMA). Runs that failed, were interrupted or whose results cannot be read (not JSON, or not
shaped like cl_ema's results) are listed in the report, never a reason to stop; so is a seed run
again in the same setting (the newest run counts: a repeat would shrink the std).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cl_ema.config import setting
from cl_ema.errors import UserError
from cl_ema.files import atomic_write
from cl_ema.metrics import ACC, FORGETTING, HEADLINE, METRICS, SETTINGS, STABILITY_METRICS, TASK_IL_ACC, Metric
from cl_ema.plugins import LIVE


@dataclass
class Run:
    path: Path
    data: dict[str, Any]
    mtime: float = 0.0  # of results.json: the newest run of a repeated seed counts

    @property
    def tracks(self) -> list[str]:
        return list(self.data["tracks"])

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        """Runs average over seeds when they agree on this: tracks, task count and every result key."""
        shape = (("tracks", json.dumps(self.tracks)), ("num_tasks", json.dumps(self.data["num_tasks"])))
        return (*shape, *sorted(setting(self.data.get("config", {})).items()))

    def horizon(self, track: str) -> float | None:
        """Optimizer steps an EMA track averages over (from its record, or its name for older runs)."""
        info = self.data.get("track_info", {}).get(track)
        if isinstance(info, dict):
            return info.get("horizon")
        try:
            decay = float(track.removeprefix("ema_"))
        except ValueError:
            return None
        return 1 / (1 - decay) if track.startswith("ema_") and decay < 1 else None


@dataclass
class Setting:
    experiment: str
    strategy: str
    label: str  # the config keys that tell this setting apart from the others
    runs: list[Run] = field(default_factory=list)

    @property
    def tracks(self) -> list[str]:
        return self.runs[0].tracks


def _number(value: Any, low: float = -1.0, high: float = 1.0) -> bool:
    """A finite number in [low, high]: accuracies and their differences (forgetting, BWT, FWT) lie in [-1, 1]."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (low <= value <= high)
    )


def check_shape(data: Any) -> None:
    """Raise ValueError unless ``data`` is shaped like a cl_ema results.json, its values in their ranges."""
    if not isinstance(data, dict) or not isinstance(data.get("tracks"), dict) or not data["tracks"]:
        raise ValueError("no tracks")
    num_tasks, done = data.get("num_tasks"), data.get("tasks_done")
    if not (isinstance(num_tasks, int) and isinstance(done, int) and 0 <= done <= num_tasks):
        raise ValueError("task counts")
    if data.get("status") == "completed" and done != num_tasks:
        raise ValueError(f"completed after {done} of {num_tasks} tasks")
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
    for track, info in (data.get("track_info") or {}).items():
        horizon = info.get("horizon") if isinstance(info, dict) else "?"
        if horizon is not None and not _number(horizon, 0.0, math.inf):
            raise ValueError(f"{track} horizon={horizon!r}")
    if not isinstance(data.get("seed", 0), int):
        raise ValueError("seed")


def collect(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Completed runs, and (path, reason) for every results.json that is not one."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    files = sorted(root.rglob("results.json"))
    if not files:
        raise UserError(f"{root}: no results.json below this directory (point at an outputs/ or multirun/ folder)")
    completed, skipped = [], []
    for path in files:
        if not path.is_file():  # a folder, a FIFO (reading it would wait forever), a device
            skipped.append((path, "unreadable (not a regular file)"))
            continue
        try:
            data, mtime = json.loads(path.read_text()), path.stat().st_mtime
            check_shape(data)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            skipped.append((path, f"unreadable ({type(err).__name__}: {err})"))
            continue
        if data.get("status") != "completed":
            status = data.get("status", "unknown")
            skipped.append((path, f"{status} after {data['tasks_done']}/{data['num_tasks']} tasks"))
            continue
        completed.append(Run(path, data, mtime))
    return completed, skipped


def one_run_per_seed(runs: list[Run], root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The newest run of each seed in each setting, and (path, why) for the repeats left out."""

    def seed_of(run: Run) -> tuple:
        return run.setting, json.dumps(run.data.get("seed"))

    newest: dict[tuple, Run] = {}
    for run in sorted(runs, key=lambda r: r.mtime, reverse=True):
        newest.setdefault(seed_of(run), run)
    repeats = [(run.path, f"seed {run.data.get('seed')} again; the newer run "
                f"{newest[seed_of(run)].path.parent.relative_to(root)} counts")
               for run in runs if newest[seed_of(run)] is not run]  # fmt: skip
    return [run for run in runs if newest[seed_of(run)] is run], repeats


def group(runs: list[Run]) -> list[Setting]:
    by_setting: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_setting[run.setting].append(run)
    families: dict[tuple[str, str], list[tuple]] = defaultdict(list)  # settings of one experiment and strategy
    for key, members in by_setting.items():
        families[str(members[0].data.get("experiment", "?")), str(members[0].data.get("strategy", "?"))].append(key)
    settings = []
    for (experiment, strategy), keys in families.items():
        # label each setting by the keys whose values differ between the settings of its family
        varying = sorted({k for key in keys for k, _ in key if len({dict(other).get(k) for other in keys}) > 1})
        for key in keys:
            values = dict(key)
            label = ", ".join(f"{k}={json.loads(values[k])}" for k in varying if k in values and k != "tracks")
            settings.append(Setting(experiment, strategy, label or "-", by_setting[key]))
    return sorted(settings, key=lambda s: (s.experiment, s.strategy, s.label))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    present = [v for v in values if v is not None]
    if not present:
        return math.nan, math.nan, 0
    return float(np.mean(present)), float(np.std(present, ddof=1)) if len(present) > 1 else 0.0, len(present)


def paired_interval(differences: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t confidence interval over them (scipy): the effect of a
    track against ``live``, which shares its training run, seed by seed. One difference: no interval."""
    from scipy import stats

    mean = float(np.mean(differences))
    if len(differences) < 2:
        return mean, math.nan, math.nan
    if float(np.std(differences)) == 0.0:  # every seed gives the same difference: no spread to widen it
        return mean, mean, mean
    low, high = stats.ttest_1samp(differences, 0.0).confidence_interval(level)
    return mean, float(low), float(high)


def metric_of(entry: dict[str, Any], metric: Metric, setting_name: str) -> float | None:
    """One track's final value of ``metric`` in ``setting`` from its results.json entry."""
    values = entry if setting_name == "class_il" else entry.get(setting_name, {})
    return values.get(metric.key)


def _difference_cell(differences: list[float]) -> str:
    if not differences:
        return "–"
    mean, low, high = paired_interval(differences)
    if math.isnan(low):
        return f"{100 * mean:+.2f}"
    excludes_zero = low > 0 or high < 0
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]" + (" *" if excludes_zero else "")


def paired_rows(settings: list[Setting]) -> list[str]:
    """Per setting and track, each headline metric's mean difference to live with its 95 % interval."""
    rows = []
    for setting_ in settings:
        if LIVE not in setting_.tracks:
            continue
        for track in setting_.tracks:
            if track == LIVE:
                continue
            cells = []
            for metric, setting_name in HEADLINE:
                differences = []
                for run in setting_.runs:
                    mine = metric_of(run.data["tracks"][track], metric, setting_name)
                    live = metric_of(run.data["tracks"][LIVE], metric, setting_name)
                    if mine is not None and live is not None:
                        differences.append(mine - live)
                cells.append(_difference_cell(differences))
            rows.append(f"| {setting_.experiment} | {setting_.strategy} | {setting_.label} | {track} | "
                        f"{len(setting_.runs)} | " + " | ".join(cells) + " |")  # fmt: skip
    return rows


def _cell(values: list[float | None]) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(settings: list[Setting], skipped: list[tuple[Path, str]], root: Path) -> str:
    columns = [*METRICS, TASK_IL_ACC]
    lines = [
        f"# cl_ema report: {root}",
        "",
        f"{_count(sum(len(s.runs) for s in settings), 'completed run')} in {_count(len(settings), 'setting')}; "
        "mean ± std (sample std) over seeds, in %. Class-IL unless marked TIL.",
        "",
        "| experiment | strategy | setting | track | seeds | " + " | ".join(m.label for m in columns) + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for setting_ in settings:
        for track in setting_.tracks:
            entries = [run.data["tracks"][track] for run in setting_.runs]
            cells = [_cell([e.get(m.key) for e in entries]) for m in METRICS]
            cells.append(_cell([e["task_il"].get(TASK_IL_ACC.key) for e in entries]))
            seeds = {run.data.get("seed") for run in setting_.runs}
            lines.append(f"| {setting_.experiment} | {setting_.strategy} | {setting_.label} | {track} | {len(seeds)} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    stability_rows = []
    for setting_ in settings:
        for track in setting_.tracks:
            entries = [run.data["tracks"][track].get("stability") for run in setting_.runs]
            if any(isinstance(e, dict) for e in entries):
                entries = [e if isinstance(e, dict) else {} for e in entries]
                cells = [_cell([e.get(m.key) for e in entries]) for m in STABILITY_METRICS]
                stability_rows.append(
                    f"| {setting_.experiment} | {setting_.strategy} | {setting_.label} | {track} | "
                    f"{sum(bool(e) for e in entries)} | " + " | ".join(cells) + " |"
                )
    if stability_rows:
        lines += [
            "",
            "## Continual evaluation (stability gap)",
            "",
            "| experiment | strategy | setting | track | runs | "
            + " | ".join(m.label for m in STABILITY_METRICS)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(STABILITY_METRICS),
            *stability_rows,
        ]
    paired = paired_rows(settings)
    if paired:
        lines += [
            "",
            "## Effect of each track against live (paired over seeds)",
            "",
            "Every track of a run is evaluated on the same training run as `live`, so its effect is the "
            "difference to `live` seed by seed: its mean and 95 % Student-t confidence interval over seeds, in "
            "percentage points; `*` where the interval excludes 0.",
            "",
            "| experiment | strategy | setting | track | seeds | "
            + " | ".join(f"Δ{m.label}" for m, _ in HEADLINE)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(HEADLINE),
            *paired,
        ]
    if skipped:
        lines += ["", "## Runs not included", "", "| results file | why |", "|---|---|"]
        lines += [f"| {path.relative_to(root)} | {why} |" for path, why in skipped]
    return "\n".join(lines) + "\n"


def horizons_figure(settings: list[Setting]):
    """Final ACC and forgetting against the EMA horizon, per experiment/strategy; live as a dashed line."""
    import matplotlib.pyplot as plt

    shown = (ACC, FORGETTING)
    curves: dict[str, dict[str, list[tuple[float, list[float | None]]]]] = defaultdict(lambda: defaultdict(list))
    live: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for setting_ in settings:
        name = f"{setting_.experiment} / {setting_.strategy}"
        for track in setting_.tracks:
            for metric in shown:
                for run in setting_.runs:
                    value = run.data["tracks"][track].get(metric.key)
                    horizon = run.horizon(track)
                    if track == LIVE:
                        live[name][metric.key].append(value)
                    elif horizon is not None:
                        curves[name][metric.key].append((horizon, [value]))
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for ax, metric in zip(axes, shown):
        for index, (name, by_metric) in enumerate(sorted(curves.items())):
            points: dict[float, list[float | None]] = defaultdict(list)
            for horizon, values in by_metric[metric.key]:
                points[horizon] += values
            horizons = sorted(points)
            stats = [mean_std(points[h]) for h in horizons]
            ax.errorbar(horizons, [100 * m for m, _, _ in stats], [100 * s for _, s, _ in stats], marker="o",
                        capsize=3, label=name, color=f"C{index}")  # fmt: skip
            live_mean, _, n = mean_std(live[name][metric.key])
            if n:
                ax.axhline(100 * live_mean, color=f"C{index}", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylabel(f"{metric.title} (%)")
        ax.set_title(metric.title)
        ax.grid(alpha=0.3)
    fig.supxlabel("EMA horizon (optimizer steps averaged over); dashed: live weights")
    axes[0].legend(fontsize=8)
    return fig


def over_tasks_figure(setting_: Setting):
    """Mean accuracy on the tasks seen so far, after each task, per track."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for track in setting_.tracks:
        curves = []
        for run in setting_.runs:
            matrix = np.array(run.data["tracks"][track]["acc_matrix"], dtype=float)
            curves.append([np.mean(matrix[i, : i + 1]) for i in range(len(matrix))])
        mean, std = np.mean(curves, axis=0), np.std(curves, axis=0)
        tasks = np.arange(1, len(mean) + 1)
        ax.plot(tasks, 100 * mean, marker="o", label=track, linestyle="--" if track == LIVE else "-")
        ax.fill_between(tasks, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole tasks
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy on tasks seen (%)")
    ax.set_title(f"{setting_.experiment} / {setting_.strategy} ({setting_.label}), {len(setting_.runs)} runs",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def mean_matrices(setting_: Setting) -> dict[str, np.ndarray]:
    return {
        track: np.mean([np.array(run.data["tracks"][track]["acc_matrix"], dtype=float) for run in setting_.runs], 0)
        for track in setting_.tracks
    }


def write_report(root: Path, out: Path) -> Path:
    """Write report.md and the plots into ``out``; return the path of report.md."""
    from cl_ema.plots import figure_png, heatmaps_png

    runs, skipped = collect(root)
    runs, repeats = one_run_per_seed(runs, root)
    skipped += repeats
    if not runs:
        reasons = "; ".join(f"{p.relative_to(root)}: {why}" for p, why in skipped[:5])
        raise UserError(f"{root}: no completed run to report ({reasons})")
    settings = group(runs)
    text = markdown(settings, skipped, root)
    figures: list[tuple[str, str]] = []
    horizons = horizons_figure(settings)
    if horizons:
        atomic_write(out / "decay_vs_metrics.png", figure_png(horizons))
        figures.append(("EMA horizon vs final accuracy and forgetting", "decay_vs_metrics.png"))
    for index, setting_ in enumerate(settings):
        stem = f"{index:02d}_{setting_.experiment}_{setting_.strategy}"
        title = f"{setting_.experiment} / {setting_.strategy} ({setting_.label})"
        atomic_write(out / f"{stem}_matrices.png", heatmaps_png(mean_matrices(setting_), f"{title}: mean class-IL R"))
        atomic_write(out / f"{stem}_over_tasks.png", figure_png(over_tasks_figure(setting_)))
        figures += [
            (f"{title}: accuracy matrices", f"{stem}_matrices.png"),
            (f"{title}: over tasks", f"{stem}_over_tasks.png"),
        ]
    text += "\n## Figures\n\n" + "".join(f"### {caption}\n\n![{caption}]({name})\n\n" for caption, name in figures)
    atomic_write(out / "report.md", text)
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cl_ema.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run, outputs/ or multirun/ directory")
    parser.add_argument("--out", type=Path, help="where to write report.md and plots (default: <root>/report)")
    args = parser.parse_args(argv)
    out = args.out or args.root / "report"
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file, not a folder")
        path = write_report(args.root, out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(path.read_text().split("\n## Figures")[0])
    print(f"report: {path}")


if __name__ == "__main__":
    main()
