"""A checked config, run: its processes, threads and device, the folder it writes to (or the run it
continues), then the runner. What the command line and ``cl_ema.run`` share once a config is checked.

Threads: torch's CPU thread count changes a CPU run's results (the order in which a matrix product
sums), so it is part of the run's configuration: ``threads`` (default: the CPUs this process may use,
divided among torchrun's processes on the node, and never among other jobs that happen to run beside
it) is resolved here and recorded, so the same command gives the same results alone or in a sweep, and
a resumed run keeps its count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import open_dict, read_write

from cl_ema import checkpoint, distributed
from cl_ema.config import LAST_CHECKPOINT, Checked, resume_request, to_container
from cl_ema.console import Console
from cl_ema.environment import torch_threads
from cl_ema.errors import UserError, warn
from cl_ema.results import Results
from cl_ema.rundirs import still_running, take_over
from cl_ema.runner import run


def launch(checked: Checked, out_dir: Path, console: Console | None = None) -> Results:
    """Run ``checked`` in ``out_dir`` (or continue the run that ``resume=`` names) and return its results."""
    processes = distributed.from_environment()
    threads = torch_threads(checked.config.threads)
    checked.config.threads = threads
    with read_write(checked.cfg), open_dict(checked.cfg):
        checked.cfg.threads = threads
    torch.set_num_threads(threads)
    device = distributed.start(processes, distributed.resolve_device(checked.config.device))
    try:
        folder, state = resume_point(checked, out_dir)
        return run(checked, folder, processes=processes, device=device, state=state, console=console)
    finally:
        distributed.stop()


def resume_point(checked: Checked, out_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    """The folder the run writes to, and the checkpoint it continues from (None for a new run).

    The main process decides (``resume=true`` picks among the runs next to its folder); the others
    take its folder and read the same checkpoint.
    """
    request, config = resume_request(checked.config.resume), to_container(checked.cfg)
    found: dict[str, tuple[Path, dict[str, Any]]] = {}

    def decide() -> tuple[str, bool]:
        if isinstance(request, Path) and not (request / LAST_CHECKPOINT).is_file():
            take_over(request)
            return str(request), False  # a run that finished no task: it starts again in its folder
        if request:
            found["main"] = resume_from(request, out_dir, config)
            take_over(found["main"][0])  # refused while that run still trains: one writer per folder
            return str(found["main"][0]), True
        return str(out_dir), False

    folder, resuming = distributed.from_main(decide)
    if "main" in found:
        return found["main"]
    return Path(folder), checkpoint.load(Path(folder) / LAST_CHECKPOINT) if resuming else None


def resume_from(request: Path | bool, out_dir: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The run directory to continue and its validated checkpoint: ``resume=<run dir>``, or ``resume=true``
    for the newest run of the same configuration next to this run's directory (runs whose checkpoint cannot
    be read are skipped, and said so)."""
    if isinstance(request, Path):
        state = checkpoint.load(request / LAST_CHECKPOINT)
        differences = checkpoint.config_differences(state["config"], config)
        if differences:
            raise UserError(
                f"{request / LAST_CHECKPOINT} was written by a different configuration ({'; '.join(differences[:3])})"
            )
        return request, state
    candidates = sorted(
        (p for p in {out_dir, *out_dir.parent.glob("*")} if (p / LAST_CHECKPOINT).is_file()),
        key=lambda p: (p / LAST_CHECKPOINT).stat().st_mtime,
        reverse=True,
    )
    for run_dir in candidates:
        if still_running(run_dir) is not None:
            warn(f"resume=true: skipping {run_dir} (its run is still training)")
            continue
        try:
            state = checkpoint.load(run_dir / LAST_CHECKPOINT)
        except UserError as err:
            warn(f"resume=true: skipping {run_dir} ({err})")
            continue
        if not checkpoint.config_differences(state["config"], config):
            return run_dir, state
    raise UserError(f"resume=true: no checkpoint of this configuration in {out_dir.parent} (give resume=<run dir>)")
