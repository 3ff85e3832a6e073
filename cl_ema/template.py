"""Avalanche's SupervisedTemplate fed from device-resident tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor

from cl_ema.data import ContinualStream


class DeviceDataTemplate(SupervisedTemplate):
    """SupervisedTemplate whose mini-batches hold sample indices, gathered on the device.

    The dataloader (Avalanche's, or the one a plugin such as replay puts in its place) yields
    ``(index, label, task)``; ``_unpack_minibatch`` turns the indices into an augmented,
    normalized input batch on the training device. Everything else is Avalanche's loop.
    """

    def __init__(self, *, stream: ContinualStream, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stream = stream

    def _unpack_minibatch(self) -> None:
        super()._unpack_minibatch()
        raw = self.stream.train.raw(self.mbatch[0])
        if self.stream.augment is not None:
            raw = self.stream.augment(raw)
        self.mbatch[0] = self.stream.train.normalize(raw)

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
