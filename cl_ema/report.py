"""Many runs → tables and figures: ``python -m cl_ema.report <outputs or multirun dir> [--out DIR]``.

Reads every ``results.json`` below the directory into one tidy table (``cl_ema.runs``) and groups the
runs into *settings*: runs whose resolved configs agree up to the seed and the keys that never change
results (``cl_ema.config.setting``), with the same task count and tracks. ``report.md`` gets, per setting
and track, the mean ± std over seeds of the final metrics, the continual-evaluation metrics where present,
and each track's paired difference to ``live`` with its 95 % Student-t interval; and links the figures
(PNG, each with a caption): mean accuracy matrices, accuracy over tasks, the difference to live against
the EMA horizon, and every track's difference to live (a forest plot). Runs that failed, were interrupted
or whose results cannot be read (not JSON, another format, not shaped like cl_ema's results) are listed in
the report, never a reason to stop; so is a seed run again in the same setting (the newest run counts: a
repeat would shrink the std).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cl_ema.errors import UserError
from cl_ema.files import atomic_write
from cl_ema.metrics import HEADLINE, METRICS, STABILITY_METRICS, TASK_IL_ACC, Metric
from cl_ema.plugins import LIVE
from cl_ema.runs import CONFIG, Runs, read

COLUMNS = (*((m, "class_il") for m in METRICS), (TASK_IL_ACC, "task_il"))  # of the table of means
STABILITY_COLUMNS = tuple((m, "class_il") for m in STABILITY_METRICS)
# Accuracies are shares of a test set, so two seeds' differences that agree to 1e-9 differ only by the
# rounding of the subtraction (a real difference is at least one test sample in a billion).
NO_SPREAD = 1e-9


@dataclass
class Setting:
    """Runs whose seeds average together, and what the tables and figures say of them."""

    experiment: str
    strategy: str
    label: str  # what tells it apart from the other settings of its experiment and strategy
    rows: pd.DataFrame  # its rows of the tidy table
    matrices: pd.DataFrame  # its rows of the matrices' table

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(self.rows["run"]))

    @property
    def tracks(self) -> list[str]:
        return list(dict.fromkeys(self.rows["track"]))

    @property
    def title(self) -> str:
        return f"{self.experiment} / {self.strategy}" + ("" if self.label == "-" else f" ({self.label})")

    @cached_property
    def effects(self) -> pd.DataFrame:
        """Each track's paired difference to live in each headline metric: one row per track and metric
        (``metric``: its label) with ``mean``, ``low``, ``high`` (its 95 % interval, NaN where there is none),
        ``n`` (the seeds with both values) and the track's ``rule``, ``posthoc`` and ``horizon_tasks``."""
        columns = ["track", "metric", "mean", "low", "high", "n", "rule", "posthoc", "horizon_tasks"]
        if LIVE not in self.tracks:
            return pd.DataFrame(columns=columns)
        records = []
        for metric, setting_name in HEADLINE:
            values = values_by_run(self, metric, setting_name)
            for track in self.tracks:
                if track == LIVE:
                    continue
                differences = (values[track] - values[LIVE]).dropna().to_numpy()
                mean, low, high = paired_interval(differences) if len(differences) else (math.nan,) * 3
                records.append(
                    {
                        "track": track,
                        "metric": metric.label,
                        "mean": mean,
                        "low": low,
                        "high": high,
                        "n": len(differences),
                    }
                )
        return pd.DataFrame(records).merge(self.track_info, left_on="track", right_index=True)[columns]

    @property
    def track_info(self) -> pd.DataFrame:
        """Each track's ``rule``, ``posthoc`` and ``horizon_tasks``, indexed by track."""
        return self.rows.groupby("track", sort=False)[["rule", "posthoc", "horizon_tasks"]].first()


