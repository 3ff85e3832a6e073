"""``python -m cl_ema [overrides]``: signals are taken in hand first, then the command line runs (``cl_ema.cli``).

A signal during the seconds of imports that start a run ends in one line too, as in the run itself.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from cl_ema.errors import Interrupted

# SIGTERM (kill, a scheduler), SIGHUP (the terminal closed), SIGUSR1 / SIGUSR2 (SLURM's warning before a
# time limit): the results so far are marked interrupted and resume= continues them. SIGINT is Ctrl-C.
STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def _stop(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    try:  # the handlers too: a Ctrl-C right after the first of them is set is still one line
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), _stop)
        from cl_ema.cli import run
    except (KeyboardInterrupt, Interrupted) as err:
        stop = err if isinstance(err, Interrupted) else Interrupted("SIGINT")
        print(f"error: interrupted by {stop.signal_name} while starting; nothing was written", file=sys.stderr)
        sys.exit(stop.exit_status)
    run()


if __name__ == "__main__":
    main()
