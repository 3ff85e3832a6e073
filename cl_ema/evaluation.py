"""Accuracy of a model's weights on test tasks, class-IL and task-IL at once, for several tracks in one pass.

Class-IL: the prediction is the arg-max over every class seen so far (the classes of tasks
0..i after training task i), as Mammoth reports it. Task-IL: the arg-max over the classes of the
test task itself (the task identity is given at test time).

``evaluate_tracks`` evaluates a list of tracks (``cl_ema.plugins.Track``: ``live``, the averages) in one
pass over the test sets: each test batch is built once (a gather, a pixel map for permuted or rotated
MNIST, a normalization) for every track, instead of once per track. The tracks are evaluated in groups:

- stacked (``stack=True``; by default on an accelerator): the tracks that have ``state()`` run as one
  forward, ``torch.func.vmap`` of ``torch.func.functional_call`` over their weights stacked tensor by
  tensor, in chunks of at most ``STACK_BYTES`` of weights. Only for models without convolutions (module
  types: ``stackable``; conv nets, BatchNorm ones among them, are swapped) whose stacked forward passes a
  test on one sample (vmap cannot batch every operation: data-dependent control flow, ``.item()``);
- swapped (everything else): ``with track.swap_in():``, the model's own forward, once per block of test
  batches. ``live`` is always among them: its accuracies stay those of the model's own forward, so the
  ``live`` track of a run with averages equals a ``plain`` run's on every device.

Where several groups read the batches, the built batches are kept for all of them in blocks of at most
``CACHE_BYTES``; each swapped track is swapped in once per block (once when the test sets fit). A run evaluates
the same test sets after every task: given a ``KeptBatches``, the batches built on a CPU are kept from one
evaluation to the next (test sets of at most ``CACHE_BYTES`` in all), built once per run rather than once per
task. On an accelerator building is a few kernels, and its memory is the model's. A held batch that a forward
changed in place (its version counter moved) is built again for the next. Predictions
are counted once per task and group, not per batch. The swapped path computes exactly what one track at a
time did (the same forward on the same batches), so it is the default on a CPU, where the matmuls are
compute-bound: a stacked forward is no faster there, and vmap's batched matmuls round differently in the
last bits, so that a prediction whose two best logits are that close flips (``benchmarks/eval_tracks.py``,
perm-MNIST, 21 averages: 0.9–1.2× the swapped path's time in four runs; 1 of 4.2 M predictions flipped). On an
accelerator a small model's forward is bound by kernel launches, which stacking shares among the tracks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from operator import itemgetter

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from cl_ema.data.stream import TaskStream
from cl_ema.distributed import my_share, sum_over_processes
from cl_ema.plugins import LIVE, Track, live_track

CACHE_BYTES = 1 << 30  # built test batches kept while several groups of tracks read them
STACK_BYTES = 1 << 26  # weights stacked into one forward: stacking pays for small models, whose forwards are short

# a batch of inputs → the logits of each track of a group, (tracks, batch, classes)
Forward = Callable[[Tensor], Tensor]


@dataclass
class Accuracies:
    class_il: list[float]
    task_il: list[float]


def class_masks(stream: TaskStream, device: torch.device) -> tuple[Tensor, Tensor]:
    """(T, C) boolean masks: classes seen after each task, and classes of each task."""
    seen = torch.zeros(stream.num_tasks, stream.num_classes, dtype=torch.bool, device=device)
    own = torch.zeros_like(seen)
    for t, classes in enumerate(stream.task_classes):
        own[t, classes] = True
        seen[t] = own[: t + 1].any(0)
    return seen, own


def evaluate(
    model: nn.Module,
    stream: TaskStream,
    trained_through: int,
    tasks: Sequence[int] | None = None,
    indices: Sequence[Tensor] | None = None,
    batch_size: int = 1024,
) -> Accuracies:
    """The model's weights as they are: ``evaluate_tracks`` of the ``live`` track alone."""
    return evaluate_tracks(model, [live_track()], stream, trained_through, tasks, indices, batch_size)[LIVE]


