"""Mammoth's and CLS-ER's MNIST tables, reproduced on real MNIST under their published protocols.

    python benchmarks/paper_tables.py --data-root DIR [--seeds 5] [--out paper_tables] [--only JOB ...]

``DIR`` holds MNIST in torchvision's layout (``DIR/MNIST/raw``). For each experiment
(``seq_mnist``, ``perm_mnist``, ``rot_mnist``) and seed it runs, in this process:

- ``strategy=ema`` on the experiment's own protocol (Mammoth's best arguments for SGD);
- ``strategy=ema_replay best_args=<experiment>/er_<200|500>`` (Mammoth's ER);
- ``strategy=ema_der`` / ``ema_derpp`` with ``best_args=<experiment>/der_<200|500>`` / ``derpp_…``;
- ``strategy=cls_er best_args=<experiment>/clser_<200|500>``: CLS-ER, reported with its stable
  EMA as its authors do, and its live weights.

Each run's ``live`` track is the published method; its EMA track (``ema.horizons=[1]``: a horizon of
one task) is an evaluation-only EMA of that same trajectory, so it is reported with its paired
difference to ``live`` (mean and 95 % Student-t interval over seeds). It prints (and writes to
``<out>/paper_tables.md``) mean ± sample std over seeds, in %, with the published value beside each
cell and a mark where ours is more than 2 std away from it; then the wall time of each run and the
time per step of DER++ and CLS-ER against ER's under the same protocol. Every run's folder stays
under ``<out>`` for ``python -m cl_ema.report``; a run finished there before is read back, not rerun,
so an interrupted study goes on where it stopped and more seeds run only the new ones.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import cl_ema
from cl_ema.config import compose
from cl_ema.plugins import LIVE
from cl_ema.report import paired_interval
from cl_ema.results import Results

# Published: Mammoth's README (Buzzega et al. 2020; aimagelab/mammoth, first commit's table) and
# CLS-ER's README (NeurAI-Lab/CLS-ER), per column below.
COLUMNS = (("seq_mnist", "class_il"), ("seq_mnist", "task_il"), ("perm_mnist", "class_il"), ("rot_mnist", "class_il"))
PUBLISHED = {
    "SGD": (19.60, 94.94, 40.70, 67.66),
    "ER 200": (80.43, 97.86, 72.37, 85.01),
    "ER 500": (86.12, 99.04, 80.60, 88.91),
    "DER 200": (84.55, 98.80, 81.74, 90.04),
    "DER 500": (90.54, 98.84, 87.29, 92.24),
    "DER++ 200": (85.61, 98.76, 83.58, 90.43),
    "DER++ 500": (91.00, 98.94, 88.21, 92.77),
    "CLS-ER 200": (89.54, 97.97, None, None),
    "CLS-ER 500": (92.05, 98.95, None, None),
}
EXPERIMENTS = tuple(dict.fromkeys(e for e, _ in COLUMNS))
EMA = "ema.horizons=[1]"  # the evaluation-only EMA of every trajectory: a horizon of one task


@dataclass
class Job:
    name: str
    overrides: list[str]
    method: str  # the table's row of the run's live track (its EMA's row is "<method> + EMA")
    ema_track: bool = True


def jobs(experiment: str) -> list[Job]:
    out = [Job("sgd", ["strategy=ema", EMA], "SGD")]
    for method, strategy, files in (
        ("ER", "ema_replay", "er"),
        ("DER", "ema_der", "der"),
        ("DER++", "ema_derpp", "derpp"),
    ):
        for buffer in (200, 500):
            protocol = f"best_args={experiment}/{files}_{buffer}"
            out.append(Job(f"{files}_{buffer}", [f"strategy={strategy}", protocol, EMA], f"{method} {buffer}"))
    for buffer in (200, 500):
        overrides = ["strategy=cls_er", f"best_args={experiment}/clser_{buffer}"]
        out.append(Job(f"clser_{buffer}", overrides, f"CLS-ER {buffer}", ema_track=False))
    return out


def run_one(out: Path, experiment: str, seed: int, job: Job, data_root: Path) -> tuple[Results, float]:
    """The run's results and wall time; a run finished before (an interrupted study) is read back, not rerun."""
    folder = out / experiment / job.name / f"seed{seed}"
    if done := finished(folder):
        return done, done.meta["elapsed_s"]
    shutil.rmtree(folder, ignore_errors=True)  # the study's own run, unfinished or unreadable: run again
    started = time.perf_counter()
    results = cl_ema.run(
        f"experiment={experiment}",
        *job.overrides,
        f"seed={seed}",
        f"data.root={data_root}",
        "data.download=false",
        "logger=none",
        "checkpoint=false",
        "device=cpu",
        folder=folder,
        output=io.StringIO(),
    )
    return results, time.perf_counter() - started


def finished(folder: Path) -> Results | None:
    """The completed run in ``folder``; None for none, an unfinished one or an unreadable file (run again)."""
    path = folder / "results.json"
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("status") != "completed":
            return None
        return Results.from_dict(saved)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def cell(values: list[float], published: float | None = None, differences: list[float] | None = None) -> str:
    """mean ± std in %, the published value beside it (†: more than 2 std away), or the paired difference."""
    mean, std = 100 * np.mean(values), 100 * np.std(values, ddof=1) if len(values) > 1 else 0.0
    text = f"{mean:.2f} ± {std:.2f}"
    if differences is not None:
        diff, low, high = (100 * v for v in paired_interval(differences))
        mark = " *" if low > 0 or high < 0 else ""
        return text + (f", Δ {diff:+.2f}" if low != low else f", Δ {diff:+.2f} [{low:+.2f}, {high:+.2f}]{mark}")
    if published is None:
        return text
    far = abs(mean - published) > 2 * std
    return text + f" ({published:.2f}{' †' if far else ''})"


