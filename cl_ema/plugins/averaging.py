"""Evaluation-only averages of the live trajectory besides the EMA: means of iterates, interpolations,
merges of task vectors. Each is a plugin with its options on its class; none changes training, so one
run evaluates them all beside ``live``; each works in a stock Avalanche strategy too.

Memory (fp32 copies of the model's averaged tensors, in the device's memory): a mean, one per track;
an interpolation, one per anchor; the merges, one for θ_0 plus one for the mean, one for MagMax and
four for TIES. An average that does not fit is refused before training, naming the size.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_ema.ema import Buffers, Frozen, MeanRule, Rule, WeightAverages, Weighting
from cl_ema.merging import election, interpolate, magmax_step, ties_merge, ties_step, trim
from cl_ema.options import Choice, choice, choices, count, fraction, fractions, positive
from cl_ema.plugins import Track, number


class AveragingPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """What the averaging plugins share: an engine (``WeightAverages``) over the model, one shadow per
    rule of ``engine_rules()``, made by ``attach`` (in a stock strategy, in ``before_training``)."""

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
        if self.averages is None:  # a stock Avalanche strategy: the model is on its device by now
            self.attach(strategy.model)

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


class Scope(Choice):
    stream = "stream"  # every iterate since training started
    task = "task"  # the current task's iterates only (restarted at each task start)


@dataclass(eq=False)
class MeanPlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Means of the iterates (one per optimizer step, or every ``update_every``): one track for each
    of ``weightings`` × ``scopes``: ``swa`` (uniform over the stream: SWA, torch's AveragedModel),
    ``swa_task`` (uniform over the current task), ``swa_linear``, ``swa_quadratic`` (online_ema's
    weighted means), … (formulas: ``cl_ema.ema``)."""

    weightings: list[Weighting] = field(default_factory=lambda: [Weighting.uniform])
    scopes: list[Scope] = field(default_factory=lambda: [Scope.stream, Scope.task])
    update_every: int = 1
    buffers: Buffers = Buffers.average

    def __post_init__(self) -> None:
        super().__init__()
        self.weightings = choices("weightings", self.weightings, Weighting)
        self.scopes = choices("scopes", self.scopes, Scope)
        count("update_every", self.update_every)
        self.buffers = choice("buffers", self.buffers, Buffers)
        self.means = [(w, s) for w in self.weightings for s in self.scopes]

    def engine_rules(self) -> list[Rule]:
        return [MeanRule(weighting, self.update_every) for weighting, _ in self.means]

    def after_update(self, strategy, **kwargs) -> None:
        self.engine.update()

    def before_training_exp(self, strategy, **kwargs) -> None:
        for k, (_, scope) in enumerate(self.means):
            if scope == Scope.task:  # the mean starts again: until the first step it is the weights now
                self.engine.snapshot(k)
                self.engine.reset(k)

    def tracks(self) -> list[Track]:
        engine = self.engine
        return [
            Track("swa" + ("" if w == Weighting.uniform else f"_{w}") + ("_task" if s == Scope.task else ""),
                  partial(engine.swapped, k), "swa")
            for k, (w, s) in enumerate(self.means)
        ]  # fmt: skip


class Anchor(Choice):
    init = "init"  # the weights training started from (pretrained ones, where the run starts from them)
    prev_task = "prev_task"  # the previous task's final weights (the start of the current task)


@dataclass(eq=False)
class InterpolationPlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """WiSE-FT's interpolation ``(1 − α) · θ_anchor + α · θ`` for each anchor and each α in ``alphas``:
    tracks ``wise_init_<α>`` and ``wise_prev_task_<α>`` (the evaluation-only counterpart of CoMA)."""

    anchors: list[Anchor] = field(default_factory=lambda: [Anchor.init, Anchor.prev_task])
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    buffers: Buffers = Buffers.average

    def __post_init__(self) -> None:
        super().__init__()
        self.anchors = choices("anchors", self.anchors, Anchor)
        self.alphas = fractions("alphas", self.alphas)
        self.buffers = choice("buffers", self.buffers, Buffers)

    def engine_rules(self) -> list[Rule]:
        return [Frozen() for _ in self.anchors]

    def before_training_exp(self, strategy, **kwargs) -> None:
        if Anchor.prev_task in self.anchors:
            self.engine.snapshot(self.anchors.index(Anchor.prev_task))

    def tracks(self) -> list[Track]:
        return [
            Track(f"wise_{anchor}_{number(alpha)}", partial(self._interpolated, k, alpha), "wise")
            for k, anchor in enumerate(self.anchors)
            for alpha in self.alphas
        ]

    def _interpolated(self, row: int, alpha: float) -> AbstractContextManager[None]:
        return self.engine.swapped_to(lambda shadows, live: interpolate(shadows[row], live, alpha))


