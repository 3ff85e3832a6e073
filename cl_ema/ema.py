"""The EMA engine's container: shadows of a model's weights, many from one training run, in one flat buffer.

A library: this module needs torch and nothing else (besides the plain-Python ``cl_ema.options`` and
``cl_ema.rules``, which say how each shadow follows the weights: the formulas are there).

    averages = EMA(model, [0.99, 0.999])       # or WeightAverages(model, [EMARule(0.999), MeanRule()])
    averages.register()                        # every shadow starts at the current weights
    for inputs, labels in loader:
        ...; optimizer.step(); averages.update()
    with averages.swapped(1):                  # the model holds shadow 1 (decay 0.999)…
        evaluate(model)                        # …and the live weights are back afterwards, bit for bit

On every ``update()`` (after an optimizer step) each shadow's rule gives the weight ``w`` of the live
weights, and ``s ← (1 − w) · s + w · θ``, computed as ``s.lerp_(θ, w)``.

Averaged tensors are the trainable parameters and the floating-point buffers (BatchNorm running
mean/var). Integer buffers are never averaged; with ``buffers="copy"`` an average evaluates with the
live model's statistics instead of its own.

Speed: at ``register()`` the averaged tensors of each (device, dtype) are moved into one flat buffer
and the model's tensors become views of it (same Parameter objects, values and strides), so an update
is one ``lerp_`` over the flat buffer for one shadow, and one fused ``torch._foreach_lerp_`` over
cache-sized chunks for several (each chunk of live weights is read once for all shadows). Every average
of one model shares that buffer. Shadows are fp32 whatever the model's dtype. Nothing is allocated per
update.

What the engine refuses rather than average wrongly: parameters that share storage without being one
Parameter (``register`` would untie them), a model whose tensors were moved, converted or replaced after
``register()`` (``update``, ``swapped`` and ``restore`` check it), and a swap left open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cl_ema.options import OptionError, check
from cl_ema.rules import (
    Buffers,
    EMAOptions,
    EMARule,
    Frozen,
    MeanRule,
    Rule,
    StochasticEMARule,
    Weighting,
    decay_for_horizon,
    mean_weight,
    warmup_decay,
)

__all__ = [
    "EMA",
    "Buffers",
    "EMAOptions",
    "EMARule",
    "Frozen",
    "MeanRule",
    "Rule",
    "StochasticEMARule",
    "WeightAverages",
    "Weighting",
    "decay_for_horizon",
    "mean_weight",
    "recompute_bn",
    "warmup_decay",
]

# 256 Ki fp32 values: one chunk of live weights stays in a 1 MiB L2 while every shadow reads it.
_CHUNK = 1 << 18


@dataclass
class _FlatGroup:
    """The averaged tensors of one (device, dtype): live views into ``live``, K shadow rows."""

    names: list[str]
    sizes: list[int]
    live: Tensor  # (N,) model dtype; the model's averaged tensors are views into it
    shadow: Tensor  # (K, N) fp32
    staging: Tensor | None  # (N,) fp32 copy of ``live`` when the model is not fp32
    parameters: int  # the first elements are parameters, the rest buffers
    backup: Tensor | None = None  # (N,) model dtype, allocated at the first swap
    shadow_chunks: list[Tensor] | None = None  # interleaved [s_0 c_0, s_1 c_0, …] for K > 1
    source_chunks: list[Tensor] | None = None  # the matching live (or staged) chunks

    def source(self) -> Tensor:
        """The live weights as fp32 (the live buffer itself when the model is fp32)."""
        if self.staging is None:
            return self.live
        self.staging.copy_(self.live)
        return self.staging


# per group (device, dtype): the shadow rows (K, N) fp32 and the live weights (N,) fp32 → the weights to load
Compute = Callable[[list[Tensor], list[Tensor]], list[Tensor]]


class WeightAverages:
    """Shadows of a model's weights, one per rule, in one flat buffer (see the module docstring).

    ``swapped(k)`` / ``apply_shadow(k)`` load shadow ``k`` into the model, keeping a copy of the live
    weights and all buffers; ``restore()`` puts them back bit for bit. ``swapped_to(compute)`` loads
    any function of the shadows and the live weights (an interpolation, a merge).
    """

    def __init__(self, model: nn.Module, rules: Sequence[Rule], buffers: Buffers = Buffers.average) -> None:
        self.model = model
        self.rules = list(rules)
        self.buffers = check("buffers", buffers, Buffers)
        self.step = 0  # calls of update(): optimizer steps seen
        self.groups: list[_FlatGroup] = []
        self._tensors: list[Tensor] = []  # the model's averaged tensors, in flat order
        self._data_ptrs: list[int] = []
        self._structure: list[tuple[dict, dict]] = []  # each module's children, parameters, buffers at register()
        self._trainable: list[tuple[Tensor, bool]] = []  # each parameter and its requires_grad at register()
        self._buffer_backup: list[Tensor] = []
        self._swapped = False

    def _averaged(self) -> Iterator[tuple[str, Tensor]]:
        """The averaged tensors: trainable parameters first, then floating buffers (every average of one
        model agrees on these, whatever its ``buffers`` policy, so that they can share one flat buffer)."""
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                yield name, param
        for name, buf in self.model.named_buffers():
            if buf.is_floating_point():
                yield name, buf

    # ------------------------------------------------------------------ registration
    @torch.no_grad()
    def register(self) -> None:
        """Start every shadow at the model's current weights."""
        if self._swapped:
            raise RuntimeError("register() while a shadow is swapped in; call restore() first")
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor]]] = {}
        parameters = {id(p) for p in self.model.parameters()}
        for name, tensor in self._averaged():
            by_key.setdefault((tensor.device, tensor.dtype), []).append((name, tensor))
        if not any(id(t) in parameters for items in by_key.values() for _, t in items):
            raise ValueError("the model has no trainable parameters to average (none with requires_grad)")
        for (device, _), items in by_key.items():
            _check_memory(device, 4 * len(self.rules) * sum(t.numel() for _, t in items), len(self.rules))
        self.groups, self._tensors = [], []
        for (device, dtype), items in by_key.items():
            tensors = [tensor for _, tensor in items]
            live = _flat_alias(tensors)  # already flat (another average of this model): share it
            if live is None:
                _refuse_shared_storage(items)
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
                raise MemoryError(
                    f"{len(self.rules)} averaged copies of the model need {size:.2f} GiB: {device} cannot allocate them"
                ) from None
            staging = None if dtype == torch.float32 else torch.empty_like(shadow[0])
            in_front = sum(t.numel() for t in tensors if id(t) in parameters)
            group = _FlatGroup([n for n, _ in items], [t.numel() for t in tensors], live, shadow, staging, in_front)
            if len(self.rules) > 1:
                source = staging if staging is not None else live
                live_chunks = source.split(_CHUNK)
                rows = [row.split(_CHUNK) for row in shadow]
                group.shadow_chunks = [rows[k][c] for c in range(len(live_chunks)) for k in range(len(rows))]
                group.source_chunks = [chunk for chunk in live_chunks for _ in rows]
            self.groups.append(group)
        self._data_ptrs = [t.data_ptr() for t in self._tensors]
        modules = list(self.model.modules())
        self._structure = [(held, dict(held)) for m in modules for held in (m._modules, m._parameters, m._buffers)]
        self._trainable = [(p, p.requires_grad) for p in self.model.parameters()]
        self.step = 0
        for rule in self.rules:
            rule.reset()

    def _check_model(self, doing: str) -> None:
        """The model still holds the registered tensors, where they were: a converted, moved or replaced
        tensor (``model.double()``, ``.to()``, channels_last, a new layer, ``load_state_dict(assign=True)``)
        would leave the shadows following, or being loaded into, tensors the model no longer uses."""
        if not self.groups:
            raise RuntimeError(f"{doing} before register()")
        if not self._unchanged():
            raise RuntimeError(
                f"{doing}: the model's tensors were moved, converted or replaced after register() (model.to(), "
                ".double(), channels_last, a new layer, load_state_dict(assign=True), requires_grad set): do that "
                "first, then register() again"
            )

    def _unchanged(self) -> bool:
        # the module tree compared dict by dict, not walked again: the walk cost a ResNet-18 0.3 ms an update
        for now, then in self._structure:
            if len(now) != len(then):
                return False
            for key, held in then.items():
                if now.get(key) is not held:
                    return False
        for param, trainable in self._trainable:
            if param.requires_grad != trainable:
                return False
        return [t.data_ptr() for t in self._tensors] == self._data_ptrs

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimizer step: each shadow moves by its rule's weight."""
        if self._swapped:
            raise RuntimeError("update() while a shadow is swapped in; call restore() first")
        self._check_model("update()")
        self.step += 1
        weights = [rule.next_weight(self.step) for rule in self.rules]
        active = [k for k, w in enumerate(weights) if w != 0.0]
        if not active:
            return
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
        self._check_model("snapshot()")
        for group in self.groups:
            group.shadow[index].copy_(group.source())

    @torch.no_grad()
    def live_values(self) -> list[Tensor]:
        """A fp32 copy of the live weights, per group."""
        self._check_model("live_values()")
        return [group.live.to(torch.float32, copy=True) for group in self.groups]

    def shadow_rows(self, index: int) -> list[Tensor]:
        """Shadow ``index`` per group: views to read or to update in place (a rule kept by its owner)."""
        return [group.shadow[index] for group in self.groups]

    @torch.no_grad()
    def flat(self, value: Callable[[Tensor], Tensor | None]) -> list[Tensor]:
        """``value(t)`` of each averaged tensor ``t`` (e.g. its gradient), laid out like the shadows (fp32;
        zeros where it is None)."""
        self._check_model("flat()")
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
        """``with averages.swapped_to(f):`` the model holds ``f(shadows, live)``; restored on exit."""
        self._apply(compute)
        try:
            yield
        finally:
            self.restore()

    def _computed(self, compute: Compute) -> list[Tensor]:
        """``compute(shadows, live)``, each group's buffers taken from the live model under ``buffers=copy``."""
        sources = [group.source() for group in self.groups]
        values = compute([group.shadow for group in self.groups], sources)
        if self.buffers == Buffers.copy:
            for k, (group, value, source) in enumerate(zip(self.groups, values, sources)):
                if group.parameters < len(value):  # a copy: the value may be a shadow row itself
                    values[k] = torch.cat([value[: group.parameters], source[group.parameters :]])
        return values

    @torch.no_grad()
    def _apply(self, compute: Compute) -> None:
        if self._swapped:
            raise RuntimeError("apply_shadow() twice without restore()")
        self._check_model("apply_shadow()")
        buffers = list(self.model.buffers())
        if len(self._buffer_backup) != len(buffers):
            self._buffer_backup = [b.clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_backup, buffers)
        values = self._computed(compute)  # before the live is overwritten
        for group, value in zip(self.groups, values):
            if group.backup is None:
                group.backup = torch.empty_like(group.live)
            group.backup.copy_(group.live)
            group.live.copy_(value)
        self._swapped = True

    def apply_shadow(self, index: int = 0) -> None:
        """Load shadow ``index`` into the model, keeping the live weights (the seed's API)."""
        self._apply(row(index))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the live weights and buffers back, bit for bit; refused if the model's tensors were moved or
        converted while the shadow was in (the live weights could not go back where the model reads them)."""
        if not self._swapped:
            raise RuntimeError("restore() without apply_shadow()")
        self._check_model("restore()")
        for group in self.groups:
            assert group.backup is not None
            group.live.copy_(group.backup)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, self._buffer_backup)
        self._swapped = False

    def swapped(self, index: int = 0) -> AbstractContextManager[None]:
        """``with averages.swapped(k):`` the model holds shadow ``k``; restored on exit."""
        return self.swapped_to(row(index))

    @torch.no_grad()
    def load_into_live(self, compute: Compute) -> None:
        """Overwrite the live weights with ``compute(shadows, live)`` for good (training goes on from them)."""
        if self._swapped:
            raise RuntimeError("load_into_live() while a shadow is swapped in")
        self._check_model("load_into_live()")
        for group, value in zip(self.groups, self._computed(compute)):
            group.live.copy_(value)

    def copy_to_live(self, index: int = 0) -> None:
        """Overwrite the live weights with shadow ``index`` (``ema.sync=task_end``)."""
        self.load_into_live(row(index))

    @torch.no_grad()
    def state(self, compute: Compute) -> dict[str, Tensor]:
        """What ``swapped_to(compute)`` would load, as the averaged tensors by name (new tensors in each one's dtype
        and layout), without touching the model: for evaluating several averages in one stacked forward."""
        self._check_model("state()")
        state, tensors = {}, iter(self._tensors)
        for group, value in zip(self.groups, self._computed(compute)):
            cast, offset = value.to(group.live.dtype), 0
            for name in group.names:
                tensor = next(tensors)
                state[name] = _dense_view(cast[offset : offset + tensor.numel()], tensor)
                offset += tensor.numel()
        return state

    def averaged_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """The fp32 shadow ``index`` by tensor name (copies, in each tensor's own layout: a channels-last
        weight stays channels-last), e.g. to save an averaged model with ``torch.save``."""
        self._check_model("averaged_state_dict()")
        state, tensors = {}, iter(self._tensors)
        for group in self.groups:
            offset = 0
            for name in group.names:
                tensor = next(tensors)
                state[name] = _dense_view(group.shadow[index, offset : offset + tensor.numel()], tensor).clone(
                    memory_format=torch.preserve_format
                )
                offset += tensor.numel()
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
        """Restore what ``state_dict()`` saved (after ``register()``), onto this model's device; ValueError if it
        does not fit (other tensors, shapes or rules, a tensor that is not fp32, values that are not finite)."""
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
            if shadow.dtype != torch.float32:
                raise ValueError(f"the saved shadows are {shadow.dtype}, not torch.float32")
            if not bool(torch.isfinite(shadow).all()):
                raise ValueError("the saved shadows hold NaN or infinite values")
        for rule, saved in zip(self.rules, rules):
            rule.load_state_dict(saved if isinstance(saved, dict) else {})
            if rule.due > step:
                raise ValueError(f"a rule was due {rule.due} updates in {step} steps")
        for group, shadow in zip(self.groups, shadows):
            group.shadow.copy_(shadow)  # onto the shadow's device, wherever it was saved
        self.step = step


def row(index: int) -> Compute:
    """The computation that gives shadow ``index`` as it is."""
    return lambda shadows, live: [rows[index] for rows in shadows]


class EMA(WeightAverages):
    """Exponential moving averages for one or more decays (the origin document's class, grown).

    Seed-compatible use: ``EMA(model, 0.999)``, ``register()``, ``update()`` after each optimizer
    step, ``apply_shadow()`` / ``restore()`` around evaluation; ``swapped(k)`` is the same as a
    context manager, for the shadow of ``decays[k]``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | Sequence[float] = 0.999,
        options: EMAOptions | None = None,
        buffers: Buffers = Buffers.average,
    ) -> None:
        decays = list(decay) if isinstance(decay, Sequence) and not isinstance(decay, str) else [decay]
        if not decays:
            raise OptionError("decay", decays, "give at least one decay")
        self.options = options or EMAOptions()
        rules = [EMARule(d, self.options) for d in decays]
        self.decays = [rule.decay for rule in rules]
        super().__init__(model, rules, buffers)

    def horizon(self, decay: float) -> float:
        """Optimizer steps over which a decay averages: ``update_every / (1 − d)``."""
        return EMARule(decay, self.options).horizon


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


def _refuse_shared_storage(items: list[tuple[str, Tensor]]) -> None:
    """Two Parameters (or buffers) that share storage, not being one object, would be untied by the flat
    buffer, which changes training: refuse them."""
    seen: dict[int, str] = {}
    for name, tensor in items:
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            raise ValueError(
                f"{seen[storage]} and {name} share storage without being one Parameter: averaging them would untie "
                "them (tie them by using one Parameter object for both)"
            )
        seen[storage] = name


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
