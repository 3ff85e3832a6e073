"""Sweep files: commands rendered by wandb's own agent code compose with Hydra and run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, cli_in_process, compose_config
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from cl_ema.config import check

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def points(sweep: dict, limit: int = 4) -> list[dict]:
    """A few parameter points of a grid sweep (first, last and some in between)."""
    params = sweep["parameters"]
    axes = [[(k, v) for v in (spec["values"] if "values" in spec else [spec["value"]])] for k, spec in params.items()]
    grid = [dict(p) for p in itertools.product(*axes)]
    return [grid[i] for i in sorted({0, len(grid) - 1, *range(0, len(grid), max(1, len(grid) // limit))})]


def render(sweep: dict, point: dict) -> list[str]:
    """The command `wandb agent` runs for ``point`` (as in wandb's Agent._command_run)."""
    command = create_sweep_command(list(sweep["command"]))
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]]}
    rendered = []
    for chunk in map(str, command):
        rendered += macros.get(chunk[2:-1], []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return rendered


def test_there_are_the_sweeps_the_readme_promises():
    names = {p.stem for p in SWEEPS}
    assert {"split_cifar_ema_decay", "split_cifar_ema_replay_decay_memory", "split_cifar_baselines"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_rendered_command_composes(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["metric"]["goal"] in ("maximize", "minimize") and sweep["metric"]["name"].startswith("final/")
    for point in points(sweep):
        command = render(sweep, point)
        assert command[:4] == ["/usr/bin/env", "python", "-m", "cl_ema"], command
        overrides = command[4:]
        assert all("=" in o and not o.startswith("-") for o in overrides), overrides
        cfg = compose_config(*overrides, "device=cpu")
        check(cfg)
        for key, value in point.items():
            assert str(_select(cfg, key)) == str(value), (key, value)


def _select(cfg, key: str):
    from omegaconf import OmegaConf

    if key == "strategy":
        return cfg.choices.strategy
    return OmegaConf.select(cfg, key)


def test_one_rendered_command_runs_end_to_end(tmp_path):
    sweep = yaml.safe_load((ROOT / "sweeps" / "split_digits_ema_decay.yaml").read_text())
    command = render(sweep, {"ema.decay": 0.995, "seed": 2})
    assert command[:4] == ["/usr/bin/env", "python", "-m", "cl_ema"]  # the agent runs `python -m cl_ema <args>`
    status, _, err = cli_in_process(*command[4:], f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert status == 0, err[-2000:]
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["seed"] == 2 and set(data["tracks"]) == {"live", "ema_0.995"} and data["status"] == "completed"
    assert list(Path(tmp_path / "run" / "wandb").glob("offline-run-*"))
