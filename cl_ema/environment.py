"""What the environment tells this process: its place among torchrun's processes, and the CPUs it may use.

Plain Python, read by the entry point before anything heavy is imported.
"""

from __future__ import annotations

import os

from cl_ema.errors import UserError


def _integer(name: str, default: int, low: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: must be an integer (torchrun sets it)") from None
    if value < low:
        raise UserError(f"{name}={value}: must be >= {low}")
    return value


def rank() -> int:
    """This process's rank among torchrun's (``RANK``; 0 alone)."""
    return _integer("RANK", 0, 0)


def local_rank() -> int:
    return _integer("LOCAL_RANK", 0, 0)


def world_size() -> int:
    return _integer("WORLD_SIZE", 1, 1)


def is_main(strict: bool = True) -> bool:
    """Whether this process is the one that writes and speaks; ``strict=False``: a bad RANK counts as main."""
    try:
        return rank() == 0
    except UserError:
        if strict:
            raise
        return True


def local_processes() -> int:
    """Processes of this run sharing this node's CPUs: torchrun's on this node."""
    return _integer("LOCAL_WORLD_SIZE", 1, 1)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and SLURM set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_threads(requested: int | None) -> int:
    """Threads for torch's CPU work: ``requested``, else OMP_NUM_THREADS when set, else the usable CPUs
    divided among this run's processes on the node (never among other runs that happen to share them: the
    thread count changes a CPU run's results)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return _integer("OMP_NUM_THREADS", 1, 1)
    return max(1, usable_cpus() // local_processes())
