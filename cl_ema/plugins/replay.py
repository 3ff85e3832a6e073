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

from cl_ema.data.loader import DeviceBatches, IndexBatch, IndexBatches
from cl_ema.data.stream import experience_indices, index_dataset
from cl_ema.ema import free_memory
from cl_ema.plugins import Position
from cl_ema.plugins.options import Replay, ReplayPolicy


def replay(
    options: Replay | None = None, /, *, seed: int = 0, device: str | None = None, **kwargs: Any
) -> SupervisedPlugin:
    """The replay plugin of the options' policy (``Replay``); ``seed`` (the run's) seeds the reservoir's draws,
    whose memory lives on ``device`` (the run's training device)."""
    options = options if options is not None else Replay(**kwargs)
    if options.policy == ReplayPolicy.reservoir:
        return ReservoirReplayPlugin(options.mem_size, options.batch_size_mem, seed, device)
    return ClassBalancedReplayPlugin(options.mem_size, options.batch_size_mem)


class ClassBalancedReplayPlugin(AvalancheReplayPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Avalanche's ReplayPlugin with a class-balanced memory, filled through ``post_adapt``.

    avalanche-lib 0.6 still calls the buffer's deprecated ``update()``, which resets the warning
    filters and warns on every task; ``post_adapt`` is what that method forwards to.
    """

    provides = "replay"

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
            groups.append(
                {
                    "key": int(key),
                    "max_size": group.max_size,
                    "index": index,
                    "targets": targets,
                    "weights": group._buffer_weights.clone(),
                }
            )
        return {"groups": groups, "seen_classes": sorted(policy.seen_classes)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state.get("groups"), list) or not isinstance(state.get("seen_classes"), list):
            raise ValueError("the replay memory lacks its class groups")
        policy = self.storage_policy
        groups = {}
        for entry in state["groups"]:
            if not isinstance(entry, dict) or not {"key", "max_size", "index", "targets", "weights"} <= entry.keys():
                raise ValueError("a class group of the replay memory is incomplete")
            index, targets, weights = (
                _long(entry["index"], "index"),
                _long(entry["targets"], "targets"),
                entry["weights"],
            )
            if not (isinstance(weights, Tensor) and weights.dim() == 1 and weights.dtype == torch.float32
                    and bool(torch.isfinite(weights).all())):  # fmt: skip
                raise ValueError(f"the replay memory of class {entry['key']} has no finite fp32 weights")
            if not (len(index) == len(targets) == len(weights) <= entry["max_size"] <= self.mem_size):
                raise ValueError(f"the replay memory of class {entry['key']} is inconsistent")
            if len(targets) and not bool((targets == entry["key"]).all()):
                raise ValueError(f"the replay memory of class {entry['key']} holds samples of other classes")
            group = ReservoirSamplingBuffer(entry["max_size"])
            group.buffer = index_dataset(index.cpu(), targets.cpu())
            group._buffer_weights = weights.cpu()
            groups[entry["key"]] = group
        policy.buffer_groups = groups
        policy.seen_classes = set(state["seen_classes"])

    def check_position(self, at: Position) -> None:
        for key, group in self.storage_policy.buffer_groups.items():
            index = experience_indices(group.buffer)
            if not 0 <= key < at.num_classes:
                raise ValueError(f"the replay memory holds class {key}, outside the stream's 0..{at.num_classes - 1}")
            if len(index) and not (int(index.min()) >= 0 and int(index.max()) < at.train_samples):
                raise ValueError(f"the replay memory of class {key} names samples outside 0..{at.train_samples - 1}")


def _check_memory(device: torch.device, nbytes: int, what: str) -> None:
    free = free_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB, but {device} has {free / 2**30:.2f} GiB free")


def _long(value: Any, name: str) -> Tensor:
    """A saved 1-d tensor of integers (sample indices, labels)."""
    if not isinstance(value, Tensor) or value.dim() != 1 or value.dtype != torch.long:
        raise ValueError(f"the replay memory's {name} is not a 1-d tensor of int64")
    return value


class StreamReservoir:
    """A reservoir sample of a stream of (sample index, label[, logits]) on the training device.

    ``add`` is Vitter's algorithm R over a batch at once; within a batch a slot drawn twice keeps
    the later sample, as adding the samples one by one would. Random numbers come from the
    reservoir's own generator (seeded, saved in checkpoints), never from the training run's; it draws on
    the CPU whatever the device, so a checkpoint resumes on another device. With ``logits`` (DER) each
    entry also keeps the model's outputs of the step it entered in.
    """

    def __init__(self, size: int, seed: int = 0, device: str | torch.device | None = None) -> None:
        self.size = size
        self.device = torch.device(device or "cpu")
        self.num_seen = 0
        self.index: Tensor | None = None
        self.labels: Tensor | None = None
        self.logits: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)
        _check_memory(self.device, 16 * size, f"a replay memory of {size:,} samples")

    @property
    def filled(self) -> int:
        return min(self.num_seen, self.size)

    def _ensure(self, logits: int = 0) -> None:
        if logits and self.logits is None:
            _check_memory(
                self.device, 4 * logits * self.size, f"the logits of a replay memory of {self.size:,} samples"
            )
        try:
            if self.index is None:
                self.index = torch.full((self.size,), -1, dtype=torch.long, device=self.device)
                self.labels = torch.full((self.size,), -1, dtype=torch.long, device=self.device)
            if logits and self.logits is None:
                self.logits = torch.zeros(self.size, logits, device=self.device)
        except RuntimeError as err:  # the allocator's refusal
            if "alloc" not in str(err).lower() and "out of memory" not in str(err).lower():
                raise
            raise MemoryError(f"a replay memory of {self.size:,} samples does not fit on {self.device}") from None

    @torch.no_grad()
    def add(self, index: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        self.device = index.device
        self._ensure(0 if logits is None else logits.shape[1])
        n = len(index)
        seen = self.num_seen + torch.arange(n, dtype=torch.float64)  # samples before each
        draw = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (seen + 1)).long()
        slot = torch.where(seen < self.size, seen.long(), draw).to(self.device)
        keep = slot < self.size
        slot, position = slot[keep], torch.arange(n, device=self.device)[keep]
        # the last sample of the batch that drew each slot wins
        winner = torch.full((self.size,), -1, dtype=torch.long, device=self.device)
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
        return torch.randperm(self.filled, generator=self.generator)[: min(count, self.filled)].to(device)

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
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved memory onto this memory's device; ValueError if it is not one of this size and kind."""
        if not {"size", "num_seen", "index", "labels", "logits", "generator"} <= state.keys():
            raise ValueError("the replay memory's state is incomplete")
        num_seen = state["num_seen"]
        if state["size"] != self.size or isinstance(num_seen, bool) or not isinstance(num_seen, int) or num_seen < 0:
            raise ValueError(f"a replay memory of size {state['size']} does not fit mem_size={self.size}")
        generator = state["generator"]
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8 or generator.shape != (5056,):
            raise ValueError("the replay memory's generator state is not a CPU generator's")
        index, labels, logits = state["index"], state["labels"], state["logits"]
        if index is None:
            if num_seen:
                raise ValueError(f"the replay memory saw {num_seen} samples but holds none")
            self.index = self.labels = self.logits = None
        else:
            for name, value in (("index", index), ("labels", labels)):
                if not isinstance(value, Tensor) or value.dtype != torch.long or value.shape != (self.size,):
                    raise ValueError(f"the replay memory's {name} is not {self.size} int64 values")
            if logits is not None and not (
                isinstance(logits, Tensor)
                and logits.dtype == torch.float32
                and logits.dim() == 2
                and len(logits) == self.size
                and bool(torch.isfinite(logits).all())
            ):
                raise ValueError("the replay memory's logits are not finite fp32 values, one row per slot")
            self.index, self.labels = index.to(self.device), labels.to(self.device)
            self.logits = None if logits is None else logits.to(self.device)
        self.num_seen = num_seen
        self.generator.set_state(generator)

    def check_position(self, at: Position, width: int | None = None) -> None:
        """The memory saw the run's samples, and holds samples and labels of the stream (logits of ``width``)."""
        if self.num_seen != at.samples_seen:
            raise ValueError(f"the replay memory saw {self.num_seen} samples, the run trained on {at.samples_seen}")
        if self.index is None or self.labels is None:
            return
        filled = self.filled
        index, labels = self.index[:filled], self.labels[:filled]
        if filled and not (int(index.min()) >= 0 and int(index.max()) < at.train_samples):
            raise ValueError(f"the replay memory names samples outside 0..{at.train_samples - 1}")
        if filled and not (int(labels.min()) >= 0 and int(labels.max()) < at.num_classes):
            raise ValueError(f"the replay memory holds labels outside the stream's 0..{at.num_classes - 1}")
        if width is not None and self.logits is not None and self.logits.shape[1] != width:
            raise ValueError(f"the replay memory's logits have {self.logits.shape[1]} classes, the model {width}")


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

    provides = "replay"

    def __init__(
        self,
        mem_size: int = 200,
        batch_size_mem: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.mem_size = mem_size
        self.batch_size_mem = batch_size_mem
        self.memory = StreamReservoir(mem_size, seed, device)
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

    def check_position(self, at: Position) -> None:
        self.memory.check_position(at)
