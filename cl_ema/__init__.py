"""cl_ema: does weight averaging stop a model from forgetting? ``cl_ema.run`` and ``cl_ema.load`` are the
notebook API (``cl_ema.api``); the command line is ``python -m cl_ema``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # the notebook API loads torch and Avalanche: only when asked, so that `import cl_ema.config` stays light
    if name in ("run", "load"):
        from cl_ema import api

        return getattr(api, name)
    raise AttributeError(f"module 'cl_ema' has no attribute {name!r}")
