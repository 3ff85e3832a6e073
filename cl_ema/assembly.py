"""A run, assembled from its config in one call, and what a checkpoint holds of it.

``assemble(checked, out_dir, processes, device, state)`` builds every part of a checked config
(``cl_ema.config.check``) once, in this order (each may need the ones before it):

1. the stream: Avalanche's tasks over sample indices, the tensors on the training device;
2. the plugins the strategy places, in its order, given the seed, the first task's optimizer steps
   (an EMA's horizon in tasks needs them), the device and the run folder;
3. the model, initialized from ``seed`` and moved to its device and layout, and the plugins
   attached to it, which gives the tracks to evaluate (``live`` first);
4. the template (cl_ema's Avalanche strategy) with the plugins, continual evaluation and the
   plugins every run has, wrapped for data parallel training when there are several processes;
5. the results: restored from ``state`` (a validated checkpoint) when resuming — each plugin's state
   checked against where the run stands (``cl_ema.plugins.Position``) — else the untrained model's
   accuracies as the baseline of forward transfer;
6. the loggers, told whether they resume.

``Run.state_dict()`` is what ``checkpoints/last.pt`` holds: the model, the optimizer, the state
of every stateful plugin under its config name, every random generator, the accuracy matrices
and the loggers' state. Restoring it into a freshly assembled run makes the rest of the run the
same, bit for bit on CPU, as if it had never stopped.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_ema import checkpoint
from cl_ema.config import Checked, Config, TrainConfig, setting_id, to_container
from cl_ema.continual_eval import ContinualEvalPlugin
from cl_ema.data.stream import TaskStream, build_stream
from cl_ema.distributed import Processes
from cl_ema.errors import UserError, first_line, warn
from cl_ema.evaluation import evaluate
from cl_ema.loggers import Loggers, RunInfo
from cl_ema.models import build_model
from cl_ema.plugins import Position, Positioned, Stateful, Track
from cl_ema.results import Results
from cl_ema.strategies import attach, build_plugins, build_strategy, training_plugins
from cl_ema.template import DeviceDataTemplate


@dataclass
class Run:
    """The parts of a run that the training loop, checkpoints and loggers share."""

    checked: Checked
    out_dir: Path
    processes: Processes
    stream: TaskStream
    model: nn.Module
    plugins: dict[str, SupervisedPlugin]  # by config name, in the strategy's order
    tracks: list[Track]
    strategy: DeviceDataTemplate
    continual: ContinualEvalPlugin | None
    results: Results
    loggers: Loggers

    @property
    def config(self) -> Config:
        return self.checked.config

    @property
    def world_size(self) -> int:
        return self.processes.world_size

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished task (a checkpoint's contents)."""
        augment = self.stream.augment
        return {
            "format": checkpoint.FORMAT,
            "config": self.results.meta["config"],
            "world_size": self.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.strategy.optimizer.state_dict(),
            "plugins": {name: plugin.state_dict() for name, plugin in stateful(self.plugins).items()},
            "continual": self.continual.state_dict() if self.continual else {},
            "loggers": self.loggers.state_dict(),
            "rng": checkpoint.rng_state({"augment": augment.get_state() if augment else {}}),
            "results": self.results.to_dict(),
            "train_iterations": self.strategy.clock.train_iterations,
        }


