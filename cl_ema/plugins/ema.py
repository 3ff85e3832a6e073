"""The EMA of the weights as an Avalanche plugin: one shadow per decay, each an evaluation track."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_ema.config import EMAConfig, Sync
from cl_ema.ema import EMA, recompute_bn, track_name
from cl_ema.evaluation import Track


class EMAPlugin(SupervisedPlugin, supports_distributed=True):
    """Keeps EMA shadows of the model for one or more decays (``config``: the ``ema`` section).

    Lifecycle: ``attach(model)`` registers the shadows (at build time, so they start from the
    initial weights); ``after_update`` updates them after every optimizer step; at the end of
    each training experience, ``sync="task_end"`` copies the (single) shadow into the live model,
    and ``recompute_bn`` remembers that experience's batches to re-estimate BatchNorm statistics
    of each shadow before it is evaluated. With ``sync="none"`` training is never changed, and
    every process of a data-parallel run keeps identical shadows without communicating.
    """

    def __init__(self, config: EMAConfig | None = None) -> None:
        super().__init__()
        self.config = config or EMAConfig()
        self.decays = self.config.decay_list()
        self.ema: EMA | None = None
        self._bn_batches: Callable[[], Iterator[Tensor]] | None = None

    def attach(self, model: nn.Module) -> None:
        if self.ema is None or self.ema.model is not model:
            self.ema = EMA(model, self.decays, self.config.options())
            self.ema.register()

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._bn_batches = None  # evaluations during training use the averaged statistics

    def after_update(self, strategy, **kwargs) -> None:
        self.ema.update()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.config.recompute_bn:
            self._bn_batches = strategy.input_batches()
        if self.config.sync == Sync.task_end:
            self.ema.copy_to_live(0)

    def tracks(self) -> list[Track]:
        return [
            Track(track_name(d), lambda k=k: self._swapped(k), d, self.ema.horizon(d))
            for k, d in enumerate(self.decays)
        ]

    @contextmanager
    def _swapped(self, index: int) -> Iterator[None]:
        with self.ema.swapped(index):
            if self._bn_batches is not None:
                recompute_bn(self.ema.model, self._bn_batches())
            yield

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
