"""Averaging rules, one function each, and the update rules they are made of.

Part of the engine (``cl_ema.ema`` holds the weights; this module says how they are averaged). It
imports no torch: a rule's options are checked before torch is loaded, and a rule's arithmetic uses
the tensors' own methods. ``cl_ema.profiles`` reads the same update rules as weight vectors over the
steps.

**Update rules.** A shadow ``s`` follows the averaged tensors θ: after every optimizer step its rule
gives the weight ``w`` of the live weights, and ``s ← (1 − w) · s + w · θ``, computed as
``s.lerp_(θ, w)`` (``w = 0``: unchanged). With ``t`` the updates this shadow has been due before
this one (from 0) and ``s`` the optimizer steps so far (from 1):

- ``EMARule(d)``, exponential moving average: ``w = 1 − d``; horizon ``every / (1 − d)`` steps.
  Its schedule (``EMAOptions.schedule``): ``constant``; ``warmup`` (timm's ``ModelEmaV3``,
  ema-pytorch): ``d_t = clamp(1 − (1 + t/γ)^(−p), 0, d)``, so the first update copies θ; ``step``
  (the temporal ensembles of Soutif-Cormerais, Carta & van de Weijer, CoLLAs 2023, ``online_ema``'s
  ``step_rampup``): ``d_t = d_0`` while ``t ≤ W``, then ``d``.
- ``MeanRule(weighting)``, the weighted mean of the iterates since the start or the last reset,
  ``Σ_n c_n θ_n / Σ_n c_n`` as the running update ``w_n = c_n / Σ_{i≤n} c_i`` (``n = t + 1``):
  ``uniform`` ``c_n = 1``, ``w = 1/n`` (SWA, Izmailov et al. 2018; torch's ``AveragedModel``);
  ``linear`` ``c_n = n``, ``w = 2/(n + 1)``; ``quadratic`` ``c_n = Σ_{i≤n} i²`` (``online_ema``'s
  ``mean_ensembling``), ``w = 2(2n + 1) / ((n + 1)(n + 2))``. The first update copies θ.
- ``PowerEMARule(κ, ρ, γ)``, BEMA's EMA: ``w = (1 + γ · (s − τ + ρ))^(−κ)`` (see ``bema``).
- ``StochasticEMARule(d, p, draw)`` (CLS-ER, Arani et al. 2022): with probability ``p`` (one ``draw()``
  per step) ``w = 1 − min(1 − 1/(s + 1), d)``, else ``w = 0``.
- ``Frozen()``: never moves; its owner sets it (a snapshot, an accumulator).

Every rule may update on every ``every``-th step only.

**Averaging rules.** An evaluation-only averaging rule is a function registered with ``@rule``: its
typed parameters are its options (``averages.rules=[{rule: bema, lag: 20}]``), and it returns an
``Averaging``: the rows it keeps (shadows that follow an update rule, snapshots of the live weights,
accumulators updated at task ends) and how the weights it evaluates are computed from them. Rows
that several averagings ask for under one key (the starting weights, say) are kept once.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import Field, Strict

from cl_ema.options import (
    Choice,
    Count,
    Fraction,
    NonNegative,
    OptionError,
    Positive,
    Share,
    arguments,
    check,
    options,
)

if TYPE_CHECKING:
    from torch import Tensor


class Buffers(Choice):
    average = "average"  # BatchNorm statistics are averaged like the weights
    copy = "copy"  # an average evaluates with the live model's statistics


class Schedule(Choice):
    constant = "constant"
    warmup = "warmup"  # timm's ModelEmaV3 / ema-pytorch ramp
    step = "step"  # online_ema's temporal ensembles: a short decay until W updates, then the decay


class Weighting(Choice):
    uniform = "uniform"  # SWA
    linear = "linear"
    quadratic = "quadratic"  # online_ema's: c_n = Σ_{i≤n} i²


class Scope(Choice):
    stream = "stream"  # every iterate since training started
    task = "task"  # the current task's iterates only (restarted at each task start)


class Anchor(Choice):
    init = "init"  # the weights training started from (pretrained ones, where the run starts from them)
    prev_task = "prev_task"  # the previous task's final weights (the start of the current task)


@options
class EMAOptions:
    """How an EMA follows the weights (formulas in the module docstring)."""

    update_every: Count = 1  # update on every N-th optimizer step; the horizon is then N/(1 − d) steps
    schedule: Schedule = Schedule.constant
    warmup_gamma: Positive = 1.0  # γ of the warmup schedule
    warmup_power: Positive = 2 / 3  # p of the warmup schedule
    step_decay: Fraction = 0.9  # d_0 of the step schedule (online_ema: 0.9)…
    step_updates: NonNegative | None = None  # …for W updates (null: 0, or step_tasks), or:
    step_tasks: Positive | None = None  # …for this many tasks' worth of steps (online_ema: 1)

    def __post_init__(self) -> None:
        if self.step_tasks is not None and self.step_updates is not None:
            raise OptionError("step_tasks", self.step_tasks, "give step_updates or step_tasks, not both")

    def short_phase(self, task_steps: int | None) -> float:
        """W of the step schedule, in updates (``step_tasks`` needs the steps of a task)."""
        if self.step_tasks is None:
            return self.step_updates or 0.0
        if task_steps is None:
            raise OptionError("step_tasks", self.step_tasks, "needs the optimizer steps of the first task")
        return self.step_tasks * task_steps / self.update_every


def warmup_decay(decay: float, t: int, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay of the update after ``t`` earlier ones, under warmup: ``clamp(1 − (1 + t/γ)^(−p), 0, decay)``."""
    return max(0.0, min(decay, 1.0 - (1.0 + t / gamma) ** -power))


