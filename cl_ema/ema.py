"""Averages of a model's weights, many from one training run: EMAs, means of iterates, CLS-ER's EMA.

A library: this module needs torch and nothing else (besides ``cl_ema.options``, plain Python).

    averages = EMA(model, [0.99, 0.999])       # or WeightAverages(model, [EMARule(0.999), MeanRule()])
    averages.register()                        # every shadow starts at the current weights
    for inputs, labels in loader:
        ...; optimizer.step(); averages.update()
    with averages.swapped(1):                  # the model holds shadow 1 (decay 0.999)…
        evaluate(model)                        # …and the live weights are back afterwards, bit for bit

Each average is a *shadow* ``s_k`` of the model's averaged tensors θ. On every ``update()`` (after
an optimizer step) the shadow's **rule** gives the weight ``w`` of the live weights, and

    s_k ← (1 − w) · s_k + w · θ               computed as  s_k.lerp_(θ, w)   (w = 0: unchanged)

The rules, with ``t`` the number of updates this shadow has been due before this one (from 0) and
``s`` the number of optimizer steps so far (from 1):

- ``EMARule(d)``, exponential moving average: ``w = 1 − d``; horizon ``every / (1 − d)`` steps.
  Its decay schedule (``EMAOptions.schedule``):
  ``constant``; ``warmup`` (timm's ``ModelEmaV3``, ema-pytorch): ``d_t = clamp(1 − (1 + t/γ)^(−p), 0, d)``,
  so the first update copies θ; ``step`` (the temporal ensembles of Soutif-Cormerais, Carta & van de
  Weijer, CoLLAs 2023, ``online_ema``'s ``step_rampup``): ``d_t = d_0`` while ``t ≤ W``, then ``d``.
- ``MeanRule(weighting)``, the weighted mean of the iterates since the start or the last ``reset``,
  ``s = Σ_n c_n θ_n / Σ_n c_n``, as the running update ``w_n = c_n / Σ_{i≤n} c_i`` (``n = t + 1``):
  ``uniform`` ``c_n = 1``, ``w = 1/n`` (SWA, Izmailov et al. 2018; torch ``AveragedModel``'s default);
  ``linear`` ``c_n = n``, ``w = 2/(n + 1)``; ``quadratic`` ``c_n = Σ_{i≤n} i²`` (what ``online_ema``'s
  ``mean_ensembling`` calls quadratic), ``w = 2(2n + 1) / ((n + 1)(n + 2))``. The first update copies θ.
- ``StochasticEMARule(d, p, generator)`` (CLS-ER, Arani et al. 2022): with probability ``p`` (one draw
  from ``generator`` per step) ``w = 1 − min(1 − 1/(s + 1), d)``, else ``w = 0``.

Every rule may update on every ``every``-th step only (``EMAOptions.update_every``).

Averaged tensors are the trainable parameters plus, with ``buffers="average"``, the floating-point
buffers (BatchNorm running mean/var). Integer buffers are never averaged; with ``buffers="copy"``
an average evaluates with the live model's statistics.

Speed: at ``register()`` the averaged tensors of each (device, dtype) are moved into one flat
buffer and the model's tensors become views of it (same Parameter objects, values and strides),
so an update is one ``lerp_`` over the flat buffer for one shadow, and one fused
``torch._foreach_lerp_`` over cache-sized chunks for several (each chunk of live weights is read
once for all shadows). Shadows are fp32 whatever the model's dtype. Nothing is allocated per update.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cl_ema.options import Choice, OptionError, at_least, choice, count, fraction, positive

# 256 Ki fp32 values: one chunk of live weights stays in a 1 MiB L2 while every shadow reads it.
_CHUNK = 1 << 18


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


@dataclass
class EMAOptions:
    """How EMA shadows follow the weights (formulas in the module docstring); all off by default."""

    update_every: int = 1  # update on every N-th optimizer step; the horizon is then N/(1 − d) steps
    schedule: Schedule = Schedule.constant
    warmup_gamma: float = 1.0  # γ of the warmup schedule
    warmup_power: float = 2 / 3  # p of the warmup schedule
    step_decay: float = 0.9  # d_0 of the step schedule (online_ema: 0.9)
    step_updates: float = 0.0  # W of the step schedule, in updates (online_ema: one task's steps)
    buffers: Buffers = Buffers.average

    def __post_init__(self) -> None:
        count("update_every", self.update_every)
        self.schedule = choice("schedule", self.schedule, Schedule)
        positive("warmup_gamma", self.warmup_gamma)
        positive("warmup_power", self.warmup_power)
        self.step_decay = fraction("step_decay", self.step_decay)
        at_least("step_updates", self.step_updates, 0, math.inf)
        self.buffers = choice("buffers", self.buffers, Buffers)


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


class Rule(ABC):
    """How one shadow follows the weights: the weight ``w`` of the live weights in each update."""

    def __init__(self, every: int = 1) -> None:
        count("every", every)
        self.every = every
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
    """Exponential moving average of decay ``d``, with the schedule of ``options``."""

    def __init__(self, decay: float, options: EMAOptions | None = None) -> None:
        self.options = options or EMAOptions()
        super().__init__(self.options.update_every)
        self.decay = fraction("decay", decay)

    def current_decay(self) -> float:
        o = self.options
        if o.schedule == Schedule.warmup:
            return warmup_decay(self.decay, self.due, o.warmup_gamma, o.warmup_power)
        if o.schedule == Schedule.step and self.due <= o.step_updates:
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
        self.weighting = choice("weighting", weighting, Weighting)

    def weight(self, step: int) -> float:
        return mean_weight(self.due + 1, self.weighting)


class StochasticEMARule(Rule):
    """CLS-ER's EMA: updated with probability ``p``, with a decay that warms up with the step count.

    One draw from ``generator`` per step; the generator's owner saves its state (several rules may
    share one, drawing in the order of their shadows).
    """

    def __init__(self, decay: float, probability: float, generator: torch.Generator) -> None:
        super().__init__()
        self.decay = fraction("decay", decay)
        self.probability = fraction("probability", probability)
        self.generator = generator

    def weight(self, step: int) -> float:
        updated = float(torch.rand((), generator=self.generator)) < self.probability
        return 1.0 - min(1.0 - 1.0 / (step + 1), self.decay) if updated else 0.0

    @property
    def horizon(self) -> float | None:
        if self.decay == 1.0 or self.probability == 0.0:
            return None
        return 1.0 / (self.probability * (1.0 - self.decay))


class Frozen(Rule):
    """A shadow no update moves: a snapshot, set by its owner (``WeightAverages.snapshot``)."""

    def weight(self, step: int) -> float:
        return 0.0


@dataclass
class _FlatGroup:
    """The averaged tensors of one (device, dtype): live views into ``live``, K shadow rows."""

    names: list[str]
    live: Tensor  # (N,) model dtype; the model's averaged tensors are views into it
    shadow: Tensor  # (K, N) fp32
    staging: Tensor | None  # (N,) fp32 copy of ``live`` when the model is not fp32
    backup: Tensor | None = None  # (N,) model dtype, allocated at the first swap
    shadow_chunks: list[Tensor] | None = None  # interleaved [s_0 c_0, s_1 c_0, …] for K > 1
    source_chunks: list[Tensor] | None = None  # the matching live (or staged) chunks

    def source(self) -> Tensor:
        """The live weights as fp32 (the live buffer itself when the model is fp32)."""
        if self.staging is None:
            return self.live
        self.staging.copy_(self.live)
        return self.staging


# per group: (shadow rows (K, N) fp32, live weights (N,) fp32) → weights to load (N,)
Compute = Callable[[Tensor, Tensor], Tensor]


class WeightAverages:
    """Shadows of a model's weights, one per rule, in one flat buffer (see the module docstring).

    ``swapped(k)`` / ``apply_shadow(k)`` load shadow ``k`` into the model, keeping a copy of the live
    weights and all buffers; ``restore()`` puts them back bit for bit. ``swapped_to(compute)`` loads
    any function of the shadows and the live weights (an interpolation, a merge).
    """

    def __init__(self, model: nn.Module, rules: Sequence[Rule], buffers: Buffers = Buffers.average) -> None:
        self.model = model
        self.rules = list(rules)
        self.buffers = choice("buffers", buffers, Buffers)
        self.step = 0  # calls of update(): optimizer steps seen
        self.groups: list[_FlatGroup] = []
        self._tensors: list[Tensor] = []  # the model's averaged tensors, in flat order
        self._data_ptrs: list[int] = []
        self._buffer_backup: list[Tensor] = []
        self._swapped = False

    def _averaged(self) -> Iterator[tuple[str, Tensor]]:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                yield name, param
        if self.buffers == Buffers.average:
            for name, buf in self.model.named_buffers():
                if buf.is_floating_point():
                    yield name, buf

    # ------------------------------------------------------------------ registration
    def shadow_bytes(self) -> int:
        """Memory the shadows take (fp32), whatever the model's dtype."""
        return 4 * len(self.rules) * sum(t.numel() for _, t in self._averaged())

    @torch.no_grad()
    def register(self) -> None:
        """Start every shadow at the model's current weights."""
        if self._swapped:
            raise RuntimeError("register() while a shadow is swapped in; call restore() first")
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor]]] = {}
        for name, tensor in self._averaged():
            by_key.setdefault((tensor.device, tensor.dtype), []).append((name, tensor))
        if not by_key:
            raise ValueError("the model has no trainable parameters to average (none with requires_grad)")
        for (device, _), items in by_key.items():
            _check_memory(device, 4 * len(self.rules) * sum(t.numel() for _, t in items), len(self.rules))
        self.groups, self._tensors = [], []
        for (device, dtype), items in by_key.items():
            tensors = [tensor for _, tensor in items]
            live = _flat_alias(tensors)  # already flat (another average on this model): share it
            if live is None:
                live = torch.empty(sum(t.numel() for t in tensors), device=device, dtype=dtype)
                offset = 0
                for tensor in tensors:
                    view = _dense_view(live[offset : offset + tensor.numel()], tensor)
                    view.copy_(tensor)
                    tensor.data = view  # same object, same values; storage now inside ``live``
                    offset += tensor.numel()
            self._tensors += tensors
            try:
                shadow = live.to(torch.float32).unsqueeze(0).repeat(len(self.rules), 1)
            except RuntimeError as err:  # the allocator's refusal (a memory limit the check above cannot see)
                if "alloc" not in str(err).lower() and "out of memory" not in str(err).lower():
                    raise
                size = 4 * len(self.rules) * live.numel() / 2**30
                raise MemoryError(f"{len(self.rules)} averaged copies of the model need {size:.2f} GiB: "
                                  f"{device} cannot allocate them") from None  # fmt: skip
            staging = None if dtype == torch.float32 else torch.empty_like(shadow[0])
            group = _FlatGroup([name for name, _ in items], live, shadow, staging)
            if len(self.rules) > 1:
                source = staging if staging is not None else live
                live_chunks = source.split(_CHUNK)
                rows = [row.split(_CHUNK) for row in shadow]
                group.shadow_chunks = [rows[k][c] for c in range(len(live_chunks)) for k in range(len(rows))]
                group.source_chunks = [chunk for chunk in live_chunks for _ in rows]
            self.groups.append(group)
        self._data_ptrs = [t.data_ptr() for t in self._tensors]
        self.step = 0
        for rule in self.rules:
            rule.reset()

    def _check_links(self) -> None:
        # model.to(), channels_last or load of a new state replaces tensor storage: the flat
        # buffer would then average stale values, so fail loudly instead.
        if any(t.data_ptr() != p for t, p in zip(self._tensors, self._data_ptrs)):
            raise RuntimeError(
                "the model's tensors were moved or replaced after register() "
                "(model.to(), channels_last, …): do that first, then register()"
            )

    def _check_model(self) -> None:
        """The model still holds the registered tensors (a replaced layer would not be averaged)."""
        if not self.groups:
            raise RuntimeError("register() first")
        current = [t for _, t in self._averaged()]
        if len(current) != len(self._tensors) or any(a is not b for a, b in zip(current, self._tensors)):
            raise RuntimeError(
                "a parameter or module of the model was replaced after register() (its shadows would follow the "
                "old tensors): register() again after changing the model"
            )
        self._check_links()

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimizer step: each shadow moves by its rule's weight."""
        if not self.groups:
            raise RuntimeError("update() before register()")
        if self._swapped:
            raise RuntimeError("update() while a shadow is swapped in; call restore() first")
        self.step += 1
        weights = [rule.next_weight(self.step) for rule in self.rules]
        active = [k for k, w in enumerate(weights) if w != 0.0]
        if not active:
            return
        self._check_links()
        for group in self.groups:
            source = group.source()
            if group.shadow_chunks is None or group.source_chunks is None:
                group.shadow[0].lerp_(source, weights[0])
            elif len(active) == len(weights):
                torch._foreach_lerp_(
                    group.shadow_chunks, group.source_chunks, weights * (len(group.shadow_chunks) // len(weights))
                )
            else:  # only some shadows move: their chunks alone
                picked = [i for i in range(len(group.shadow_chunks)) if i % len(weights) in active]
                torch._foreach_lerp_(
                    [group.shadow_chunks[i] for i in picked],
                    [group.source_chunks[i] for i in picked],
                    [weights[i % len(weights)] for i in picked],
                )

    def reset(self, index: int) -> None:
        """Rule ``index`` starts again (a mean's next update copies the weights)."""
        self.rules[index].reset()

    @torch.no_grad()
    def snapshot(self, index: int) -> None:
        """Shadow ``index`` ← the live weights (for rules that keep snapshots, such as task ends)."""
        self._check_model()
        for group in self.groups:
            group.shadow[index].copy_(group.source())

    @torch.no_grad()
    def live_values(self) -> list[Tensor]:
        """A fp32 copy of the live weights, per group."""
        self._check_model()
        return [group.live.to(torch.float32, copy=True) for group in self.groups]

    def shadow_rows(self, index: int) -> list[Tensor]:
        """Shadow ``index`` per group: views to read or to update in place (a rule kept by its owner)."""
        return [group.shadow[index] for group in self.groups]

    @torch.no_grad()
    def flat(self, value: Callable[[Tensor], Tensor | None]) -> list[Tensor]:
        """``value(t)`` of each averaged tensor ``t`` (e.g. its gradient), laid out like the shadows (fp32;
        zeros where it is None)."""
        self._check_model()
        flats, tensors = [], iter(self._tensors)
        for group in self.groups:
            flat, offset = torch.zeros_like(group.shadow[0]), 0
            for _ in group.names:
                tensor = next(tensors)
                got = value(tensor)
                if got is not None:  # into the tensor's place and layout in the flat buffer
                    _dense_view(flat[offset : offset + tensor.numel()], tensor).copy_(got)
                offset += tensor.numel()
            flats.append(flat)
        return flats

    # ------------------------------------------------------------------ swapping
    @contextmanager
    def swapped_to(self, compute: Compute) -> Iterator[None]:
        """``with averages.swapped_to(f):`` the model holds ``f(shadows, live)`` per group; restored on exit."""
        self._apply(compute)
        try:
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def _apply(self, compute: Compute) -> None:
        if self._swapped:
            raise RuntimeError("apply_shadow() twice without restore()")
        self._check_model()
        buffers = list(self.model.buffers())
        if len(self._buffer_backup) != len(buffers):
            self._buffer_backup = [b.clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_backup, buffers)
        values = [compute(group.shadow, group.source()) for group in self.groups]  # before the live is overwritten
        for group, value in zip(self.groups, values):
            if group.backup is None:
                group.backup = torch.empty_like(group.live)
            group.backup.copy_(group.live)
            group.live.copy_(value)
        self._swapped = True

    def apply_shadow(self, index: int = 0) -> None:
        """Load shadow ``index`` into the model, keeping the live weights (the seed's API)."""
        self._apply(lambda shadows, live: shadows[index])

    @torch.no_grad()
    def restore(self) -> None:
        """Put the live weights and buffers back, bit for bit."""
        if not self._swapped:
            raise RuntimeError("restore() without apply_shadow()")
        for group in self.groups:
            assert group.backup is not None
            group.live.copy_(group.backup)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, self._buffer_backup)
        self._swapped = False

    def swapped(self, index: int = 0) -> AbstractContextManager[None]:
        """``with averages.swapped(k):`` the model holds shadow ``k``; restored on exit."""
        return self.swapped_to(lambda shadows, live: shadows[index])

    @torch.no_grad()
    def load_into_live(self, compute: Compute) -> None:
        """Overwrite the live weights with ``compute(shadows, live)`` for good (training goes on from them)."""
        if self._swapped:
            raise RuntimeError("load_into_live() while a shadow is swapped in")
        self._check_model()
        for group in self.groups:
            group.live.copy_(compute(group.shadow, group.source()))

    def copy_to_live(self, index: int = 0) -> None:
        """Overwrite the live weights with shadow ``index`` (``ema.sync=task_end``)."""
        self.load_into_live(lambda shadows, live: shadows[index])

    def averaged_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """The fp32 shadow ``index`` by tensor name (copies), e.g. to save an averaged model."""
        shapes = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        state = {}
        for group in self.groups:
            offset = 0
            for name in group.names:
                n = shapes[name].numel()
                state[name] = group.shadow[index, offset : offset + n].view(shapes[name].shape).clone()
                offset += n
        return state

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rules": [rule.state_dict() for rule in self.rules],
            "names": [group.names for group in self.groups],
            "shadows": [group.shadow.detach().clone() for group in self.groups],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` saved (after ``register()``); ValueError if it does not fit."""
        if not isinstance(state, dict):
            raise ValueError(f"the saved averages are a {type(state).__name__}, not a dict")
        shadows, rules, step = state.get("shadows"), state.get("rules"), state.get("step")
        if state.get("names") != [group.names for group in self.groups] or not isinstance(shadows, list):
            raise ValueError("the saved shadows do not match this model's parameters")
        if not isinstance(rules, list) or len(rules) != len(self.rules):
            raise ValueError(f"the saved averages have {len(rules or [])} rules, these have {len(self.rules)}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"the saved step count {step!r} is not a count")
        for group, shadow in zip(self.groups, shadows):
            if not isinstance(shadow, Tensor) or shadow.shape != group.shadow.shape:
                raise ValueError("the saved shadows do not match this model's parameters")
            if not bool(torch.isfinite(shadow).all()):
                raise ValueError("the saved shadows hold NaN or infinite values")
        for rule, saved in zip(self.rules, rules):
            rule.load_state_dict(saved if isinstance(saved, dict) else {})
        for group, shadow in zip(self.groups, shadows):
            group.shadow.copy_(shadow)
        self.step = step


class EMA(WeightAverages):
    """Exponential moving averages for one or more decays (the origin document's class, grown).

    Seed-compatible use: ``EMA(model, 0.999)``, ``register()``, ``update()`` after each optimizer
    step, ``apply_shadow()`` / ``restore()`` around evaluation; ``swapped(k)`` is the same as a
    context manager, for the shadow of ``decays[k]``.
    """

    def __init__(
        self, model: nn.Module, decay: float | Sequence[float] = 0.999, options: EMAOptions | None = None
    ) -> None:
        decays = list(decay) if isinstance(decay, Sequence) and not isinstance(decay, str) else [decay]
        if not decays:
            raise OptionError("decay", decays, "give at least one decay")
        self.decays = [fraction("decay", d) for d in decays]
        self.options = options or EMAOptions()
        super().__init__(model, [EMARule(d, self.options) for d in self.decays], self.options.buffers)

    def horizon(self, decay: float) -> float:
        """Optimizer steps over which a decay averages: ``update_every / (1 − d)``."""
        return EMARule(decay, self.options).horizon


def decay_for_horizon(steps: float) -> float:
    """The decay whose horizon ``1/(1 − d)`` is ``steps`` optimizer steps (at least one)."""
    if not (math.isfinite(steps) and steps >= 1):
        raise OptionError("horizon", steps, "must be at least one optimizer step")
    return 1.0 - 1.0 / steps


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what the kernel could give without swapping
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(device: torch.device, nbytes: int, shadows: int) -> None:
    """Refuse, in one line, shadows that cannot fit where they would live."""
    free = free_memory(device)
    if free is not None and nbytes > free:
        raise MemoryError(
            f"{shadows} averaged copies of the model need {nbytes / 2**30:.2f} GiB, but {device} has "
            f"{free / 2**30:.2f} GiB free: average fewer ways, or a smaller model"
        )


def _dense_view(flat: Tensor, like: Tensor) -> Tensor:
    """A view of ``flat`` with ``like``'s shape and, when it is dense, its strides."""
    if like.is_contiguous():
        return flat.view(like.shape)
    if _is_dense(like):  # channels_last and other permuted-but-dense layouts
        return flat.as_strided(like.shape, like.stride())
    return flat.view(like.shape)


def _flat_alias(tensors: list[Tensor]) -> Tensor | None:
    """A 1-D view over ``tensors`` if they already lie back to back, densely, in one storage."""
    first = tensors[0]
    storage, start = first.untyped_storage(), first.storage_offset()
    offset = start
    for tensor in tensors:
        same = tensor.untyped_storage().data_ptr() == storage.data_ptr()
        if not same or tensor.storage_offset() != offset or not _is_dense(tensor):
            return None
        offset += tensor.numel()
    return first.new_empty(0).set_(storage, start, (offset - start,))  # type: ignore[call-overload]


def _is_dense(tensor: Tensor) -> bool:
    order = sorted(range(tensor.dim()), key=lambda d: tensor.stride(d))
    expected = 1
    for d in order:
        if tensor.size(d) != 1 and tensor.stride(d) != expected:
            return False
        expected *= tensor.size(d)
    return True


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterator[Tensor]) -> None:
    """Re-estimate BatchNorm running statistics by a pass over ``batches`` (as torch's update_bn).

    Statistics are reset and accumulated as a plain average (momentum=None); the model's mode
    and each layer's momentum are restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    for inputs in batches:
        model(inputs)
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    model.train(was_training)
