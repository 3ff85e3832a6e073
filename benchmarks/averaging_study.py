"""Which weight averaging helps against forgetting, and by how much beyond noise: every rule from one run.

    python benchmarks/averaging_study.py --data-root DIR [--seeds 5] [--out averaging_study]

    python benchmarks/averaging_study.py --data-root DIR --posthoc [--seeds 5] [--experiments seq_mnist]

``DIR`` holds MNIST in torchvision's layout. On Mammoth's seq-MNIST, perm-MNIST and rot-MNIST
protocols it trains, for each seed, two trajectories with every evaluation-only averaging rule as a
track beside ``live`` (``strategy=averages``: plain SGD; ``strategy=averages_replay`` with
``best_args=<experiment>/er_200``: Mammoth's ER with a buffer of 200), and the two strategies whose
averaging changes training (``strategy=coma``, ``strategy=cofima``) on the SGD protocol. It prints
(and writes to ``<out>/averaging_study.md``) for every rule the mean ± std over seeds and its
paired difference to its trajectory's ``live`` weights (mean and 95 % Student-t interval; ``*``
where it excludes 0), CoMA / CoFiMA against plain SGD (unpaired: other trajectories), and the time
each run took, training and evaluation apart.

``--posthoc``: the EMA's horizon, chosen after the run. Each run of the SGD and ER-200 trajectories keeps
post-hoc snapshots (``+plugin@posthoc=posthoc``) beside EMAs of 0.5, 1 and 2 tasks tracked directly; then
``cl_ema.posthoc`` rebuilds the EMA of every horizon of ``POSTHOC_HORIZONS`` (0.05 to 8 tasks). It prints
(and writes to ``<out>/posthoc_study.md``) the paired Δ to ``live`` against the horizon (mean and 95 %
interval over seeds), the best horizon with its interval, and how far each post-hoc track is from the same
horizon tracked directly in the same run; ``python -m cl_ema.report <out>`` draws the curves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from paper_tables import COLUMNS, EXPERIMENTS, Job, cell, run_one

from cl_ema.plugins import LIVE
from cl_ema.posthoc import DEFAULT_MAX_RESIDUAL, add_tracks
from cl_ema.report import paired_interval
from cl_ema.results import Results

TRAJECTORIES = {
    "SGD": lambda experiment: Job("averages", ["strategy=averages"], "SGD"),
    "ER 200": lambda experiment: Job(
        "averages_er_200",
        ["strategy=averages_replay", f"best_args={experiment}/er_200", "best_args.strategies=[averages_replay]"],
        "ER 200",
    ),
    "CoMA": lambda experiment: Job("coma", ["strategy=coma"], "CoMA"),
    "CoFiMA": lambda experiment: Job("cofima", ["strategy=cofima"], "CoFiMA"),
}
DIRECT = (0.5, 1, 2)  # horizons (tasks) the post-hoc study also tracks directly
POSTHOC_HORIZONS = (0.05, 0.08, 0.125, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8)
POSTHOC = {
    "SGD": lambda experiment: Job(
        "posthoc_sgd", ["strategy=ema", f"ema.horizons={list(DIRECT)}", "+plugin@posthoc=posthoc"], "SGD"
    ),
    "ER 200": lambda experiment: Job(
        "posthoc_er_200",
        [
            "strategy=ema_replay",
            f"best_args={experiment}/er_200",
            "best_args.strategies=[ema_replay]",
            f"ema.horizons={list(DIRECT)}",
            "+plugin@posthoc=posthoc",
        ],
        "ER 200",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding MNIST/raw")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("averaging_study"))
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    parser.add_argument("--posthoc", action="store_true", help="the EMA horizon chosen after the run (see above)")
    args = parser.parse_args()
    if args.posthoc:
        return posthoc_study(args)
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
                print(
                    f"{experiment} {name} seed {seed}: {wall:.1f} s, live "
                    f"{100 * values[name, LIVE, experiment, 'class_il'][-1]:.2f}",
                    flush=True,
                )
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
    lines = [
        "| run | experiment | s / run | training s | evaluation s (every track after each task) |",
        "|---|---|---|---|---|",
    ]
    for (experiment, name), rows in times.items():
        wall, train, evaluation = (float(np.mean(column)) for column in zip(*rows))
        lines.append(f"| {name} | {experiment} | {wall:.1f} | {train:.1f} | {evaluation:.1f} |")
    runs = sum(len(rows) for rows in times.values())
    total = sum(row[0] for rows in times.values() for row in rows)  # a run read back counts training + evaluation
    lines.append(f"\nall {runs} runs: {total / 60:.1f} min ({torch.get_num_threads()} CPU threads)")
    return "\n".join(lines) + "\n"


def posthoc_study(args: argparse.Namespace) -> None:
    """Every horizon of ``POSTHOC_HORIZONS``, rebuilt after each run (see the module docstring)."""
    lines = [
        f"post-hoc EMA, paired Δ to live over {args.seeds} seeds, in points (95 % Student-t interval; `*`: "
        "excludes 0); ACC class-IL (domain-IL on perm/rot), TIL task-IL",
        "",
    ]
    for experiment in args.experiments:
        for name, make in POSTHOC.items():
            job = make(experiment)
            runs: list[Results] = []
            for seed in range(args.seeds):
                results, wall = run_one(args.out, experiment, seed, job, args.data_root)
                folder = args.out / experiment / job.name / f"seed{seed}"
                add_tracks(folder, POSTHOC_HORIZONS, [], DEFAULT_MAX_RESIDUAL)
                runs.append(Results.from_dict(json.loads((folder / "results.json").read_text())))
                print(f"{experiment} {name} seed {seed}: {wall:.1f} s", flush=True)
            lines += posthoc_table(experiment, name, runs)
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "posthoc_study.md").write_text(text)
    print("\n" + text)


def posthoc_table(experiment: str, name: str, runs: list[Results]) -> list[str]:
    def final(results: Results, track: str, setting: str = "class_il") -> float:
        return float(results.metrics(track, results.tasks_done - 1, setting)["avg_acc"] or 0.0)

    def delta(track: str, setting: str, against: str = LIVE) -> tuple[float, float, float]:
        return paired_interval([final(r, track, setting) - final(r, against, setting) for r in runs])

    def shown(mean: float, low: float, high: float) -> str:
        star = " *" if low > 0 or high < 0 else ""
        return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]{star}"

    lines = [
        f"### {experiment}, {name}: live ACC {100 * np.mean([final(r, LIVE) for r in runs]):.2f}",
        "",
        "| horizon (tasks) | ΔACC | ΔTIL | max residual |",
        "|---|---|---|---|",
    ]
    best = max(POSTHOC_HORIZONS, key=lambda h: delta(f"posthoc_ema_h{h:g}", "class_il")[0])
    for h in POSTHOC_HORIZONS:
        track = f"posthoc_ema_h{h:g}"
        residual = max(r.meta["track_info"][track]["residual"] for r in runs)
        lines.append(
            f"| {h:g}{' (best)' if h == best else ''} | {shown(*delta(track, 'class_il'))} | "
            f"{shown(*delta(track, 'task_il'))} | {100 * residual:.2f} % |"
        )
    lines += ["", "post-hoc against the same horizon tracked directly in the same run (ACC, points):", ""]
    for h in DIRECT:
        (direct,) = [t for t in runs[0].tracks if t.startswith(f"ema_h{h:g}_")]
        gaps = [abs(final(r, f"posthoc_ema_h{h:g}") - final(r, direct)) for r in runs]
        lines.append(
            f"- {h:g} task(s): largest |post-hoc − direct| {100 * max(gaps):.2f}, mean {100 * float(np.mean(gaps)):.2f}"
        )
    return [*lines, ""]


if __name__ == "__main__":
    main()
