"""The exceptions users see, each told in one line by the entry point, and the one-line warning."""

import sys


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
        import signal

        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))  # the shell's convention


class Refused(BaseException):  # noqa: N818
    """A UserError raised where Hydra would only warn about an ``Exception`` (its callbacks)."""
