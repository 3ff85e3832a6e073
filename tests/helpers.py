"""Shared helpers: compose configs the way the CLI does, run experiments in-process, fake a template."""

from __future__ import annotations

import contextlib
import functools
import io
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig

from cl_ema.config import CONFIG_DIR, check, compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
assert CONFIG_DIR == CONF  # the tests exercise the checkout's configs


def compose_config(*overrides: str) -> DictConfig:
    return compose(*overrides)


def run_experiment(out_dir: Path, *overrides: str, figures: bool = False):
    """Compose, check and run like ``python -m cl_ema``; returns (results, console text).

    The run's heatmaps (``acc_matrix.png``) are drawn only with ``figures``; otherwise the file holds a 1×1
    PNG. Drawing them costs 0.1–0.25 s a run, about 40 s of CPU over the tests that make runs this way, none
    of which looks at the picture (those that do, and every forked or fresh ``python -m cl_ema``, draw it).
    """
    from unittest import mock

    from cl_ema.console import Console
    from cl_ema.launch import launch

    cfg = compose_config("logger=none", "checkpoint=false", *overrides)
    text = io.StringIO()
    placeholder = mock.patch("cl_ema.plots.heatmaps_png", lambda *_, **__: _one_pixel_png())
    with contextlib.nullcontext() if figures else placeholder:
        results = launch(check(cfg), out_dir, console=Console(file=text))
    return results, text.getvalue()


@functools.cache
def _one_pixel_png() -> bytes:
    import matplotlib.pyplot as plt
    import numpy as np

    buffer = io.BytesIO()
    plt.imsave(buffer, np.zeros((1, 1)), format="png")
    return buffer.getvalue()


def interrupt_in_task(monkeypatch, task: int, step: int) -> None:
    """Make the next run stop with Ctrl-C at ``step`` of ``task`` (0-based), as a user would stop it."""
    from cl_ema.plugins.training import FiniteLossPlugin

    original = FiniteLossPlugin.after_training_iteration

    def stop(self, strategy, **kwargs):
        original(self, strategy, **kwargs)
        if strategy.experience.current_experience == task and strategy.clock.train_exp_iterations == step:
            monkeypatch.setattr(FiniteLossPlugin, "after_training_iteration", original)
            raise KeyboardInterrupt

    monkeypatch.setattr(FiniteLossPlugin, "after_training_iteration", stop)


def stop_and_resume(tmp_path: Path, monkeypatch, *overrides: str, task: int = 2, step: int = 5) -> tuple[dict, dict]:
    """Tracks of a run stopped in the middle of ``task`` and resumed, and of the same run uninterrupted."""
    import json

    import pytest

    run_dir = tmp_path / "stopped"
    interrupt_in_task(monkeypatch, task, step)
    from cl_ema.errors import Interrupted

    with pytest.raises(Interrupted):
        run_experiment(run_dir, "checkpoint=true", *overrides)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"
    run_experiment(tmp_path / "resumer", "checkpoint=true", *overrides, f"resume={run_dir}")
    run_experiment(tmp_path / "whole", *overrides)
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["status"] == "completed"
    return resumed["tracks"], json.loads((tmp_path / "whole" / "results.json").read_text())["tracks"]


def run_script(name: str, *args: str) -> str:
    """``python benchmarks/<name> args`` in this process; what it printed."""
    out, saved = io.StringIO(), (sys.argv, list(sys.path))
    sys.argv = [name, *args]
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as running the script puts its folder first
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved
    return out.getvalue()


def cli_in_process(*argv: str, cwd: Path) -> tuple[int, str, str]:
    """``python -m cl_ema argv`` run in this process from ``cwd``: exit status, stdout, stderr."""
    import os
    import signal

    from cl_ema.__main__ import STOP_SIGNALS, main

    out, err = io.StringIO(), io.StringIO()
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in (*STOP_SIGNALS, "SIGINT")}
    saved = sys.argv, os.getcwd(), os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["cl_ema", *argv]
    os.chdir(cwd)
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        if saved[2] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[2]
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
    return status, out.getvalue(), err.getvalue()


class FakeTemplate(SimpleNamespace):
    """What a plugin may read of cl_ema's template (``cl_ema.plugins.DeviceTemplate``) and nothing else,
    from the attributes given: ``batches`` (the task's training batches), ``store`` (inputs by index)."""

    mb_replayed = 0
    mb_index = torch.empty(0, dtype=torch.long)
    batches: list | None = None
    store: torch.Tensor | None = None

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def inputs(self, index, augment=True):
        if self.store is None:
            raise NotImplementedError("this test's template has no stored inputs")
        return self.store[index]

    def input_batches(self):
        raise NotImplementedError("no plugin under test reads unaugmented batches")

    def training_batches(self):
        if self.batches is None:
            raise NotImplementedError("this test's template has no training batches")
        return iter(self.batches)
