"""PNG figures of accuracy matrices (matplotlib, headless)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmaps_png(matrices: dict[str, np.ndarray], title: str = "") -> bytes:
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
    return figure_png(fig)


def figure_png(fig: plt.Figure) -> bytes:
    """Render and close a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
