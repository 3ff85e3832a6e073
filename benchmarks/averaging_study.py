"""Which weight averaging helps against forgetting, and by how much beyond noise: every rule from one run.

    python benchmarks/averaging_study.py --data-root DIR [--seeds 5] [--out averaging_study]

``DIR`` holds MNIST in torchvision's layout. On Mammoth's seq-MNIST, perm-MNIST and rot-MNIST
protocols it trains, for each seed, two trajectories with every evaluation-only averaging rule as a
track beside ``live`` (``strategy=averages``: plain SGD; ``strategy=averages_replay`` with
``best_args=<experiment>/er_200``: Mammoth's ER with a buffer of 200), and the two strategies whose
averaging changes training (``strategy=coma``, ``strategy=cofima``) on the SGD protocol. It prints
(and writes to ``<out>/averaging_study.md``) for every rule the mean ± std over seeds and its
paired difference to its trajectory's ``live`` weights (mean and 95 % Student-t interval; ``*``
where it excludes 0), CoMA / CoFiMA against plain SGD (unpaired: other trajectories), and the time
each run took, training and evaluation apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from paper_tables import COLUMNS, EXPERIMENTS, Job, cell, run_one

from cl_ema.plugins import LIVE

TRAJECTORIES = {
    "SGD": lambda experiment: Job("averages", ["strategy=averages"], "SGD"),
    "ER 200": lambda experiment: Job("averages_er_200", ["strategy=averages_replay", f"best_args={experiment}/er_200",
                                                         "best_args.strategies=[averages_replay]"], "ER 200"),
    "CoMA": lambda experiment: Job("coma", ["strategy=coma"], "CoMA"),
    "CoFiMA": lambda experiment: Job("cofima", ["strategy=cofima"], "CoFiMA"),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding MNIST/raw")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("averaging_study"))
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    args = parser.parse_args()
    # (trajectory, track, experiment, setting) → accuracy per seed
    values: dict[tuple[str, str, str, str], list[float]] = {}
    times: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # wall, training, evaluation seconds
    tracks: dict[str, list[str]] = {}
    for experiment in args.experiments:
        for name, make in TRAJECTORIES.items():
            job = make(experiment)
            for seed in range(args.seeds):
                results, wall = run_one(args.out, experiment, seed, job, args.data_root)
                train, elapsed = results.meta["train_s"], results.meta["elapsed_s"]
                times.setdefault((experiment, name), []).append((wall, train, elapsed - train))
                tracks[name] = results.tracks
                for track in results.tracks:
                    for setting in ("class_il", "task_il"):
                        acc = results.metrics(track, results.tasks_done - 1, setting)["avg_acc"]
                        values.setdefault((name, track, experiment, setting), []).append(acc)
                print(f"{experiment} {name} seed {seed}: {wall:.1f} s, live "
                      f"{100 * values[name, LIVE, experiment, 'class_il'][-1]:.2f}", flush=True)  # fmt: skip
    text = table(values, tracks, args.seeds) + "\n" + timing(times)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "averaging_study.md").write_text(text)
    print("\n" + text)


def table(values: dict, tracks: dict[str, list[str]], seeds: int) -> str:
    lines = [
        f"mean ± std over {seeds} seeds, in %; Δ: the paired difference to the trajectory's live weights, "
        "with its 95 % Student-t interval (`*`: excludes 0)",
        "",
        "| trajectory | track | seq-MNIST class-IL | seq-MNIST task-IL | perm-MNIST domain-IL | rot-MNIST domain-IL |",
        "|---|---|---|---|---|---|",
    ]
    for name, names in tracks.items():
        for track in names:
            cells = []
            for experiment, setting in COLUMNS:
                mine = values.get((name, track, experiment, setting))
                if mine is None:
                    cells.append("–")
                    continue
                live = values[name, LIVE, experiment, setting]
                paired = track != LIVE and name in ("SGD", "ER 200")
                cells.append(cell(mine, differences=[a - b for a, b in zip(mine, live)] if paired else None))
            lines.append(f"| {name} | {track} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def timing(times: dict) -> str:
    lines = ["| run | experiment | s / run | training s | evaluation s (every track after each task) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (experiment, name), rows in times.items():
        wall, train, evaluation = (float(np.mean(column)) for column in zip(*rows))
        lines.append(f"| {name} | {experiment} | {wall:.1f} | {train:.1f} | {evaluation:.1f} |")
    runs = sum(len(rows) for rows in times.values())
    total = sum(row[0] for rows in times.values() for row in rows)  # a run read back counts training + evaluation
    lines.append(f"\nall {runs} runs: {total / 60:.1f} min ({torch.get_num_threads()} CPU threads)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
