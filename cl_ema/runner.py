"""One experiment, top to bottom: assemble the run, then for each task: train, evaluate every track, record."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from cl_ema import checkpoint
from cl_ema.assembly import Run, assemble, steps_per_task
from cl_ema.config import LAST_CHECKPOINT, Checked
from cl_ema.console import Console
from cl_ema.continual_eval import stability_metrics
from cl_ema.distributed import Processes
from cl_ema.errors import Interrupted, UserError
from cl_ema.evaluation import KeptBatches, evaluate_tracks
from cl_ema.files import atomic_write
from cl_ema.plugins import Summarized
from cl_ema.results import Results, save_outputs


def run(
    checked: Checked,
    out_dir: Path,
    *,
    processes: Processes,
    device: torch.device,
    state: dict[str, Any] | None = None,
    console: Console | None = None,
) -> Results:
    """Run the checked experiment on ``device``, writing results into ``out_dir`` (continuing ``state``, a
    validated checkpoint of it, when resuming); return the results."""
    console = console or Console(None if processes.main else open(os.devnull, "w"))  # noqa: SIM115
    the_run = assemble(checked, out_dir, processes, device, state, out_dir / LAST_CHECKPOINT)
    if state:
        console.print(f"resuming {out_dir} after task {the_run.results.tasks_done}/{the_run.stream.num_tasks}")
    print_header(console, the_run, device)
    if processes.main:
        atomic_write(out_dir / "config.yaml", OmegaConf.to_yaml(checked.cfg, resolve=True))
    try:
        try:
            train_all_tasks(the_run, console)
            console.final(the_run.results)
            console.print(
                f"\nresults: {out_dir / 'results.json'} ({the_run.results.meta['elapsed_s']:.1f} s "
                "training + evaluation)"
            )
        finally:
            the_run.loggers.finish(the_run.results)  # last: W&B prints how to upload an offline run
    except (KeyboardInterrupt, Interrupted) as err:
        if isinstance(err, Interrupted) and err.run_dir:  # training's own: it says where it stopped
            raise
        raise stopped(the_run, err) from None
    return the_run.results


def stopped(run: Run, err: BaseException) -> Interrupted:
    """A signal (a Ctrl-C's KeyboardInterrupt, or Interrupted) said with where it left ``run``: in a task,
    or while the results are printed or the loggers finish (W&B writes and syncs its run); the results
    stay as they are, complete or resumable."""
    results = run.results
    return Interrupted(
        err.signal_name if isinstance(err, Interrupted) else "SIGINT",
        str(run.out_dir),
        results.tasks_done,
        completed=results.status == "completed",
        resumable=bool(run.config.checkpoint and results.tasks_done),
    )


def train_all_tasks(run: Run, console: Console) -> None:
    """Train the remaining tasks; after each, evaluate every track and save results and checkpoint."""
    results, strategy, stream, train = run.results, run.strategy, run.stream, run.config.train
    started = time.perf_counter() - results.meta["elapsed_s"]
    logged = len(run.continual.points()) if run.continual else 0  # continual evaluations given to the loggers
    kept = KeptBatches()  # the test sets, built at the first evaluation for the others
    try:
        for task in range(results.tasks_done, stream.num_tasks):
            steps_before, train_started = strategy.clock.train_iterations, time.perf_counter()
            strategy.train(stream.benchmark.train_stream[task], drop_last=train.drop_last)
            results.meta["train_s"] = round(results.meta["train_s"] + time.perf_counter() - train_started, 3)
            results.meta["steps_per_task"].append(strategy.clock.train_iterations - steps_before)
            # every track in one pass: each test batch built once for all of them
            evaluated = evaluate_tracks(
                run.model, run.tracks, stream, task, batch_size=train.eval_batch_size, kept=kept
            )
            for name, accuracies in evaluated.items():
                results.record(name, task, accuracies)
            results.tasks_done = task + 1
            results.meta["elapsed_s"] = round(time.perf_counter() - started, 2)
            save(run, with_checkpoint=run.config.checkpoint, final=False)
            console.task(results, task, results.meta["steps_per_task"][-1], stream.task_classes[task])
            if run.continual:  # the task's continual evaluations, once they are in a checkpoint
                for point in run.continual.points(logged):
                    run.loggers.log_eval(*point)
                logged = len(run.continual.points())
            run.loggers.log_task(results, task)
        results.status = "completed"
    except (KeyboardInterrupt, Interrupted) as err:
        results.status = "interrupted"
        raise stopped(run, err) from None
    except SystemExit:  # submitit's handler of a preemption or time-limit signal: it requeues the job
        results.status = "interrupted"
        raise
    except BaseException:
        results.status = "failed"
        raise
    finally:
        if results.tasks_done:
            with contextlib.suppress(UserError):  # if the disk is what failed, the error being raised says so
                save(run, with_checkpoint=False, final=True)  # the status; the checkpoint of the last task stays


def save(run: Run, with_checkpoint: bool, final: bool) -> None:
    """Result files (and the checkpoint) of the tasks done, the figures at the end (``final``); only the
    main process writes."""
    if not run.processes.main:
        return
    continual = run.continual
    if continual:
        run.results.stability = {name: stability_metrics(curve) for name, curve in continual.curves.items()}
    if with_checkpoint:  # first: killed between the two files, the run still resumes from its last task
        checkpoint.save(run.out_dir / LAST_CHECKPOINT, run.state_dict())
    save_outputs(run.results, run.out_dir, continual.curves if continual else None, final)


def print_header(console: Console, run: Run, device: object) -> None:
    c, stream = run.config, run.stream
    console.print(
        f"{c.choices.experiment}: {stream.num_tasks} tasks, {stream.num_classes} classes, "
        f"{len(stream.train)} train samples, strategy={c.choices.strategy}, "
        f"model={run.checked.model.target.__name__}, device={device}, seed={c.seed}, threads={c.threads}, "
        f"precision={'bf16 autocast' if run.strategy.autocast_dtype else 'fp32'}"
        f"{', compiled' if c.train.compile else ''}"
        f"{f', {run.world_size} processes' if run.world_size > 1 else ''}"
    )
    for plugin in run.plugins.values():
        if isinstance(plugin, Summarized):
            console.print(f"  {plugin.summary()}")
    steps = steps_per_task(c.train, len(stream.benchmark.train_stream[0].dataset))
    for track in run.tracks:
        if track.horizon is not None:
            console.print(
                f"  {track.name}: decay {track.decay:.6g}, averages over ~{track.horizon:,.0f} steps; task 1 "
                f"has {steps:,} steps"
            )
