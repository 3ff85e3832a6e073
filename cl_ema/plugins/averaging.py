"""The averaging plugins' common base, and the one plugin that evaluates any list of averaging rules.

``AveragesPlugin`` takes a list of rule entries (``cl_ema.rules``: EMAs, means of iterates, WiSE-FT
interpolations, task-vector merges, BEMA, LiNeS, …), keeps the rows they ask for in one engine
(``cl_ema.ema.WeightAverages``, rows that several rules share kept once) and evaluates each as a track
beside ``live``. None of them changes training, so one run evaluates them all; it works in a stock
Avalanche strategy too. A new rule is one function in ``cl_ema.rules`` and one entry in a config.

Memory: one fp32 copy of the model's averaged tensors per row, in the device's memory: an EMA or a mean,
one; an interpolation, one per anchor; the merges, one for θ_0 plus one for the mean, one for MagMax and
four for TIES; BEMA two. Rows that do not fit are refused before training, naming the size.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_ema.ema import Compute, WeightAverages
from cl_ema.errors import UserError
from cl_ema.options import OptionError
from cl_ema.plugins import Position, Track
from cl_ema.plugins.options import Averages
from cl_ema.rules import (
    Accumulator,
    Averaging,
    Buffers,
    Context,
    Event,
    Follow,
    Frozen,
    Layout,
    Moment,
    RowSpec,
    Rule,
    Snapshot,
    averaging,
)


class AveragingPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """What the averaging plugins share: an engine (``WeightAverages``) over one model, one shadow per rule of
    ``engine_rules()``, made by ``attach`` (in a stock strategy, in ``before_training``). A plugin averages one
    model: given to a second strategy, or twice to one, it says so rather than mix their steps."""

    averages: WeightAverages | None = None
    buffers: Buffers = Buffers.average

    def engine_rules(self) -> list[Rule]:
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        if self.averages is None or self.averages.model is not model:
            self.averages = WeightAverages(model, self.engine_rules(), self.buffers)
            self.averages.register()
            self.registered()

    def registered(self) -> None:
        """Called once the shadows hold the initial weights (to clear the ones that accumulate)."""

    def before_training(self, strategy, **kwargs) -> None:
        model = getattr(strategy.model, "module", strategy.model)  # unwrapped from DistributedDataParallel
        if self.averages is None:  # a stock Avalanche strategy: the model is on its device by now
            self.attach(model)
        elif self.averages.model is not model:
            raise RuntimeError(
                f"{type(self).__name__} averages another model already: give each strategy a plugin of its own"
            )
        if sum(plugin is self for plugin in strategy.plugins) > 1:
            raise RuntimeError(
                f"{type(self).__name__} is in the strategy's plugins twice: it would update twice a step"
            )

    @property
    def engine(self) -> WeightAverages:
        if self.averages is None:
            raise RuntimeError(
                f"{type(self).__name__}: attach(model) first (a stock strategy does it in before_training)"
            )
        return self.averages

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def check_steps(self, at: Position) -> None:
        """One engine update per optimizer step (for a plugin that updates its averages after every step)."""
        if self.engine.step != at.steps:
            raise ValueError(f"its averages saw {self.engine.step} optimizer steps, the run {at.steps}")


def _averaging(index: int, entry: dict[str, Any], task_steps: int | None) -> Averaging:
    """The averaging of entry ``index`` of a rule list, an error in it named as ``rules[index].…``."""
    try:
        return averaging(entry, Context(task_steps))
    except OptionError as err:
        raise err.renamed(f"rules[{index}]") from None


class _Rows:
    """The rows of an engine by key, as one view per group of the shadows given."""

    def __init__(self, index: dict[str, int], shadows: Sequence[Tensor]) -> None:
        self.index, self.shadows = index, shadows

    def __getitem__(self, key: str) -> list[Tensor]:
        return [rows[self.index[key]] for rows in self.shadows]


class AveragesPlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Evaluates every averaging of its rule list as a track (see the module docstring); ``task_steps``: the
    first task's optimizer steps (horizons in tasks), which a cl_ema run gives the plugin itself."""

    def __init__(self, options: Averages | None = None, /, *, task_steps: int | None = None, **kwargs: Any) -> None:
        self.options = options if options is not None else Averages(**kwargs)
        self.setup(self.options.rules, self.options.buffers, task_steps)

    def setup(self, entries: list[dict[str, Any]], buffers: Buffers, task_steps: int | None) -> None:
        """The averagings of the rule entries, and the rows they keep (each key once, in engine order)."""
        SupervisedPlugin.__init__(self)
        self.buffers = buffers
        self.averagings = [_averaging(index, entry, task_steps) for index, entry in enumerate(entries)]
        self.rows: dict[str, RowSpec] = {}
        for made in self.averagings:
            for key, spec in made.rows.items():
                self.rows.setdefault(key, spec)
        self.index = {key: k for k, key in enumerate(self.rows)}
        self.tasks = 0  # task ends seen (the merges' count)
        self.layout: Layout | None = None

    def engine_rules(self) -> list[Rule]:
        return [spec.rule() if isinstance(spec, Follow) else Frozen() for spec in self.rows.values()]

    def registered(self) -> None:
        engine = self.engine
        self.layout = Layout(tuple(tuple(zip(g.names, g.sizes)) for g in engine.groups))
        for key, spec in self.rows.items():
            if isinstance(spec, Accumulator):  # what accumulates starts from nothing
                for row in engine.shadow_rows(self.index[key]):
                    row.zero_()

    def moment(self) -> Moment:
        assert self.layout is not None
        return Moment(self.engine.step, self.tasks, self.layout)

    def after_update(self, strategy, **kwargs) -> None:
        self.engine.update()

    def before_training_exp(self, strategy, **kwargs) -> None:
        engine = self.engine
        for key, spec in self.rows.items():
            k = self.index[key]
            if isinstance(spec, Snapshot) and spec.at == Event.task_start:
                engine.snapshot(k)
            elif isinstance(spec, Follow) and spec.restart:  # until the first step, the mean is the weights now
                engine.snapshot(k)
                engine.reset(k)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        hooks = [made.at_task_end for made in self.averagings if made.at_task_end is not None]
        if hooks:
            engine, moment = self.engine, self.moment()
            rows, live = _Rows(self.index, [g.shadow for g in engine.groups]), engine.live_values()
            for hook in hooks:
                hook(rows, live, moment)
        self.tasks += 1

    def tracks(self) -> list[Track]:
        return [
            Track(
                made.name,
                partial(self.swapped, made),
                made.family,
                made.decay,
                made.horizon,
                made.info,
                partial(self.state, made),
            )
            for made in self.averagings
        ]

    def computed(self, made: Averaging) -> Compute:
        """The engine's computation of the averaging's weights, as they are now; refused if they are not finite
        (a scale so large that the weights overflow would otherwise be evaluated as if it meant something)."""
        moment = self.moment()

        def compute(shadows: list[Tensor], live: list[Tensor]) -> list[Tensor]:
            weights = made.weights(_Rows(self.index, shadows), live, moment)
            if not all(bool(torch.isfinite(w).all()) for w in weights):
                raise UserError(
                    f"{made.name}: its weights are not finite numbers (an option of rule {made.family} too large?)"
                )
            return weights

        return compute

    def swapped(self, made: Averaging) -> AbstractContextManager[None]:
        """``with plugin.swapped(averaging):`` the model holds the averaging's weights."""
        return self.engine.swapped_to(self.computed(made))

    def state(self, made: Averaging) -> dict[str, Tensor]:
        """The averaging's weights by tensor name, without loading them into the model."""
        return self.engine.state(self.computed(made))

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.engine.state_dict(), "tasks": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tasks = state.get("tasks")
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0:
            raise ValueError(f"the averages' task count {tasks!r} is not a count")
        self.engine.load_state_dict(state.get("averages") or {})
        self.tasks = tasks

    def check_position(self, at: Position) -> None:
        """One task end per finished task, one update per step, and each row's updates as many as its rule
        was due since it started (a mean over the current task: since the last task began)."""
        self.check_steps(at)
        if self.tasks != at.tasks_done:
            raise ValueError(f"its task count {self.tasks} is not the run's {at.tasks_done}")
        for (key, spec), rule in zip(self.rows.items(), self.engine.rules):
            if isinstance(spec, Follow):
                expected = rule.due_between(at.last_task_start if spec.restart else 0, at.steps)
                if rule.due != expected:
                    track = next(made.name for made in self.averagings if key in made.rows)
                    raise ValueError(f"the average of track {track} was due {rule.due} updates, not {expected}")