class Merge(Choice):
    mean = "mean"
    magmax = "magmax"
    ties = "ties"


@dataclass(eq=False)
class MergePlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Merges of the task vectors ``τ_i = θ_i − θ_0`` at the end of each task (``cl_ema.merging``):
    tracks ``merge_mean``, ``magmax`` (scale ``magmax_scale``, MagMax's 0.5) and ``ties`` (the
    ``ties_keep`` fraction of each τ kept, scale ``ties_scale``: MagMax's run of TIES, 0.2 and 0.55).
    Before the first task ends every merge is θ_0."""

    merges: list[Merge] = field(default_factory=lambda: [Merge.mean, Merge.magmax, Merge.ties])
    magmax_scale: float = 0.5
    ties_scale: float = 0.55
    ties_keep: float = 0.2
    buffers: Buffers = Buffers.average

    ROWS = {Merge.mean: ("sum",), Merge.magmax: ("largest",), Merge.ties: ("positive", "negative", "positives",
                                                                          "negatives")}  # fmt: skip

    def __post_init__(self) -> None:
        super().__init__()
        self.merges = choices("merges", self.merges, Merge)
        positive("magmax_scale", self.magmax_scale)
        positive("ties_scale", self.ties_scale)
        self.ties_keep = fraction("ties_keep", self.ties_keep)
        positive("ties_keep", self.ties_keep)
        self.buffers = choice("buffers", self.buffers, Buffers)
        names = ["start", *(row for merge in self.merges for row in self.ROWS[merge])]
        self.row = {name: k for k, name in enumerate(names)}
        self.tasks = 0  # task vectors merged so far

    def engine_rules(self) -> list[Rule]:
        return [Frozen() for _ in self.row]

    def registered(self) -> None:
        for name, k in self.row.items():
            if name != "start":  # what accumulates starts from nothing
                for row in self.engine.shadow_rows(k):
                    row.zero_()

    def _rows(self, name: str) -> list[Tensor]:
        return self.engine.shadow_rows(self.row[name])

    def after_training_exp(self, strategy, **kwargs) -> None:
        live = self.engine.live_values()
        vectors = [weights - start for weights, start in zip(live, self._rows("start"))]
        if Merge.mean in self.merges:
            for total, weights in zip(self._rows("sum"), live):
                total.add_(weights)
        if Merge.magmax in self.merges:
            for largest, vector in zip(self._rows("largest"), vectors):
                magmax_step(largest, vector)
        if Merge.ties in self.merges:
            rows = [self._rows(name) for name in self.ROWS[Merge.ties]]
            for positive, negative, positives, negatives, trimmed in zip(*rows, trim(vectors, self.ties_keep)):
                ties_step(positive, negative, positives, negatives, trimmed)
        self.tasks += 1

    def tracks(self) -> list[Track]:
        names = {Merge.mean: "merge_mean", Merge.magmax: "magmax", Merge.ties: "ties"}
        return [Track(names[merge], partial(self._merged, merge), str(merge)) for merge in self.merges]

    def _merged(self, merge: Merge) -> AbstractContextManager[None]:
        start, r = self.row["start"], self.row
        if merge == Merge.mean:
            tasks = self.tasks
            return self.engine.swapped_to(lambda s, live: s[r["sum"]] / tasks if tasks else s[start])
        if merge == Merge.magmax:
            return self.engine.swapped_to(lambda s, live: s[start] + self.magmax_scale * s[r["largest"]])
        majority = election(self._rows("positive"), self._rows("negative"))
        p, n, cp, cn = (r[name] for name in self.ROWS[Merge.ties])
        return self.engine.swapped_to(
            lambda s, live: s[start] + self.ties_scale * ties_merge(s[p], s[n], s[cp], s[cn], majority)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.engine.state_dict(), "tasks": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tasks = state.get("tasks")
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0:
            raise ValueError(f"the merges' task count {tasks!r} is not a count")
        self.engine.load_state_dict(state.get("averages") or {})
        self.tasks = tasks
