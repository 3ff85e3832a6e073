"""Experience replay, two ways (``replay.policy``).

``class_balanced``: Avalanche's ``ReplayPlugin`` with its ``ClassBalancedBuffer`` — each seen class
keeps an equal share of the memory, filled at the end of each task; from the second task on,
Avalanche's ``ReplayDataLoader`` appends ``batch_size_mem`` memory samples to every mini-batch.

``reservoir``: experience replay as Mammoth's ``er`` model does it (Buzzega et al. 2020,
``models/er.py`` and ``utils/buffer.py``): after every optimizer step the step's current samples
enter a reservoir over the whole stream (Vitter's algorithm R: the n-th sample seen takes a free
slot, or replaces slot ``j ~ U{0..n}`` if ``j < mem_size``, so every sample seen is in memory with
probability ``mem_size / n``), and every mini-batch gets ``min(batch_size_mem, filled)`` memory
samples drawn uniformly without replacement — from the second step of the first task on.
Avalanche's ``ReservoirSamplingBuffer`` holds the same distribution but is filled once per task,
which is not Mammoth's protocol. Memory holds sample indices; replayed samples are augmented
like current ones when they are gathered, as Mammoth's buffer applies the training transform.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin as AvalancheReplayPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer
from torch import Tensor

from cl_ema.data import experience_indices, index_dataset
from cl_ema.data.loader import DeviceBatches, IndexBatch, IndexBatches
from cl_ema.options import Choice, choice, count


class ReplayPolicy(Choice):
    class_balanced = "class_balanced"  # Avalanche's ClassBalancedBuffer, updated after each task
    reservoir = "reservoir"  # Mammoth's ER: reservoir sampling over the stream, updated every step


def replay(
    mem_size: int = 200,
    batch_size_mem: int | None = None,
    policy: ReplayPolicy = ReplayPolicy.class_balanced,
    seed: int = 0,
) -> SupervisedPlugin:
    """The replay plugin of ``policy``: a memory of ``mem_size`` samples, ``batch_size_mem`` replayed
    per step (None: as many as the training batch); ``seed`` (the run's) seeds the reservoir's draws."""
    count("mem_size", mem_size, 1, 1 << 28)
    if batch_size_mem is not None:
        count("batch_size_mem", batch_size_mem, 1, 1 << 24)
    if choice("policy", policy, ReplayPolicy) == ReplayPolicy.reservoir:
        return ReservoirReplayPlugin(mem_size, batch_size_mem, seed)
    return ClassBalancedReplayPlugin(mem_size, batch_size_mem)


class ClassBalancedReplayPlugin(AvalancheReplayPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Avalanche's ReplayPlugin with a class-balanced memory, filled through ``post_adapt``.

    avalanche-lib 0.6 still calls the buffer's deprecated ``update()``, which resets the warning
    filters and warns on every task; ``post_adapt`` is what that method forwards to.
    """

    def __init__(self, mem_size: int = 200, batch_size_mem: int | None = None) -> None:
        policy = ClassBalancedBuffer(max_size=mem_size, adaptive_size=True)
        super().__init__(mem_size=mem_size, batch_size_mem=batch_size_mem, storage_policy=policy)

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.storage_policy.post_adapt(strategy, strategy.experience)

    def state_dict(self) -> dict:
        """The memory's contents (sample indices, labels, reservoir weights), class by class."""
        policy = self.storage_policy
        groups = []
        for key, group in policy.buffer_groups.items():
            index = experience_indices(group.buffer)
            targets = torch.as_tensor(list(group.buffer.targets), dtype=torch.long)
            groups.append({"key": int(key), "max_size": group.max_size, "index": index, "targets": targets,
                           "weights": group._buffer_weights.clone()})  # fmt: skip
        return {"groups": groups, "seen_classes": sorted(policy.seen_classes)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state.get("groups"), list) or not isinstance(state.get("seen_classes"), list):
            raise ValueError("the replay memory lacks its class groups")
        policy = self.storage_policy
        groups = {}
        for entry in state["groups"]:
            if not isinstance(entry, dict) or not {"key", "max_size", "index", "targets", "weights"} <= entry.keys():
                raise ValueError("a class group of the replay memory is incomplete")
            index, targets, weights = entry["index"], entry["targets"], entry["weights"]
            if not (len(index) == len(targets) == len(weights) <= entry["max_size"] <= self.mem_size):
                raise ValueError(f"the replay memory of class {entry['key']} is inconsistent")
            group = ReservoirSamplingBuffer(entry["max_size"])
            group.buffer = index_dataset(index, targets)
            group._buffer_weights = weights
            groups[entry["key"]] = group
        policy.buffer_groups = groups
        policy.seen_classes = set(state["seen_classes"])


class StreamReservoir:
    """A reservoir sample of a stream of (sample index, label[, logits]) on the training device.

    ``add`` is Vitter's algorithm R over a batch at once; within a batch a slot drawn twice keeps
    the later sample, as adding the samples one by one would. Random numbers come from the
    reservoir's own generator (seeded, saved in checkpoints), never from the training run's. With
    ``logits`` (DER) each entry also keeps the model's outputs of the step it entered in.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.num_seen = 0
        self.index: Tensor | None = None
        self.labels: Tensor | None = None
        self.logits: Tensor | None = None
        self._generator: torch.Generator | None = None

    @property
    def filled(self) -> int:
        return min(self.num_seen, self.size)

    def _ensure(self, device: torch.device, logits: int = 0) -> torch.Generator:
        try:
            if self.index is None:
                self.index = torch.full((self.size,), -1, dtype=torch.long, device=device)
                self.labels = torch.full((self.size,), -1, dtype=torch.long, device=device)
            if logits and self.logits is None:
                self.logits = torch.zeros(self.size, logits, device=device)
        except RuntimeError as err:  # the allocator's refusal
            if "alloc" not in str(err).lower() and "out of memory" not in str(err).lower():
                raise
            raise MemoryError(f"a replay memory of {self.size:,} samples does not fit on {device}") from None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def add(self, index: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        generator = self._ensure(index.device, 0 if logits is None else logits.shape[1])
        n = len(index)
        seen = self.num_seen + torch.arange(n, device=index.device, dtype=torch.float64)  # samples before each
        draw = (torch.rand(n, generator=generator, device=index.device, dtype=torch.float64) * (seen + 1)).long()
        slot = torch.where(seen < self.size, seen.long(), draw)
        keep = slot < self.size
        slot, position = slot[keep], torch.arange(n, device=index.device)[keep]
        # the last sample of the batch that drew each slot wins
        winner = torch.full((self.size,), -1, dtype=torch.long, device=index.device)
        winner.scatter_reduce_(0, slot, position, reduce="amax")
        taken = winner >= 0
        assert self.index is not None and self.labels is not None
        self.index[taken] = index[winner[taken]]
        self.labels[taken] = labels[winner[taken]]
        if logits is not None and self.logits is not None:
            self.logits[taken] = logits[winner[taken]].to(self.logits.dtype)
        self.num_seen += n

    def slots(self, count: int, device: torch.device) -> Tensor:
        """``min(count, filled)`` slots, uniformly without replacement (each draw independent of the last)."""
        if self.filled == 0:
            return torch.empty(0, dtype=torch.long, device=device)
        generator = self._ensure(device)
        return torch.randperm(self.filled, generator=generator, device=device)[: min(count, self.filled)]

    def sample(self, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The sample indices and labels of ``min(count, filled)`` entries, uniformly without replacement."""
        pick = self.slots(count, device)
        if not len(pick):
            return pick, pick
        assert self.index is not None and self.labels is not None
        return self.index[pick], self.labels[pick]

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "num_seen": self.num_seen,
            "index": None if self.index is None else self.index.cpu(),
            "labels": None if self.labels is None else self.labels.cpu(),
            "logits": None if self.logits is None else self.logits.cpu(),
            "generator": None if self._generator is None else self._generator.get_state(),
            "device": None if self.index is None else str(self.index.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"size", "num_seen", "index", "labels", "logits", "generator", "device"} <= state.keys():
            raise ValueError("the replay memory's state is incomplete")
        if state["size"] != self.size or not isinstance(state["num_seen"], int) or state["num_seen"] < 0:
            raise ValueError(f"a replay memory of size {state['size']} does not fit replay.mem_size={self.size}")
        self.num_seen = state["num_seen"]
        if state["index"] is None:
            self.index = self.labels = self.logits = self._generator = None
            return
        logits = state["logits"]
        if (
            state["index"].shape != (self.size,)
            or state["labels"].shape != (self.size,)
            or not (logits is None or (isinstance(logits, Tensor) and logits.dim() == 2 and len(logits) == self.size))
        ):
            raise ValueError("the replay memory has the wrong shape")
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise ValueError("the replay memory's logits hold NaN or infinite values")
        device = torch.device(state["device"])
        self.index, self.labels = state["index"].to(device), state["labels"].to(device)
        self.logits = None if logits is None else logits.to(device)
        self._generator = torch.Generator(device=device)
        self._generator.set_state(state["generator"])


class ReplayedBatches(DeviceBatches):
    """Avalanche's current batches, each followed by replayed samples drawn when it is requested."""

    def __init__(self, current: IndexBatches, memory: StreamReservoir, batch_size_mem: int) -> None:
        self.current = current
        self.memory = memory
        self.batch_size_mem = batch_size_mem
        self.last: IndexBatch | None = None  # the current part of the batch last yielded

    def __len__(self) -> int:
        return len(self.current)

    def without_draws(self):
        """The current batches, then the memory's contents in batches (no sampling)."""
        yield from self.current
        for start in range(0, self.memory.filled, self.batch_size_mem):
            index = self.memory.index[start : start + self.batch_size_mem]
            labels = self.memory.labels[start : start + self.batch_size_mem]
            yield IndexBatch([index, labels, torch.zeros_like(labels)], replayed=len(index))

    def __iter__(self):
        for batch in self.current:
            self.last = batch
            index, labels = self.memory.sample(self.batch_size_mem, batch[0].device)
            tasks = torch.zeros_like(labels)
            yield IndexBatch(
                [torch.cat([batch[0], index]), torch.cat([batch[1], labels]), torch.cat([batch[2], tasks])],
                replayed=len(index),
            )


class ReservoirReplayPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Mammoth's experience replay: a reservoir over the stream, replayed from the second step on."""

    def __init__(self, mem_size: int = 200, batch_size_mem: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.mem_size = mem_size
        self.batch_size_mem = batch_size_mem
        self.memory = StreamReservoir(mem_size, seed)
        self._batches: ReplayedBatches | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        current = IndexBatches(strategy.dataloader, strategy.device)
        self._batches = ReplayedBatches(current, self.memory, self.batch_size_mem or strategy.train_mb_size)
        strategy.dataloader = self._batches

    def after_training_iteration(self, strategy, **kwargs) -> None:
        batch = self._batches.last if self._batches else None  # the whole global batch: every process alike
        assert batch is not None, "after_training_iteration before the experience's first batch"
        self.memory.add(batch[0], batch[1])

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)
