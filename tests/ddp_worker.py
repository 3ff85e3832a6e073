"""Runs one experiment in every process of ``torchrun`` and keeps each process's final state.

    torchrun --nproc-per-node=2 tests/ddp_worker.py OUT OVERRIDES…

Writes ``OUT/rank<r>.pt``: that process's checkpoint snapshot (model, every plugin's state) after
the last task, so a test can compare the processes; results go to ``OUT/run`` (main process).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cl_ema import runner
from cl_ema.config import check, compose
from cl_ema.launch import launch


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    keep = runner.train_all_tasks

    def train_and_keep(run, console):
        keep(run, console)
        torch.save(run.state_dict(), out / f"rank{dist.get_rank()}.pt")

    runner.train_all_tasks = train_and_keep
    launch(check(compose("logger=none", "checkpoint=false", "device=cpu", *overrides)), out / "run")


if __name__ == "__main__":
    main()
