"""Host time per mini-batch: Avalanche's loaders (items fetched one by one) vs cl_ema's IndexBatches.

    python benchmarks/loader.py [--batch-size 128] [--rounds 5]

Both iterate the same batches of split CIFAR-100 indices (generated data of its shape; only the
indices matter here): one epoch of task 1 through Avalanche's ``TaskBalancedDataLoader``, and
one epoch of task 2 through its ``ReplayDataLoader`` with a 2,000-sample memory. This is host
work that, on a GPU, runs between kernel launches of every training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from avalanche.benchmarks.utils.data_loader import ReplayDataLoader, TaskBalancedDataLoader
from throughput import cifar_like

from cl_ema.config import Scenario
from cl_ema.data.loader import IndexBatches
from cl_ema.data.stream import stream_from_stores


def ms_per_batch(loader) -> float:
    started, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
    return 1000 * (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    stream = stream_from_stores(*cifar_like(None, 50_000), Scenario.split, 10, seed=0, device=torch.device("cpu"))
    first, second = (exp.dataset for exp in stream.benchmark.train_stream[:2])
    memory = first.subset(range(2_000))
    loaders = {
        "task 1 (TaskBalancedDataLoader)": TaskBalancedDataLoader(
            first, oversample_small_groups=True, batch_size=args.batch_size, shuffle=True
        ),
        "task 2 + replay (ReplayDataLoader)": ReplayDataLoader(
            second,
            memory,
            oversample_small_tasks=True,
            batch_size=args.batch_size,
            batch_size_mem=args.batch_size,
            shuffle=True,
        ),
    }
    print(f"host ms per batch of {args.batch_size} (+{args.batch_size} replayed), median of {args.rounds} rounds")
    for name, loader in loaders.items():
        fast = IndexBatches(loader, torch.device("cpu"))
        times = {"Avalanche": [], "IndexBatches": []}
        for _ in range(args.rounds):
            times["Avalanche"].append(ms_per_batch(loader))
            times["IndexBatches"].append(ms_per_batch(fast))
        slow, quick = (statistics.median(t) for t in times.values())
        print(f"{name:<36} Avalanche {slow:7.3f} ms   IndexBatches {quick:7.3f} ms   {slow / quick:6.1f}x")


if __name__ == "__main__":
    main()
