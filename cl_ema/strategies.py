"""The strategy named by ``strategy=``: cl_ema's Avalanche template plus the plugins its config lists.

A strategy is a config file, ``conf/strategy/<name>.yaml``, listing plugins under ``plugins:``
(config name → node with a ``_target_``; ``conf/plugin/`` holds the shared ones): ``plain`` has
none, ``ema`` the EMAPlugin, ``replay`` a replay plugin, ``ema_replay`` both, ``cls_er`` replay
and CLS-ER's two EMA teachers, ``lwf`` Avalanche's LwF. Each plugin is checked once against the
protocol of ``cl_ema.plugins``.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from omegaconf import DictConfig
from torch import nn

from cl_ema.building import build
from cl_ema.config import autocast_dtype
from cl_ema.data import TaskStream
from cl_ema.errors import UserError
from cl_ema.evaluation import Track
from cl_ema.plugins import Attaches, HasTracks, Stateful
from cl_ema.plugins.training import FiniteLossPlugin, LRStepsPlugin, ProgressBarPlugin
from cl_ema.template import DeviceDataTemplate


def build_plugins(cfg: DictConfig) -> dict[str, SupervisedPlugin]:
    """The strategy's plugins by config name, each checked against the plugin protocol."""
    plugins = {}
    for name, node in cfg.strategy.plugins.items():
        key = f"strategy.plugins.{name}"
        plugin = build(node, key, seed=cfg.seed)
        if not isinstance(plugin, SupervisedPlugin):
            raise UserError(f"{key}: {type(plugin).__name__} is not an Avalanche SupervisedPlugin")
        if cfg.checkpoint and not isinstance(plugin, Stateful) and not getattr(plugin, "stateless", False):
            raise UserError(
                f"{key}: {type(plugin).__module__}.{type(plugin).__name__} cannot save what it keeps across tasks "
                "(no state_dict() / load_state_dict()), so a resumed run would not be the same run; "
                "give it those methods (as cl_ema/plugins/lwf.py does) or set checkpoint=false"
            )
        plugins[name] = plugin
    return plugins


def attach(plugins: dict[str, SupervisedPlugin], model: nn.Module) -> list[Track]:
    """Attach the plugins to the model; the tracks to evaluate, ``live`` first."""
    tracks = [Track("live", nullcontext)]
    for plugin in plugins.values():
        if isinstance(plugin, Attaches):
            plugin.attach(model)
        if isinstance(plugin, HasTracks):
            tracks += plugin.tracks()
    names = [t.name for t in tracks]
    if len(set(names)) != len(names):
        raise UserError(f"strategy.plugins: two plugins evaluate tracks of the same name ({names})")
    return tracks


def training_plugins(cfg: DictConfig, device: torch.device, rank: int) -> list[SupervisedPlugin]:
    """The plugins every run has (none of them keeps state across tasks)."""
    plugins = [
        # reading the loss forces a GPU sync: check every 50 steps there, every step on CPU
        FiniteLossPlugin(check_every=50 if device.type == "cuda" else 1),
        ProgressBarPlugin(enabled=rank == 0),
    ]
    if cfg.train.lr_milestones:
        plugins.append(LRStepsPlugin(list(cfg.train.lr_milestones), cfg.train.lr_gamma))
    return plugins


def build_optimizer(node: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The ``optimizer`` section's optimizer (a partial ``_target_``) over the model's trainable
    parameters; a model with ``param_groups(lr)`` (e.g. a slower backbone) gives its own groups."""
    make = build(node, "optimizer")
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(model, "param_groups"):
        params = model.param_groups(make.keywords.get("lr"))
    try:
        return make(params)
    except ValueError as err:  # torch.optim checks its own ranges (learning rate, momentum, …)
        raise UserError(f"optimizer: {err}") from err


def silent_evaluator() -> EvaluationPlugin:
    """Avalanche's evaluation plugin with no metrics and no loggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(loggers=[])


def build_strategy(
    cfg: DictConfig,
    model: nn.Module,
    stream: TaskStream,
    plugins: list[SupervisedPlugin],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    training_model: nn.Module | None = None,
) -> DeviceDataTemplate:
    """The training template with ``plugins``; ``training_model`` is what trains (``model`` wrapped for DDP)."""
    return DeviceDataTemplate(
        stream=stream,
        autocast=autocast_dtype(cfg.train.precision, device),
        channels_last=cfg.train.channels_last,
        loss_classes=cfg.train.loss_classes,
        world_size=world_size,
        model=training_model or model,
        optimizer=build_optimizer(cfg.optimizer, model),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=cfg.train.batch_size,
        train_epochs=cfg.train.epochs,
        eval_mb_size=cfg.train.eval_batch_size,
        device=device,
        plugins=[*plugins, *training_plugins(cfg, device, rank)],
        evaluator=silent_evaluator(),  # cl_ema evaluates its tracks itself
    )
