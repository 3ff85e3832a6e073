"""Builds the Avalanche strategy named by ``strategy=``: our template plus the config's plugins.

A strategy is a config file, ``conf/strategy/<name>.yaml``, listing Hydra-instantiable plugins
under ``plugins:`` (``conf/plugin/`` holds the shared ones): ``plain`` has none, ``ema`` the
EMAPlugin, ``replay`` Avalanche's ReplayPlugin, ``ema_replay`` both. A plugin with a
``tracks()`` method contributes evaluation tracks; one with ``attach(model)`` is attached to the
model before training starts.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from avalanche.training.plugins import EvaluationPlugin
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cl_ema.config import autocast_dtype
from cl_ema.data import ContinualStream
from cl_ema.evaluation import Track
from cl_ema.plugins import FiniteLossPlugin, ProgressBarPlugin
from cl_ema.template import DeviceDataTemplate


def build_optimizer(train: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def silent_evaluator() -> EvaluationPlugin:
    """Avalanche's evaluation plugin with no metrics and no loggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(loggers=[])


def build_strategy(
    cfg: DictConfig, model: nn.Module, stream: ContinualStream, device: torch.device
) -> tuple[DeviceDataTemplate, list[Track]]:
    """The training template and the tracks to evaluate (``live`` first)."""
    plugins = [instantiate(node, _convert_="all") for node in cfg.strategy.plugins.values()]
    tracks = [Track("live", nullcontext)]
    for plugin in plugins:
        if hasattr(plugin, "attach"):
            plugin.attach(model)
        if hasattr(plugin, "tracks"):
            tracks += plugin.tracks()
    strategy = DeviceDataTemplate(
        stream=stream,
        autocast=autocast_dtype(cfg.train.precision, device),
        channels_last=cfg.train.channels_last,
        model=model,
        optimizer=build_optimizer(cfg.train, model),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=cfg.train.batch_size,
        train_epochs=cfg.train.epochs,
        eval_mb_size=cfg.train.eval_batch_size,
        device=device,
        # reading the loss forces a GPU sync: check every 50 steps there, every step on CPU
        plugins=[*plugins, FiniteLossPlugin(check_every=50 if device.type == "cuda" else 1), ProgressBarPlugin()],
        evaluator=silent_evaluator(),  # cl_ema evaluates its tracks itself
    )
    return strategy, tracks
