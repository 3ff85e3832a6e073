"""Each run gets a folder of its own, and no run writes into a folder that holds another run.

A Hydra callback, run before Hydra creates the run folder or writes its ``.hydra/`` files:

- the folder is claimed exclusively (``O_CREAT | O_EXCL`` on a marker file), so two runs started
  in the same second — two W&B agents, two terminals — never share one: the second default
  folder takes a suffix (``…_14-03-07_1``);
- a folder that already holds a run (results, a checkpoint, Hydra's files or the marker) is
  refused with one line, unless ``resume=`` names it: nothing is written into it;
- under multirun the sweep folder is claimed the same way, and each job gets its own subfolder;
- under ``torchrun`` only the main process claims and writes; the others run in a temporary
  folder that nothing is written to and that is removed when they end;
- a run refused before it wrote anything of its own (a value only its code can check, such as a
  model that does not fit the data) gives back what the claim made: ``release``.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from cl_ema.config import LAST_CHECKPOINT, resume_request
from cl_ema.environment import is_main
from cl_ema.errors import Refused, UserError, first_line

MARKER = ".cl_ema_run"
_RUN_FILES = (MARKER, "results.json", str(LAST_CHECKPOINT), ".hydra", "config.yaml")
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into .hydra/ at the start
_MADE: dict[Path, Path | None] = {}  # claimed folder → the outermost folder its claim created (None: it existed)


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in _RUN_FILES)


def claim(folder: Path, *, given: bool, key: str) -> Path:
    """``folder``, or the first free ``folder_N`` if the default pattern collides, claimed for this run."""
    for attempt in range(10_000):
        candidate = folder if attempt == 0 else folder.with_name(f"{folder.name}_{attempt}")
        if holds_run(candidate):
            if given:
                raise UserError(
                    f"{key}={folder}: that folder already holds a run (its results would be overwritten); "
                    f"continue it with resume={folder}, or choose another folder"
                )
            continue
        missing = [p for p in (candidate, *candidate.parents) if not p.exists()]
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            os.close(os.open(candidate / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:  # another run claimed it between our check and our claim
            if given:
                raise UserError(f"{key}={folder}: another run is writing into that folder") from None
            continue
        except OSError as err:
            raise UserError(f"cannot create the run folder {candidate}: {err.strerror}") from err
        _MADE[candidate.resolve()] = missing[-1].resolve() if missing else None
        return candidate
    raise UserError(f"{key}={folder}: no free folder name")


def release(folder: Path) -> None:
    """Undo the claim of ``folder`` if the run wrote nothing there but the marker and Hydra's files:
    those go, and so do the folders the claim created once empty. Anything else keeps them all."""
    folder = folder.resolve()
    if folder not in _MADE:
        return
    made = _MADE.pop(folder)
    hydra = folder / ".hydra"
    try:
        if {p.name for p in folder.iterdir()} - {MARKER, ".hydra"} or (
            hydra.exists() and {p.name for p in hydra.iterdir()} - _HYDRA_FILES
        ):
            return
        for name in _HYDRA_FILES:
            (hydra / name).unlink(missing_ok=True)
        (folder / MARKER).unlink()
        for empty in (hydra, folder, *folder.parents):
            if made is None and empty == folder:
                return  # the folder was there before: keep it
            if empty.exists():
                empty.rmdir()  # OSError if not empty: stop there
            if empty == made:
                return
    except OSError:
        return  # what cannot be removed stays; the run's own error is what the user needs to read


def _overridden(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


def _refuse_on_error(claim_in: Any, config: DictConfig) -> None:
    """Hydra turns an Exception raised in a callback into a mere warning: a folder that cannot be
    claimed must stop the run instead, before anything is written."""
    HydraConfig.instance().set_config(config)  # the run folder's name reads Hydra's choices
    try:
        claim_in(config)
    except UserError as err:
        raise Refused(str(err)) from None
    except Exception as err:  # noqa: BLE001 - anything else: refuse rather than share a folder
        raise Refused(f"cannot claim the run folder ({first_line(err, with_type=True)})") from err


class RunDirectories(Callback):
    """Claims the run (or sweep) folder before Hydra writes anything into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_on_error(self._claim_run, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_on_error(self._claim_sweep, config)

    def _claim_run(self, config: DictConfig) -> None:
        if not is_main():  # torchrun: only the main process writes
            scratch = tempfile.mkdtemp(prefix="cl_ema_rank_")
            atexit.register(shutil.rmtree, scratch, True)
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = scratch
                config.hydra.output_subdir = None
            return
        from cl_ema.config import check, record_choices

        task_cfg = copy.deepcopy(config)  # what the task function will get, as Hydra's run_job makes it
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        record_choices(task_cfg, config.hydra.runtime.choices)
        check(task_cfg)  # a bad value is refused before any folder is made
        folder = Path(str(config.hydra.run.dir))
        resumed = resume_request(config.resume)
        if isinstance(resumed, Path) and resumed.resolve() == folder.resolve():
            return  # resume=<this folder>: continue the run in it
        claimed = claim(folder, given=_overridden(config, "hydra.run.dir"), key="hydra.run.dir")
        with read_write(config.hydra):
            config.hydra.run.dir = str(claimed)

    def _claim_sweep(self, config: DictConfig) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        given = _overridden(config, "hydra.sweep.dir")
        if given and resume_request(config.get("resume")) and folder.is_dir():
            return  # the jobs resume, each in its own subfolder
        claimed = claim(folder, given=given, key="hydra.sweep.dir")
        with read_write(config.hydra):
            config.hydra.sweep.dir = str(claimed)
            # each job's config is composed again from the overrides: make them name this folder
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={claimed}")
