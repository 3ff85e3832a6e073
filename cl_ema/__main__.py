"""Entry point: ``python -m cl_ema [overrides]`` (Hydra). Every failure ends in one line.

Bad input (a config value, missing or corrupt data, a broken checkpoint, a file that cannot be
written) prints ``error: <what and why>`` and exits with status 2; SIGINT and SIGTERM print one
line and exit with 130 / 143, the results so far marked ``interrupted`` and resumable. Under
multirun a job that fails says so in one line and the sweep goes on; at the end one line lists
the jobs that failed, and an interrupted sweep names the jobs it did not run.
``HYDRA_FULL_ERROR=1`` shows tracebacks instead.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cl_ema.config import CONFIG_DIR, check, plugin_nodes, record_choices, register_schema, unused_overrides
from cl_ema.environment import is_main
from cl_ema.errors import Interrupted, Refused, UserError, warn
from cl_ema.plugins import LIVE
from cl_ema.rundirs import release
from cl_ema.sweep import SWEEP


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    try:
        record_choices(cfg, hydra_cfg.runtime.choices)
        check(cfg)
        for key in unused_overrides(cfg, list(hydra_cfg.overrides.task)):
            warn(f"{key}: no plugin of strategy={cfg.choices.strategy} reads it (plugins: "
                 f"{', '.join(plugin_nodes(cfg)) or 'none'}); it changes nothing")  # fmt: skip
        from cl_ema.runner import run  # heavy imports only once the config is known to be good

        results = run(cfg, Path(hydra_cfg.runtime.output_dir))
        return results.metrics(LIVE, results.tasks_done - 1)["avg_acc"]  # the objective for sweepers
    except Exception as err:
        if not user_error(err):
            raise  # a bug: its traceback, in a single run and in a multirun alike
        message = describe(err)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            release(Path(hydra_cfg.runtime.output_dir))  # refused before writing: leave no empty run folder
            _fail(message, said_by_main=not isinstance(err, OSError))
        SWEEP.failed(hydra_cfg.job.num, list(hydra_cfg.overrides.task), message, Path(hydra_cfg.runtime.output_dir))
        return None  # the sweep goes on; the summary at its end reports this job


# keys of earlier versions → where the setting lives now (said when an override names the old key)
RENAMED = {
    "train.lr": "optimizer.lr",
    "train.momentum": "optimizer.momentum",
    "train.weight_decay": "optimizer.weight_decay",
    "train.optimizer": "the optimizer group (optimizer=adam)",
    "model.name": "the model group (model=timm, model=torchvision, …)",
    **{f"logger.{key}": f"logger.wandb.{key}" for key in ("mode", "project", "entity", "group", "tags")},
}


def user_error(err: BaseException) -> bool:
    """Whether the user can act on ``err`` (bad input, a file, a resource): one line, exit 2. Anything
    else is a bug, shown with its traceback (exit 1)."""
    if isinstance(err, (UserError, HydraException, OmegaConfBaseException, OverflowError, MemoryError)):
        return True  # (Hydra's MissingConfigException is an OSError too)
    return isinstance(err, OSError) and err.filename is not None  # an OSError without a file: not the user's


def describe(err: BaseException) -> str:
    """One line for an error a user can act on."""
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        message = one_line(err)
        renamed = [f"{old} is {new} now" for old, new in RENAMED.items() if f"override '{old}'" in message]
        return f"{message} ({'; '.join(renamed)})" if renamed else message
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OverflowError):
        return f"a value is too large for the computation ({err})"
    if isinstance(err, MemoryError):
        return f"not enough memory: {err}" if str(err) else "not enough memory"
    if isinstance(err, OSError):
        return f"{err.filename}: {err.strerror or type(err).__name__}"
    return one_line(err)


def _fail(message: str, status: int = 2, said_by_main: bool = True) -> NoReturn:
    """``error: <message>``, exit ``status``. Under torchrun every process meets the same bad input
    (``said_by_main``): the main one says it, once; a file error may be a single process's own."""
    if not said_by_main or is_main(strict=False):
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def one_line(err: BaseException) -> str:
    """A Hydra / OmegaConf error and its cause on one line, without their diagnostic dumps."""
    parts: list[str] = []
    cause: BaseException | None = err
    while cause is not None and len(parts) < 3:
        message = getattr(cause, "msg", None) if isinstance(cause, OmegaConfBaseException) else None
        if message:
            key = getattr(cause, "full_key", None)
            line = message.splitlines()[0]  # later lines repeat full_key / object types
            parts.append(f"{key}: {line}" if key else line)
        else:
            # Hydra appends the config search path; the options before it are what matters.
            parts.append(str(cause).split("Config search path")[0])
        cause = cause.__cause__
    return "; ".join(" ".join(p.split()).rstrip(".") for p in parts if p.strip())


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("SIGTERM")


def interrupted(err: BaseException) -> NoReturn:
    """One line for a run stopped by a signal; exit 130 (SIGINT) or 143 (SIGTERM)."""
    stop = err if isinstance(err, Interrupted) else Interrupted("SIGINT")
    where = ""
    if stop.run_dir:
        where = (f" after {stop.tasks_done} finished task(s); results.json in {stop.run_dir} says 'interrupted' "
                 f"and resume={stop.run_dir} continues it")  # fmt: skip
    _fail(f"interrupted by {stop.signal_name}{where}{SWEEP.not_run()}", stop.exit_status)


def main() -> None:
    user_wants_traceback = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    signal.signal(signal.SIGTERM, _on_sigterm)
    register_schema()
    try:
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
        _fail(describe(err), said_by_main=not isinstance(err, OSError))
    summary = SWEEP.summary()
    if summary:
        _fail(summary)


if __name__ == "__main__":
    main()
