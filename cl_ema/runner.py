"""One experiment, top to bottom: data → model → strategy → for each task: train, evaluate, record."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cl_ema import checkpoint
from cl_ema.config import LAST_CHECKPOINT, data_root, resolve_device, to_container
from cl_ema.continual import ContinualEvalPlugin, stability_metrics
from cl_ema.data import ContinualStream, build_stream
from cl_ema.errors import UserError
from cl_ema.evaluation import evaluate
from cl_ema.models import build_model
from cl_ema.plugins import EMAPlugin, ReplayPlugin
from cl_ema.results import Results, atomic_write
from cl_ema.strategies import build_strategy
from cl_ema.template import DeviceDataTemplate
from cl_ema.tracking import Console, WandbLogger, save_outputs


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
    console = console or Console()
    config = to_container(cfg)
    resume_state = None
    if cfg.resume:
        out_dir, resume_state = checkpoint.resume_from(str(cfg.resume), out_dir, config)

    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    stream = build_stream(
        cfg.data.name,
        cfg.data.scenario,
        cfg.data.n_tasks,
        seed=cfg.seed,
        root=data_root(cfg.data.root),
        download=cfg.data.download,
        device=device,
        class_order=list(cfg.data.class_order) if cfg.data.class_order is not None else None,
        augment=cfg.data.augment,
    )
    seed_everything(cfg.seed)  # model init does not depend on how the data was loaded
    options = {k: v for k, v in cfg.model.items() if k not in ("name", "weights")}
    model = build_model(cfg.model.name, stream.input_shape, stream.num_classes, weights=cfg.model.weights,
                        input_norm=stream.train.norm, **options)  # fmt: skip
    # layout and device are final before the EMA engine links the weights into its flat buffer
    model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format)
    strategy, tracks = build_strategy(cfg, model, stream, device)
    if cfg.train.compile:
        # in place, not torch.compile's wrapper, so checkpoints keep plain keys; after the EMA
        # engine has moved the weights into its flat buffer, so tracing sees the final tensors
        model.compile()
    meta = {
        "experiment": experiment,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "device": str(device),
        "class_order": stream.class_order,
        "task_classes": stream.task_classes,
        "steps_per_task": [],
        "elapsed_s": 0.0,
        "config": config,
    }
    results = Results([t.name for t in tracks], stream.num_tasks, meta)
    continual = None
    if cfg.eval.every_n_steps:
        continual = ContinualEvalPlugin(stream, tracks, cfg.eval.every_n_steps, cfg.eval.subset_size, cfg.seed,
                                        cfg.train.eval_batch_size)  # fmt: skip
        strategy.plugins.append(continual)
    if resume_state:
        restore(resume_state, strategy, stream, results, out_dir / LAST_CHECKPOINT)
        console.print(f"resuming {out_dir} after task {results.tasks_done}/{stream.num_tasks}")
    else:
        results.record_baseline(evaluate(model, stream, -1, batch_size=cfg.train.eval_batch_size))

    wandb = None
    if cfg.logger.name == "wandb":
        group = "-".join([experiment, cfg.strategy.name, *results.tracks[1:]])  # seeds of a setting aggregate
        run_id = resume_state.get("wandb_run_id") if resume_state else None
        wandb = WandbLogger(cfg.logger, out_dir, config, f"{group}-seed{cfg.seed}", group,
                            [experiment, cfg.strategy.name], results.tracks, run_id=run_id)  # fmt: skip
        if continual:
            continual.on_eval = wandb.log_eval
    print_header(console, cfg, experiment, stream, strategy, device)
    atomic_write(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # every value, interpolations resolved

    started = time.perf_counter() - meta["elapsed_s"]
    try:
        for task in range(results.tasks_done, stream.num_tasks):
            steps_before = strategy.clock.train_iterations
            strategy.train(stream.benchmark.train_stream[task])
            meta["steps_per_task"].append(strategy.clock.train_iterations - steps_before)
            for track in tracks:
                with track.weights():
                    accuracies = evaluate(model, stream, task, batch_size=cfg.train.eval_batch_size)
                results.record(track.name, task, accuracies)
            results.tasks_done = task + 1
            meta["elapsed_s"] = round(time.perf_counter() - started, 2)
            if continual:
                results.continual = {n: stability_metrics(c) for n, c in continual.curves.items()}
            save_outputs(results, out_dir, continual.curves if continual else None)
            if cfg.checkpoint:
                checkpoint.save(out_dir / LAST_CHECKPOINT, snapshot(strategy, stream, results, wandb))
            console.task(results, task, meta["steps_per_task"][-1], stream.task_classes[task])
            if wandb:
                wandb.log_task(results, task)
        results.status = "completed"
    except BaseException:
        results.status = "failed"
        raise
    finally:
        if results.tasks_done:
            save_outputs(results, out_dir, continual.curves if continual else None)
        if wandb:
            wandb.finish(results, out_dir)
    console.final(results)
    console.print(f"\nresults: {out_dir / 'results.json'} ({meta['elapsed_s']:.1f} s training + evaluation)")
    if wandb and wandb.offline_dir:
        console.print(f"W&B offline run: {wandb.offline_dir} (upload with: wandb sync {wandb.offline_dir})")
    return results


def print_header(
    console: Console, cfg: DictConfig, experiment: str, stream: ContinualStream, strategy, device: torch.device
) -> None:
    console.print(
        f"{experiment}: {stream.num_tasks} tasks, {stream.num_classes} classes, {len(stream.train)} train samples, "
        f"strategy={cfg.strategy.name}, model={cfg.model.name}, device={device}, seed={cfg.seed}, "
        f"precision={'bf16 autocast' if strategy.autocast else 'fp32'}{', compiled' if cfg.train.compile else ''}"
    )
    first_steps = cfg.train.epochs * -(-len(stream.benchmark.train_stream[0].dataset) // cfg.train.batch_size)
    for ema in (p.ema for p in strategy.plugins if isinstance(p, EMAPlugin)):
        for decay, name in zip(ema.decays, ema.track_names):
            console.print(
                f"  {name}: averages over ~{ema.horizon(decay):,.0f} steps (update_every/(1-decay)); "
                f"task 1 has {first_steps:,} steps"
            )


def _plugin(strategy: DeviceDataTemplate, kind: type):
    return next((p for p in strategy.plugins if isinstance(p, kind)), None)


def snapshot(strategy: DeviceDataTemplate, stream: ContinualStream, results: Results, wandb) -> dict:
    """Everything needed to continue after the last finished task."""
    ema, replay, continual = (_plugin(strategy, kind) for kind in (EMAPlugin, ReplayPlugin, ContinualEvalPlugin))
    return {
        "config": results.meta["config"],
        "model": strategy.model.state_dict(),
        "optimizer": strategy.optimizer.state_dict(),
        "ema": ema.state_dict() if ema else None,
        "replay": replay.state_dict() if replay else None,
        "continual": continual.state_dict() if continual else None,
        "rng": checkpoint.rng_state({"augment": stream.augment.get_state() if stream.augment else {}}),
        "results": results.to_dict(),
        "train_iterations": strategy.clock.train_iterations,
        "wandb_run_id": wandb.run_id if wandb else None,
    }


def restore(state: dict, strategy: DeviceDataTemplate, stream: ContinualStream, results: Results, path: Path) -> None:
    """Load a snapshot into a freshly built run."""
    try:
        checkpoint.restore_model(strategy.model, state["model"], path)
        # Avalanche resets the optimizer on its first experience; do it now, then load the state
        strategy.make_optimizer(reset_optimizer_state=True)
        strategy.optimizer.load_state_dict(state["optimizer"])
        for kind, key in ((EMAPlugin, "ema"), (ReplayPlugin, "replay"), (ContinualEvalPlugin, "continual")):
            plugin = _plugin(strategy, kind)
            if plugin is not None:
                plugin.load_state_dict(state[key])
        results.load(state["results"])
        strategy.clock.train_iterations = state["train_iterations"]
        checkpoint.set_rng_state(state["rng"])
        if stream.augment:
            stream.augment.set_state(state["rng"]["augment"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: incomplete or foreign checkpoint ({type(err).__name__}: {err})") from err