def mean_weight(n: int, weighting: Weighting = Weighting.uniform) -> float:
    """Weight of the ``n``-th iterate (from 1) in the running update of a weighted mean of iterates."""
    if weighting == Weighting.uniform:
        return 1.0 / n
    if weighting == Weighting.linear:
        return 2.0 / (n + 1)
    return 2.0 * (2 * n + 1) / ((n + 1) * (n + 2))


def decay_for_horizon(steps: float) -> float:
    """The decay whose horizon ``1/(1 − d)`` is ``steps`` updates (at least one)."""
    if not (math.isfinite(steps) and steps >= 1):
        raise OptionError("horizon", steps, "must span at least one update")
    return 1.0 - 1.0 / steps


# ---------------------------------------------------------------------------- update rules
class Rule(ABC):
    """How one shadow follows the weights: the weight ``w`` of the live weights in each update."""

    def __init__(self, every: int = 1) -> None:
        self.every = check("every", every, Count)
        self.due = 0  # updates due so far (on every ``every``-th step)

    def next_weight(self, step: int) -> float:
        """``w`` of the update after optimizer step ``step`` (from 1); 0 leaves the shadow as it is."""
        if step % self.every:
            return 0.0
        weight = self.weight(step)
        self.due += 1
        return weight

    @abstractmethod
    def weight(self, step: int) -> float:
        """``w`` of a due update, ``self.due`` updates having been due before it."""

    @property
    def horizon(self) -> float | None:
        """Optimizer steps the shadow averages over (None: it grows without bound)."""
        return None

    def due_between(self, first: int, last: int) -> int:
        """Updates due after optimizer steps ``first + 1 … last`` (a resumed rule's ``due`` is checked by it)."""
        return last // self.every - first // self.every

    def reset(self) -> None:
        """Start again: the next due update of a mean copies the weights."""
        self.due = 0

    def state_dict(self) -> dict[str, Any]:
        return {"due": self.due}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        due = state.get("due")
        if isinstance(due, bool) or not isinstance(due, int) or due < 0:
            raise ValueError(f"a rule's update count {due!r} is not a count")
        self.due = due


class EMARule(Rule):
    """Exponential moving average of decay ``d``, with the schedule of ``options`` (``short_phase``: W of
    the step schedule, in updates, when the options give it in tasks)."""

    def __init__(self, decay: float, options: EMAOptions | None = None, short_phase: float | None = None) -> None:
        self.options = options or EMAOptions()
        super().__init__(self.options.update_every)
        self.decay = check("decay", decay, Fraction)
        self.short_phase = self.options.short_phase(None) if short_phase is None else short_phase

    def current_decay(self) -> float:
        o = self.options
        if o.schedule == Schedule.warmup:
            return warmup_decay(self.decay, self.due, o.warmup_gamma, o.warmup_power)
        if o.schedule == Schedule.step and self.due <= self.short_phase:
            return o.step_decay
        return self.decay

    def weight(self, step: int) -> float:
        return 1.0 - self.current_decay()

    @property
    def horizon(self) -> float:
        return math.inf if self.decay == 1.0 else self.every / (1.0 - self.decay)