def stateful(plugins: dict[str, SupervisedPlugin]) -> dict[str, Stateful]:
    return {name: p for name, p in plugins.items() if isinstance(p, Stateful)}


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def assemble(
    checked: Checked,
    out_dir: Path,
    processes: Processes,
    device: torch.device,
    state: dict[str, Any] | None = None,
    state_path: Path | None = None,
) -> Run:
    """Every part of the run of ``checked`` (see the module docstring); ``state``: a checkpoint to continue."""
    cfg, c = checked.cfg, checked.config
    config = to_container(cfg)
    seed_everything(c.seed, c.deterministic)
    stream = build_stream(checked.dataset, c.data, seed=c.seed, device=device)
    task_steps = steps_per_task(c.train, len(stream.benchmark.train_stream[0].dataset))
    plugins = build_plugins(
        checked.plugins,
        c.checkpoint,
        seed=c.seed,
        task_steps=task_steps or None,
        num_tasks=stream.num_tasks,
        device=device,
        run_dir=out_dir,
    )
    for name, plugin in plugins.items():
        if processes.world_size > 1 and not getattr(plugin, "supports_distributed", False):
            raise UserError(
                f"{name}: {type(plugin).__name__} does not support data parallel training (run it in one process)"
            )
    seed_everything(c.seed)  # model init does not depend on how the data was loaded
    model = build_model(checked.model, stream.spec, cfg.model.get("weights"))
    # layout and device are final before an average links the weights into its flat buffer
    model.to(device)
    if c.train.channels_last:
        model.to(memory_format=torch.channels_last)
    refuse_single_sample_batches(model, stream, c.train)
    tracks = attach(plugins, model)
    if c.train.compile:
        compile_in_place(model)
    continual = None
    if c.eval.every_n_steps:
        continual = ContinualEvalPlugin(
            stream, tracks, c.eval.every_n_steps, c.eval.subset_size, c.seed, c.train.eval_batch_size
        )
    strategy = build_strategy(
        checked,
        model=model,
        training_model=distributed_model(model, c.train.sync_batchnorm, processes),
        stream=stream,
        plugins=[*plugins.values(), *training_plugins(c.train, device, processes.main)],
        after_clock=[continual] if continual else [],
        device=device,
        world_size=processes.world_size,
    )
    meta = run_meta(c, stream, tracks, config, processes.world_size)
    results = Results([t.name for t in tracks], stream.num_tasks, meta)
    if state is not None:
        restore(
            state,
            state_path or out_dir,
            model=model,
            strategy=strategy,
            plugins=plugins,
            continual=continual,
            results=results,
            stream=stream,
            train=c.train,
            world_size=processes.world_size,
        )
    else:
        results.record_baseline(evaluate(model, stream, -1, batch_size=c.train.eval_batch_size))
    loggers = build_loggers(checked, out_dir, processes, results, state)
    return Run(checked, out_dir, processes, stream, model, plugins, tracks, strategy, continual, results, loggers)


def steps_per_task(train: TrainConfig, samples: int) -> int:
    """Optimizer steps of a task of ``samples`` training samples under ``train``."""
    per_epoch = samples // train.batch_size if train.drop_last else -(-samples // train.batch_size)
    return train.epochs * per_epoch


def refuse_single_sample_batches(model: nn.Module, stream: TaskStream, train: TrainConfig) -> None:
    """A task whose last batch holds one sample: BatchNorm cannot train on it (one value per channel)."""
    if train.drop_last or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    for task, experience in enumerate(stream.benchmark.train_stream):
        if len(experience.dataset) % train.batch_size == 1:
            raise UserError(
                f"train.batch_size={train.batch_size}: task {task + 1}'s last batch holds one sample, which the "
                "model's BatchNorm cannot train on: set train.drop_last=true, or another batch size"
            )


def samples_trained(train: TrainConfig, samples: int) -> int:
    """Training samples the steps of a task of ``samples`` samples go through (``drop_last`` drops a remainder)."""
    per_epoch = samples // train.batch_size * train.batch_size if train.drop_last else samples
    return train.epochs * per_epoch


def run_meta(c: Config, stream: TaskStream, tracks: list[Track], config: dict, world_size: int) -> dict:
    return {
        "experiment": c.choices.experiment,
        "strategy": c.choices.strategy,
        "seed": c.seed,
        "device": str(stream.train.device),
        "world_size": world_size,
        "class_order": stream.class_order,
        "task_classes": stream.task_classes,
        "track_info": {t.name: t.info() for t in tracks},
        "steps_per_task": [],
        "train_s": 0.0,  # in strategy.train (continual evaluation included), the rest of elapsed_s evaluates
        "elapsed_s": 0.0,
        "config": config,
    }