def ema_track(results) -> str:
    (track,) = [t for t in results.tracks if results.meta["track_info"][t]["rule"] == "ema"]
    return track


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding MNIST/raw")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("paper_tables"))
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    names = [job.name for job in jobs(EXPERIMENTS[0])]
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="JOB",
        choices=names,
        help="only these runs, to share a table among processes (a last call without it reads "
        f"every run back): {', '.join(names)}",
    )
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of the time-per-step comparison")
    args = parser.parse_args()
    values: dict[tuple[str, str, str], list[float]] = {}  # (row, experiment, setting) → accuracy per seed
    times: dict[tuple[str, str], list[float]] = {}
    for experiment in args.experiments:
        for job in (j for j in jobs(experiment) if not args.only or j.name in args.only):
            for seed in range(args.seeds):
                results, wall = run_one(args.out, experiment, seed, job, args.data_root)
                times.setdefault((experiment, job.name), []).append(wall)
                last = results.tasks_done - 1
                rows = {job.method: LIVE}
                if job.method.startswith("CLS-ER"):
                    rows = {job.method: "ema_stable", f"{job.method} (its live weights)": LIVE}
                elif job.ema_track:
                    rows[f"{job.method} + EMA"] = ema_track(results)
                for row, track in rows.items():
                    for setting in ("class_il", "task_il"):
                        acc = results.metrics(track, last, setting)["avg_acc"]
                        values.setdefault((row, experiment, setting), []).append(acc)
                print(
                    f"{experiment} {job.name} seed {seed}: {wall:.1f} s, "
                    + ", ".join(f"{row} {100 * values[row, experiment, 'class_il'][-1]:.2f}" for row in rows),
                    flush=True,
                )
    total = sum(t for v in times.values() for t in v)  # a run read back counts its training + evaluation
    lines = [
        f"mean ± std over {args.seeds} seeds, in % (published value in parentheses; † more than 2 std away). "
        "`+ EMA`: the evaluation-only EMA of the row above (horizon one task), with its paired difference Δ "
        "to it and the 95 % interval (`*`: excludes 0)",
        "",
        "| method | seq-MNIST class-IL | seq-MNIST task-IL | perm-MNIST domain-IL | rot-MNIST domain-IL |",
        "|---|---|---|---|---|",
    ]
    for row in dict.fromkeys(r for r, _, _ in values):
        cells = []
        for (experiment, setting), published in zip(COLUMNS, PUBLISHED.get(row, (None,) * len(COLUMNS))):
            if (row, experiment, setting) not in values:
                cells.append("–")
            elif row.endswith(" + EMA"):
                base = values[row.removesuffix(" + EMA"), experiment, setting]
                mine = values[row, experiment, setting]
                cells.append(cell(mine, differences=[a - b for a, b in zip(mine, base)]))
            else:
                cells.append(cell(values[row, experiment, setting], published))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | " + " | ".join(f"{e} s / run" for e in EXPERIMENTS) + " |",
        "|---|" + "---|" * len(EXPERIMENTS),
    ]
    for name in dict.fromkeys(n for (_, n) in times):
        cells = [f"{np.mean(times[e, name]):.1f}" if (e, name) in times else "–" for e in EXPERIMENTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nall {len([t for v in times.values() for t in v])} runs: {total / 60:.1f} min "
        f"({torch.get_num_threads()} CPU threads)"
    )
    lines += ["", step_costs(args)]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_tables.md").write_text(text)
    print("\n" + text)


def step_costs(args) -> str:
    """DER++'s and CLS-ER's training time per step against ER's, under the same protocol and seed, measured
    in turns: ER replays ``batch_size_mem`` samples in one pass, DER++ passes two such batches separately."""
    out = []
    for method, files in (("derpp", "derpp"), ("cls_er", "clser")):
        for buffer in (200, 500):
            # ER under the other method's protocol (same batch, memory, replayed batch), for the time per step
            protocol = [f"best_args=seq_mnist/{files}_{buffer}", f"best_args.strategies=[{method},replay]"]
            replayed = "der.batch_size_mem" if method == "derpp" else "replay.batch_size_mem"
            cfg = compose("experiment=seq_mnist", f"strategy={method}", *protocol)
            er = [
                "replay.policy=reservoir",
                f"replay.mem_size={buffer}",
                f"replay.batch_size_mem={cfg[replayed.split('.')[0]].batch_size_mem}",
            ]
            per_step: dict[str, list[float]] = {"replay": [], method: []}
            for round_ in range(args.timing_rounds):
                for strategy in per_step:
                    extra = er if strategy == "replay" else []
                    overrides = [f"strategy={strategy}", *protocol, *extra]
                    job = Job(f"{strategy}_{files}_{buffer}", overrides, method, ema_track=False)
                    results, _ = run_one(args.out / f"timing{round_}", "seq_mnist", 0, job, args.data_root)
                    per_step[strategy].append(1000 * results.meta["train_s"] / sum(results.meta["steps_per_task"]))
            if args.timing_rounds:
                replay, other = (float(np.median(v)) for v in per_step.values())
                out.append(
                    f"seq-MNIST, {method}'s protocol with buffer {buffer}: ER {replay:.2f} ms/step, {method} "
                    f"{other:.2f} ms/step ({other / replay:.2f}x; median of {args.timing_rounds})"
                )
    return "\n".join(out)


if __name__ == "__main__":
    main()