def settings_of(runs: Runs) -> list[Setting]:
    """The settings of the runs read, sorted by experiment, strategy and label."""
    settings = []
    for (experiment, strategy), family in runs.table.groupby(["experiment", "strategy"], sort=False):
        groups = dict(list(family.groupby("group", sort=False)))
        labels = _labels(groups)
        for key, rows in groups.items():
            matrices = runs.matrices[runs.matrices["run"].isin(rows["run"].unique())]
            settings.append(Setting(str(experiment), str(strategy), labels[key], rows, matrices))
    return sorted(settings, key=lambda s: (s.experiment, s.strategy, s.label))


def _labels(groups: dict[Any, pd.DataFrame]) -> dict[Any, str]:
    """Each group of one experiment and strategy labelled by the config keys whose values differ between
    the groups, and, where those agree, by the tracks that differ."""
    configs = {key: _config(rows) for key, rows in groups.items()}
    keys = sorted({k for config in configs.values() for k in config})
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs.values()}) > 1]
    labels = {key: ", ".join(f"{k}={_shown(configs[key].get(k))}" for k in varying) for key in groups}
    for label in set(labels.values()):
        alike = [key for key in groups if labels[key] == label]
        if len(alike) < 2:
            continue
        tracks = {key: list(dict.fromkeys(groups[key]["track"])) for key in alike}
        every = list(dict.fromkeys(t for names in tracks.values() for t in names))
        shared = [t for t in every if all(t in names for names in tracks.values())]
        for key in alike:
            extra = [t for t in tracks[key] if t not in shared]
            lacking = [t for t in every if t not in tracks[key]]
            parts = [label] if label else []
            parts += [f"with {_names(extra)}"] if extra else []
            parts += [f"without {_names(lacking)}"] if lacking else []
            labels[key] = "; ".join(parts) or f"group {key}"  # the same tracks in another order or task count
    return {key: label or "-" for key, label in labels.items()}


def _config(rows: pd.DataFrame) -> dict[str, Any]:
    """A group's result config keys (its runs agree on them up to the seed), without those it lacks."""
    first = rows.iloc[0]
    return {
        c.removeprefix(CONFIG): first[c].item() if isinstance(first[c], np.generic) else first[c]
        for c in rows.columns
        if c.startswith(CONFIG) and c != f"{CONFIG}seed" and not _missing(first[c])
    }


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)  # results.json is strict JSON: NaN is an absent key


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _names(tracks: list[str]) -> str:
    return ", ".join(tracks) if len(tracks) <= 3 else f"{len(tracks)} tracks: {tracks[0]} … {tracks[-1]}"


