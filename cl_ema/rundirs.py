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
  model that does not fit the data) gives back what the claim made: ``release``;
- the marker names its owner (process and host; for a multirun job, its sweep and number): a job
  requeued after preemption or a time limit, or a sweep resumed with ``resume=true``, finds its
  own folder and continues there (``claim_job``); a job whose folder another job of the sweep owns
  (``hydra.sweep.subdir`` giving two jobs one folder) is refused and the other job's files are
  kept; ``resume=`` refuses a folder whose run is still training on this host.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from cl_ema.config import LAST_CHECKPOINT, NEUTRAL_KEYS, compose, resume_request
from cl_ema.environment import is_main, torch_threads, usable_cpus
from cl_ema.errors import STOP_SIGNALS, Refused, UserError, describe, first_line, one_line, user_error, warn
from cl_ema.files import atomic_write
from cl_ema.sweep import grid

MARKER = ".cl_ema_run"
_RUN_FILES = (MARKER, "results.json", str(LAST_CHECKPOINT), ".hydra", "config.yaml")
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into .hydra/ at the start
_MADE: dict[Path, Path | None] = {}  # claimed folder → the outermost folder its claim created (None: it existed)


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in _RUN_FILES)


def me(**job: Any) -> dict[str, Any]:
    """This process as a folder's owner: process, host, and (multirun) the job's sweep and number."""
    return {"pid": os.getpid(), "host": socket.gethostname(), **job}


def owner(folder: Path) -> dict[str, Any]:
    """Who claimed ``folder`` (empty: nobody, or a claim whose marker is being written)."""
    try:
        data = json.loads((folder / MARKER).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def still_running(folder: Path) -> int | None:
    """The process of this host that owns ``folder`` and is still alive (None: none that we can see)."""
    found = owner(folder)
    pid = found.get("pid")
    if found.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    return pid


def take_over(folder: Path, **job: Any) -> None:
    """Make this process the owner of ``folder`` (a run it resumes); refused while the owner still runs."""
    pid = still_running(folder)
    if pid is not None:
        raise UserError(
            f"{folder}: its run is still training (process {pid} on this host); wait for it to end or stop it "
            "before resuming it, so that two runs never write into one folder"
        )
    _write_owner(folder, {**owner(folder), **job, **me()})


def _write_owner(folder: Path, who: dict[str, Any]) -> None:
    atomic_write(folder / MARKER, json.dumps(who) + "\n")


def _check_folder(folder: Path, key: str) -> None:
    text = str(folder)
    if not text or text == ".":
        raise UserError(f"{key} is empty: give the folder the run writes to")
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{key}={folder}: a broken symbolic link (to {os.readlink(folder)})")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{key}={folder}: not a folder")


