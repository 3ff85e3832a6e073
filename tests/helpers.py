"""Shared helpers: compose configs the way the CLI does, run experiments in-process."""

from __future__ import annotations

import io
from pathlib import Path

from omegaconf import DictConfig

from cl_ema.config import CONFIG_DIR, check, compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
assert CONFIG_DIR == CONF  # the tests exercise the checkout's configs


def compose_config(*overrides: str) -> DictConfig:
    return compose(*overrides)


def run_experiment(out_dir: Path, *overrides: str, experiment: str = "split_digits"):
    """Compose, check and run like ``python -m cl_ema``; returns (results, console text)."""
    from cl_ema.console import Console
    from cl_ema.runner import run

    cfg = compose_config("logger=none", "checkpoint=false", *overrides)
    check(cfg)
    text = io.StringIO()
    results = run(cfg, out_dir, experiment, console=Console(file=text))
    return results, text.getvalue()