class MeanRule(Rule):
    """The ``weighting``-weighted mean of the iterates since the start or the last ``reset()``."""

    def __init__(self, weighting: Weighting = Weighting.uniform, every: int = 1) -> None:
        super().__init__(every)
        self.weighting = check("weighting", weighting, Weighting)

    def weight(self, step: int) -> float:
        return mean_weight(self.due + 1, self.weighting)


class PowerEMARule(Rule):
    """BEMA's EMA: it copies the weights at step ``τ`` (when τ > 0; from the start when τ = 0), then
    ``w = max((1 + γ · max(s − τ + ρ, 1))^(−κ), floor)`` on every ``every``-th step after ``τ``."""

    def __init__(self, power: float, lag: float, multiplier: float, after: int, floor: float, every: int) -> None:
        super().__init__(every)
        self.power, self.lag, self.multiplier, self.after, self.floor = power, lag, multiplier, after, floor

    def next_weight(self, step: int) -> float:
        if step == self.after:  # the burn-in ends: the EMA starts from the weights now
            self.due += 1
            return 1.0
        if step < self.after or (step - self.after) % self.every:
            return 0.0
        self.due += 1
        return self.weight(step)

    def due_between(self, first: int, last: int) -> int:
        start = int(first < self.after <= last)
        return start + max(last - self.after, 0) // self.every - max(first - self.after, 0) // self.every

    def weight(self, step: int) -> float:
        t = max(step - self.after + self.lag, 1)  # the authors' "shared t (with scaling lag)"
        return max((1 + self.multiplier * t) ** -self.power, self.floor)


class StochasticEMARule(Rule):
    """CLS-ER's EMA: updated with probability ``p``, with a decay that warms up with the step count.

    ``draw()`` gives one uniform number in [0, 1) per step; its owner keeps (and saves) the generator
    behind it (several rules may share one, drawing in the order of their shadows).
    """

    def __init__(self, decay: float, probability: float, draw: Callable[[], float]) -> None:
        super().__init__()
        self.decay = check("decay", decay, Fraction)
        self.probability = check("probability", probability, Fraction)
        self.draw = draw

    def weight(self, step: int) -> float:
        updated = self.draw() < self.probability
        return 1.0 - min(1.0 - 1.0 / (step + 1), self.decay) if updated else 0.0

    @property
    def horizon(self) -> float | None:
        if self.decay == 1.0 or self.probability == 0.0:
            return None
        return 1.0 / (self.probability * (1.0 - self.decay))


class Frozen(Rule):
    """A shadow no update moves: a snapshot or an accumulator, set by its owner."""

    def weight(self, step: int) -> float:
        return 0.0


# ---------------------------------------------------------------------------- averaging rules
class Event(Choice):
    start = "start"  # when the rows are made: the weights training starts from
    task_start = "task_start"  # before each task's first step


@dataclass(frozen=True)
class Follow:
    """A row that follows the weights by an update rule; ``restart``: set to the live weights, and the rule
    reset, at each task start (a mean over the current task)."""

    rule: Callable[[], Rule]
    restart: bool = False


@dataclass(frozen=True)
class Snapshot:
    """A row set to the live weights at ``at`` (the start, or each task start)."""

    at: Event


@dataclass(frozen=True)
class Accumulator:
    """A row that starts at 0 and that its averaging updates at each task end."""


RowSpec = Follow | Snapshot | Accumulator


@dataclass(frozen=True)
class Layout:
    """Where each averaged tensor lies in the flat rows: per group (device, dtype), its tensors' names and
    sizes in order."""

    groups: tuple[tuple[tuple[str, int], ...], ...]

    def depths(self) -> dict[str, int]:
        """Each tensor's layer: the rank of its module among the modules that own averaged tensors, in the
        model's order (``features.0.weight`` and ``features.0.bias`` share one)."""
        modules: dict[str, int] = {}
        for group in self.groups:
            for name, _ in group:
                modules.setdefault(name.rpartition(".")[0], len(modules))
        return {name: modules[name.rpartition(".")[0]] for group in self.groups for name, _ in group}


