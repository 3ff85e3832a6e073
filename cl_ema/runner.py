"""One experiment, top to bottom: data → model → strategy → for each task: train, evaluate, record."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from cl_ema.config import data_root, resolve_device, to_container
from cl_ema.data import build_stream
from cl_ema.evaluation import evaluate
from cl_ema.models import build_model
from cl_ema.plugins import EMAPlugin
from cl_ema.results import Results, atomic_write
from cl_ema.strategies import build_strategy
from cl_ema.tracking import Console, WandbLogger, save_outputs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def run(cfg: DictConfig, out_dir: Path, experiment: str, console: Console | None = None) -> Results:
    """Run the configured experiment, writing results into ``out_dir``; return the results."""
    console = console or Console()
    seed_everything(cfg.seed)
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
    model_options = {k: v for k, v in cfg.model.items() if k not in ("name", "weights")}
    model = build_model(
        cfg.model.name, stream.input_shape, stream.num_classes, weights=cfg.model.weights, **model_options
    )
    model.to(device)
    strategy, tracks = build_strategy(cfg, model, stream, device)
    track_names = [t.name for t in tracks]
    meta = {
        "experiment": experiment,
        "strategy": cfg.strategy.name,
        "seed": cfg.seed,
        "device": str(device),
        "class_order": stream.class_order,
        "task_classes": stream.task_classes,
        "steps_per_task": [],
        "config": to_container(cfg),
    }
    results = Results(track_names, stream.num_tasks, meta)
    emas = [p.ema for p in strategy.plugins if isinstance(p, EMAPlugin)]
    group = "-".join([experiment, cfg.strategy.name, *track_names[1:]])  # seeds of one setting aggregate
    wandb = None
    if cfg.logger.name == "wandb":
        wandb = WandbLogger(
            cfg.logger,
            out_dir,
            meta["config"],
            name=f"{group}-seed{cfg.seed}",
            group=group,
            tags=[experiment, cfg.strategy.name],
        )

    console.print(
        f"{experiment}: {stream.num_tasks} tasks, {stream.num_classes} classes, {len(stream.train)} train samples, "
        f"strategy={cfg.strategy.name}, model={cfg.model.name}, device={device}, seed={cfg.seed}"
    )
    first_steps = cfg.train.epochs * -(-len(stream.benchmark.train_stream[0].dataset) // cfg.train.batch_size)
    for ema in emas:
        for decay, name in zip(ema.decays, ema.track_names):
            console.print(
                f"  {name}: averages over ~{ema.horizon(decay):,.0f} steps (update_every/(1-decay)); "
                f"task 1 has {first_steps:,} steps"
            )

    results.record_baseline(evaluate(model, stream, -1, batch_size=cfg.train.eval_batch_size))
    started = time.perf_counter()
    try:
        for task, experience in enumerate(stream.benchmark.train_stream):
            steps_before = strategy.clock.train_iterations
            strategy.train(experience)
            meta["steps_per_task"].append(strategy.clock.train_iterations - steps_before)
            for track in tracks:
                with track.weights():
                    results.record(
                        track.name, task, evaluate(model, stream, task, batch_size=cfg.train.eval_batch_size)
                    )
            results.tasks_done = task + 1
            meta["elapsed_s"] = round(time.perf_counter() - started, 2)
            save_outputs(results, out_dir)
            if cfg.checkpoint:
                save_checkpoint(out_dir / "checkpoints" / "last.pt", task, model, strategy, results)
            console.task(results, task, meta["steps_per_task"][-1], stream.task_classes[task])
            if wandb:
                wandb.log_task(results, task)
        results.status = "completed"
    except BaseException:
        results.status = "failed"
        raise
    finally:
        if results.tasks_done:
            save_outputs(results, out_dir)
        if wandb:
            wandb.finish(results, out_dir)
    console.final(results)
    console.print(f"\nresults: {out_dir / 'results.json'} ({meta['elapsed_s']:.1f} s training + evaluation)")
    if wandb and wandb.offline_dir:
        console.print(f"W&B offline run: {wandb.offline_dir} (upload with: wandb sync {wandb.offline_dir})")
    return results


def save_checkpoint(path: Path, task: int, model: torch.nn.Module, strategy, results: Results) -> None:
    """Everything needed to continue after ``task``; loadable with ``torch.load(weights_only=True)``."""
    state = {
        "task": task,
        "model": model.state_dict(),
        "optimizer": strategy.optimizer.state_dict(),
        "ema": [p.state_dict() for p in strategy.plugins if isinstance(p, EMAPlugin)],
        "torch_rng": torch.get_rng_state(),
        "results": results.to_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())
