"""Figures (matplotlib, headless): accuracy matrices, continual-evaluation curves, and the report's figures of
many tracks, where each rule family keeps one colour and marker (``live`` black and dashed) and the tracks of
a family go from dark to light (shorter to longer horizons)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize, to_hex, to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from cl_ema.metrics import FORGETTING, HEADLINE, SETTINGS, Metric  # noqa: E402
from cl_ema.plugins import LIVE  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

SETTING_TITLES = {"class_il": "class-IL", "task_il": "task-IL"}
HEATMAPS_PER_ROW = 5
ACCURACY, ACCURACY_COLORS = Normalize(0.0, 1.0), "viridis"  # of the heatmaps and their colour bar


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    linestyle: Literal["-", "--"] = "-"


POSTHOC_EMA = "posthoc ema"  # an EMA computed after training from saved weights (``posthoc`` in track_info)
FAMILY_STYLES = {
    LIVE: Style("#000000", "", "--"),
    "ema": Style("#1f77b4", "o"),
    POSTHOC_EMA: Style("#17becf", "p"),
    "stochastic_ema": Style("#7f7f7f", "h"),
    "swa": Style("#ff7f0e", "s"),
    "wise": Style("#2ca02c", "^"),
    "merge_mean": Style("#d62728", "D"),
    "magmax": Style("#9467bd", "v"),
    "ties": Style("#8c564b", "P"),
    "bema": Style("#e377c2", "X"),
    "lines": Style("#bcbd22", "*"),
}
OTHER_FAMILY = Style("#393b79", "x")  # a rule this list does not know yet


def family_of(rule: Any, posthoc: Any) -> str:
    """A track's family in figures: its rule, ``posthoc ema`` for an EMA computed after training."""
    name = str(rule) if isinstance(rule, str) else "?"
    return POSTHOC_EMA if name == "ema" and bool(posthoc) else name


def _families(tracks: pd.DataFrame) -> dict[str, list[str]]:
    """The families of the tracks (columns ``track``, ``rule``, ``posthoc``, ``horizon_tasks``) and their tracks,
    in the order figures list them: ``live``, the known families, the others by name; by horizon in a family."""
    members: dict[str, list[tuple[float, str]]] = {}
    for row in tracks.drop_duplicates("track").itertuples():
        horizon = math.inf if math.isnan(row.horizon_tasks) else float(row.horizon_tasks)
        members.setdefault(family_of(row.rule, row.posthoc), []).append((horizon, str(row.track)))
    order = [f for f in FAMILY_STYLES if f in members] + sorted(f for f in members if f not in FAMILY_STYLES)
    return {family: [track for _, track in sorted(members[family])] for family in order}


def track_styles(tracks: pd.DataFrame) -> dict[str, Style]:
    """The style of each track (columns as ``_families``), in the order figures list them."""
    styles = {}
    for family, members in _families(tracks).items():
        base = FAMILY_STYLES.get(family, OTHER_FAMILY)
        for shade, track in zip(_shades(base.color, len(members)), members):
            styles[track] = Style(shade, base.marker, base.linestyle)
    return styles


def _shades(color: str, n: int) -> list[str]:
    """``n`` shades of ``color``, from darker to lighter (the colour itself for one)."""
    if n == 1:
        return [to_hex(color)]
    rgb = np.array(to_rgb(color))
    shades = []
    for t in np.linspace(0.0, 1.0, n):
        # 0: 35 % towards black, 1: 40 % towards white (lighter fades into the background), the colour at 0.5
        mixed = rgb * (1 - 0.35 * (1 - 2 * t)) if t < 0.5 else rgb + (1 - rgb) * 0.4 * (2 * t - 1)
        shades.append(to_hex((float(mixed[0]), float(mixed[1]), float(mixed[2]))))
    return shades


def _family_handles(tracks: pd.DataFrame) -> list[Line2D]:
    """One legend entry per family present (its base colour and marker)."""
    handles = []
    for family in _families(tracks):
        style = FAMILY_STYLES.get(family, OTHER_FAMILY)
        handles.append(
            Line2D([], [], color=style.color, marker=style.marker or None, linestyle=style.linestyle, label=family)
        )
    return handles