@dataclass(frozen=True)
class Moment:
    """When an averaging is evaluated or updated: optimizer steps and tasks finished so far."""

    step: int
    tasks: int
    layout: Layout


class Rows(Protocol):
    def __getitem__(self, key: str) -> list[Tensor]:
        """The row of ``key``, one flat fp32 tensor per group."""
        ...


Weights = Callable[[Rows, list["Tensor"], Moment], list["Tensor"]]


@dataclass
class Averaging:
    """One evaluation track: the rows it keeps (by key) and the weights it evaluates, per group."""

    name: str
    family: str  # the rule's name: the report colours and marks tracks by it
    rows: dict[str, RowSpec]
    weights: Weights
    at_task_end: Callable[[Rows, list[Tensor], Moment], None] | None = None
    decay: float | None = None
    horizon: float | None = None  # optimizer steps it averages over (an EMA's)
    info: dict[str, Any] = field(default_factory=dict)  # more of its description for results.json


@dataclass(frozen=True)
class Context:
    """What a rule may need of the run besides its options."""

    task_steps: int | None = None  # optimizer steps of the first task (horizons in tasks)


RULES: dict[str, Callable[..., Averaging]] = {}


def rule(function: Callable[..., Averaging]) -> Callable[..., Averaging]:
    """Register an averaging rule under its function's name; its typed parameters are its options, and a
    parameter named ``context`` receives the run's ``Context``."""
    RULES[function.__name__] = function
    return function


def check_entry(entry: Any) -> dict[str, Any]:
    """An entry of a rule list, ``{rule: <name>, [name: <track>], **options}``, checked against its rule's
    signature (the run's context is not needed yet), its options converted; OptionError naming the option."""
    if not isinstance(entry, Mapping):
        raise OptionError("rule", entry, "each entry is {rule: <name>, <option>: <value>, …}")
    values = dict(entry)
    rule_name, track = values.pop("rule", None), values.pop("name", None)
    if rule_name not in RULES:
        raise OptionError("rule", rule_name, f"must be one of {', '.join(sorted(RULES))}")
    checked = arguments(RULES[rule_name], values, given=("context",))
    named = {} if track is None else {"name": check("name", track, str)}
    return {"rule": rule_name, **named, **{k: checked[k] for k in values}}


def averaging(entry: Mapping[str, Any], context: Context = Context()) -> Averaging:
    """The averaging of one rule-list entry (``check_entry``), in the run's ``context``."""
    values = check_entry(entry)
    function, track = RULES[values.pop("rule")], values.pop("name", None)
    if "context" in inspect.signature(function).parameters:
        values["context"] = context
    made = function(**values)
    if track is not None:
        made.name = track
    return made


def number(value: float) -> str:
    """``value`` in a track name: short (``0.999``), and exact where the short form is not."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def ema_name(decay: float, *, horizon: float | None = None, schedule: str = "constant") -> str:
    """``ema_0.999``; ``ema_step_0.99`` for a schedule; ``ema_h1_0.999167`` for a horizon of 1 task."""
    parts = ["ema"]
    if schedule != "constant":
        parts.append(schedule)
    if horizon is not None:
        parts += [f"h{number(horizon)}", f"{decay:.6g}"]
    else:
        parts.append(number(decay))
    return "_".join(parts)


def _row(key: str) -> Weights:
    """The weights of one row as they are."""
    return lambda rows, live, at: rows[key]


# ---------------------------------------------------------------------------- the rules
@rule
def ema(
    decay: Fraction = 0.999,
    horizon: Positive | None = None,
    update_every: Count = 1,
    schedule: Schedule = Schedule.constant,
    warmup_gamma: Positive = 1.0,
    warmup_power: Positive = 2 / 3,
    step_decay: Fraction = 0.9,
    step_updates: NonNegative | None = None,
    step_tasks: Positive | None = None,
    context: Context = Context(),
) -> Averaging:
    """Exponential moving average (formulas and schedules: the module docstring), of ``decay``, or of a
    ``horizon`` in tasks: ``d = 1 − update_every / (h · S)``, ``S`` the first task's optimizer steps."""
    settings = EMAOptions(update_every, schedule, warmup_gamma, warmup_power, step_decay, step_updates, step_tasks)
    if horizon is not None:
        decay = horizon_decay(horizon, context.task_steps, update_every)
    short = settings.short_phase(context.task_steps)
    key = f"ema:{decay!r}:{settings}:{short!r}"
    return Averaging(
        ema_name(decay, horizon=horizon, schedule=str(schedule)),
        "ema",
        {key: Follow(lambda: EMARule(decay, settings, short))},
        _row(key),
        decay=decay,
        horizon=EMARule(decay, settings, short).horizon,
        info={"horizon_tasks": horizon},
    )


