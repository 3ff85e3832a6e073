"""The EMA of the weights as an Avalanche plugin: one shadow per decay (or horizon), each an evaluation track.

Works in cl_ema's runs and in any stock Avalanche strategy (``Naive(..., plugins=[EMAPlugin(decay=0.999)])``).
Its options: ``cl_ema.plugins.options.EMA``; the rule: ``cl_ema.rules.ema``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import Tensor

from cl_ema.ema import recompute_bn
from cl_ema.plugins import Track, unaugmented_batches
from cl_ema.plugins.averaging import AveragesPlugin
from cl_ema.plugins.options import EMA, Sync
from cl_ema.rules import Averaging


class EMAPlugin(AveragesPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """EMA shadows of the model, one per decay (``EMA``'s options).

    Lifecycle: ``attach(model)`` registers the shadows (before training, from the initial weights; in a
    stock strategy at ``before_training``); ``after_update`` updates them after every step. With
    ``sync="none"`` training is never changed, and every process of a data-parallel run keeps identical
    shadows without communicating. ``task_steps``: the first task's optimizer steps (horizons in tasks),
    which a cl_ema run gives the plugin itself.
    """

    def __init__(self, options: EMA | None = None, /, *, task_steps: int | None = None, **kwargs: Any) -> None:
        self.ema = options if options is not None else EMA(**kwargs)
        self.setup(self.ema.entries(), self.ema.buffers, task_steps)
        self._bn_batches: Callable[[], Iterator[Tensor]] | None = None

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._bn_batches = None  # evaluations during training use the averaged statistics

    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy, **kwargs)
        if self.ema.recompute_bn:
            self._bn_batches = unaugmented_batches(strategy)
        if self.ema.sync == Sync.task_end:
            self.engine.copy_to_live(0)

    def tracks(self) -> list[Track]:
        if not self.ema.recompute_bn:
            return super().tracks()
        # statistics re-estimated in each shadow's model: only swapping the shadow in gives them
        return [dataclasses.replace(track, state=None) for track in super().tracks()]

    def swapped(self, made: Averaging) -> AbstractContextManager[None]:
        return self._recomputed(super().swapped(made))

    @contextmanager
    def _recomputed(self, swap: AbstractContextManager[None]) -> Iterator[None]:
        with swap:
            if self._bn_batches is not None:
                recompute_bn(self.engine.model, self._bn_batches())
            yield
