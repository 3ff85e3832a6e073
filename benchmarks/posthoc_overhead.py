"""What post-hoc snapshots cost a run: training time with ``+plugin@posthoc=posthoc`` against without.

    python benchmarks/posthoc_overhead.py [--experiment split_digits] [--rounds 5] [--data-root DIR] [--hooks]

Runs the same experiment (``strategy=ema``, seed 0, no logger) with and without the post-hoc plugin,
taking turns for ``--rounds`` rounds, and prints the median training time of each (``train_s`` of
results.json: the training loop, snapshots included, evaluation apart), their ratio, and the disk the
snapshots took. ``--hooks`` also prints where the plugin's time goes, median over the rounds: its basis
updates, its snapshots (copied and written) and its flushes to disk.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import cl_ema
from cl_ema.plugins.posthoc import PostHocPlugin

SPENT: collections.Counter[str] = collections.Counter()  # seconds in each timed method, its timed calls apart
NESTED: list[float] = []  # for each timed call under way, the seconds of the timed calls it made


def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        NESTED.append(0.0)
        try:
            return method(*args, **kwargs)
        finally:
            total = time.perf_counter() - start
            SPENT[name] += total - NESTED.pop()
            if NESTED:
                NESTED[-1] += total

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="split_digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-root", type=Path, help="folder holding MNIST/raw (MNIST experiments)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hooks", action="store_true", help="where the plugin's time goes")
    args = parser.parse_args()
    with contextlib.ExitStack() as timers:
        if args.hooks:  # after_update, its saves apart: the basis update of each step
            for name in ("after_update", "save", "flush"):
                timers.enter_context(mock.patch.object(PostHocPlugin, name, timed(name, getattr(PostHocPlugin, name))))
        measure(args)


def measure(args: argparse.Namespace) -> None:
    data = [f"data.root={args.data_root}", "data.download=false"] if args.data_root else []
    common = [f"experiment={args.experiment}", "strategy=ema", "logger=none", "checkpoint=false"]
    common += [f"threads={args.threads}", *data]
    times: dict[str, list[float]] = {"without": [], "with": []}
    hooks: dict[str, list[float]] = {"basis updates": [], "snapshots": [], "flushes": []}
    disk = 0
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name, extra in (("without", []), ("with", ["+plugin@posthoc=posthoc"])):
                folder = Path(scratch) / f"{name}{round_}"
                SPENT.clear()
                results = cl_ema.run(*common, *extra, folder=folder, output=io.StringIO())
                times[name].append(results.meta["train_s"])
                if extra:
                    disk = sum(p.stat().st_size for p in (folder / "posthoc").iterdir())
                    hooks["basis updates"].append(SPENT["after_update"])
                    hooks["snapshots"].append(SPENT["save"])
                    hooks["flushes"].append(SPENT["flush"])
    without, with_ = (statistics.median(times[name]) for name in ("without", "with"))
    print(
        f"{args.experiment}, {args.rounds} rounds, {args.threads} thread(s): training {without:.2f} s without, "
        f"{with_:.2f} s with post-hoc snapshots: {with_ / without:.3f}x; snapshots {disk / 2**20:.1f} MiB"
    )
    if args.hooks:
        print("  in the plugin: " + ", ".join(f"{name} {statistics.median(s):.3f} s" for name, s in hooks.items()))


if __name__ == "__main__":
    main()
