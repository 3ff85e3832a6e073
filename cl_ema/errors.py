"""The exceptions users see, each told in one line by the entry point, the one-line warning, and which
errors are the user's to act on (bad input, a file, a resource) rather than bugs.

Plain Python (with Hydra's and OmegaConf's exception classes), read before anything heavy is imported.
"""

from __future__ import annotations

import errno
import re
import signal
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

# SIGTERM (kill, a scheduler), SIGHUP (the terminal closed), SIGUSR1 / SIGUSR2 (SLURM's warning before a
# time limit): the results so far are marked interrupted and resume= continues them. SIGINT is Ctrl-C.
STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def first_line(err: BaseException, with_type: bool = False, past_headings: bool = False) -> str:
    """The first line of an exception's message, for one-line reports; ``past_headings``: the first
    informative one, past heading lines ending in ':' (torch's load_state_dict writes one);
    ``with_type``: prefixed by the exception's class name."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    while past_headings and len(lines) > 1 and lines[0].endswith(":"):
        lines.pop(0)
    text = lines[0][:300] if lines else ""
    if with_type:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text or type(err).__name__


def warn(message: str) -> None:
    """``warning: <message>`` on one line of stderr: something went wrong and the run goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class UserError(Exception):
    """Bad config value, missing or corrupt data, broken checkpoint, a file that cannot be written.

    The entry point prints ``error: <message>`` and exits with status 2; the message must name
    the culprit (a config key, a path) and say what would be accepted.
    """


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, which it stands beside
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP, SIGUSR1/2). A BaseException, as KeyboardInterrupt is,
    so that no ``except Exception`` on the way (Hydra's, a logger's) takes it for a failure."""

    def __init__(
        self,
        signal_name: str,
        run_dir: str | None = None,
        tasks_done: int = 0,
        resumable: bool = False,
        completed: bool = False,
    ) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.run_dir = run_dir
        self.tasks_done = tasks_done
        self.resumable = resumable  # a checkpoint of its last finished task is there
        self.completed = completed  # stopped after its last task, while the loggers finished

    @property
    def exit_status(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))  # the shell's convention


class Refused(BaseException):  # noqa: N818
    """A UserError raised where Hydra would only warn about an ``Exception`` (its callbacks)."""


WRITE_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit, e.g. ulimit -f)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "it is a directory",
}


def write_error(err: OSError, path: Path | str | None = None) -> UserError:
    """One line naming the file and the cause of a failed write."""
    where = path if path is not None else (err.filename or "a file")
    cause = WRITE_CAUSES.get(err.errno or -1, err.strerror or type(err).__name__)
    return UserError(f"cannot write {where}: {cause}; files written before are kept")


NO_TEMPORARY_FOLDER = "No usable temporary directory"  # what tempfile.gettempdir() says when it can write nowhere


def user_error(err: BaseException) -> bool:
    """Whether the user can act on ``err`` (bad input, a file, a resource): one line, exit 2. Anything
    else is a bug, shown with its traceback (exit 1)."""
    if isinstance(err, (UserError, HydraException, OmegaConfBaseException, OverflowError, MemoryError)):
        return True  # (Hydra's MissingConfigException is an OSError too)
    if isinstance(err, FileNotFoundError) and NO_TEMPORARY_FOLDER in str(err):
        return True
    return isinstance(err, OSError) and err.filename is not None  # an OSError without a file: not the user's


def describe(err: BaseException, plugin_keys: frozenset[str] = frozenset()) -> str:
    """One line for an error a user can act on; ``plugin_keys``: the schema's top-level keys (an override of
    another section names a plugin)."""
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        message = one_line(err)
        missing = re.search(r"Could not override '([^']+)'", message)
        if missing and "." in missing.group(1) and missing.group(1).split(".")[0] not in plugin_keys:  # a plugin's
            key = missing.group(1)
            return (
                f"{key}: this strategy has no plugin {key.split('.')[0]}, or the plugin no option of that name "
                "(a strategy places its plugins under their names: conf/strategy/*.yaml)"
            )
        return message
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OverflowError):
        return f"a value is too large for the computation ({err})"
    if isinstance(err, MemoryError):
        return f"not enough memory: {err}" if str(err) else "not enough memory"
    if isinstance(err, FileNotFoundError) and NO_TEMPORARY_FOLDER in str(err):
        return (
            "no temporary file can be written (in /tmp, /var/tmp, … or TMPDIR): the disk is full, or a "
            "file-size limit (ulimit -f) leaves no room"
        )
    if isinstance(err, OSError):  # a file Hydra writes at the start (.hydra/), or another's
        return str(write_error(err)) if err.errno in WRITE_CAUSES else f"{err.filename}: {err.strerror or err}"
    return one_line(err)


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
