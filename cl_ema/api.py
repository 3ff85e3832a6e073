"""cl_ema from Python (a notebook, a script): run an experiment with the command line's overrides, and read
every run below a folder into one table::

    import cl_ema

    results = cl_ema.run("strategy=ema", "seed=1")   # as `python -m cl_ema strategy=ema seed=1`
    results.metrics("ema_0.99", results.tasks_done - 1)["avg_acc"]
    table = cl_ema.load("outputs")                    # every run below outputs/: one tidy pandas DataFrame

``run`` composes, checks and runs exactly as the command line does — the same config, the same folder
(``outputs/<experiment>/<strategy>/<date_time>`` below the working directory, or ``folder``), the same
files — and returns the run's ``cl_ema.results.Results``. Bad input (a config value, missing data, a
broken checkpoint) is raised as ``cl_ema.errors.UserError`` with the command line's one-line message
instead of printed. ``resume=<run dir>`` continues that run as it was configured.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from cl_ema.config import check, composed
from cl_ema.console import Console
from cl_ema.errors import UserError
from cl_ema.launch import launch
from cl_ema.results import Results
from cl_ema.rundirs import claim, release, resumed_config
from cl_ema.runs import load

__all__ = ["load", "run"]


def run(*overrides: str, folder: str | Path | None = None, output: TextIO | None = None) -> Results:
    """Run ``python -m cl_ema <overrides>`` in this process and return its results; ``folder``: the run folder
    (default: the command line's); ``output``: where the per-task tables go (default: stdout)."""
    console = Console(output or sys.stdout)
    resumed = resumed_config(list(overrides))
    if resumed is not None:
        return launch(check(resumed.cfg), resumed.folder, console)
    cfg, default = composed(*overrides)
    checked = check(cfg)
    where = claim(Path(folder) if folder is not None else default, given=folder is not None, key="folder")
    try:
        return launch(checked, where, console)
    except UserError:
        release(where)  # refused before the run wrote anything of its own: no empty folder is left
        raise