def restore(
    state: dict[str, Any],
    path: Path,
    *,
    model: nn.Module,
    strategy: DeviceDataTemplate,
    plugins: dict[str, SupervisedPlugin],
    continual: ContinualEvalPlugin | None,
    results: Results,
    stream: TaskStream,
    train: TrainConfig,
    world_size: int,
) -> None:
    """Load a validated checkpoint into freshly built parts; nothing is written. What a checkpoint that
    does not fit makes each part raise becomes one UserError naming the file; anything else is a bug. Each
    plugin checks its loaded state against where the run stands (``Position``)."""
    saved = stateful(plugins)
    if set(saved) != set(state["plugins"]):
        raise UserError(f"{path}: holds the state of plugins {sorted(state['plugins'])}, this run has {sorted(saved)}")
    if state["world_size"] != world_size:
        warn(f"resuming a run trained by {state['world_size']} processes with {world_size}")
    try:
        model.load_state_dict(state["model"])  # copies in place: the averages' views stay valid
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        raise UserError(
            f"{path}: the model's weights do not fit this model ({first_line(err, past_headings=True)})"
        ) from None
    # Avalanche resets the optimizer on its first experience; do it now, then load the state
    strategy.make_optimizer(reset_optimizer_state=True)
    try:
        checkpoint.check_optimizer_state(state["optimizer"], strategy.optimizer.state_dict())
        strategy.optimizer.load_state_dict(state["optimizer"])
        results.load(state["results"])
        at = position(results, stream, train, state["train_iterations"])
        for name, plugin in saved.items():
            try:
                plugin.load_state_dict(state["plugins"][name])
                if isinstance(plugin, Positioned):
                    plugin.check_position(at)
            except (ValueError, TypeError, KeyError) as err:
                raise UserError(f"the state of plugin {name} does not fit ({first_line(err)})") from None
        if continual:
            continual.load_state_dict(state["continual"])
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    except ValueError as err:  # the optimizer's or the results' own checks
        raise UserError(f"{path}: does not fit this run ({first_line(err)})") from None
    strategy.clock.train_iterations = state["train_iterations"]
    try:
        checkpoint.set_rng_state(state["rng"])
        if stream.augment:
            stream.augment.set_state(state["rng"]["augment"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # the generators' own checks of their states
        raise UserError(f"{path}: its random generator states are not readable ({first_line(err)})") from None


def position(results: Results, stream: TaskStream, train: TrainConfig, steps: int) -> Position:
    """Where a run restored from a checkpoint stands."""
    done = results.tasks_done
    samples = [len(stream.benchmark.train_stream[t].dataset) for t in range(done)]
    return Position(
        tasks_done=done,
        steps=steps,
        last_task_start=steps - results.meta["steps_per_task"][-1],
        samples_seen=sum(samples_trained(train, n) for n in samples),
        num_classes=stream.num_classes,
        train_samples=len(stream.train),
    )


def build_loggers(
    checked: Checked, out_dir: Path, processes: Processes, results: Results, state: dict[str, Any] | None
) -> Loggers:
    """The loggers of ``logger=`` (the main process only)."""
    if not processes.main:
        return Loggers({})
    c = checked.config
    info = RunInfo(
        out_dir,
        results.meta["config"],
        c.choices.experiment,
        c.choices.strategy,
        c.seed,
        results.tracks,
        setting_id(results.meta["config"]),
        results.tasks_done,
        world_size=processes.world_size,
    )
    saved = (state or {}).get("loggers", {})
    return Loggers.start(
        {name: partial(spec.build, run=info, resumed=saved.get(name)) for name, spec in checked.loggers.items()}
    )


def distributed_model(model: nn.Module, sync_batchnorm: bool, processes: Processes) -> nn.Module:
    """``model``, wrapped for data parallel training when there are several processes."""
    if processes.world_size == 1:
        return model
    if sync_batchnorm:
        if model_device(model).type != "cuda":
            raise UserError("train.sync_batchnorm=true needs CUDA devices (SyncBatchNorm has no CPU kernels)")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # reuses the parameters and buffers: the views stay valid
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compile_in_place(model: nn.Module) -> None:
    """``torch.compile`` the model in place, so checkpoints keep plain keys; after the averages have linked
    the weights into their flat buffer, so tracing sees the final tensors. Needs a C/C++ compiler."""
    compiler = os.environ.get("CXX") or "g++"
    if model_device(model).type == "cpu" and not shutil.which(compiler):
        raise UserError(f"train.compile=true needs a C++ compiler ({compiler} is not on PATH); install one, or set CXX")
    if model_device(model).type == "cuda" and not (shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")):
        raise UserError("train.compile=true needs a C compiler for Triton (cc / gcc is not on PATH); install one")
    model.compile()