def claim(folder: Path, *, given: bool, key: str, **job: Any) -> Path:
    """``folder``, or the first free ``folder_N`` if the default pattern collides, claimed for this run."""
    folder = folder.expanduser()
    _check_folder(folder, key)
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
            descriptor = os.open(candidate / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another run claimed it between our check and our claim
            if given:
                raise UserError(f"{key}={folder}: another run is writing into that folder") from None
            continue
        except OSError as err:
            raise UserError(f"cannot create the run folder {candidate}: {err.strerror}") from err
        with os.fdopen(descriptor, "w") as marker:
            marker.write(json.dumps(me(**job)) + "\n")
        _MADE[candidate.resolve()] = missing[-1].resolve() if missing else None
        return candidate
    raise UserError(f"{key}={folder}: no free folder name")


def claim_job(folder: Path, sweep: str, job: int) -> bool:
    """Claim a multirun job's folder (Hydra has made it); True if it was this job's already: a job
    requeued after preemption or a time limit, or a sweep resumed with ``resume=true``.

    A folder another job of the sweep owns is refused, its Hydra files (just overwritten by this
    job's) put back as that job wrote them."""
    identity = {"sweep": str(Path(sweep).resolve()), "job": job}
    hydra = {name: _read(folder / ".hydra" / name) for name in _HYDRA_FILES}
    try:
        descriptor = os.open(folder / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        found = owner(folder)
        if {k: found.get(k) for k in identity} == identity:
            take_over(folder, **identity)
            return True
        for name, text in (found.get("hydra") or {}).items():
            if name in _HYDRA_FILES and isinstance(text, str):
                (folder / ".hydra" / name).write_text(text)
        raise UserError(
            f"job #{job}: its folder {folder} holds job #{found.get('job', '?')}'s run: give each job a folder "
            "of its own (hydra.sweep.subdir, e.g. its default ${hydra.job.num}_${hydra.job.override_dirname})"
        ) from None
    with os.fdopen(descriptor, "w") as marker:
        marker.write(json.dumps(me(**identity, hydra=hydra)) + "\n")
    return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def restartable(folder: Path) -> bool:
    """A folder holding a run that finished no task (no checkpoint, no finished task in results.json):
    ``resume=`` on it starts that run again there, as nothing of it could be continued."""
    if (folder / str(LAST_CHECKPOINT)).exists():
        return False
    try:
        done = json.loads((folder / "results.json").read_text()).get("tasks_done", 0)
    except FileNotFoundError:
        return holds_run(folder)
    except (OSError, ValueError, AttributeError):
        return False
    return done == 0


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


@dataclass
class Resumed:
    """A run to continue as it was configured: its own config, in its own folder."""

    cfg: DictConfig
    folder: Path


CHOSEN = ("experiment", "strategy")  # config groups whose choice a run records (``choices``)


def resumed_config(arguments: list[str]) -> Resumed | None:
    """``resume=<run dir>`` among the command line's ``arguments``: that run's own config (its config.yaml),
    with the other arguments, which may change only the keys that never change results (device, logger,
    checkpoint, …) or repeat the run's own values; None for a command that names no run folder.

    Nothing is composed from conf/ but the option a ``logger=`` or ``+plugin@name=`` override names (to compare
    it), and no folder is made: the run continues where it is, as it was."""
    requests = [a.split("=", 1)[1] for a in arguments if a.split("=", 1)[0] == "resume"]
    folder = resume_request(requests[-1]) if requests else False
    if not isinstance(folder, Path):
        return None
    if any(a in ("-m", "--multirun") for a in arguments):
        raise UserError(f"resume={folder}: names one run; a multirun resumes its jobs with resume=true")
    saved = folder / "config.yaml"
    if not saved.is_file():
        if holds_run(folder):  # claimed, stopped before it wrote its config: it starts again with the overrides
            return None
        raise UserError(f"resume={folder}: no run there (no config.yaml in that folder)")
    try:
        cfg = OmegaConf.load(saved)
    except (OSError, ValueError, OmegaConfBaseException) as err:
        raise UserError(f"{saved}: not a readable run config ({first_line(err)})") from None
    if not isinstance(cfg, DictConfig) or "choices" not in cfg:
        raise UserError(f"{saved}: not the config of a cl_ema run")
    refused = []
    others = [a for a in arguments if a.split("=", 1)[0] != "resume"]
    for argument, override in zip(others, OverridesParser.create().parse_overrides(others)):
        key, value = override.key_or_group, override.value()
        if key.startswith("hydra.") or key.startswith("hydra/"):  # where a new run would go: a resume stays put
            warn(f"{argument}: not used, the run continues in its own folder {folder}")
        elif key == "logger":  # a config group whose every key is neutral
            with read_write(cfg), open_dict(cfg):
                cfg.logger = compose(argument).logger
        elif key == "plugin" and override.package:  # +plugin@name=option: the run has that plugin as ``name``
            if OmegaConf.select(cfg, f"{override.package}._target_") != compose(argument)[override.package]._target_:
                refused.append(argument)
        elif _is_neutral(key):
            with read_write(cfg), open_dict(cfg):
                OmegaConf.update(cfg, key, value, force_add=True)
        elif not _same(cfg, key, value):
            refused.append(f"{key}={_as_override(value)}")
    if refused:
        raise UserError(
            f"resume={folder} continues that run as it was configured: {', '.join(refused)} would change its results "
            f"(beside resume= only {', '.join(k for k in NEUTRAL_KEYS if k != 'resume')} may change)"
        )
    with read_write(cfg), open_dict(cfg):
        cfg.resume = str(folder)
    return Resumed(cfg, folder)


def _is_neutral(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in NEUTRAL_KEYS)


def _same(cfg: DictConfig, key: str, value: Any) -> bool:
    """Whether an override repeats the run's value (``experiment=seq_mnist``, ``ema.decay=0.99``), by value."""
    if key in CHOSEN:
        return cfg.choices.get(key) == value
    found = OmegaConf.select(cfg, key, default=_ABSENT)
    if found is _ABSENT:
        return False
    plain = OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found
    return bool(plain == value)


_ABSENT = object()


def _as_override(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


NEXT_TO: list[Path | None] = [None]  # resume=true: the folder the run would have had (its neighbours are candidates)


def _scratch(config: DictConfig) -> None:
    """Run in a temporary folder that nothing is written to, removed when the process ends."""
    scratch = tempfile.mkdtemp(prefix="cl_ema_")
    atexit.register(shutil.rmtree, scratch, True)
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = scratch
        config.hydra.output_subdir = None


def release_all() -> None:
    """``release`` every folder this process claimed (a run stopped before it wrote anything of its own)."""
    for folder in list(_MADE):
        release(folder)


def _overridden(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


def _refuse_on_error(claim_in: Any, config: DictConfig) -> None:
    """Hydra turns an Exception raised in a callback into a mere warning: a folder that cannot be
    claimed must stop the run instead, before anything is written."""
    HydraConfig.instance().set_config(config)  # the run folder's name reads Hydra's choices
    # A signal raised inside the imports the claim makes (numpy, torch) can leave a library half
    # imported and surface as an unrelated error: signals wait until the claim is done.
    held = {signal.SIGINT, *(getattr(signal, name) for name in STOP_SIGNALS)}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        claim_in(config)
    except UserError as err:
        raise Refused(str(err)) from None
    except OmegaConfBaseException as err:  # an interpolation of the config (seed=${oc.env:NOPE}): name its key
        raise Refused(one_line(err)) from None
    except FileNotFoundError as err:  # no temporary folder can be written (an import needs one)
        if user_error(err):
            raise Refused(describe(err)) from None
        raise
    except Exception as err:  # noqa: BLE001 - anything else: refuse rather than share a folder
        raise Refused(f"cannot claim the run folder ({first_line(err, with_type=True)})") from err
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered here


def _jobs_at_once(config: DictConfig) -> int:
    """How many jobs of this sweep run at once on one machine: the local launchers' (submitit_local runs
    up to ``array_parallelism`` processes; Hydra's basic launcher one after the other)."""
    launcher = str(config.hydra.launcher.get("_target_", ""))
    if "LocalLauncher" not in launcher:
        return 1
    jobs = len(grid([str(o) for o in config.hydra.overrides.task]) or [None])
    return max(1, min(jobs, int(config.hydra.launcher.get("array_parallelism") or jobs)))


class RunDirectories(Callback):
    """Claims the run (or sweep) folder before Hydra writes anything into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_on_error(self._claim_run, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_on_error(self._claim_sweep, config)

    def _claim_run(self, config: DictConfig) -> None:
        if not is_main():  # torchrun: only the main process writes
            _scratch(config)
            return
        folder = Path(str(config.hydra.run.dir)).expanduser()
        resumed = resume_request(config.resume)
        if resumed is True:  # the run it continues is found later, next to this folder: write nothing here
            NEXT_TO[0] = folder
            _scratch(config)
            return
        if isinstance(resumed, Path) and resumed.resolve() == folder.resolve():
            take_over(folder)  # resume=<this folder>: continue the run in it, if it is not still running
            with read_write(config.hydra):
                config.hydra.run.dir = str(folder)
            return
        claimed = claim(folder, given=_overridden(config, "hydra.run.dir"), key="hydra.run.dir")
        with read_write(config.hydra):
            config.hydra.run.dir = str(claimed)

    def _claim_sweep(self, config: DictConfig) -> None:
        folder = Path(str(config.hydra.sweep.dir)).expanduser()
        given = _overridden(config, "hydra.sweep.dir")
        resume = resume_request(config.get("resume"))
        if isinstance(resume, Path):
            raise UserError(f"resume={config.resume}: names one run; a multirun resumes its jobs with resume=true")
        if given and resume and folder.is_dir():
            claimed = folder  # the jobs resume, each in its own subfolder
        else:
            claimed = claim(folder, given=given, key="hydra.sweep.dir")
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(claimed)
            # each job's config is composed again from the overrides: make them name this folder
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={claimed}")
        at_once, threads, cpus = _jobs_at_once(config), torch_threads(config.get("threads")), usable_cpus()
        if at_once > 1 and threads * at_once > cpus:
            warn(
                f"{at_once} jobs at once, each with {threads} CPU thread(s), share {cpus} CPUs: set "
                f"threads={max(1, cpus // at_once)} to share them (on the CPU the thread count changes results, so "
                "every job records it)"
            )
