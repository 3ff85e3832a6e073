"""What happened to the jobs of a multirun: one line per failed job, a summary, the jobs not run.

A job that fails (bad value, missing data, a write error) prints ``error: job #N (overrides): …``,
leaves ``error.txt`` in its folder, and the sweep goes on; when the sweep ends, ``summary()`` is one
line naming every failed job (also those run elsewhere by a launcher such as submitit, found by
their ``error.txt``). If the sweep is interrupted, ``not_run()`` names the jobs it never started.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

ERROR_FILE = "error.txt"


class Sweep:
    def __init__(self) -> None:
        self.jobs: list[list[str]] | None = None  # the overrides of every job, when the sweeper's grid is known
        self.folder: Path | None = None
        self.started: set[int] = set()
        self.failures: dict[int, tuple[list[str], str]] = {}

    def reset(self) -> None:
        """No sweep (a command run in a process that ran a sweep before: a test, a notebook)."""
        self.jobs, self.folder = None, None
        self.started.clear()
        self.failures.clear()

    def start(self, jobs: list[list[str]] | None, folder: Path) -> None:
        self.jobs, self.folder = jobs, folder
        self.started.clear()
        self.failures.clear()

    def failed(self, num: int, overrides: list[str], message: str, job_dir: Path) -> None:
        print(f"error: job #{num} ({' '.join(overrides)}): {message}", file=sys.stderr, flush=True)
        self.failures[num] = (overrides, message)
        with contextlib.suppress(OSError):  # the line above said it already
            (job_dir / ERROR_FILE).write_text(message + "\n")

    def summary(self) -> str | None:
        """One line on the failed jobs of the sweep that just ended (None if all succeeded)."""
        if self.folder is None:
            return None
        failures, folder = dict(self.failures), self.folder
        for path in sorted(folder.glob(f"*/{ERROR_FILE}")):  # jobs a launcher ran in other processes
            num = int(path.parent.name.split("_", 1)[0]) if path.parent.name.split("_", 1)[0].isdigit() else -1
            failures.setdefault(num, ([path.parent.name], path.read_text().strip()))
        self.folder = None
        if not failures:
            return None
        total = f" of {len(self.jobs)}" if self.jobs else ""
        listed = "; ".join(f"#{n} ({' '.join(o)}): {m}" for n, (o, m) in sorted(failures.items()))
        where = f"{ERROR_FILE} in their folders in {folder}"
        return f"{len(failures)}{total} jobs failed, the others completed: {listed} ({where})"

    def not_run(self) -> str:
        """``; jobs … were not run: …`` for an interrupted sweep (empty otherwise)."""
        if self.folder is None or self.jobs is None:
            return ""
        left = [n for n in range(len(self.jobs)) if n not in self.started]
        if not left:
            return ""
        return "; jobs not run: " + "; ".join(f"#{n} ({' '.join(self.jobs[n])})" for n in left)


SWEEP = Sweep()


def grid(overrides: list[str]) -> list[list[str]] | None:
    """The jobs Hydra's basic sweeper makes of these overrides (None if it cannot tell)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(overrides)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - another sweeper, or overrides only it understands
        return None


class SweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        overrides = [str(o) for o in config.hydra.overrides.task]
        SWEEP.start(
            grid(overrides) if config.hydra.sweeper._target_.endswith("BasicSweeper") else None,
            Path(str(config.hydra.sweep.dir)),
        )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode is not None and str(config.hydra.mode).endswith("MULTIRUN"):
            SWEEP.started.add(int(config.hydra.job.num))
