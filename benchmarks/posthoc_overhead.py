"""What post-hoc snapshots cost a run: training time with ``+plugin@posthoc=posthoc`` against without.

    python benchmarks/posthoc_overhead.py [--experiment split_digits] [--rounds 5] [--data-root DIR]

Runs the same experiment (``strategy=ema``, seed 0, no logger) with and without the post-hoc plugin,
taking turns for ``--rounds`` rounds, and prints the median training time of each (``train_s`` of
results.json: the training loop, snapshots included, evaluation apart), their ratio, and the disk the
snapshots took.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from pathlib import Path

import cl_ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="split_digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-root", type=Path, help="folder holding MNIST/raw (MNIST experiments)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    data = [f"data.root={args.data_root}", "data.download=false"] if args.data_root else []
    common = [f"experiment={args.experiment}", "strategy=ema", "logger=none", "checkpoint=false"]
    common += [f"threads={args.threads}", *data]
    times: dict[str, list[float]] = {"without": [], "with": []}
    disk = 0
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name, extra in (("without", []), ("with", ["+plugin@posthoc=posthoc"])):
                folder = Path(scratch) / f"{name}{round_}"
                results = cl_ema.run(*common, *extra, folder=folder, output=io.StringIO())
                times[name].append(results.meta["train_s"])
                if extra:
                    disk = sum(p.stat().st_size for p in (folder / "posthoc").iterdir())
    without, with_ = (statistics.median(times[name]) for name in ("without", "with"))
    print(
        f"{args.experiment}, {args.rounds} rounds, {args.threads} thread(s): training {without:.2f} s without, "
        f"{with_:.2f} s with post-hoc snapshots: {with_ / without:.3f}x; snapshots {disk / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
