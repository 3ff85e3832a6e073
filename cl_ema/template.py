"""Avalanche's SupervisedTemplate fed from device-resident tensors, on one process or several."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor

from cl_ema.config import LossClasses
from cl_ema.data.loader import DeviceBatches, IndexBatches
from cl_ema.data.stream import TaskStream
from cl_ema.distributed import my_share
from cl_ema.evaluation import class_masks


class DeviceDataTemplate(SupervisedTemplate):
    """SupervisedTemplate whose mini-batches hold sample indices, gathered on the device.

    The dataloader (Avalanche's, or the one a plugin such as replay puts in its place) chooses
    batches of ``(index, label, task)``; ``IndexBatches`` serves them as device tensors without
    per-sample fetching, and ``_unpack_minibatch`` turns the indices into an augmented,
    normalized input batch on the training device. ``mb_replayed`` counts the replayed samples
    at the end of the mini-batch. With ``autocast`` (e.g. ``torch.bfloat16``) the forward pass
    and the loss run under ``torch.autocast``; the weights stay fp32.

    ``loss_classes="task"`` restricts each sample's cross-entropy to the classes of its own task
    (the current task's logits of SLCA and CoMA, for current samples).

    With ``world_size`` processes (``torchrun``), every process draws the same global batch and
    trains on its share: the current and the replayed samples are each split in
    ``world_size`` parts, and the loss is the global mean, so that the gradients averaged by
    DistributedDataParallel are those of the global batch. Everything else is Avalanche's loop.
    """

    def __init__(
        self,
        *,
        stream: TaskStream,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        loss_classes: LossClasses = LossClasses.all,
        world_size: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.stream = stream
        self.loss_classes = loss_classes
        _, own = class_masks(stream, self.device)
        task_of_class = torch.zeros(stream.num_classes, dtype=torch.long, device=self.device)
        for task, classes in enumerate(stream.task_classes):
            task_of_class[classes] = task  # the last task that has the class (permuted: every task has all)
        self._own_classes = own[task_of_class]  # class → the classes of its task
        self.autocast_dtype = autocast
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.world_size = world_size
        self.mb_replayed = 0
        self.dataloader: Any = None  # Avalanche's loader of the experience, then IndexBatches over it
        self.mbatch: Any = None
        self.mb_index = torch.empty(0, dtype=torch.long)  # the mini-batch's sample indices (this process's)
        self.mb_global_size = 0

    def _before_training_exp(self, **kwargs) -> None:
        super()._before_training_exp(**kwargs)  # builds the loader; plugins (replay) may replace it
        if not isinstance(self.dataloader, DeviceBatches):
            self.dataloader = IndexBatches(self.dataloader, self.device, current_size=len(self.adapted_dataset))

    def _unpack_minibatch(self) -> None:
        replayed = getattr(self.mbatch, "replayed", 0)
        super()._unpack_minibatch()
        index, labels, tasks = self.mbatch
        self.mb_global_size = len(index)
        if self.world_size > 1:
            (index, labels, tasks), replayed = self._share([index, labels, tasks], replayed)
        self.mbatch = [self.inputs(index), labels, tasks]
        self.mb_index = index
        self.mb_replayed = replayed

    def inputs(self, index: Tensor, augment: bool = True) -> Tensor:
        """The model's input batch for training samples ``index``: gathered, augmented, normalized."""
        raw = self.stream.train.raw(index)
        if augment and self.stream.augment is not None:
            raw = self.stream.augment(raw)
        return self.stream.train.normalize(raw).contiguous(memory_format=self.memory_format)

    def _share(self, columns: list[Tensor], replayed: int) -> tuple[list[Tensor], int]:
        """This process's part of the current and of the replayed samples of a global batch."""
        cut = len(columns[0]) - replayed
        return [torch.cat([my_share(c[:cut]), my_share(c[cut:])]) for c in columns], len(my_share(columns[0][cut:]))

    def autocast(self) -> AbstractContextManager:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self) -> Tensor:
        with self.autocast():
            return super().forward()

    def criterion(self) -> Tensor:
        with self.autocast():
            if (self.world_size == 1 or not self.is_training) and self.loss_classes == LossClasses.all:
                return super().criterion()
            logits = self.mb_output
            if self.loss_classes == LossClasses.task:
                logits = logits.masked_fill(~self._own_classes[self.mb_y], float("-inf"))
            if self.world_size == 1 or not self.is_training:
                return F.cross_entropy(logits, self.mb_y)
            # DDP averages gradients over processes: scale the local sum so the average is the global mean
            return F.cross_entropy(logits, self.mb_y, reduction="sum") * (self.world_size / self.mb_global_size)

    def training_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One more pass over the current experience's batches as training sees them: inputs (augmented)
        and labels, this process's share of each; it draws from the generators training draws from."""
        for mbatch in self.dataloader:
            index, labels, _ = mbatch
            if self.world_size > 1:
                (index, labels), _ = self._share([index, labels], getattr(mbatch, "replayed", 0))
            yield self.inputs(index), labels

    def input_batches(self) -> Callable[[], Iterator[Tensor]]:
        """Replays the current experience's batches (replay memory included), unaugmented.

        The loader's shuffling draws from torch's global generator; the pass runs on a fork of
        it, and draws nothing from a replay memory, so re-estimating statistics never changes
        the training run.
        """
        loader = self.dataloader

        def batches() -> Iterator[Tensor]:
            with torch.random.fork_rng(devices=[]):
                for mbatch in loader.without_draws():
                    yield self.inputs(mbatch[0], augment=False)

        return batches
