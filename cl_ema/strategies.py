"""A run's strategy: cl_ema's Avalanche template plus the plugins its config places (``conf/strategy/``).

A strategy file lists plugin configs (``conf/plugin/``) in its defaults; each lands at the top
level under its name (``ema``, ``replay``, …), in that order, and is built here and checked once
against the plugin protocol of ``cl_ema.plugins``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_ema.building import Spec
from cl_ema.config import Checked, TrainConfig
from cl_ema.data.stream import TaskStream
from cl_ema.distributed import autocast_dtype
from cl_ema.errors import UserError
from cl_ema.options import OptionError
from cl_ema.plugins import Attaches, HasTracks, Stateful, Track, live_track
from cl_ema.plugins.training import FiniteLossPlugin, LRStepsPlugin, ProgressBarPlugin
from cl_ema.template import DeviceDataTemplate


def build_plugins(specs: dict[str, Spec], checkpoints: bool, **context: Any) -> dict[str, SupervisedPlugin]:
    """The strategy's plugins by config name, each built once from its checked spec and checked against the
    plugin protocol; ``context`` (the seed, the first task's steps, the device, the run folder) goes to those
    whose signature asks for it."""
    plugins = {}
    for name, spec in specs.items():
        plugin = spec.build(**context)
        if not isinstance(plugin, SupervisedPlugin):
            raise UserError(f"{name}: {type(plugin).__name__} is not an Avalanche SupervisedPlugin")
        if checkpoints and not isinstance(plugin, Stateful) and not getattr(plugin, "stateless", False):
            raise UserError(
                f"{name}: {type(plugin).__module__}.{type(plugin).__name__} cannot save what it keeps across tasks "
                "(no state_dict() / load_state_dict()), so a resumed run would not be the same run; "
                "give it those methods (as cl_ema/plugins/lwf.py does) or set checkpoint=false"
            )
        plugins[name] = plugin
    given = {getattr(p, "provides", None) for p in plugins.values()}
    for name, plugin in plugins.items():
        if getattr(plugin, "needs", None) not in (None, *given):
            raise UserError(
                f"{name}: {type(plugin).__name__} acts on the samples a {plugin.needs} plugin brings, and "
                f"this strategy has none: add one (+plugin@{plugin.needs}={plugin.needs})"
            )
    return plugins


def attach(plugins: dict[str, SupervisedPlugin], model: nn.Module) -> list[Track]:
    """Attach the plugins to the model; the tracks to evaluate, ``live`` first."""
    tracks = [live_track()]
    for name, plugin in plugins.items():
        if isinstance(plugin, Attaches):
            try:
                plugin.attach(model)
            except OptionError as err:  # an option only the model or the stream can check (a horizon's steps)
                raise UserError(str(err.renamed(name))) from None
            except MemoryError as err:  # the averages' shadows do not fit
                raise UserError(f"{name}: {err}") from None
        if isinstance(plugin, HasTracks):
            tracks += plugin.tracks()
    names = [t.name for t in tracks]
    if len(set(names)) != len(names):
        raise UserError(f"plugins {list(plugins)}: two of them evaluate tracks of the same name ({names})")
    return tracks


def training_plugins(train: TrainConfig, device: torch.device, main: bool) -> list[SupervisedPlugin]:
    """The plugins every run has (none of them keeps state across tasks)."""
    plugins: list[SupervisedPlugin] = [
        # reading the loss forces a GPU sync: check every 50 steps there, every step on CPU
        FiniteLossPlugin(check_every=50 if device.type == "cuda" else 1),
        ProgressBarPlugin(enabled=main),
    ]
    if train.lr_milestones:
        plugins.append(LRStepsPlugin(list(train.lr_milestones), train.lr_gamma))
    return plugins


def build_optimizer(spec: Spec, model: nn.Module) -> torch.optim.Optimizer:
    """The checked ``optimizer`` section's optimizer (a partial ``_target_``) over the model's trainable
    parameters; a model with ``param_groups(lr)`` (e.g. a slower backbone) gives its own groups."""
    params: Any = [p for p in model.parameters() if p.requires_grad]
    param_groups = getattr(model, "param_groups", None)
    if callable(param_groups):
        params = param_groups(spec.arguments.get("lr"))
    try:
        return spec.build(params=params)
    except (ValueError, IndexError, TypeError) as err:  # torch.optim checks its own values (lr, betas, …)
        raise UserError(f"optimizer: {err}") from err


def silent_evaluator() -> EvaluationPlugin:
    """Avalanche's evaluation plugin with no metrics and no loggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(loggers=[])


def build_strategy(
    checked: Checked,
    *,
    model: nn.Module,
    training_model: nn.Module,
    stream: TaskStream,
    plugins: list[SupervisedPlugin],
    after_clock: list[SupervisedPlugin],
    device: torch.device,
    world_size: int,
) -> DeviceDataTemplate:
    """The training template with ``plugins``; ``after_clock``: plugins that read the step count an
    iteration has just made (Avalanche's clock counts in its own plugin, which the template adds
    last). ``training_model`` is what trains (``model`` itself, or wrapped for data parallel training)."""
    train = checked.config.train
    strategy = DeviceDataTemplate(
        stream=stream,
        autocast=autocast_dtype(train.precision, device),
        channels_last=train.channels_last,
        loss_classes=train.loss_classes,
        world_size=world_size,
        model=training_model,
        optimizer=build_optimizer(checked.optimizer, model),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=train.batch_size,
        train_epochs=train.epochs,
        eval_mb_size=train.eval_batch_size,
        device=device,
        plugins=plugins,
        evaluator=silent_evaluator(),  # cl_ema evaluates its tracks itself
    )
    strategy.plugins += after_clock
    return strategy
