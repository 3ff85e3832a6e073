"""Mammoth's and CLS-ER's MNIST tables, reproduced on real MNIST under their published protocols.

    python benchmarks/paper_tables.py --data-root DIR [--seeds 5] [--out paper_tables]

``DIR`` holds MNIST in torchvision's layout (``DIR/MNIST/raw``). For each experiment
(``seq_mnist``, ``perm_mnist``) and seed it runs, in this process:

- ``strategy=ema`` on the experiment's own protocol (Mammoth's best arguments for SGD): its
  ``live`` track is plain fine-tuning, its EMA tracks are evaluation-only EMAs of it (they never
  change training, so one run gives both);
- ``strategy=ema_replay best_args=<experiment>/er_<200|500>``: ``live`` is Mammoth's ER, the EMA
  tracks evaluation-only EMAs of it;
- ``strategy=cls_er best_args=<experiment>/clser_<200|500>``: CLS-ER, reported with its stable
  EMA as its authors do.

It prints (and writes to ``<out>/paper_tables.md``) mean ± sample std over seeds, in %, with the
published value beside each cell and a mark where ours is more than 2 std away from it; then the
wall time of each run and CLS-ER's training time per step against replay's under the same
protocol. Every run's folder (results.json, matrices) stays under ``<out>`` for
``python -m cl_ema.report``.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl_ema.config import check, compose
from cl_ema.console import Console
from cl_ema.runner import run

# Published: Mammoth's README (Buzzega et al. 2020; aimagelab/mammoth, first commit's table) and
# CLS-ER's README (NeurAI-Lab/CLS-ER). seq-MNIST class-IL, seq-MNIST task-IL, perm-MNIST domain-IL.
PUBLISHED = {
    "plain": (19.60, 94.94, 40.70),  # Mammoth's SGD
    "replay 200": (80.43, 97.86, 72.37),
    "replay 500": (86.12, 99.04, 80.60),
    "cls_er 200": (89.54, 97.97, None),
    "cls_er 500": (92.05, 98.95, None),
}
# evaluation-only EMAs: a short horizon (100 steps) and about one task (seq: 1,000 of ~1,200; perm: 500 of 469)
EMA_DECAYS = {"seq_mnist": (0.99, 0.999), "perm_mnist": (0.99, 0.998)}
COLUMNS = (("seq_mnist", "class_il"), ("seq_mnist", "task_il"), ("perm_mnist", "class_il"))
ROWS = (
    "plain", "ema (short)", "ema (task)", "replay 200", "replay 500", "ema_replay 200 (short)", "ema_replay 200 (task)",
    "ema_replay 500 (short)", "ema_replay 500 (task)", "cls_er 200", "cls_er 500", "cls_er 200 (live)",
    "cls_er 500 (live)",
)  # fmt: skip


@dataclass
class Job:
    name: str
    overrides: list[str]
    rows: dict[str, str]  # table row → track of this run


def jobs(experiment: str) -> list[Job]:
    short, task = EMA_DECAYS[experiment]
    decays = f"ema.decays=[{short},{task}]"
    ema_rows = {"short": f"ema_{short}", "task": f"ema_{task}"}
    out = [Job("sgd", ["strategy=ema", decays], {"plain": "live", **{f"ema ({k})": t for k, t in ema_rows.items()}})]
    for buffer in (200, 500):
        rows = {f"replay {buffer}": "live", **{f"ema_replay {buffer} ({k})": t for k, t in ema_rows.items()}}
        out.append(Job(f"er_{buffer}", ["strategy=ema_replay", f"best_args={experiment}/er_{buffer}", decays], rows))
        out.append(Job(f"clser_{buffer}", ["strategy=cls_er", f"best_args={experiment}/clser_{buffer}"],
                       {f"cls_er {buffer}": "ema_stable", f"cls_er {buffer} (live)": "live"}))  # fmt: skip
    return out


def run_one(out: Path, experiment: str, seed: int, job: Job, data_root: Path):
    cfg = compose(f"experiment={experiment}", *job.overrides, f"seed={seed}", f"data.root={data_root}",
                  "data.download=false", "logger=none", "checkpoint=false", "device=cpu")  # fmt: skip
    check(cfg)
    started = time.perf_counter()
    results = run(cfg, out / experiment / job.name / f"seed{seed}", console=Console(file=io.StringIO()))
    return results, time.perf_counter() - started


def cell(values: list[float], published: float | None) -> str:
    mean, std = 100 * np.mean(values), 100 * np.std(values, ddof=1) if len(values) > 1 else 0.0
    text = f"{mean:.2f} ± {std:.2f}"
    if published is None:
        return text + " (–)"
    far = abs(mean - published) > 2 * std
    return text + f" ({published:.2f}{' †' if far else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding MNIST/raw")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("paper_tables"))
    parser.add_argument("--experiments", nargs="+", default=list(EMA_DECAYS), choices=list(EMA_DECAYS))
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of the CLS-ER vs replay step timing")
    args = parser.parse_args()
    values: dict[tuple[str, str, str], list[float]] = {}
    times: dict[tuple[str, str], list[float]] = {}
    started = time.perf_counter()
    for experiment in args.experiments:
        for job in jobs(experiment):
            for seed in range(args.seeds):
                results, wall = run_one(args.out, experiment, seed, job, args.data_root)
                times.setdefault((experiment, job.name), []).append(wall)
                last = results.tasks_done - 1
                for row, track in job.rows.items():
                    for setting in ("class_il", "task_il"):
                        acc = results.metrics(track, last, setting)["avg_acc"]
                        values.setdefault((row, experiment, setting), []).append(acc)
                print(f"{experiment} {job.name} seed {seed}: {wall:.1f} s, "
                      + ", ".join(f"{row} {100 * values[row, experiment, 'class_il'][-1]:.2f}" for row in job.rows),
                      flush=True)  # fmt: skip
    total = time.perf_counter() - started
    lines = [
        f"mean ± std over {args.seeds} seeds, in % (published value in parentheses; † more than 2 std away)",
        "",
        "| method | seq-MNIST class-IL | seq-MNIST task-IL | perm-MNIST domain-IL |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        published = PUBLISHED.get(row, (None, None, None))
        cells = [cell(values[row, e, s], p) if (row, e, s) in values else "–" for (e, s), p in zip(COLUMNS, published)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "| run | seq-MNIST s / run | perm-MNIST s / run |", "|---|---|---|"]
    for name in dict.fromkeys(n for (_, n) in times):
        cells = (f"{np.mean(times[e, name]):.1f}" if (e, name) in times else "–" for e in EMA_DECAYS)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nall {len([t for v in times.values() for t in v])} runs: {total / 60:.1f} min "
                 f"({torch.get_num_threads()} CPU threads)")  # fmt: skip
    lines += ["", step_costs(args)]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_tables.md").write_text(text)
    print("\n" + text)


def step_costs(args) -> str:
    """CLS-ER's training time per step against replay's, same protocol and seed, measured in turns."""
    out = []
    for buffer in (200, 500):
        per_step: dict[str, list[float]] = {"replay": [], "cls_er": []}
        for _ in range(args.timing_rounds):
            for strategy in per_step:
                # replay under CLS-ER's protocol, for the time per step alone
                job = Job(strategy, [f"strategy={strategy}", f"best_args=seq_mnist/clser_{buffer}",
                                     "best_args.strategies=[cls_er,replay]"], {})  # fmt: skip
                results, _ = run_one(args.out / "timing", "seq_mnist", 0, job, args.data_root)
                per_step[strategy].append(1000 * results.meta["train_s"] / sum(results.meta["steps_per_task"]))
        if args.timing_rounds:
            replay, cls_er = (float(np.median(v)) for v in per_step.values())
            out.append(f"seq-MNIST, CLS-ER's protocol with buffer {buffer}: replay {replay:.2f} ms/step, cls_er "
                       f"{cls_er:.2f} ms/step ({cls_er / replay:.2f}x; median of {args.timing_rounds})")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
