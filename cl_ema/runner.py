"""One experiment, top to bottom: data → model → strategy → for each task: train, evaluate, record."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cl_ema import checkpoint, distributed
from cl_ema.building import build
from cl_ema.config import LAST_CHECKPOINT, resolve_device, resume_request, setting_id, to_container
from cl_ema.console import Console
from cl_ema.continual_eval import ContinualEvalPlugin, stability_metrics
from cl_ema.data import TaskStream, build_stream
from cl_ema.errors import Interrupted, UserError
from cl_ema.evaluation import Track, evaluate
from cl_ema.files import atomic_write
from cl_ema.loggers import Loggers, RunInfo, warn_disabled
from cl_ema.models import build_model
from cl_ema.plugins import Stateful
from cl_ema.results import Results, save_outputs
from cl_ema.strategies import attach, build_plugins, build_strategy
from cl_ema.template import DeviceDataTemplate


@dataclass
class Run:
    """The parts of a run that checkpoints, loggers and the training loop share."""

    cfg: DictConfig
    out_dir: Path
    stream: TaskStream
    model: nn.Module
    strategy: DeviceDataTemplate
    plugins: dict[str, SupervisedPlugin]  # by config name
    tracks: list[Track]
    results: Results
    processes: distributed.Processes
    loggers: Loggers

    @property
    def world_size(self) -> int:
        return self.processes.world_size

    def stateful_plugins(self) -> dict[str, Stateful]:
        return {name: p for name, p in self.plugins.items() if isinstance(p, Stateful)}


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def run(cfg: DictConfig, out_dir: Path, experiment: str, console: Console | None = None) -> Results:
    """Run the configured experiment, writing results into ``out_dir``; return the results."""
    processes = distributed.from_environment()
    console = console or Console(None if processes.main else open(os.devnull, "w"))  # noqa: SIM115
    config = to_container(cfg)
    device = distributed.start(processes, resolve_device(cfg.device))
    try:
        out_dir, state = resume_point(cfg, out_dir, config)
        seed_everything(cfg.seed, cfg.deterministic)
        plugins = build_plugins(cfg)
        stream = build_stream(cfg.data, seed=cfg.seed, device=device)
        seed_everything(cfg.seed)  # model init does not depend on how the data was loaded
        model = build_model(cfg.model, stream.spec)
        # layout and device are final before an EMA links the weights into its flat buffer
        model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format)
        tracks = attach(plugins, model)
        if cfg.train.compile:
            compile_in_place(model)
        meta = run_meta(cfg, experiment, stream, tracks, config, processes.world_size)
        results = Results([t.name for t in tracks], stream.num_tasks, meta)
        strategy = build_strategy(cfg, model, stream, list(plugins.values()), device, processes.rank,
                                  processes.world_size, distributed_model(model, cfg, processes))  # fmt: skip
        if cfg.eval.every_n_steps:  # after Avalanche's clock among the plugins: it reads the updated step
            every, size = cfg.eval.every_n_steps, cfg.eval.subset_size
            plugins["continual_eval"] = ContinualEvalPlugin(
                stream, tracks, every, size, cfg.seed, cfg.train.eval_batch_size
            )
            strategy.plugins.append(plugins["continual_eval"])
        the_run = Run(cfg, out_dir, stream, model, strategy, plugins, tracks, results, processes, Loggers({}))
        if state:
            checkpoint.restore(the_run, state, out_dir / LAST_CHECKPOINT)
            console.print(f"resuming {out_dir} after task {results.tasks_done}/{stream.num_tasks}")
        else:
            results.record_baseline(evaluate(model, stream, -1, batch_size=cfg.train.eval_batch_size))
        the_run.loggers = build_loggers(the_run, experiment, state)
        if "continual_eval" in plugins:
            plugins["continual_eval"].on_eval = the_run.loggers.log_eval
        print_header(console, the_run, experiment, device)
        if processes.main:
            atomic_write(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        try:
            train_all_tasks(the_run, console)
            console.final(results)
            console.print(f"\nresults: {out_dir / 'results.json'} ({results.meta['elapsed_s']:.1f} s training + "
                          "evaluation)")  # fmt: skip
        finally:
            the_run.loggers.finish(results)  # last: W&B prints how to upload an offline run
    finally:
        distributed.stop()
    return results


def resume_point(cfg: DictConfig, out_dir: Path, config: dict) -> tuple[Path, dict | None]:
    """The folder the run writes to, and the checkpoint it continues from (None for a new run).

    The main process decides (``resume=true`` picks among the runs next to its folder); the others
    take its folder and read the same checkpoint.
    """
    request = resume_request(cfg.resume)
    found: dict[str, tuple[Path, dict]] = {}

    def decide() -> tuple[str, bool]:
        if request:
            found["main"] = checkpoint.resume_from(request, out_dir, config)
            return str(found["main"][0]), True
        return str(out_dir), False

    folder, resuming = distributed.from_main(decide)
    if "main" in found:
        return found["main"]
    return Path(folder), checkpoint.load(Path(folder) / LAST_CHECKPOINT) if resuming else None


def train_all_tasks(run: Run, console: Console) -> None:
    """Train the remaining tasks; after each, evaluate every track and save results and checkpoint."""
    results, strategy, stream, cfg = run.results, run.strategy, run.stream, run.cfg
    started = time.perf_counter() - results.meta["elapsed_s"]
    try:
        for task in range(results.tasks_done, stream.num_tasks):
            steps_before, train_started = strategy.clock.train_iterations, time.perf_counter()
            strategy.train(stream.benchmark.train_stream[task], drop_last=cfg.train.drop_last)
            results.meta["train_s"] = round(results.meta["train_s"] + time.perf_counter() - train_started, 3)
            results.meta["steps_per_task"].append(strategy.clock.train_iterations - steps_before)
            for track in run.tracks:
                with track.swap_in():
                    results.record(
                        track.name, task, evaluate(run.model, stream, task, batch_size=cfg.train.eval_batch_size)
                    )
            results.tasks_done = task + 1
            results.meta["elapsed_s"] = round(time.perf_counter() - started, 2)
            save(run, with_checkpoint=cfg.checkpoint)
            console.task(results, task, results.meta["steps_per_task"][-1], stream.task_classes[task])
            run.loggers.log_task(results, task)
        results.status = "completed"
    except (KeyboardInterrupt, Interrupted) as err:
        results.status = "interrupted"
        name = err.signal_name if isinstance(err, Interrupted) else "SIGINT"
        raise Interrupted(name, str(run.out_dir), results.tasks_done) from None
    except BaseException:
        results.status = "failed"
        raise
    finally:
        if results.tasks_done:
            with contextlib.suppress(UserError):  # if the disk is what failed, the error being raised says so
                save(run, with_checkpoint=False)  # the status; the checkpoint of the last task stays


def save(run: Run, with_checkpoint: bool) -> None:
    """Result files (and the checkpoint) of the tasks done; only the main process writes."""
    if not run.processes.main:
        return
    continual = run.plugins.get("continual_eval")
    if continual:
        run.results.stability = {name: stability_metrics(curve) for name, curve in continual.curves.items()}
    save_outputs(run.results, run.out_dir, continual.curves if continual else None)
    if with_checkpoint:
        checkpoint.save(run.out_dir / LAST_CHECKPOINT, checkpoint.snapshot(run))


def run_meta(
    cfg: DictConfig, experiment: str, stream: TaskStream, tracks: list[Track], config: dict, world_size: int
) -> dict:
    return {
        "experiment": experiment,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "device": str(stream.train.device),
        "world_size": world_size,
        "class_order": stream.class_order,
        "task_classes": stream.task_classes,
        "track_info": {t.name: {"decay": t.decay, "horizon": t.horizon} for t in tracks},
        "steps_per_task": [],
        "train_s": 0.0,  # in strategy.train (continual evaluation included), the rest of elapsed_s evaluates
        "elapsed_s": 0.0,
        "config": config,
    }


def build_loggers(run: Run, experiment: str, state: dict | None) -> Loggers:
    """The loggers of ``logger=`` (the main process only); one that cannot start is a warning."""
    if not run.processes.main:
        return Loggers({})
    cfg, results = run.cfg, run.results
    info = RunInfo(run.out_dir, results.meta["config"], experiment, cfg.strategy.name, cfg.seed, results.tracks,
                   setting_id(results.meta["config"]), results.tasks_done, world_size=run.world_size)  # fmt: skip
    saved = (state or {}).get("loggers", {})
    loggers = {}
    for name, node in cfg.logger.items():
        try:
            loggers[name] = build(node, f"logger.{name}", run=info, resumed=saved.get(name))
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a logger must never stop training
            warn_disabled(name, err)
    return Loggers(loggers)


def distributed_model(model: nn.Module, cfg: DictConfig, processes: distributed.Processes) -> nn.Module | None:
    """``model`` wrapped for data parallel training (None with one process)."""
    if processes.world_size == 1:
        return None
    if cfg.train.sync_batchnorm:
        if model_device(model).type != "cuda":
            raise UserError("train.sync_batchnorm=true needs CUDA devices (SyncBatchNorm has no CPU kernels)")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # reuses the parameters and buffers: EMA views stay valid
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compile_in_place(model: nn.Module) -> None:
    """``torch.compile`` the model in place, so checkpoints keep plain keys; after an EMA has linked
    the weights into its flat buffer, so tracing sees the final tensors. Needs a C/C++ compiler."""
    compiler = os.environ.get("CXX") or "g++"
    if model_device(model).type == "cpu" and not shutil.which(compiler):
        raise UserError(f"train.compile=true needs a C++ compiler ({compiler} is not on PATH); install one, or set CXX")
    if model_device(model).type == "cuda" and not (shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")):
        raise UserError("train.compile=true needs a C compiler for Triton (cc / gcc is not on PATH); install one")
    model.compile()


def print_header(console: Console, run: Run, experiment: str, device: torch.device) -> None:
    cfg, stream = run.cfg, run.stream
    console.print(
        f"{experiment}: {stream.num_tasks} tasks, {stream.num_classes} classes, {len(stream.train)} train samples, "
        f"strategy={cfg.strategy.name}, model={cfg.model._target_.rsplit('.', 1)[-1]}, device={device}, "
        f"seed={cfg.seed}, precision={'bf16 autocast' if run.strategy.autocast_dtype else 'fp32'}"
        f"{', compiled' if cfg.train.compile else ''}"
        f"{f', {run.world_size} processes' if run.world_size > 1 else ''}"
    )
    first = len(stream.benchmark.train_stream[0].dataset)
    steps = first // cfg.train.batch_size if cfg.train.drop_last else -(-first // cfg.train.batch_size)
    for track in run.tracks:
        if track.horizon is not None:
            console.print(f"  {track.name}: averages over ~{track.horizon:,.0f} steps; task 1 has "
                          f"{cfg.train.epochs * steps:,} steps")  # fmt: skip
