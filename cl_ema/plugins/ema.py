"""The EMA of the weights as an Avalanche plugin: one shadow per decay (or horizon), each an evaluation track.

Works in cl_ema's runs and in any stock Avalanche strategy (``Naive(..., plugins=[EMAPlugin(decay=0.999)])``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial

from torch import Tensor

from cl_ema.ema import EMAOptions, EMARule, Rule, decay_for_horizon, recompute_bn
from cl_ema.options import Choice, OptionError, choice, count, fraction, fractions, positive, positives
from cl_ema.plugins import Track, ema_name, unaugmented_batches
from cl_ema.plugins.averaging import AveragingPlugin


class Sync(Choice):
    none = "none"  # evaluation only: training never sees the averages
    task_end = "task_end"  # the EMA weights are loaded into the live model after each task


@dataclass(eq=False)
class EMAPlugin(EMAOptions, AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """EMA shadows of the model, one per decay; the engine's options (``EMAOptions``) and these:

    ``decay`` (one shadow), or ``decays`` (several), or ``horizons`` (in units of the first task's
    optimizer steps ``S``: decay ``1 − update_every/(h·S)``); ``step_tasks``: the step schedule's
    short-decay phase in units of ``S`` (``online_ema``: 1); ``recompute_bn``: re-estimate BatchNorm
    statistics of each shadow on the last task's batches before it is evaluated; ``sync=task_end``:
    load the (single) shadow into the live model after each task, which changes training.
    ``first_task_steps`` is ``S``, which a cl_ema run gives the plugin itself.

    Lifecycle: ``attach(model)`` registers the shadows (before training, from the initial weights;
    in a stock strategy at ``before_training``); ``after_update`` updates them after every step.
    With ``sync="none"`` training is never changed, and every process of a data-parallel run keeps
    identical shadows without communicating.
    """

    decay: float = 0.999
    decays: list[float] | None = None
    horizons: list[float] | None = None
    step_tasks: float | None = None
    recompute_bn: bool = False
    sync: Sync = Sync.none
    first_task_steps: int | None = None

    def __post_init__(self) -> None:
        EMAOptions.__post_init__(self)
        AveragingPlugin.__init__(self)
        self.sync = choice("sync", self.sync, Sync)
        if self.decays is not None and self.horizons is not None:
            raise OptionError("horizons", self.horizons, "give decays or horizons, not both")
        if self.horizons is not None:
            self.horizons = positives("horizons", self.horizons)
        elif self.decays is not None:
            self.decays = fractions("decays", self.decays)
        else:
            self.decay = fraction("decay", self.decay)
        if self.step_tasks is not None:
            positive("step_tasks", self.step_tasks)
        if self.first_task_steps is not None:
            count("first_task_steps", self.first_task_steps)
        if self.sync == Sync.task_end and len(self.horizons or self.decays or [self.decay]) > 1:
            raise OptionError("sync", str(self.sync), "changes training, so it takes one decay, not several")
        self.horizon_tasks: list[float | None] = []  # per shadow, its horizon in tasks (when given so)
        self._bn_batches: Callable[[], Iterator[Tensor]] | None = None

    def _steps(self, option: str, value: object) -> int:
        if self.first_task_steps is None:
            raise OptionError(option, value, "needs first_task_steps, the optimizer steps of the first task")
        return self.first_task_steps

    def engine_options(self) -> EMAOptions:
        """The engine's options, the step schedule's length in updates."""
        options = {f.name: getattr(self, f.name) for f in fields(EMAOptions)}
        if self.step_tasks is not None:
            options["step_updates"] = self.step_tasks * self._steps("step_tasks", self.step_tasks) / self.update_every
        return EMAOptions(**options)

    def resolved_decays(self) -> list[float]:
        """The shadows' decays (a horizon of ``h`` tasks: ``1 − update_every / (h · first_task_steps)``)."""
        if self.horizons is None:
            self.horizon_tasks = [None] * len(self.decays or [self.decay])
            return list(self.decays or [self.decay])
        steps = self._steps("horizons", self.horizons)
        self.horizon_tasks = list(self.horizons)
        try:
            return [decay_for_horizon(h * steps / self.update_every) for h in self.horizons]
        except OptionError:
            raise OptionError("horizons", self.horizons, f"each must span one update ({steps} steps a task)") from None

    def engine_rules(self) -> list[Rule]:
        options = self.engine_options()
        return [EMARule(decay, options) for decay in self.resolved_decays()]

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._bn_batches = None  # evaluations during training use the averaged statistics

    def after_update(self, strategy, **kwargs) -> None:
        self.engine.update()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.recompute_bn:
            self._bn_batches = unaugmented_batches(strategy)
        if self.sync == Sync.task_end:
            self.engine.copy_to_live(0)

    def tracks(self) -> list[Track]:
        return [
            Track(ema_name(rule.decay, horizon=h, schedule=str(self.schedule)), partial(self._swapped, k), "ema",
                  rule.decay, rule.horizon)
            for k, (rule, h) in enumerate(zip(self.engine.rules, self.horizon_tasks))
            if isinstance(rule, EMARule)
        ]  # fmt: skip

    @contextmanager
    def _swapped(self, index: int) -> Iterator[None]:
        with self.engine.swapped(index):
            if self._bn_batches is not None:
                recompute_bn(self.engine.model, self._bn_batches())
            yield