Scale = Annotated[float, Strict(), Field(gt=0, le=1e3)]  # a multiple of a task vector


def horizon_decay(horizon: float, task_steps: int | None, update_every: int = 1) -> float:
    """The decay of an EMA of ``horizon`` tasks of ``task_steps`` optimizer steps, updated every ``update_every``."""
    if task_steps is None:
        raise OptionError("horizon", horizon, "needs the optimizer steps of the first task")
    try:
        return decay_for_horizon(horizon * task_steps / update_every)
    except OptionError:
        raise OptionError("horizon", horizon, f"must span one update ({task_steps} steps a task)") from None


@rule
def mean(weighting: Weighting = Weighting.uniform, scope: Scope = Scope.stream, update_every: Count = 1) -> Averaging:
    """The ``weighting``-weighted mean of the iterates (formulas: the module docstring), one every
    ``update_every`` optimizer steps, over the stream or over the current task: ``swa`` (uniform over the
    stream: SWA, torch's ``AveragedModel``), ``swa_task``, ``swa_linear``, ``swa_quadratic_task``, …"""
    key = f"mean:{weighting}:{scope}:{update_every}"
    name = (
        "swa" + ("" if weighting == Weighting.uniform else f"_{weighting}") + ("_task" if scope == Scope.task else "")
    )
    return Averaging(
        name, "swa", {key: Follow(lambda: MeanRule(weighting, update_every), scope == Scope.task)}, _row(key)
    )


def _anchor(anchor: Anchor) -> tuple[str, Snapshot]:
    return f"snapshot:{anchor}", Snapshot(Event.start if anchor == Anchor.init else Event.task_start)


@rule
def wise(anchor: Anchor = Anchor.init, alpha: Fraction = 0.5) -> Averaging:
    """WiSE-FT's interpolation (Wortsman et al., CVPR 2022) ``(1 − α) · θ_a + α · θ``, computed as
    ``θ_a.lerp(θ, α)`` (α = 0: the anchor, 1: the weights, exactly), with the anchor θ_a the weights training
    started from (``init``) or the previous task's final weights (``prev_task``): ``wise_init_0.5``, …"""
    key, spec = _anchor(anchor)
    return Averaging(
        f"wise_{anchor}_{number(alpha)}",
        "wise",
        {key: spec},
        lambda rows, live, at: [start.lerp(now, alpha) for start, now in zip(rows[key], live)],
    )


# Task-vector merges. With θ_0 the weights training started from and θ_i the weights at the end of task i,
# the task vectors are τ_i = θ_i − θ_0 (MagMax, Marczak et al., ECCV 2024, ``danielm1405/magmax``: sequential
# fine-tuning, so each τ_i is cumulative). Each merge is kept incrementally in rows of the model's size,
# one task at a time, so no rule keeps one snapshot per task. Before the first task ends each is θ_0.
START, START_ROW = _anchor(Anchor.init)


def _task_vectors(rows: Rows, live: list[Tensor]) -> list[Tensor]:
    return [now - start for now, start in zip(live, rows[START])]


@rule
def merge_mean() -> Averaging:
    """The mean merge ``θ_0 + (1/t) Σ_i τ_i`` (= the mean of the θ_i), from a running sum of the θ_i."""

    def add(rows: Rows, live: list[Tensor], at: Moment) -> None:
        for total, now in zip(rows["merge:sum"], live):
            total.add_(now)

    def weights(rows: Rows, live: list[Tensor], at: Moment) -> list[Tensor]:
        return [total / at.tasks for total in rows["merge:sum"]] if at.tasks else rows[START]

    return Averaging("merge_mean", "merge_mean", {START: START_ROW, "merge:sum": Accumulator()}, weights, add)


