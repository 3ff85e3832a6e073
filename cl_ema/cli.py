"""The command line (Hydra): ``python -m cl_ema [overrides]``. Every failure ends in one line.

Bad input (a config value, missing or corrupt data, a broken checkpoint, a file that cannot be
written) prints ``error: <what and why>`` and exits with status 2; a bug keeps its traceback (exit
1). A signal (SIGINT, SIGTERM, SIGHUP, SIGUSR1/2) prints one line and exits with 128 + its number,
the results so far marked ``interrupted`` and resumable. Under multirun a job that fails says so in
one line and the sweep goes on; at the end one line lists the jobs that failed, and an interrupted
sweep names the jobs it did not run. A multirun job claims its folder: requeued (preemption, a time
limit) or resumed with ``resume=true``, it continues from its last finished task there.
``HYDRA_FULL_ERROR=1`` shows tracebacks instead.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from cl_ema.config import (
    CONFIG_DIR,
    LAST_CHECKPOINT,
    SCHEMA_KEYS,
    check,
    plugin_nodes,
    record_choices,
    register_schema,
    unused_overrides,
)
from cl_ema.environment import is_main
from cl_ema.errors import Interrupted, Refused, UserError, describe, user_error, warn
from cl_ema.plugins import LIVE
from cl_ema.rundirs import NEXT_TO, claim_job, release, release_all, resumed_config
from cl_ema.sweep import SWEEP


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            resume_own_folder(cfg, hydra_cfg)
        record_choices(cfg, hydra_cfg.runtime.choices)
        checked = check(cfg)
        for key in unused_overrides(cfg, list(hydra_cfg.overrides.task)):
            warn(
                f"{key}: no plugin of strategy={cfg.choices.strategy} reads it (plugins: "
                f"{', '.join(plugin_nodes(cfg)) or 'none'}); it changes nothing"
            )
        out_dir = NEXT_TO[0] or Path(hydra_cfg.runtime.output_dir)  # resume=true: the runs next to it are candidates
        return _launched(checked, out_dir, single=hydra_cfg.mode != RunMode.MULTIRUN)
    except Exception as err:
        if not user_error(err):
            raise  # a bug: its traceback, in a single run and in a multirun alike
        message = describe(err, SCHEMA_KEYS)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            release(Path(hydra_cfg.runtime.output_dir))  # refused before writing: leave no empty run folder
            _fail(message, said_by_main=not isinstance(err, OSError))
        SWEEP.failed(hydra_cfg.job.num, list(hydra_cfg.overrides.task), message, Path(hydra_cfg.runtime.output_dir))
        return None  # the sweep goes on; the summary at its end reports this job


def _launched(checked: Any, out_dir: Path, single: bool) -> float:
    """Run a checked config; the live weights' final ACC, the objective for sweepers."""
    from cl_ema.launch import launch  # torch and Avalanche: only once the config is known to be good

    results = launch(checked, out_dir)
    if single:
        _quiet_exit()  # the run is complete and said so: a Ctrl-C from here on changes nothing
    return float(results.metrics(LIVE, results.tasks_done - 1)["avg_acc"] or 0.0)


def resume_own_folder(cfg: DictConfig, hydra_cfg: Any) -> None:
    """A multirun job claims its folder; back in it (requeued, or the sweep resumed with resume=true), it
    continues from the checkpoint there, or starts again if it finished no task."""
    folder = Path(hydra_cfg.runtime.output_dir)
    own = claim_job(folder, str(hydra_cfg.sweep.dir), int(hydra_cfg.job.num))
    with read_write(cfg):
        cfg.resume = str(folder) if own and (folder / LAST_CHECKPOINT).is_file() else None


def _fail(message: str, status: int = 2, said_by_main: bool = True) -> NoReturn:
    """``error: <message>``, exit ``status``.

    Under torchrun every process meets the same bad input (``said_by_main``): the main one says it.
    Another process waits a moment first: if the main process fails alike, torchrun stops this one
    and the line is said once; if not, the error was this process's own, and it says it, so that
    it is not lost behind the others' "interrupted by SIGTERM". A file error may be any process's own.
    """
    if said_by_main and not is_main(strict=False):
        try:
            time.sleep(MAIN_SPEAKS_S)
        except (Interrupted, KeyboardInterrupt):  # the main process failed too, and said it
            _quiet_exit()
            sys.exit(status)
        message = f"process {os.environ.get('RANK')}: {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    _quiet_exit()
    sys.exit(status)


# how long another process of a torchrun leaves the main one to fail alike: the processes meet bad input
# seconds apart on a loaded machine, and the wait is only served in full when the error is this one's own
MAIN_SPEAKS_S = 10.0


