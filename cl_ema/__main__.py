"""Entry point: ``python -m cl_ema [overrides]`` (Hydra). Bad input ends in one line and exit 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cl_ema.config import CONFIG_DIR, check, register_schema
from cl_ema.errors import UserError


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run(cfg: DictConfig) -> float:
    try:
        check(cfg)
        from cl_ema.runner import run  # heavy imports only once the config is known to be good

        hydra_cfg = HydraConfig.get()
        experiment = hydra_cfg.runtime.choices.get("experiment") or "custom"
        results = run(cfg, Path(hydra_cfg.runtime.output_dir), experiment)
    except UserError as err:  # exit here: past this point Hydra would log the job as crashed
        _fail(str(err))
    except OSError as err:
        if err.filename is None:
            raise
        _fail_to_write(err)
    return results.metrics("live", results.tasks_done - 1)["avg_acc"]  # the objective for sweepers


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _fail_to_write(err: OSError) -> NoReturn:
    _fail(f"cannot write to {err.filename}: {err.strerror}")


def one_line(err: BaseException) -> str:
    """A Hydra / OmegaConf error and its cause on one line, without their diagnostic dumps."""
    parts = []
    while err is not None and len(parts) < 3:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "msg", None):
            key = getattr(err, "full_key", None)
            msg = err.msg.splitlines()[0]  # later lines repeat full_key / object types
            parts.append(f"{key}: {msg}" if key else msg)
        else:
            # Hydra appends the config search path; the options before it are what matters.
            parts.append(str(err).split("Config search path")[0])
        err = err.__cause__
    return "; ".join(" ".join(p.split()).rstrip(".") for p in parts if p.strip())


def main() -> None:
    user_wants_traceback = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    register_schema()
    try:
        _run()
    except (HydraException, OmegaConfBaseException) as err:
        if user_wants_traceback:
            raise
        _fail(one_line(err))
    except OSError as err:  # the run directory (or a file in it) cannot be written
        if user_wants_traceback or err.filename is None:
            raise
        _fail_to_write(err)


if __name__ == "__main__":
    main()