@rule
def magmax(scale: Scale = 0.5) -> Averaging:
    """MagMax: ``θ_0 + λ · m``, ``m`` per entry the τ_i of largest magnitude, the later task on a tie (their
    ``merge_max_abs``, λ = 0.5)."""

    def keep_largest(rows: Rows, live: list[Tensor], at: Moment) -> None:
        for largest, vector in zip(rows["magmax:largest"], _task_vectors(rows, live)):
            largest.copy_(vector.where(vector.abs() >= largest.abs(), largest))

    def weights(rows: Rows, live: list[Tensor], at: Moment) -> list[Tensor]:
        return [start + scale * largest for start, largest in zip(rows[START], rows["magmax:largest"])]

    return Averaging(
        f"magmax{_unless_default(scale, 0.5)}",
        "magmax",
        {START: START_ROW, "magmax:largest": Accumulator()},
        weights,
        keep_largest,
    )


@rule
def ties(scale: Scale = 0.55, keep: Share = 0.2) -> Averaging:
    """TIES (Yadav et al., NeurIPS 2023), as MagMax's ``merge_splitted.py`` runs it: each τ_i keeps its
    ``keep`` (20 %) largest magnitudes over all its entries (the rest 0: ``trim``); per entry the elected sign
    is that of Σ_i τ̂_i (where that is 0: the sign of the sum of every entry's elected sign); the merge is
    ``θ_0 + λ ·`` the mean of the τ̂_i that agree with it (disjoint mean), λ = 0.55. Kept as the sums and
    counts of the positive and the negative trimmed entries ``P, N, c_P, c_N``: the elected sign is
    ``sign(P + N)``, the disjoint mean ``P / c_P`` or ``N / c_N``."""
    names = [f"ties:{keep!r}:{part}" for part in ("positive", "negative", "positives", "negatives")]

    def add(rows: Rows, live: list[Tensor], at: Moment) -> None:
        trimmed = trim(_task_vectors(rows, live), keep)
        for positive, negative, positives, negatives, vector in zip(*(rows[n] for n in names), trimmed):
            positive.add_(vector.clamp(min=0))
            negative.add_(vector.clamp(max=0))
            positives.add_(vector > 0)
            negatives.add_(vector < 0)

    def weights(rows: Rows, live: list[Tensor], at: Moment) -> list[Tensor]:
        positive, negative, positives, negatives = (rows[n] for n in names)
        votes = [(p + n).sign().sum() for p, n in zip(positive, negative)]
        majority = functools.reduce(operator.add, votes).sign()
        merged = []
        for start, p, n, cp, cn in zip(rows[START], positive, negative, positives, negatives):
            elected = (p + n).sign()
            elected = majority.expand_as(elected).where(elected == 0, elected)
            mean = (p / cp.clamp(min=1)).where(elected > 0, n / cn.clamp(min=1))
            merged.append(start + scale * mean)
        return merged

    rows: dict[str, RowSpec] = {START: START_ROW, **{n: Accumulator() for n in names}}
    return Averaging(
        f"ties{_unless_default(scale, 0.55)}{_unless_default(keep, 0.2, '_keep')}", "ties", rows, weights, add
    )


def trim(task_vectors: list[Tensor], keep: float) -> list[Tensor]:
    """TIES's trimming of one task vector (given per group): all but the ``keep`` fraction largest
    magnitudes, counted over all its entries, set to 0 (entries equal to the threshold are kept)."""
    sizes = [t.numel() for t in task_vectors]
    magnitudes = task_vectors[0].new_empty(sum(sizes))
    for piece, vector in zip(magnitudes.split(sizes), task_vectors):
        piece.copy_(vector.abs().flatten())
    k = magnitudes.numel() - int(magnitudes.numel() * keep)
    if k <= 0:
        return [t.clone() for t in task_vectors]
    threshold = magnitudes.kthvalue(k).values
    return [t * (t.abs() >= threshold) for t in task_vectors]


def _unless_default(value: float, default: float, prefix: str = "_") -> str:
    """A suffix naming an option in a track name when it is not the default (two settings, two names)."""
    return "" if value == default else f"{prefix}{number(value)}"


