"""The cost of evaluating every track after a task, one track at a time vs in one pass; and of whole runs.

    bash ../shared/data/mnist.sh /tmp/mnist      # real MNIST in torchvision's layout, once
    python benchmarks/eval_tracks.py --data-root /tmp/mnist [--threads 1] [--rounds 3] [--tasks 20]

Part 1, one evaluation: ``experiment=perm_mnist strategy=averages`` (20 tasks, MLP 784-100-100-10, eval
batch 1024; ``live`` and 21 averages: 22 tracks), assembled as ``python -m cl_ema`` assembles it, trained
through task ``--trained-through`` (mid-stream), then the evaluation after that task (every task's test set:
200,000 images) timed three ways, taking turns for ``--rounds`` rounds (the median of each):

(a) one track at a time, as the runner did (its loop, the evaluation function and the batch building as they
    were): each track swapped in and evaluated on its own, every test batch built again (a gather through the
    task's pixel permutation, a normalization) and counted for each;
(a') the same loop with today's batch building (``TensorStore.batch``: index_select, one broadcast map,
    in-place arithmetic, the same values), to tell the two savings apart;
(b) one pass (``cl_ema.evaluation.evaluate_tracks``, its default on a CPU): each batch built once, each
    track swapped in once and run on all of them;
(b') (b) as a run makes it after its first evaluation: the batches that evaluation built kept (``KeptBatches``);
(c) one pass stacked (``stack=True``): the 21 averages in one forward, vmap over their stacked weights
    (``live`` swapped);
(f) the floor of (b): each track swapped in once and its forward run on every test batch, the batches built
    beforehand and nothing counted. Exact evaluation on this device cannot take less.

It checks that (b) gives exactly (a)'s accuracies, and counts how (c)'s logits and predictions differ from
each track's own forward over the whole evaluation. Part 2: the wall time of the whole runs
``experiment=perm_mnist strategy=plain`` and ``strategy=averages`` (``data.n_tasks=--tasks``; 0 skips them),
their training and evaluation, the ratio, and the least the averages run could take with exact evaluation: its
training and (f) after each task (on its ``--tasks`` test sets); with ``--rebuilt``, the two runs again with
their test batches built at every evaluation, as runs did before they kept them. Everything in one process,
``threads`` as given.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor, nn

from cl_ema.assembly import Run, assemble
from cl_ema.config import check, compose
from cl_ema.console import Console
from cl_ema.data.storage import TensorStore
from cl_ema.data.stream import TaskStream
from cl_ema.distributed import from_environment
from cl_ema.evaluation import Accuracies, KeptBatches, class_masks, evaluate_tracks, plan
from cl_ema.launch import launch


def overrides(data_root: str, threads: int, *more: str) -> list[str]:
    return ["experiment=perm_mnist", f"data.root={data_root}", "data.download=false", "logger=none",
            "checkpoint=false", f"threads={threads}", *more]  # fmt: skip


def one_at_a_time(run: Run, task: int, build: Callable[[TensorStore, Tensor], Tensor]) -> dict[str, Accuracies]:
    """The runner's loop before one-pass evaluation, batches built by ``build``."""
    results = {}
    for track in run.tracks:
        with track.swap_in():
            results[track.name] = evaluate_before(run.model, run.stream, task, run.config.train.eval_batch_size, build)
    return results


