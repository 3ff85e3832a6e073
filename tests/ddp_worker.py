"""``python -m cl_ema OVERRIDES…`` in every process of ``torchrun``, keeping each process's final state.

    torchrun --nproc-per-node=2 tests/ddp_worker.py OUT OVERRIDES…

The run is the command line's, folders and output included; each process also writes ``OUT/rank<r>.pt``,
its checkpoint snapshot (model, every plugin's state) after the last task, so a test can compare them.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cl_ema import __main__ as command_line
from cl_ema import runner


def main() -> None:
    out = Path(sys.argv[1])
    del sys.argv[1]
    keep = runner.train_all_tasks

    def train_and_keep(run, console):
        keep(run, console)
        torch.save(run.state_dict(), out / f"rank{dist.get_rank()}.pt")

    runner.train_all_tasks = train_and_keep
    command_line.main()


if __name__ == "__main__":
    main()
