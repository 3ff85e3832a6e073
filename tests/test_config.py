"""Every config composes; every bad value is one clear error naming its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONF, ROOT, compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cl_ema.config import MODEL_NAMES, check
from cl_ema.errors import UserError
from cl_ema.models import MODELS

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
MODEL_FILES = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def test_the_documented_experiments_and_strategies_exist():
    assert EXPERIMENTS == ["permuted_mnist", "split_cifar", "split_cifar10", "split_digits", "split_mnist"]
    assert STRATEGIES == ["ema", "ema_replay", "plain", "replay"]
    assert tuple(MODELS) == MODEL_NAMES


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_experiment_and_strategy_composes_and_instantiates(experiment, strategy):
    cfg = compose_config(f"experiment={experiment}", f"strategy={strategy}", "device=cpu")
    check(cfg)
    plugins = {name: instantiate(node, _convert_="all") for name, node in cfg.strategy.plugins.items()}
    assert (
        set(plugins)
        == {"plain": set(), "ema": {"ema"}, "replay": {"replay"}, "ema_replay": {"ema", "replay"}}[strategy]
    )
    if "ema" in plugins:
        assert plugins["ema"].decays == [cfg.ema.decay]
    if "replay" in plugins:
        assert plugins["replay"].mem_size == cfg.replay.mem_size
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "group,option", [("model", m) for m in MODEL_FILES] + [("logger", "wandb"), ("logger", "none")]
)
def test_every_group_option_composes(group, option):
    check(compose_config(f"{group}={option}", "device=cpu"))


def test_default_is_split_digits_with_ema():
    cfg = compose_config()
    assert cfg.data.name == "digits" and cfg.data.n_tasks == 5 and cfg.strategy.name == "ema"
    assert cfg.logger.name == "wandb" and cfg.device == "cpu"


def test_decays_list_overrides_decay():
    cfg = compose_config("ema.decays=[0.9,0.99]")
    plugin = instantiate(cfg.strategy.plugins.ema, _convert_="all")
    assert plugin.decays == [0.9, 0.99]


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CL_EMA_DATA", str(tmp_path))
    assert compose_config().data.root == str(tmp_path)
    monkeypatch.delenv("CL_EMA_DATA")
    assert compose_config().data.root is None


BAD_VALUES = [
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("ema.decay=-0.1", "ema.decay"),
    ("ema.decays=[0.9,1.2]", "ema.decays"),
    ("ema.decays=[0.9,0.9]", "distinct"),
    ("ema.update_every=0", "ema.update_every"),
    ("ema.buffers=median", "ema.buffers"),
    ("ema.sync=always", "ema.sync"),
    ("ema.warmup_power=0", "ema.warmup_power"),
    ("replay.mem_size=-5", "replay.mem_size=-5"),
    ("replay.batch_size_mem=0", "replay.batch_size_mem"),
    ("train.epochs=0", "train.epochs=0"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("train.momentum=1.0", "train.momentum"),
    ("train.optimizer=lbfgs", "train.optimizer"),
    ("train.precision=fp16", "train.precision"),
    ("eval.every_n_steps=-1", "eval.every_n_steps"),
    ("eval.subset_size=0", "eval.subset_size"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("seed=-1", "seed"),
    ("data.n_tasks=0", "data.n_tasks"),
    ("data.name=imagenet", "data.name"),
    ("data.scenario=rotated", "data.scenario"),
    ("model.name=vit", "model.name"),
    ("model.hidden=0", "model.hidden"),
    ("logger.mode=sometimes", "logger.mode"),
    ("device=tpu", "device"),
    ("device=cuda:7", "device=cuda:7"),
    ("+foo=1", "foo: unknown config key"),
    ("+train.foo=1", "train.foo: unknown config key"),
]


@pytest.mark.parametrize("override,expected", BAD_VALUES)
def test_bad_value_is_a_user_error_naming_the_key(override, expected):
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("+", r"\+")):
        check(compose_config(override))


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cl_ema", "logger=none", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "override,expected",
    [
        ("ema.decay=1.5", "error: ema.decay=1.5: an EMA decay must be a number in [0, 1]"),
        ("replay.mem_size=-3", "error: replay.mem_size=-3: must be >= 1"),
        ("strategy=foo", "error: In 'config': Could not find 'strategy/foo' Available options in 'strategy': ema"),
        ("train.epochs=0", "error: train.epochs=0: must be >= 1"),
        ("train.batch_size=abc", "train.batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
        ("experiment=nope", "error: In 'config': Could not find 'experiment/nope'"),
        ("foo=1", "Could not override 'foo'"),
    ],
)
def test_cli_prints_one_line_and_exits_2(override, expected, tmp_path):
    proc = cli(override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_precision_defaults_per_device():
    import torch

    from cl_ema.config import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None  # fp32 on CPU
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert autocast_dtype("auto", torch.device("cuda")) == expected