def built_before(store: TensorStore, index: Tensor) -> Tensor:
    """``TensorStore.batch`` before one-pass evaluation: advanced indexing, a (batch, pixels) map, out of place."""
    index = index.to(store.device)
    if store.pixel_maps is None:
        raw = store.inputs[index]
    else:
        base = store.inputs[index % store.num_base]
        pixels = base.flatten(1)
        if store._fills:  # a rotation's 0 pixels
            pixels = torch.cat([pixels, pixels.new_zeros(len(pixels), 1)], 1)
        raw = pixels.gather(1, store.pixel_maps[index // store.num_base]).view_as(base)
    return (raw.float() * store.norm.scale - store._mean) / store._std


@torch.no_grad()
def evaluate_before(
    model: nn.Module,
    stream: TaskStream,
    trained_through: int,
    batch_size: int,
    build: Callable[[TensorStore, Tensor], Tensor],
) -> Accuracies:
    """``cl_ema.evaluation.evaluate`` before one-pass evaluation (one process): every batch built and counted."""
    seen, own = class_masks(stream, stream.test.device)
    was_training = model.training
    model.eval()
    result = Accuracies([], [])
    for task in range(stream.num_tasks):
        index = stream.test_indices[task]
        correct = torch.zeros(2, dtype=torch.long)
        for batch in index.split(batch_size):
            logits, labels = model(build(stream.test, batch)), stream.test.targets_at(batch)
            for k, allowed in enumerate((seen[trained_through], own[task])):
                correct[k] += (logits.masked_fill(~allowed, float("-inf")).argmax(1) == labels).sum()
        result.class_il.append(int(correct[0]) / len(index))
        result.task_il.append(int(correct[1]) / len(index))
    model.train(was_training)
    return result


def timed(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each; the contenders take turns, so that drift in the machine's load hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def stacked_differences(run: Run, batch_size: int) -> tuple[int, int, int, int, float]:
    """Over every test batch, for the stacked averages: logits of the stacked forward that differ from each
    track's own forward, of how many; predictions (arg-max over the classes) that differ, of how many; the
    largest difference of a logit."""
    model, stream, tracks = run.model, run.stream, run.tracks
    was_training = model.training
    model.eval()
    sample = stream.test.batch(stream.test_indices[0][:1])
    group = plan(model, tracks, sample, stack=True)[0]
    stacked_tracks = [tracks[k] for k in group.rows]
    assert group.stacked and len(stacked_tracks) == len(tracks) - 1, "the averages do not stack"  # live: swapped
    logits_differ = logits = flips = predictions = 0
    largest = 0.0
    with group.loaded() as forward:
        for index in stream.test_indices:
            for batch in index.split(batch_size):
                inputs = stream.test.batch(batch)
                for track, got in zip(stacked_tracks, forward(inputs)):
                    with track.swap_in():
                        own = model(inputs)
                    logits_differ += int((own != got).sum())
                    logits += own.numel()
                    flips += int((own.argmax(1) != got.argmax(1)).sum())
                    predictions += len(own)
                    largest = max(largest, float((own - got).abs().max()))
    model.train(was_training)
    return logits_differ, logits, flips, predictions, largest


@torch.no_grad()
def forwards_alone(run: Run, inputs: list[Tensor]) -> None:
    """Each track's forward on every built batch, nothing else: the floor of evaluating the tracks exactly."""
    run.model.eval()
    for track in run.tracks:
        with track.swap_in():
            for batch in inputs:
                run.model(batch)
    run.model.train()


def one_evaluation(args: argparse.Namespace) -> float:
    """Part 1; returns (f) per test set (seconds: the forwards of every track on one task's test images)."""
    cfg = compose(*overrides(args.data_root, args.threads, "strategy=averages"))
    with tempfile.TemporaryDirectory() as folder:
        run = assemble(check(cfg), Path(folder), from_environment(), torch.device("cpu"))
        task, batch_size = args.trained_through, run.config.train.eval_batch_size
        started = time.perf_counter()
        for t in range(task + 1):
            run.strategy.train(run.stream.benchmark.train_stream[t], drop_last=run.config.train.drop_last)
        print(f"trained tasks 0..{task} of {run.stream.num_tasks} in {time.perf_counter() - started:.0f} s; "
              f"{len(run.tracks)} tracks; {sum(len(i) for i in run.stream.test_indices):,} test images, "
              f"batch {batch_size}")  # fmt: skip
        a, a2 = one_at_a_time(run, task, built_before), one_at_a_time(run, task, TensorStore.batch)
        b = evaluate_tracks(run.model, run.tracks, run.stream, task, batch_size=batch_size)
        kept = KeptBatches()
        b2 = evaluate_tracks(run.model, run.tracks, run.stream, task, batch_size=batch_size, kept=kept)
        same = all(x[n].class_il == b[n].class_il and x[n].task_il == b[n].task_il for x in (a, a2, b2) for n in a)
        print(f"(a'), (b) and (b') give (a)'s accuracies exactly: {same}")
        c = evaluate_tracks(run.model, run.tracks, run.stream, task, batch_size=batch_size, stack=True)
        differ = sum(x != y for n in a for x, y in zip(a[n].class_il + a[n].task_il, c[n].class_il + c[n].task_il))
        print(f"(c) accuracies that differ from (a)'s: {differ} of {2 * len(a) * run.stream.num_tasks}")
        logits_differ, logits, flips, predictions, largest = stacked_differences(run, batch_size)
        print(f"(c) vs each track's own forward: {logits_differ:,} of {logits:,} logits differ (largest by "
              f"{largest:.3g}), {flips} of {predictions:,} predictions")  # fmt: skip
        built = [run.stream.test.batch(b) for index in run.stream.test_indices for b in index.split(batch_size)]
        contenders: dict[str, Callable[[], object]] = {
            "(a) one track at a time": lambda: one_at_a_time(run, task, built_before),
            "(a') (a), today's batches": lambda: one_at_a_time(run, task, TensorStore.batch),
            "(b) one pass": lambda: evaluate_tracks(run.model, run.tracks, run.stream, task, batch_size=batch_size),
            "(b') (b), batches kept": lambda: evaluate_tracks(
                run.model, run.tracks, run.stream, task, batch_size=batch_size, kept=kept
            ),
            "(c) one pass, stacked": lambda: evaluate_tracks(
                run.model, run.tracks, run.stream, task, batch_size=batch_size, stack=True
            ),
            "(f) the forwards alone": lambda: forwards_alone(run, built),
        }
        times = timed(contenders, args.rounds)
    base, n = times["(a) one track at a time"], len(run.tracks)
    for name, seconds in times.items():
        print(f"  {name:<26} {seconds:7.2f} s   {seconds / n:6.3f} s/track   (a)/this = {base / seconds:.2f}")
    return times["(f) the forwards alone"] / run.stream.num_tasks


def whole_runs(args: argparse.Namespace, forwards: float) -> None:
    """Part 2; ``forwards``: (f) per test set, the floor of evaluating every track on one task. With
    ``--rebuilt`` the runs are made again with their test batches built at every evaluation (as runs did
    before they kept them)."""
    variants = {"kept": contextlib.nullcontext, "rebuilt": lambda: mock.patch("cl_ema.runner.KeptBatches", type(None))}
    for variant, patched in list(variants.items())[: 2 if args.rebuilt else 1]:
        elapsed, train = {}, {}
        print(f" test batches {'kept (as a run does)' if variant == 'kept' else 'built at every evaluation'}:")
        for strategy in ("plain", "averages"):
            cfg = compose(
                *overrides(args.data_root, args.threads, f"strategy={strategy}", f"data.n_tasks={args.tasks}")
            )
            with tempfile.TemporaryDirectory() as folder, patched():
                started = time.perf_counter()
                results = launch(check(cfg), Path(folder), console=Console(file=io.StringIO()))
                elapsed[strategy] = time.perf_counter() - started
            train[strategy], total = results.meta["train_s"], results.meta["elapsed_s"]
            print(f"  strategy={strategy:<9} {len(results.tracks):2} tracks: {elapsed[strategy]:6.1f} s in all "
                  f"(tasks: {train[strategy]:.1f} s training, {total - train[strategy]:.1f} s evaluating)")  # fmt: skip
        print(f"  averages / plain = {elapsed['averages'] / elapsed['plain']:.2f}")
        floor = train["averages"] + args.tasks**2 * forwards  # after each task, every task's test set
        print(f"  the least for averages with exact evaluation, its training + (f) on {args.tasks}² test sets: "
              f"{floor:.1f} s, {floor / elapsed['plain']:.2f} x plain")  # fmt: skip


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} CPUs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder with MNIST in torchvision's layout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trained-through", type=int, default=9, help="the task after which to evaluate (0-based)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=20, help="tasks of the whole runs (0: no whole runs)")
    parser.add_argument("--rebuilt", action="store_true", help="the whole runs again, test batches not kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, device: cpu")
    print("one evaluation of strategy=averages on perm-MNIST:")
    forwards = one_evaluation(args)
    if args.tasks:
        print(f"whole runs, experiment=perm_mnist data.n_tasks={args.tasks}:")
        whole_runs(args, forwards)


if __name__ == "__main__":
    main()
