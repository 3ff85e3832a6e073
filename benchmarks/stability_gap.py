"""Does EMA shrink the stability gap? Continual evaluation of live vs EMA weights, on real MNIST.

    python benchmarks/stability_gap.py --data-root DIR [--seeds 5] [--every 10]

Runs ``strategy=ema`` with ``eval.every_n_steps`` on split digits (offline) and, with MNIST in
torchvision's layout under ``DIR``, on split_mnist (van de Ven & Tolias' protocol) and seq_mnist
(Mammoth's). Each experiment has a short EMA horizon (100 steps) and one of about a task. Prints
mean ± std over seeds of min-ACC, WC-ACC, AAA, the stability gap and final ACC per track, and
the cost of continual evaluation (wall time with and without it, one seed, same process).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cl_ema
from cl_ema.metrics import STABILITY_METRICS

# experiment → EMA decays: horizons of 100 steps and about one task
STUDIES = {
    "split_digits": [0.9, 0.99],  # a task is 90 steps
    "split_mnist": [0.99, 0.998],  # a task is ~2,000 steps
    "seq_mnist": [0.99, 0.999],  # a task is ~1,200 steps
}


def run_once(out: Path, *overrides: str):
    started = time.perf_counter()
    results = cl_ema.run("logger=none", "checkpoint=false", *overrides, folder=out, output=io.StringIO())
    return results, time.perf_counter() - started


def summary(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    return f"{100 * np.mean(present):5.1f} ± {100 * np.std(present, ddof=1 if len(present) > 1 else 0):4.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, help="folder holding MNIST/raw (without it: split digits only)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--every", type=int, default=10, help="eval.every_n_steps")
    parser.add_argument("--experiments", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cl_ema_gap_"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, eval.every_n_steps={args.every}, "
        f"eval.subset_size=200, seeds 0..{args.seeds - 1}\n"
    )
    print(f"{'experiment':<16}{'track':<12}" + "".join(f"{m.label:>16}" for m in STABILITY_METRICS) + f"{'ACC':>16}")
    for name in args.experiments:
        if name != "split_digits" and args.data_root is None:
            continue
        data = [f"data.root={args.data_root}", "data.download=false"] if args.data_root else []
        overrides = [f"experiment={name}", f"ema.decays=[{','.join(map(str, STUDIES[name]))}]", "device=cpu", *data]
        runs = []
        for seed in range(args.seeds):
            results, _ = run_once(
                work / name / str(seed), "strategy=ema", f"eval.every_n_steps={args.every}", f"seed={seed}", *overrides
            )
            runs.append(results)
        for track in runs[0].tracks:
            cells = [summary([r.stability[track][m.key] for r in runs]) for m in STABILITY_METRICS]
            final = summary([r.metrics(track, r.num_tasks - 1)["avg_acc"] for r in runs])
            print(f"{name:<16}{track:<12}" + "".join(f"{c:>16}" for c in (*cells, final)), flush=True)
        _, with_eval = run_once(
            work / name / "timed_eval", "strategy=ema", f"eval.every_n_steps={args.every}", *overrides
        )
        _, without = run_once(work / name / "timed_plain", "strategy=ema", *overrides)
        evaluations = sum(runs[0].meta["steps_per_task"]) // args.every
        tracks = len(runs[0].tracks)
        print(
            f"{'':<16}cost: {with_eval:.1f} s with continual evaluation vs {without:.1f} s without "
            f"({with_eval / without:.2f}x; ~{evaluations} evaluations of {tracks} tracks)\n"
        )


if __name__ == "__main__":
    main()
