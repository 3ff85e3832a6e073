"""Data parallel under ``torchrun``: every process runs the same story on its share of each batch.

``torchrun --nproc-per-node=N -m cl_ema …`` starts N processes (``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in their environment; a SLURM job of N tasks started by submitit works the same).
All of them seed alike, so Avalanche's loaders draw the same global mini-batch everywhere, and
each trains on its 1/N share of it (``cl_ema.template``); DistributedDataParallel averages the
gradients, so the parameters stay equal after every step.
The EMA shadows, the replay memory and every plugin's random draws are then identical on all
processes without any communication (timm's pattern for EMA). Evaluation splits each test set
over the processes and sums the correct predictions, so every process sees the same accuracies.
Only the main process (rank 0) writes files and logs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cl_ema.config import Precision
from cl_ema.environment import local_rank, rank, world_size
from cl_ema.errors import UserError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment() -> Processes:
    """This process's place, as torchrun tells it, or SLURM through submitit for a job of several
    tasks (``hydra.launcher.tasks_per_node=N``); one process otherwise."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        if submitit.JobEnvironment().num_tasks > 1:  # MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    processes = Processes(rank(), local_rank(), world_size())
    if processes.world_size > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError(
            f"WORLD_SIZE={processes.world_size} without MASTER_ADDR: start the processes with torchrun "
            "(or a SLURM job of several tasks through hydra/launcher=slurm)"
        )
    if processes.rank >= processes.world_size:
        raise UserError(f"RANK={processes.rank}: must be below WORLD_SIZE={processes.world_size}")
    return processes


def start(processes: Processes, device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs); the device this process trains on."""
    if processes.world_size == 1:
        return device
    if device.type == "cuda":
        if processes.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {processes.rank} has LOCAL_RANK={processes.local_rank} but this node has "
                f"{torch.cuda.device_count()} GPU(s): run at most that many processes per node"
            )
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def from_main(compute: Callable[[], T]) -> T:
    """``compute()`` on the main process, its result on every process. Whatever it raises there is
    raised everywhere (a UserError as itself, anything else as a RuntimeError naming it), so that no
    process waits for one that has stopped."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    message: list[Any] = [None]
    raised: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            message = [("value", compute())]
        except BaseException as err:  # noqa: BLE001 - told to the others, then raised here as it was
            raised = err
            message = [("user" if isinstance(err, UserError) else "bug", first_line(err, with_type=True))]
    dist.broadcast_object_list(message, src=0)
    if raised is not None:
        raise raised
    kind, payload = message[0]
    if kind == "user":
        raise UserError(payload.removeprefix("UserError: "))
    if kind == "bug":
        raise RuntimeError(f"the main process failed: {payload}")
    return payload


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes (itself with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def my_share(index: torch.Tensor) -> torch.Tensor:
    """This process's contiguous part of ``index`` (all of it with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return index.tensor_split(dist.get_world_size())[dist.get_rank()]
    return index


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a device this machine lacks is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device={name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UserError(f"device={name!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")  # cpu:0 is the one CPU device
    if not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine (use device=cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training (None: plain fp32)."""
    if precision == Precision.auto:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if precision == Precision.bf16 else None