# ---------------------------------------------------------------------------- accuracy matrices
def heatmaps_png(matrices: dict[str, np.ndarray], title: str = "") -> bytes:
    """One annotated heatmap per track of R[i, j] (rows: trained through task i), as PNG."""
    return figure_png(heatmaps_figure(matrices, title), crop=False)  # laid out to its margins already


def heatmaps_figure(matrices: dict[str, np.ndarray], title: str = "") -> plt.Figure:
    """One annotated heatmap per track of R[i, j] (rows: trained through task i), in rows of at most
    ``HEATMAPS_PER_ROW``; values written in the cells up to 10 tasks. Laid out by hand, in inches: a layout
    engine measures every text of every panel, seconds for thirty tracks."""
    names = list(matrices)
    size = max(m.shape[0] for m in matrices.values())
    columns = min(len(names), HEATMAPS_PER_ROW)
    rows = -(-len(names) // columns)
    panel = float(np.clip(0.3 * size + 0.9, 1.9, 4.0))
    gap_x, gap_y, left, right, top, bottom = 0.45, 0.7, 0.75, 1.1, 0.75 if title else 0.4, 0.55
    width = left + columns * panel + (columns - 1) * gap_x + right
    height = top + rows * panel + (rows - 1) * gap_y + bottom
    fig = plt.figure(figsize=(width, height))
    ticks = range(size)
    step = max(1, -(-size // 10))  # at most 10 tick labels an axis
    for index, name in enumerate(names):
        row, column = divmod(index, columns)
        x, y = left + column * (panel + gap_x), height - top - (row + 1) * panel - row * gap_y
        ax = fig.add_axes((x / width, y / height, panel / width, panel / height))
        matrix = matrices[name]
        ax.imshow(np.ma.masked_invalid(matrix), norm=ACCURACY, cmap=ACCURACY_COLORS)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(ticks[::step], [str(t + 1) for t in ticks[::step]], fontsize=7)
        ax.set_yticks(ticks[::step], [str(t + 1) for t in ticks[::step]], fontsize=7)
        if index + columns >= len(names):  # the lowest panel of its column
            ax.set_xlabel("test task", fontsize=8)
        if column == 0:
            ax.set_ylabel("trained through task", fontsize=8)
        if size <= 10:
            for (i, j), value in np.ndenumerate(matrix):
                if not np.isnan(value):
                    ax.text(
                        j,
                        i,
                        f"{100 * value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7 if size <= 6 else 6,
                        color="w" if value < 0.6 else "k",
                    )
    bar = min(rows * panel + (rows - 1) * gap_y, 3.5)
    colorbar = fig.add_axes(((width - right + 0.25) / width, (height - top - bar) / height, 0.15 / width, bar / height))
    fig.colorbar(ScalarMappable(ACCURACY, ACCURACY_COLORS), cax=colorbar, label="accuracy")
    if title:
        fig.suptitle(title, y=1 - 0.25 / height, va="top")
    return fig


# ---------------------------------------------------------------------------- the report's figures
def over_tasks_figure(curves: pd.DataFrame, title: str) -> plt.Figure:
    """Accuracy on the tasks seen so far after each task, one panel per setting (class-IL, task-IL), a line
    per track. ``curves``: one row per track, ``setting`` and tasks ``trained`` with the ``mean`` accuracy
    and the track's ``rule``, ``posthoc`` and ``horizon_tasks``."""
    styles = track_styles(curves)
    columns = -(-len(styles) // 30)  # legend columns of at most 30 entries
    height = max(4.2, 0.16 * -(-len(styles) // columns) + 0.8)
    fig, axes = plt.subplots(
        1, len(SETTINGS), figsize=(5.2 * len(SETTINGS) + 1.8 * columns, height), layout="constrained"
    )
    for ax, setting_name in zip(axes, SETTINGS):
        for track, style in styles.items():
            curve = curves[(curves["track"] == track) & (curves["setting"] == setting_name)].sort_values("trained")
            ax.plot(
                curve["trained"],
                100 * curve["mean"],
                color=style.color,
                marker=style.marker or None,
                linestyle=style.linestyle,
                linewidth=2.0 if track == LIVE else 1.2,
                markersize=4,
                label=track,
                zorder=3 if track == LIVE else 2,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole tasks
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("accuracy on the tasks seen (%)")
        ax.set_title(SETTING_TITLES[setting_name])
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, ncols=columns, title="track", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _log_tasks_axis(ax: plt.Axes) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, 2, 5, …
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=0.8)  # one task


def _difference_title(metric: Metric) -> str:
    return f"Δ {metric.title}" + (" (< 0: forgets less)" if metric.key == FORGETTING.key else "")


def horizon_figure(effects: pd.DataFrame, title: str) -> plt.Figure | None:
    """The difference to live against the EMA horizon in tasks (log axis), one panel per headline metric:
    post-hoc EMAs as a line with its 95 % band, EMAs tracked during training as points with their
    intervals; None without EMA tracks of known horizon. ``effects``: ``cl_ema.report.Setting.effects``."""
    ema = effects[(effects["rule"] == "ema") & effects["horizon_tasks"].notna()]
    if ema.empty:
        return None
    posthoc_style, tracked_style = FAMILY_STYLES[POSTHOC_EMA], FAMILY_STYLES["ema"]
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(4.6 * len(HEADLINE), 3.9), sharex=True, layout="constrained")
    for ax, (metric, _) in zip(axes, HEADLINE):
        of_metric = ema[ema["metric"] == metric.label].sort_values("horizon_tasks")
        posthoc = of_metric[of_metric["posthoc"].astype(bool)]
        tracked = of_metric[~of_metric["posthoc"].astype(bool)]
        ax.axhline(0.0, color="black", linestyle="--", linewidth=1.2)
        if not posthoc.empty:
            horizons = posthoc["horizon_tasks"].to_numpy(float)
            ax.fill_between(
                horizons,
                100 * posthoc["low"].to_numpy(float),
                100 * posthoc["high"].to_numpy(float),
                color=posthoc_style.color,
                alpha=0.25,
                linewidth=0,
            )
            ax.plot(
                horizons,
                100 * posthoc["mean"].to_numpy(float),
                color=posthoc_style.color,
                marker=posthoc_style.marker,
                markersize=4,
                linewidth=1.8,
            )
        if not tracked.empty:
            mean = 100 * tracked["mean"].to_numpy(float)
            below = np.nan_to_num(mean - 100 * tracked["low"].to_numpy(float))  # no interval: no bar
            above = np.nan_to_num(100 * tracked["high"].to_numpy(float) - mean)
            ax.errorbar(
                tracked["horizon_tasks"].to_numpy(float),
                mean,
                yerr=[below, above],
                fmt=tracked_style.marker,
                color=tracked_style.color,
                capsize=3,
                markersize=6,
                zorder=3,
            )
        _log_tasks_axis(ax)
        ax.set_title(_difference_title(metric), fontsize=9)
        ax.set_xlabel("EMA horizon (tasks, log scale)")
        ax.set_ylabel("difference to live (points)")
        ax.grid(alpha=0.3)
    legend = [Line2D([], [], color="black", linestyle="--", label="live (0)")]
    if ema["posthoc"].astype(bool).any():
        legend.append(
            Line2D(
                [],
                [],
                color=posthoc_style.color,
                marker=posthoc_style.marker,
                markersize=4,
                linewidth=1.8,
                label="post-hoc EMA, 95 % band",
            )
        )
    if (~ema["posthoc"].astype(bool)).any():
        legend.append(
            Line2D(
                [],
                [],
                color=tracked_style.color,
                marker=tracked_style.marker,
                linestyle="",
                label="EMA tracked in training, 95 % interval",
            )
        )
    fig.legend(handles=legend, loc="outside lower center", ncols=len(legend), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def forest_figure(effects: pd.DataFrame, title: str) -> plt.Figure:
    """Every track's difference to live with its 95 % interval, one panel per headline metric, a row per
    track: sorted by the accuracy difference (best on top), coloured and marked by family.
    ``effects``: ``cl_ema.report.Setting.effects``."""
    styles = track_styles(effects)
    accuracy = effects[effects["metric"] == HEADLINE[0][0].label].set_index("track")["mean"]
    order = accuracy.sort_values(ascending=False, na_position="last").index.tolist()  # best on top
    rows = {track: len(order) - 1 - k for k, track in enumerate(order)}
    fig, axes = plt.subplots(
        1,
        len(HEADLINE),
        figsize=(4.0 * len(HEADLINE) + 1.6, max(3.0, 0.24 * len(order) + 1.6)),
        sharey=True,
        layout="constrained",
    )
    for ax, (metric, _) in zip(axes, HEADLINE):
        of_metric = effects[effects["metric"] == metric.label]
        y = of_metric["track"].map(rows).to_numpy(float)
        colors = [styles[track].color for track in of_metric["track"]]
        # one artist per panel for the intervals and one per family for the points: a forest of 40 tracks
        # drawn as 40 errorbar containers takes seconds
        ax.hlines(y, 100 * of_metric["low"], 100 * of_metric["high"], colors=colors, linewidth=1.4)
        for marker in dict.fromkeys(styles[track].marker for track in of_metric["track"]):
            mine = [styles[track].marker == marker for track in of_metric["track"]]
            ax.scatter(
                100 * of_metric["mean"][mine],
                y[mine],
                c=[c for c, m in zip(colors, mine) if m],
                marker=marker or "o",
                s=28,
                zorder=3,
            )
        for row in range(0, len(order), 2):
            ax.axhspan(row - 0.5, row + 0.5, color="0.95", zorder=0)  # every other row shaded, to follow it across
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1.0)
        ax.set_title(_difference_title(metric), fontsize=9)
        ax.set_xlabel("difference to live (points)")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(list(rows.values()), list(rows), fontsize=7)
    axes[0].set_ylim(-0.7, len(order) - 0.3)
    fig.legend(
        handles=_family_handles(effects), loc="outside right upper", fontsize=8, title="family", title_fontsize=8
    )
    intervals = ", 95 % interval" if effects["low"].notna().any() else " (one seed or no spread: no interval)"
    fig.suptitle(f"{title}: difference to live{intervals}", fontsize=10)
    return fig


def figure_png(fig: plt.Figure, crop: bool = True) -> bytes:
    """Render and close a figure, cropped to what it draws unless a layout engine fitted it already or
    ``crop`` is False (cropping draws it twice, and drawing is most of a figure's time)."""
    buffer = io.BytesIO()
    tight = crop and not fig.get_layout_engine()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- continual evaluation
def continual_png(curves: dict, title: str = "") -> bytes:
    """Accuracy on each previous task over training steps, one panel per task, a line per track.

    ``curves`` maps track name → ``cl_ema.continual.Curve``; dotted lines mark task starts.
    """
    names = list(curves)
    reference = curves[names[0]]
    num_tasks = max(reference.tasks) + 1
    panels = max(num_tasks - 1, 1)
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    # steps where a new task begins (the first task's start is the left edge)
    starts = [
        step
        for i, (step, task) in enumerate(zip(reference.steps, reference.tasks))
        if i and task != reference.tasks[i - 1]
    ]
    for k, ax in enumerate(axes.flat):
        if k >= panels:
            ax.axis("off")
            continue
        for index, name in enumerate(names):
            curve = curves[name]
            points = [(s, acc[k]) for s, acc in zip(curve.steps, curve.accuracies) if len(acc) > k]
            if points:
                xs, ys = zip(*points)
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    label=name,
                    color=f"C{index}",
                    linestyle="--" if name == LIVE else "-",
                    linewidth=1.2,
                )
        for start in starts:
            ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"task {k + 1}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)