def _quiet_exit() -> None:
    """Past the one line, a Ctrl-C while the interpreter closes (a logger's service shutting down) would end
    the process by the signal itself: the outcome is said already, so let nothing change it now."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupted(err: BaseException) -> NoReturn:
    """One line for a run stopped by a signal, saying what can be done with it; exit 128 + the signal."""
    stop = err if isinstance(err, Interrupted) else Interrupted("SIGINT")
    if not stop.run_dir:  # stopped before the run began: a folder claimed for it goes back
        release_all()
    if not is_main(strict=False):  # under torchrun the main process says it
        _quiet_exit()
        sys.exit(stop.exit_status)
    where = ""
    if stop.run_dir and stop.completed:
        where = (
            f" after the run completed: results.json in {stop.run_dir} has all {stop.tasks_done} tasks; a logger "
            "(W&B) may not have finished writing"
        )
    elif stop.run_dir and stop.resumable:
        where = (
            f" after {stop.tasks_done} finished task(s); results.json in {stop.run_dir} says 'interrupted' "
            f"and `python -m cl_ema {shlex.quote('resume=' + stop.run_dir)}` continues it"
        )
    elif stop.run_dir and stop.tasks_done:
        where = (
            f" after {stop.tasks_done} finished task(s), kept in {stop.run_dir}/results.json (checkpoint=false: "
            "it cannot be resumed)"
        )
    elif stop.run_dir:
        where = (
            f" before its first task ended: nothing to continue; `python -m cl_ema "
            f"{shlex.quote('resume=' + stop.run_dir)}` starts it again there"
        )
    _fail(f"interrupted by {stop.signal_name}{where}{SWEEP.not_run()}", stop.exit_status)


def check_file_size_limit() -> None:
    """A file-size limit of 0 (``ulimit -f 0``) lets nothing be written, not even the temporary file an
    import makes: say so, rather than whichever write fails first."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == 0:
        raise UserError("the file-size limit is 0 bytes (ulimit -f 0): no result could be written; raise it")


def check_arguments(arguments: list[str]) -> list[str]:
    """What Hydra would take badly from the command line, in one line: two of its modes (``-m --cfg``), a
    config group set to null (its parser raises) or to a path out of its folder (``best_args=../strategy/ema``
    would place another group's file), ``choices.*`` (which ``experiment=`` and ``strategy=`` set).
    ``best_args=null`` is the default, and dropped."""
    from hydra._internal.utils import get_args_parser  # Hydra's own parser: the flags as Hydra reads them

    flags, _ = get_args_parser().parse_known_args(arguments)
    given = {
        "--run": flags.run,
        "--multirun": flags.multirun,
        "--cfg": flags.cfg,
        "--info": flags.info,
        "--shell-completion": flags.shell_completion,
    }
    modes = [name for name, value in given.items() if value]
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback
        raise UserError(f"{' and '.join(modes)}: give only one of them (a sweep's config: --cfg job without -m)")
    groups = {
        p.name: sorted(f.relative_to(p).with_suffix("").as_posix() for f in p.rglob("*.yaml"))
        for p in CONFIG_DIR.iterdir()
        if p.is_dir()
    }
    kept = []
    for argument in arguments:
        key, equals, value = argument.partition("=")
        name = key.lstrip("+~").split("@")[0]
        if equals and name in groups and value.strip() in ("null", "~", "None", ""):  # not `--cfg hydra`'s word
            if name == "best_args":
                continue
            options = ", ".join(groups[name]) + (" (logger=none: no logger)" if name == "logger" else "")
            raise UserError(f"{argument}: {name} is a config group: choose one of {options}")
        if equals and name in groups and ("/.." in f"/{value}" or value.startswith("/")):  # another group's file
            raise UserError(f"{argument}: not a config of the {name} group (choose one of {', '.join(groups[name])})")
        if name.startswith("choices."):
            raise UserError(f"{argument}: the choices are what experiment= and strategy= selected; set those instead")
        kept.append(argument)
    return kept


def run() -> None:
    """``python -m cl_ema [overrides]`` (the signals are in hand already: ``cl_ema.__main__``)."""
    user_wants_traceback = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    try:
        register_schema()
        SWEEP.reset()
        NEXT_TO[0] = None
        check_file_size_limit()
        arguments = check_arguments(sys.argv[1:])
        resumed = resumed_config(arguments)
        if resumed is not None:  # resume=<run dir>: that run, as it was configured, in its own folder
            _launched(check(resumed.cfg), resumed.folder, single=True)
            return
        sys.argv[1:] = arguments
        _run()
    except (KeyboardInterrupt, Interrupted) as err:
        if user_wants_traceback:
            raise
        interrupted(err)
    except Refused as err:
        _fail(str(err))
    except Exception as err:
        if user_wants_traceback or not user_error(err):
            raise
        _fail(describe(err, SCHEMA_KEYS), said_by_main=not isinstance(err, OSError))
    summary = SWEEP.summary()
    if summary:
        _fail(summary)
    _quiet_exit()
