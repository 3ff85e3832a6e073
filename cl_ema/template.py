"""Avalanche's SupervisedTemplate fed from device-resident tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor

from cl_ema.data import ContinualStream
from cl_ema.data.loader import IndexBatches


class DeviceDataTemplate(SupervisedTemplate):
    """SupervisedTemplate whose mini-batches hold sample indices, gathered on the device.

    The dataloader (Avalanche's, or the one a plugin such as replay puts in its place) chooses
    batches of ``(index, label, task)``; ``IndexBatches`` serves them as device tensors without
    per-sample fetching, and ``_unpack_minibatch`` turns the indices into an augmented,
    normalized input batch on the training device. With ``autocast`` (e.g. ``torch.bfloat16``)
    the forward pass and the loss run under ``torch.autocast``; the weights stay fp32.
    Everything else is Avalanche's loop.
    """

    def __init__(
        self,
        *,
        stream: ContinualStream,
        autocast: torch.dtype | None = None,
        channels_last: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.stream = stream
        self.autocast = autocast
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def _before_training_exp(self, **kwargs) -> None:
        super()._before_training_exp(**kwargs)  # builds the loader; plugins (replay) may replace it
        self.dataloader = IndexBatches(self.dataloader, self.device)

    def _unpack_minibatch(self) -> None:
        super()._unpack_minibatch()
        raw = self.stream.train.raw(self.mbatch[0])
        if self.stream.augment is not None:
            raw = self.stream.augment(raw)
        self.mbatch[0] = self.stream.train.normalize(raw).contiguous(memory_format=self.memory_format)

    def _autocast(self) -> AbstractContextManager:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def forward(self) -> Tensor:
        with self._autocast():
            return super().forward()

    def criterion(self) -> Tensor:
        with self._autocast():
            return super().criterion()

    def input_batches(self) -> Callable[[], Iterator[Tensor]]:
        """Replays the current experience's batches (replay memory included), unaugmented.

        The loader's shuffling draws from torch's global generator; the pass runs on a fork of
        it, so re-estimating statistics never changes the training run.
        """
        loader, store = self.dataloader, self.stream.train

        def batches() -> Iterator[Tensor]:
            with torch.random.fork_rng(devices=[]):
                for mbatch in loader:
                    yield store.batch(mbatch[0])

        return batches