class StepSnapshotRule(Rule):
    """Copies the weights once, after optimizer step ``step`` (``w = 1`` then, 0 otherwise: ``lerp`` with
    weight 1 gives the weights exactly)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def weight(self, step: int) -> float:
        return 1.0 if step == self.step else 0.0


@rule
def bema(
    update_every: Count = 400,
    ema_power: NonNegative = 0.5,
    bias_power: NonNegative = 0.2,
    lag: NonNegative = 10.0,
    multiplier: Positive = 1.0,
    update_after: Annotated[int, Strict(), Field(ge=0)] = 0,
    min_ema_multiplier: Fraction = 0.0,
) -> Averaging:
    """BEMA, the bias-corrected EMA (Block & Zhang 2025, "EMA Without the Lag"; the authors' ``abblock/bema``
    ``src/core_online.py`` and TRL's ``BEMACallback``, whose defaults these are)::

        θ'_s = α_s · (θ_s − θ_τ) + EMA_s,       α_s = (1 + γ · t_s)^(−η),    t_s = max(s − τ + ρ, 1)
        EMA ← (1 − β_s) · EMA + β_s · θ_s        every φ-th step after τ,    β_s = max((1 + γ · t_s)^(−κ), β_min)

    with θ_τ the weights after the burn-in step τ (``update_after``; the starting weights for τ = 0), where
    the EMA starts too; φ = ``update_every``, κ = ``ema_power``, η = ``bias_power``, ρ = ``lag``,
    γ = ``multiplier``, β_min = ``min_ema_multiplier``. The authors refresh the evaluated weights every φ
    steps only; here ``θ'_s`` is computed from the current weights whenever the track is evaluated."""
    settings = (update_every, ema_power, bias_power, lag, multiplier, update_after, min_ema_multiplier)
    key = f"bema:{settings!r}"
    rows: dict[str, RowSpec] = {
        f"{key}:ema": Follow(
            lambda: PowerEMARule(ema_power, lag, multiplier, update_after, min_ema_multiplier, update_every)
        ),
        f"{key}:anchor": Snapshot(Event.start) if update_after == 0 else Follow(lambda: StepSnapshotRule(update_after)),
    }

    def weights(rows: Rows, live: list[Tensor], at: Moment) -> list[Tensor]:
        if at.step <= update_after:  # burn-in: the live weights
            return live
        alpha = (1 + multiplier * max(at.step - update_after + lag, 1)) ** -bias_power
        return [
            average + alpha * (now - anchor)
            for average, now, anchor in zip(rows[f"{key}:ema"], live, rows[f"{key}:anchor"])
        ]

    return Averaging("bema", "bema", rows, weights)


@rule
def lines(alpha: Fraction = 0.5, anchor: Anchor = Anchor.init) -> Averaging:
    """LiNeS, layer-increasing network scaling (Wang et al., ICLR 2025, ``wang-kee/LiNeS``): the task vector
    ``τ = θ − θ_a`` scaled by depth, ``θ_a + λ(ℓ) · τ_ℓ`` with ``λ(ℓ) = α + (1 − α) · ℓ / (L − 1)`` for layer
    ℓ = 0 … L − 1: the first layer keeps the share α of its change, the last one all of it (their single-task
    form, β = 1 − α). Layers are the modules that own averaged tensors, in the model's order (``Layout``);
    the anchor θ_a is the starting weights (``init``) or the previous task's (``prev_task``)."""
    key, spec = _anchor(anchor)
    scales: dict[Layout, list[Tensor]] = {}

    def layer_scales(layout: Layout, like: list[Tensor]) -> list[Tensor]:
        if layout not in scales:
            depth = layout.depths()
            last = max(max(depth.values()), 1)
            scales[layout] = []
            for group, flat in zip(layout.groups, like):
                scale = flat.new_empty(flat.numel())
                for piece, (name, _) in zip(scale.split([n for _, n in group]), group):
                    piece.fill_(alpha + (1 - alpha) * depth[name] / last)
                scales[layout].append(scale)
        return scales[layout]

    def weights(rows: Rows, live: list[Tensor], at: Moment) -> list[Tensor]:
        return [
            start + scale * (now - start) for start, now, scale in zip(rows[key], live, layer_scales(at.layout, live))
        ]

    return Averaging(f"lines_{anchor}_{number(alpha)}", "lines", {key: spec}, weights)
