"""``python -m cl_ema`` in a process of its own, without the seconds of imports each such process costs.

A test that stops, kills or limits a run needs the run in a process of its own. Starting Python and importing
torch, torchvision and Avalanche costs each such process about 7 s of CPU, most of the real-process tests' time.
``cli()`` forks it instead from multiprocessing's fork server, which imports what a run imports once per test
worker: the child is a real process (its own pid, signal handlers, file-size limit, pipes and exit status), in
the folder and environment it is given, running ``cl_ema.__main__.main()`` with the command line, standard
streams and signal dispositions ``python -m cl_ema`` would start with under a test worker. What a module makes
for its own process at import is made again in each fork (W&B's folder for media files). What happens while
Python starts (a Ctrl-C during the imports) needs a real interpreter: ``cli(..., fresh=True)`` starts one.
``torchrun()`` forks torchrun's agent the same way; the workers it starts are fresh interpreters, as they are
for users.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

# what a run imports, loaded once into the fork server (the forks share it): the command line and the run, then
# what a run imports as it goes (the digits, the EMA plugins, W&B's logger and init, Hydra's launchers, pandas)
PRELOAD = [
    *("cl_ema.__main__", "cl_ema.cli", "cl_ema.launch", "cl_ema.runner"),
    *("cl_ema.data.sources", "sklearn.datasets", "sklearn.model_selection", "cl_ema.plugins.ema", "pandas"),
    *("cl_ema.plugins.averaging", "cl_ema.loggers.wandb_logger", "wandb", "wandb.sdk.wandb_init", "wandb.sdk.launch"),
    *("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_submitit_launcher.submitit_launcher"),
    "torch.distributed.run",
]
_server: Any = None


def _context() -> Any:
    global _server
    if _server is None:
        _server = multiprocessing.get_context("forkserver")
        _server.set_forkserver_preload(PRELOAD)
    return _server


def cli(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    ctrl_c: bool = False,
    file_size: int | None = None,
    fresh: bool = False,
) -> Started:
    """``python -m cl_ema args`` from ``cwd`` with stdout and stderr piped (text), W&B offline and silent.

    ``ctrl_c``: SIGINT raises KeyboardInterrupt, as in a terminal (a test worker ignores SIGINT, and a child,
    forked or not, inherits that); ``file_size``: RLIMIT_FSIZE in bytes; ``fresh``: a new interpreter, imports
    and all.
    """
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return _start(CL_EMA, args, cwd, env, ctrl_c, file_size, fresh)


def torchrun(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Started:
    """``python -m torch.distributed.run args`` from ``cwd`` in a session of its own, as from a shell, stdout and
    stderr piped (text), W&B offline; its workers are fresh interpreters (torchrun starts them)."""
    return _start(TORCHRUN, args, cwd, {**os.environ, "WANDB_MODE": "offline", **(env or {})})


def _start(
    program: str,
    args: tuple[str, ...],
    cwd: Path,
    env: dict[str, str],
    ctrl_c: bool = False,
    file_size: int | None = None,
    fresh: bool = False,
) -> Started:
    """``python -m <program> args``, forked from the server, or a fresh interpreter (torchrun's in a session of
    its own either way)."""
    # a fork is safe on Linux; on macOS system libraries may have started threads, which makes it unsafe
    # (Python's multiprocessing docs): fresh interpreters there
    if fresh or sys.platform != "linux":
        return subprocess.Popen([sys.executable, "-m", program, *args], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=program == TORCHRUN,
                                preexec_fn=lambda: _dispositions(ctrl_c, file_size))  # fmt: skip
    # a Popen child inherits this process's SIGINT: ignored under a test worker, else Python's KeyboardInterrupt
    ctrl_c = ctrl_c or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    return Run(program, list(args), Path(cwd), env, ctrl_c, file_size)


def _dispositions(ctrl_c: bool, file_size: int | None) -> None:
    if ctrl_c:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if file_size is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))


CL_EMA, TORCHRUN = "cl_ema", "torch.distributed.run"  # the programs a Run forks: python -m <program>


class Run:
    """A forked ``python -m cl_ema`` (or torchrun), with what the tests use of ``subprocess.Popen``."""

    def __init__(
        self, program: str, args: list[str], cwd: Path, env: dict[str, str], ctrl_c: bool, file_size: int | None
    ):
        pipes = [os.pipe() for _ in range(2)]
        writers = [Connection(write, readable=False) for _, write in pipes]
        child_args = (program, args, str(cwd), env, ctrl_c, file_size, *writers)
        self._process = _context().Process(target=_child, args=child_args)
        self._program = program
        self._process.start()
        for writer in writers:  # the child holds its own copies: EOF once it exits
            writer.close()
        # read ends, closed by communicate() as Popen's are
        self.stdout: IO[str] = open(pipes[0][0], encoding="utf-8")  # noqa: SIM115
        self.stderr: IO[str] = open(pipes[1][0], encoding="utf-8")  # noqa: SIM115
        self.pid: int = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self._process.join()
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(["python", "-m", self._program], timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Everything the process writes from now on, once it has exited (both pipes read at once, as Popen does)."""
        texts: dict[int, str] = {}
        readers = [threading.Thread(target=lambda k=k, f=f: texts.__setitem__(k, f.read()), daemon=True)
                   for k, f in enumerate((self.stdout, self.stderr))]  # fmt: skip
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join(timeout)
        self.stdout.close()
        self.stderr.close()
        return texts.get(0, ""), texts.get(1, "")


def _child(
    program: str,
    args: list[str],
    cwd: str,
    env: dict[str, str],
    ctrl_c: bool,
    file_size: int | None,
    out: Connection,
    err: Connection,
) -> None:
    """In the fork: the process ``python -m <program>`` would be, then its ``main()``."""
    import atexit
    import io

    for stream, fd in ((out, 1), (err, 2)):
        os.dup2(stream.fileno(), fd)
        stream.close()
    # as Python opens them for pipes: stdout block-buffered, stderr line-buffered
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # unless ctrl_c: cli() says what a Popen child would inherit
    _dispositions(ctrl_c, file_size)
    if program == TORCHRUN:
        from torch.distributed import run

        os.setsid()  # a session of its own, as Popen(start_new_session=True) gives it
        sys.argv = [run.__file__, *args]
        main: Callable[[], None] = partial(run.main, args)
    else:
        from cl_ema import __main__

        for name in __main__.STOP_SIGNALS:  # the signals main() takes in hand, at their defaults until it does
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        # what a module made for its own process at import: W&B's folder for media files, which the first fork to
        # exit would otherwise remove for all (its modules hold the object: it gets a folder of this process's own)
        from wandb.sdk.data_types import _private

        _private.MEDIA_TMP.name = tempfile.mkdtemp("wandb-media")
        sys.argv = [str(Path(__main__.__file__)), *args]
        main = __main__.main
    try:
        main()
    finally:  # an interpreter's exit: its atexit functions (W&B's among them), then its streams flushed
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()


Started = Run | subprocess.Popen  # what cli() gives: a fork, or a fresh interpreter
