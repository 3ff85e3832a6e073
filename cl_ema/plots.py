"""PNG figures of accuracy matrices (matplotlib, headless)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cl_ema.plugins import LIVE  # noqa: E402


def heatmaps_png(matrices: dict[str, np.ndarray], title: str = "") -> bytes:
    """One annotated heatmap per track of R[i, j] (rows: trained through task i), as PNG."""
    return figure_png(heatmaps_figure(matrices, title))


def heatmaps_figure(matrices: dict[str, np.ndarray], title: str = "") -> plt.Figure:
    """One annotated heatmap per track of R[i, j] (rows: trained through task i)."""
    names = list(matrices)
    size = max(m.shape[0] for m in matrices.values())
    cell = 0.45 if size <= 10 else 0.25
    fig, axes = plt.subplots(
        1, len(names), figsize=(max(3.0, cell * size + 1.5) * len(names), cell * size + 1.8), squeeze=False
    )
    for ax, name in zip(axes[0], names):
        matrix = matrices[name]
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("test task")
        ax.set_ylabel("trained through task")
        ticks = range(matrix.shape[0])
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        if size <= 10:
            for (i, j), value in np.ndenumerate(matrix):
                if not np.isnan(value):
                    ax.text(
                        j,
                        i,
                        f"{100 * value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="w" if value < 0.6 else "k",
                    )
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    if title:
        fig.suptitle(title)
    return fig


def figure_png(fig: plt.Figure) -> bytes:
    """Render and close a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


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