@torch.no_grad()
def evaluate_tracks(
    model: nn.Module,
    tracks: Sequence[Track],
    stream: TaskStream,
    trained_through: int,
    tasks: Sequence[int] | None = None,
    indices: Sequence[Tensor] | None = None,
    batch_size: int = 1024,
    stack: bool | None = None,
    kept: KeptBatches | None = None,
) -> dict[str, Accuracies]:
    """Accuracy of each track on each test task in ``tasks`` (default: all) after training ``trained_through``,
    in one pass (see the module docstring); by track name, in the order of ``tracks``.

    ``indices`` overrides the test samples of each task (subsets for continual evaluation).
    ``trained_through=-1`` evaluates an untrained model over all classes. ``stack``: whether tracks may run
    as one stacked forward (None: on an accelerator, not on a CPU). ``kept``: built batches kept for the next
    evaluation of the same test sets (see the module docstring). With several processes each evaluates
    its share of every test set and the counts are summed. ``model`` is the unwrapped model the tracks
    swap into (not a DistributedDataParallel wrapper).
    """
    names = [track.name for track in tracks]
    if len(set(names)) != len(names):
        raise ValueError(f"two tracks have the same name: {names}")
    tasks = list(range(stream.num_tasks)) if tasks is None else list(tasks)
    device = stream.test.device
    seen, own = class_masks(stream, device)
    seen_now = seen[trained_through] if trained_through >= 0 else torch.ones_like(seen[0])
    full = [stream.test_indices[task] if indices is None else indices[task] for task in tasks]
    batches = [
        (i, j, batch) for i, index in enumerate(full) for j, batch in enumerate(my_share(index).split(batch_size))
    ]
    sample_bytes = 4 * math.prod(stream.test.inputs.shape[1:])
    keeping = (
        kept is not None
        and indices is None
        and device.type == "cpu"
        and sum(len(batch) for *_, batch in batches) * sample_bytes <= CACHE_BYTES
    )

    correct = torch.zeros(len(tracks), len(tasks), 2, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        stack = device.type != "cpu" if stack is None else stack
        sample = stream.test.batch(batches[0][-1][:1]) if stack and batches else None  # for the test forward
        groups = plan(model, tracks, sample, stack)
        # several groups read each batch: the built batches are held, in blocks of at most CACHE_BYTES (one block
        # when they are kept for the next evaluation); one group reads them once, each built as it is read
        holding = len(groups) > 1 or keeping
        held = kept.inputs if keeping and kept is not None else {}

        def inputs_of(i: int, j: int, batch: Tensor) -> Tensor:
            if not holding:
                return stream.test.batch(batch)
            key = (tasks[i], batch_size, j)
            entry = held.get(key)
            if entry is None or entry[0]._version != entry[1]:  # a forward wrote into its inputs: built again
                inputs = stream.test.batch(batch)
                entry = held[key] = (inputs, inputs._version)
            return entry[0]

        for block in _blocks(batches, sample_bytes if holding and not keeping else 0, CACHE_BYTES):
            if not keeping:
                held.clear()  # the block before's
            block_tasks = [(i, list(part)) for i, part in groupby(block, key=itemgetter(0))]
            labels = [stream.test.targets_at(torch.cat([batch for *_, batch in items])) for _, items in block_tasks]
            for group in groups:
                rows = torch.tensor(group.rows, device=device)
                with group.loaded() as forward:
                    for (i, items), task_labels in zip(block_tasks, labels):
                        # counted once per task, not per batch: a few small operations per batch would cost as
                        # much as a small model's forward
                        logits = torch.cat([forward(inputs_of(*item)) for item in items], 1)
                        correct[rows, i] += _correct(logits, task_labels, (seen_now, own[tasks[i]]))
    finally:
        model.train(was_training)
    counts = sum_over_processes(correct).tolist()
    sizes = [max(len(index), 1) for index in full]
    return {
        name: Accuracies([c[0] / n for c, n in zip(per_task, sizes)], [c[1] / n for c, n in zip(per_task, sizes)])
        for name, per_task in zip(names, counts)
    }


@dataclass
class KeptBatches:
    """Test batches built by one ``evaluate_tracks`` for the next ones of the same run (see the module
    docstring): by (task, batch size, batch number), each with its version counter when it was built (a
    model that changes its inputs in place gets them built again)."""

    inputs: dict[tuple[int, int, int], tuple[Tensor, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """Tracks evaluated together: ``rows``, their places in the track list; ``loaded()``, their forward."""

    rows: list[int]
    loaded: Callable[[], AbstractContextManager[Forward]]
    stacked: bool


def plan(model: nn.Module, tracks: Sequence[Track], sample: Tensor | None, stack: bool) -> list[Group]:
    """The groups ``evaluate_tracks`` evaluates the tracks in: the tracks with ``state()`` stacked in chunks of
    at most ``STACK_BYTES`` of weights (when ``stack``, the model is ``stackable`` and its stacked forward
    works on ``sample``), then every other track (``live`` always) swapped in on its own."""
    states = {k: (track.name, track.state) for k, track in enumerate(tracks) if track.state is not None}
    chunk = STACK_BYTES // max(sum(t.nbytes for t in own_weights(model).values()), 1)
    worth = stack and len(states) >= 2 and chunk >= 2 and stackable(model)
    stacking = list(states) if worth and sample is not None and _stacks(model, sample) else []
    groups = [
        Group(rows, partial(_stacked, model, [states[k] for k in rows]), True)
        for rows in (stacking[i : i + chunk] for i in range(0, len(stacking), chunk))
    ]
    return groups + [
        Group([k], partial(_swapped, model, track), False) for k, track in enumerate(tracks) if k not in stacking
    ]


def stackable(model: nn.Module) -> bool:
    """Whether the model's type allows a stacked forward: no convolution, and not compiled.

    vmap runs K stacked convolution weights as one grouped convolution, which is slower than K plain
    ones (on a CPU: the CNN 1.4×, a ResNet-18 1.4×) and rounds differently, and a conv net's forward is
    compute-bound, with no launches to share: conv nets (the CNN and ResNets, with their BatchNorm) are
    swapped. BatchNorm itself batches under vmap; a compiled model would be traced again under it.
    """
    compiled = getattr(model, "_compiled_call_impl", None) is not None  # set by Module.compile()
    return not compiled and not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def own_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors that a track replaces (``Track.state``'s): trainable parameters, floating buffers."""
    weights = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return weights | {name: b for name, b in model.named_buffers() if b.is_floating_point()}


def _stacked_forward(model: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """(weights stacked along a first dimension, inputs) → logits of each set of weights."""
    return vmap(lambda weights, inputs: functional_call(model, weights, (inputs,)), in_dims=(0, None))


def _stacks(model: nn.Module, sample: Tensor) -> bool:
    """The test forward: the model's own weights stacked twice give its own logits (shape, and values up to
    rounding) on ``sample``."""
    weights = {name: torch.stack([t, t]) for name, t in own_weights(model).items()}
    try:
        logits = _stacked_forward(model)(weights, sample)
    except Exception:  # whatever vmap cannot batch (its errors have no common type): the swap evaluates it
        return False
    expected = model(sample)
    return logits.shape == (2, *expected.shape) and bool(torch.allclose(logits, expected, rtol=1e-3, atol=1e-5))


@contextmanager
def _stacked(model: nn.Module, tracks: list[tuple[str, Callable[[], dict[str, Tensor]]]]) -> Iterator[Forward]:
    """The forward of the tracks (name, ``state``) stacked."""
    expected = own_weights(model).keys()
    states = [state() for _, state in tracks]
    for (name, _), state in zip(tracks, states):
        if state.keys() != expected:
            raise ValueError(f"track {name}: state() gives other tensors than the model's trainable parameters and "
                             f"floating buffers ({sorted(state.keys() ^ expected)})")  # fmt: skip
    weights = {name: torch.stack([state[name] for state in states]) for name in expected}
    del states  # computed weights: the stacked copy is what the forward reads
    yield partial(_stacked_forward(model), weights)


@contextmanager
def _swapped(model: nn.Module, track: Track) -> Iterator[Forward]:
    with track.swap_in():
        yield lambda inputs: model(inputs).unsqueeze(0)


def _blocks(
    batches: list[tuple[int, int, Tensor]], sample_bytes: int, budget: int
) -> Iterator[list[tuple[int, int, Tensor]]]:
    """Consecutive batches whose built inputs take at most ``budget`` bytes (at least one batch each)."""
    block: list[tuple[int, int, Tensor]] = []
    size = 0
    for item in batches:
        if block and size + len(item[-1]) * sample_bytes > budget:
            yield block
            block, size = [], 0
        block.append(item)
        size += len(item[-1]) * sample_bytes
    if block:
        yield block


def _correct(logits: Tensor, labels: Tensor, settings: Sequence[Tensor]) -> Tensor:
    """Correct predictions of each track in each setting (a mask of the classes it allows): (tracks, batch,
    classes) logits → (tracks, settings). A setting that allows every class takes the arg-max of the logits as
    they are, and one that allows what the setting before it allows shares its predictions: on permuted MNIST
    class-IL and task-IL are one arg-max (counted apart, they were a twentieth of the evaluation).
    ``max(-1).indices`` is ``argmax(-1)`` (the first of tied maxima; NaN wins), in half its time on a CPU."""
    counts = []
    for k, allowed in enumerate(settings):
        if k == 0 or not torch.equal(allowed, settings[k - 1]):
            masked = logits if bool(allowed.all()) else logits.masked_fill(~allowed, float("-inf"))
            hits = (masked.max(-1).indices == labels).sum(-1)
        counts.append(hits)
    return torch.stack(counts, -1)