def count(n: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def paired_interval(differences: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its Student-t confidence interval over them (scipy): the effect of a
    track against ``live``, which shares its training run, seed by seed. No interval (nan) from one
    difference, nor from differences without spread (equal up to rounding): a t interval of zero width
    would claim certainty that a few equal seeds cannot give."""
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    mean = float(values.mean())
    if len(values) < 2 or np.ptp(values) <= NO_SPREAD:
        return mean, math.nan, math.nan
    low, high = stats.ttest_1samp(values, 0.0).confidence_interval(level)
    return mean, float(low), float(high)


def values_by_run(setting: Setting, metric: Metric, setting_name: str) -> pd.DataFrame:
    """A metric's final values: one row per run, one column per track (NaN where a run lacks it)."""
    rows = setting.rows
    chosen = rows[(rows["metric"] == metric.key) & (rows["setting"] == setting_name)]
    return chosen.pivot(index="run", columns="track", values="value").reindex(columns=setting.tracks)


def _summary_cell(values: pd.Series, row_count: int) -> str:
    present = values.dropna()
    if present.empty:
        return "–"
    mean = 100 * present.mean()
    text = f"{mean:.2f}" if len(present) == 1 else f"{mean:.2f} ± {100 * present.std(ddof=1):.2f}"
    return text + _fewer(len(present), row_count)


def _fewer(n: int, row_count: int) -> str:
    """Marks a cell over fewer runs than its row counts."""
    return f" (n={n})" if n < row_count else ""


def _summary_rows(setting: Setting, columns: Sequence[tuple[Metric, str]]) -> list[str]:
    """One table row per track with any of the columns' values: its mean ± std over the runs that have
    each; the runs column counts the runs with a value (cells over fewer say how many)."""
    by_column = [values_by_run(setting, metric, setting_name) for metric, setting_name in columns]
    rows = []
    for track in setting.tracks:
        series = [values[track] for values in by_column]
        counts = [int(s.notna().sum()) for s in series]
        if max(counts) == 0:
            continue
        cells = [_summary_cell(s, max(counts)) for s in series]
        rows.append(
            f"| {setting.experiment} | {setting.strategy} | {setting.label} | {track} | {max(counts)} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def _difference_cell(effect: pd.Series, row_count: int) -> str:
    if effect["n"] == 0:
        return "–"
    text = f"{100 * effect['mean']:+.2f}"
    if not math.isnan(effect["low"]):
        excludes_zero = effect["low"] > 0 or effect["high"] < 0
        text += f" [{100 * effect['low']:+.2f}, {100 * effect['high']:+.2f}]" + (" *" if excludes_zero else "")
    elif effect["n"] > 1:
        text += " (no spread)"
    return text + _fewer(effect["n"], row_count)


def _paired_rows(setting: Setting) -> list[str]:
    rows = []
    for track, of_track in setting.effects.groupby("track", sort=False):
        by_metric = of_track.set_index("metric")
        row_count = int(by_metric["n"].max())
        cells = [_difference_cell(by_metric.loc[metric.label], row_count) for metric, _ in HEADLINE]
        rows.append(
            f"| {setting.experiment} | {setting.strategy} | {setting.label} | {track} | {row_count} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def _table(count_header: str, headers: list[str], rows: list[str]) -> list[str]:
    return [
        f"| experiment | strategy | setting | track | {count_header} | " + " | ".join(headers) + " |",
        "|---|---|---|---|---|" + "---|" * len(headers),
        *rows,
        "",
    ]


def markdown(settings: list[Setting], skipped: list[tuple[Path, str]], root: Path) -> str:
    """report.md without its figures."""
    lines = [
        f"# cl_ema report: {root}",
        "",
        f"{count(sum(len(s.runs) for s in settings), 'completed run')} in {count(len(settings), 'setting')}; "
        "mean ± std (sample std) over seeds, in %. Class-IL unless marked TIL. The seeds column counts the "
        "runs with a value; a cell over fewer says (n=…).",
        "",
        *_table("seeds", [m.label for m, _ in COLUMNS], [row for s in settings for row in _summary_rows(s, COLUMNS)]),
    ]
    stability = [row for s in settings for row in _summary_rows(s, STABILITY_COLUMNS)]
    if stability:
        lines += ["## Continual evaluation (stability gap)", ""]
        lines += _table("runs", [m.label for m, _ in STABILITY_COLUMNS], stability)
    paired = [row for s in settings for row in _paired_rows(s)]
    if paired:
        lines += [
            "## Effect of each track against live (paired over seeds)",
            "",
            "Every track of a run is evaluated on the same training run as `live`, so its effect is the difference "
            "to `live` seed by seed: its mean and 95 % Student-t confidence interval over seeds, in percentage "
            "points; `*` where the interval excludes 0; (no spread) where every seed gives the same difference, "
            "which leaves no interval.",
            "",
            *_table("seeds", [f"Δ{m.label}" for m, _ in HEADLINE], paired),
        ]
    if skipped:
        lines += ["## Runs not included", "", "| results file | why |", "|---|---|"]
        lines += [f"| {path.relative_to(root)} | {why} |" for path, why in skipped]
        lines.append("")
    return "\n".join(lines)


def mean_matrices(setting: Setting) -> dict[str, np.ndarray]:
    """Each track's class-IL accuracy matrix, averaged over the setting's runs."""
    cells = setting.matrices[setting.matrices["setting"] == "class_il"]
    mean = cells.groupby(["track", "trained", "task"])["value"].mean()
    return {track: mean.loc[track].unstack().to_numpy() for track in setting.tracks}


def over_tasks(setting: Setting) -> pd.DataFrame:
    """Accuracy on the tasks seen so far after each task: one row per track, setting (class-IL, task-IL)
    and tasks ``trained``, with its ``mean`` over the runs and the track's ``rule`` and ``posthoc``."""
    cells = setting.matrices[setting.matrices["task"] <= setting.matrices["trained"]]
    per_run = cells.groupby(["track", "setting", "trained", "run"], sort=False)["value"].mean()
    curves = per_run.groupby(["track", "setting", "trained"], sort=False).mean().rename("mean").reset_index()
    return curves.merge(setting.track_info, left_on="track", right_index=True)


def write_report(root: Path, out: Path, figures: bool = True) -> Path:
    """Write report.md and, with ``figures``, the figures into ``out``; return the path of report.md."""
    runs = read(root)
    if runs.table.empty:
        reasons = "; ".join(f"{p.relative_to(root)}: {why}" for p, why in runs.skipped[:5])
        raise UserError(f"{root}: no completed run to report ({reasons})")
    settings = settings_of(runs)
    text = markdown(settings, runs.skipped, root)
    if figures:
        text += write_figures(settings, out)
    atomic_write(out / "report.md", text)
    return out / "report.md"


def write_figures(settings: list[Setting], out: Path) -> str:
    """Write each setting's figures into ``out``; return report.md's section that links them, with captions."""
    from cl_ema import plots

    section = "## Figures\n\n"

    def add(name: str, figure: Any, heading: str, caption: str) -> None:
        nonlocal section
        atomic_write(out / name, plots.figure_png(figure))
        section += f"### {heading}\n\n![{heading}]({name})\n\n{caption}\n\n"

    for index, setting in enumerate(settings):
        stem, seeds = f"{index:02d}_{setting.experiment}_{setting.strategy}", count(len(setting.runs), "seed")
        title = f"{setting.title}, {seeds}"
        add(
            f"{stem}_matrices.png",
            plots.heatmaps_figure(mean_matrices(setting), f"{title}: mean class-IL R"),
            f"{setting.title}: accuracy matrices",
            f"Each track's class-IL accuracy R[i, j] (in %) after training tasks 1…i (rows) on test task j "
            f"(columns), mean over {seeds}.",
        )
        add(
            f"{stem}_over_tasks.png",
            plots.over_tasks_figure(over_tasks(setting), title),
            f"{setting.title}: accuracy over tasks",
            f"Accuracy on the tasks seen so far after each task, class-IL and task-IL, mean over {seeds}; "
            "`live` black and dashed, one colour and marker per rule family.",
        )
        if setting.effects.empty:
            continue
        horizon = plots.horizon_figure(setting.effects, title)
        if horizon is not None:
            add(
                f"{stem}_horizon.png",
                horizon,
                f"{setting.title}: EMA horizon",
                "Difference to `live` (percentage points) of accuracy, forgetting and task-IL accuracy against "
                "the EMA horizon in tasks (log scale): the line, post-hoc EMAs computed after training, its band "
                "their 95 % paired interval over seeds; the points, EMAs tracked during training, with theirs; "
                "dotted: a horizon of one task. Above 0 in the accuracy panels: more accurate than `live`; below 0 "
                "in the forgetting panel: forgets less.",
            )
        add(
            f"{stem}_forest.png",
            plots.forest_figure(setting.effects, title),
            f"{setting.title}: effect of each track",
            "Each track's paired difference to `live` over seeds (percentage points) with its 95 % Student-t "
            "interval, tracks sorted by their accuracy difference, coloured by rule family.",
        )
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cl_ema.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run, outputs/ or multirun/ directory")
    parser.add_argument("--out", type=Path, help="where to write report.md and plots (default: <root>/report)")
    parser.add_argument("--no-figures", action="store_true", help="the tables alone (figures take seconds a setting)")
    args = parser.parse_args(argv)
    out = args.out or args.root / "report"
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file, not a folder")
        path = write_report(args.root, out, figures=not args.no_figures)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(path.read_text().split("## Figures")[0].rstrip())
    print(f"report: {path}")


if __name__ == "__main__":
    main()
