"""Many runs → tables and plots: ``python -m cl_ema.report <outputs or multirun dir> [--out DIR]``.

Reads every ``results.json`` below the directory and groups the runs into *settings*: runs whose
configs are equal up to the seed (and keys that do not change results, such as the logger or the
data folder). For each setting and track it writes the mean ± std over seeds of the final
metrics to ``report.md``, and PNG plots: decay vs final accuracy and forgetting, mean accuracy
matrices, and accuracy over tasks (live vs EMA). Runs that failed, were interrupted or whose
results cannot be read are listed in the report, not dropped.
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

from cl_ema.errors import UserError
from cl_ema.results import atomic_write

REPORTED = ("avg_acc", "avg_forgetting", "max_forgetting", "bwt", "learning_acc")
CONTINUAL = ("min_acc", "wc_acc", "aaa", "stability_gap")  # present with eval.every_n_steps
# keys that never change results; the seed is what a setting averages over
_IGNORED = {"seed", "device", "checkpoint", "logger", "data.root", "data.download"}


@dataclass
class Run:
    path: Path
    data: dict[str, Any]

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        config = self.data.get("config", {})
        plugins = set(config.get("strategy", {}).get("plugins", {}))
        flat = _flatten(config)
        return tuple(sorted((k, json.dumps(v)) for k, v in flat.items() if not _ignored(k, plugins)))


@dataclass
class Setting:
    experiment: str
    strategy: str
    label: str  # the config keys that tell this setting apart from the others
    runs: list[Run] = field(default_factory=list)

    @property
    def tracks(self) -> list[str]:
        return list(self.runs[0].data["tracks"])


def _ignored(key: str, plugins: set[str]) -> bool:
    """Keys that do not change a run's results (``ema.*`` in a run without the EMA plugin, …)."""
    section = key.split(".")[0]
    unused = section in ("ema", "replay") and section not in plugins
    return key in _IGNORED or unused or key.startswith(("logger.", "strategy.plugins."))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def collect(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Completed runs, and (path, reason) for every results.json that is not one."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    files = sorted(root.rglob("results.json"))
    if not files:
        raise UserError(f"{root}: no results.json below this directory (point at an outputs/ or multirun/ folder)")
    completed, skipped = [], []
    for path in files:
        try:
            data = json.loads(path.read_text())
            data["tracks"]  # noqa: B018 - a results file must have tracks
        except (OSError, ValueError, KeyError, TypeError) as err:
            skipped.append((path, f"unreadable ({type(err).__name__})"))
            continue
        if data.get("status") != "completed":
            status = data.get("status", "unknown")
            skipped.append((path, f"{status} after {data.get('tasks_done', 0)}/{data.get('num_tasks', '?')} tasks"))
            continue
        completed.append(Run(path, data))
    return completed, skipped


def group(runs: list[Run]) -> list[Setting]:
    by_setting: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_setting[run.setting].append(run)
    keys = list(by_setting)
    # label each setting by the keys whose values differ between settings of the same experiment
    varying = {k for key in keys for k, _ in key if len({dict(other).get(k) for other in keys}) > 1}
    varying -= {"strategy.name"}
    settings = []
    for key in keys:
        values = dict(key)
        label = ", ".join(f"{k}={json.loads(values[k])}" for k in sorted(varying) if k in values) or "-"
        first = by_setting[key][0].data
        settings.append(Setting(first.get("experiment", "?"), first.get("strategy", "?"), label, by_setting[key]))
    return sorted(settings, key=lambda s: (s.experiment, s.strategy, s.label))


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    present = [v for v in values if v is not None]
    if not present:
        return math.nan, math.nan, 0
    return float(np.mean(present)), float(np.std(present, ddof=1)) if len(present) > 1 else 0.0, len(present)


def _cell(values: list[float | None]) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown(settings: list[Setting], skipped: list[tuple[Path, str]], root: Path) -> str:
    lines = [
        f"# cl_ema report: {root}",
        "",
        f"{sum(len(s.runs) for s in settings)} completed runs in {len(settings)} settings; "
        "mean ± std (sample std) over seeds, in %. Class-IL unless marked TIL.",
        "",
        "| experiment | strategy | setting | track | seeds | ACC | forgetting | max forgetting | BWT | LA | TIL ACC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        for track in setting.tracks:
            entries = [run.data["tracks"].get(track, {}) for run in setting.runs]
            cells = [_cell([e.get(m) for e in entries]) for m in REPORTED]
            til = _cell([e.get("task_il", {}).get("avg_acc") for e in entries])
            seeds = sorted({run.data.get("seed") for run in setting.runs})
            lines.append(
                f"| {setting.experiment} | {setting.strategy} | {setting.label} | {track} | {len(seeds)} | "
                + " | ".join(cells)
                + f" | {til} |"
            )
    continual_rows = []
    for setting in settings:
        for track in setting.tracks:
            entries = [run.data["tracks"][track].get("continual") for run in setting.runs]
            if any(entries):
                cells = [_cell([(e or {}).get(m) for e in entries]) for m in CONTINUAL]
                continual_rows.append(
                    f"| {setting.experiment} | {setting.strategy} | {setting.label} | {track} | "
                    f"{sum(e is not None for e in entries)} | " + " | ".join(cells) + " |"
                )
    if continual_rows:
        lines += [
            "",
            "## Continual evaluation (stability gap)",
            "",
            "| experiment | strategy | setting | track | runs | min-ACC | WC-ACC | AAA | stability gap |",
            "|---|---|---|---|---|---|---|---|---|",
            *continual_rows,
        ]
    if skipped:
        lines += ["", "## Runs not included", "", "| results file | why |", "|---|---|"]
        lines += [f"| {path.relative_to(root)} | {why} |" for path, why in skipped]
    return "\n".join(lines) + "\n"


def _decay(track: str) -> float | None:
    return float(track.removeprefix("ema_")) if track.startswith("ema_") else None


def plot_decays(settings: list[Setting]) -> bytes | None:
    """Final ACC and forgetting against the EMA decay, per experiment/strategy; live as a line."""
    import matplotlib.pyplot as plt

    from cl_ema.plots import figure_png

    curves: dict[str, dict[str, list[tuple[float, list[float | None]]]]] = defaultdict(lambda: defaultdict(list))
    live: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for setting in settings:
        name = f"{setting.experiment} / {setting.strategy}"
        for track in setting.tracks:
            for metric in ("avg_acc", "avg_forgetting"):
                values = [run.data["tracks"][track].get(metric) for run in setting.runs]
                decay = _decay(track)
                if decay is None:
                    live[name][metric] += values
                else:
                    curves[name][metric].append((decay, values))
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(axes, ("avg_acc", "avg_forgetting"), ("final average accuracy", "average forgetting")):
        for index, (name, by_metric) in enumerate(sorted(curves.items())):
            points: dict[float, list[float | None]] = defaultdict(list)
            for decay, values in by_metric[metric]:
                points[decay] += values
            decays = sorted(points)
            stats = [mean_std(points[d]) for d in decays]
            horizon = [1 / (1 - d) if d < 1 else math.inf for d in decays]
            ax.errorbar(
                horizon,
                [100 * m for m, _, _ in stats],
                [100 * s for _, s, _ in stats],
                marker="o",
                capsize=3,
                label=name,
                color=f"C{index}",
            )
            live_mean, _, n = mean_std(live[name][metric])
            if n:
                ax.axhline(100 * live_mean, color=f"C{index}", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("EMA horizon 1/(1 − decay), optimizer steps (dashed: live weights)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return figure_png(fig)


def plot_over_tasks(setting: Setting) -> bytes:
    """Mean accuracy on the tasks seen so far, after each task, per track."""
    import matplotlib.pyplot as plt

    from cl_ema.plots import figure_png

    fig, ax = plt.subplots(figsize=(6, 4))
    for track in setting.tracks:
        curves = []
        for run in setting.runs:
            matrix = np.array(run.data["tracks"][track]["acc_matrix"], dtype=float)
            curves.append([np.mean(matrix[i, : i + 1]) for i in range(len(matrix))])
        mean, std = np.mean(curves, axis=0), np.std(curves, axis=0)
        tasks = np.arange(1, len(mean) + 1)
        ax.plot(tasks, 100 * mean, marker="o", label=track, linestyle="--" if track == "live" else "-")
        ax.fill_between(tasks, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy on tasks seen (%)")
    ax.set_title(f"{setting.experiment} / {setting.strategy} ({setting.label}), {len(setting.runs)} runs", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig)


def mean_matrices(setting: Setting) -> dict[str, np.ndarray]:
    return {
        track: np.mean([np.array(run.data["tracks"][track]["acc_matrix"], dtype=float) for run in setting.runs], axis=0)
        for track in setting.tracks
    }


def write_report(root: Path, out: Path) -> Path:
    """Write report.md and the plots into ``out``; return the path of report.md."""
    from cl_ema.plots import heatmaps_png

    runs, skipped = collect(root)
    if not runs:
        reasons = "; ".join(f"{p.relative_to(root)}: {why}" for p, why in skipped[:5])
        raise UserError(f"{root}: no completed run to report ({reasons})")
    settings = group(runs)
    text = markdown(settings, skipped, root)
    figures: list[tuple[str, str]] = []
    decay_png = plot_decays(settings)
    if decay_png:
        atomic_write(out / "decay_vs_metrics.png", decay_png)
        figures.append(("Decay vs final accuracy and forgetting", "decay_vs_metrics.png"))
    for index, setting in enumerate(settings):
        stem = f"{index:02d}_{setting.experiment}_{setting.strategy}"
        title = f"{setting.experiment} / {setting.strategy} ({setting.label})"
        atomic_write(out / f"{stem}_matrices.png", heatmaps_png(mean_matrices(setting), f"{title}: mean class-IL R"))
        atomic_write(out / f"{stem}_over_tasks.png", plot_over_tasks(setting))
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
    try:
        path = write_report(args.root, args.out or args.root / "report")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(path.read_text().split("\n## Figures")[0])
    print(f"report: {path}")


if __name__ == "__main__":
    main()
