"""Exponential moving averages of a model's weights: many decays from one training run.

For each decay ``d_k`` the engine keeps a shadow ``s_k`` of the model's averaged tensors and, on
every update (after an optimizer step),

    s_k ← d_k · s_k + (1 − d_k) · θ          computed as  s_k.lerp_(θ, 1 − d_k)

Averaged tensors are the trainable parameters plus, with ``buffers="average"``, the floating-point
buffers (BatchNorm running mean/var). Integer buffers (``num_batches_tracked``) are never
averaged; with ``buffers="copy"`` the float buffers are not averaged either, and an EMA model
evaluates with the live model's current statistics (a copy of them, as of the last update).

Speed: at ``register()`` the averaged tensors of each dtype are moved into one flat buffer and
the model's tensors become views of it (same Parameter objects, same values, same strides), so
one update is a single ``lerp_`` over the flat buffer for one decay, and one fused
``torch._foreach_lerp_`` over cache-sized chunks for several (each live chunk is read from memory
once and reused for every decay). Shadows are fp32 whatever the model's dtype. Nothing is
allocated per update.

Options (``cl_ema.config.EMAOptions``, all off by default, so a decay sweep means what it says):

- ``update_every=N``: update only on every N-th call of ``update()``; the decay applies per
  update, so the horizon in optimizer steps is ``N / (1 − d)``.
- ``warmup=True``: the decay ramp of timm's ``ModelEmaV3`` / ema-pytorch, with ``t`` the number
  of updates already made: ``d_t = clamp(1 − (1 + t/γ)^(−p), 0, d)``; the first update copies θ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl_ema.config import Buffers, EMAOptions, check_decays
from cl_ema.errors import UserError

# 256 Ki fp32 values: one chunk of live weights stays in a 1 MiB L2 while every decay reads it.
_CHUNK = 1 << 18


def track_name(decay: float) -> str:
    """Name of the evaluation track for one decay: ``ema_0.999``; it reads back as exactly ``decay``."""
    short = f"{decay:g}"
    return f"ema_{short if float(short) == decay else repr(float(decay))}"


def warmup_decay(decay: float, num_updates: int, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay for the next update under warmup: ``clamp(1 − (1 + t/γ)^(−p), 0, decay)``."""
    return max(0.0, min(decay, 1.0 - (1.0 + num_updates / gamma) ** -power))


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
        if self.staging is None:
            return self.live
        self.staging.copy_(self.live)
        return self.staging


class EMA:
    """Shadow copies of a model's weights for one or more decays.

    Seed-compatible use::

        ema = EMA(model, 0.999)
        ema.register()
        ...; optimizer.step(); ema.update()
        with ema.swapped():          # or ema.apply_shadow() ... ema.restore()
            evaluate(model)

    ``swapped(k)`` / ``apply_shadow(k)`` load the shadow of ``decays[k]`` into the model, keeping
    a copy of the live weights and all buffers; ``restore()`` puts them back bit for bit.
    """

    def __init__(
        self, model: nn.Module, decay: float | Sequence[float] = 0.999, options: EMAOptions | None = None
    ) -> None:
        decays = list(decay) if isinstance(decay, Sequence) and not isinstance(decay, str) else [decay]
        self.decays = check_decays(decays, "decay", distinct=False)
        self.model = model
        self.options = options or EMAOptions()
        self.num_updates = 0  # updates applied to the shadows
        self.num_calls = 0  # calls of update(), i.e. optimizer steps seen
        self._groups: list[_FlatGroup] = []
        self._tensors: list[Tensor] = []  # the model's averaged tensors, in flat order
        self._data_ptrs: list[int] = []
        self._buffer_backup: list[Tensor] = []
        self._swapped: int | None = None

    def _averaged(self) -> Iterator[tuple[str, Tensor]]:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                yield name, param
        if self.options.buffers == Buffers.average:
            for name, buf in self.model.named_buffers():
                if buf.is_floating_point():
                    yield name, buf

    # ------------------------------------------------------------------ registration
    @torch.no_grad()
    def register(self) -> None:
        """Start every shadow at the model's current weights."""
        if self._swapped is not None:
            raise RuntimeError("register() while a shadow is swapped in; call restore() first")
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[str, Tensor]]] = {}
        for name, tensor in self._averaged():
            by_key.setdefault((tensor.device, tensor.dtype), []).append((name, tensor))
        self._groups, self._tensors = [], []
        for (device, dtype), items in by_key.items():
            tensors = [tensor for _, tensor in items]
            live = _flat_alias(tensors)  # already flat (another EMA on this model): share it
            if live is None:
                live = torch.empty(sum(t.numel() for t in tensors), device=device, dtype=dtype)
                offset = 0
                for tensor in tensors:
                    view = _dense_view(live[offset : offset + tensor.numel()], tensor)
                    view.copy_(tensor)
                    tensor.data = view  # same object, same values; storage now inside ``live``
                    offset += tensor.numel()
            self._tensors += tensors
            shadow = live.to(torch.float32).unsqueeze(0).repeat(len(self.decays), 1)
            staging = None if dtype == torch.float32 else torch.empty_like(shadow[0])
            group = _FlatGroup([name for name, _ in items], live, shadow, staging)
            if len(self.decays) > 1:
                source = staging if staging is not None else live
                live_chunks = source.split(_CHUNK)
                rows = [row.split(_CHUNK) for row in shadow]
                group.shadow_chunks = [rows[k][c] for c in range(len(live_chunks)) for k in range(len(rows))]
                group.source_chunks = [chunk for chunk in live_chunks for _ in rows]
            self._groups.append(group)
        self._data_ptrs = [t.data_ptr() for t in self._tensors]
        self.num_updates = self.num_calls = 0

    def _check_links(self) -> None:
        # model.to(), channels_last or load of a new state replaces tensor storage: the flat
        # buffer would then average stale values, so fail loudly instead.
        if any(t.data_ptr() != p for t, p in zip(self._tensors, self._data_ptrs)):
            raise RuntimeError(
                "the model's tensors were moved or replaced after EMA.register() "
                "(model.to(), channels_last, …): do that first, then register()"
            )

    # ------------------------------------------------------------------ the update
    def current_decays(self) -> list[float]:
        """Decays the next update will use (after warmup)."""
        o = self.options
        if not o.warmup:
            return self.decays
        return [warmup_decay(d, self.num_updates, o.warmup_gamma, o.warmup_power) for d in self.decays]

    @torch.no_grad()
    def update(self, decays: Sequence[float] | None = None) -> None:
        """Call after every optimizer step.

        ``decays`` overrides this update's decay per shadow (a rule of the caller's, such as
        CLS-ER's stochastic updates); a decay of 1 leaves that shadow as it is.
        """
        if not self._groups:
            raise RuntimeError("EMA.update() before register()")
        if self._swapped is not None:
            raise RuntimeError("EMA.update() while a shadow is swapped in; call restore() first")
        if decays is not None and len(decays) != len(self.decays):
            raise ValueError(f"EMA.update() got {len(decays)} decays for {len(self.decays)} shadows")
        self.num_calls += 1
        if self.num_calls % self.options.update_every:
            return
        self._check_links()
        weights = [1.0 - d for d in (self.current_decays() if decays is None else decays)]
        active = [k for k, w in enumerate(weights) if w != 0.0]
        for group in self._groups:
            source = group.source() if active else None
            if group.shadow_chunks is None:
                if active:
                    group.shadow[0].lerp_(source, weights[0])
            elif len(active) == len(weights):
                torch._foreach_lerp_(
                    group.shadow_chunks, group.source_chunks, weights * (len(group.shadow_chunks) // len(weights))
                )
            elif active:  # only some shadows move: their chunks alone
                k_all = len(weights)
                picked = [i for i in range(len(group.shadow_chunks)) if i % k_all in active]
                torch._foreach_lerp_(
                    [group.shadow_chunks[i] for i in picked],
                    [group.source_chunks[i] for i in picked],
                    [weights[i % k_all] for i in picked],
                )
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping
    @torch.no_grad()
    def apply_shadow(self, index: int = 0) -> None:
        """Load the shadow of ``decays[index]`` into the model, keeping the live weights."""
        if self._swapped is not None:
            raise RuntimeError("apply_shadow() twice without restore()")
        if not self._groups:
            raise RuntimeError("apply_shadow() before register()")
        self._check_links()
        buffers = list(self.model.buffers())
        if len(self._buffer_backup) != len(buffers):
            self._buffer_backup = [b.clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._buffer_backup, buffers)
        for group in self._groups:
            if group.backup is None:
                group.backup = torch.empty_like(group.live)
            group.backup.copy_(group.live)
            group.live.copy_(group.shadow[index])
        self._swapped = index

    @torch.no_grad()
    def restore(self) -> None:
        """Put the live weights and buffers back, bit for bit."""
        if self._swapped is None:
            raise RuntimeError("restore() without apply_shadow()")
        for group in self._groups:
            group.live.copy_(group.backup)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, self._buffer_backup)
        self._swapped = None

    @contextmanager
    def swapped(self, index: int = 0) -> Iterator[None]:
        """``with ema.swapped(k):`` the model holds the shadow of ``decays[k]``; restored on exit."""
        self.apply_shadow(index)
        try:
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def copy_to_live(self, index: int = 0) -> None:
        """Overwrite the live weights with a shadow (used by ``ema.sync=task_end``)."""
        if self._swapped is not None:
            raise RuntimeError("copy_to_live() while a shadow is swapped in")
        for group in self._groups:
            group.live.copy_(group.shadow[index])

    def averaged_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """The fp32 shadow of ``decays[index]`` by tensor name (copies), e.g. to save an EMA model."""
        shapes = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        state = {}
        for group in self._groups:
            offset = 0
            for name in group.names:
                n = shapes[name].numel()
                state[name] = group.shadow[index, offset : offset + n].view(shapes[name].shape).clone()
                offset += n
        return state

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "decays": list(self.decays),
            "num_updates": self.num_updates,
            "num_calls": self.num_calls,
            "names": [group.names for group in self._groups],
            "shadows": [group.shadow.detach().clone() for group in self._groups],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore shadows and counters saved by ``state_dict()`` (after ``register()``)."""
        if state.get("decays") != self.decays:
            raise UserError(f"checkpoint EMA decays {state.get('decays')} differ from the configured {self.decays}")
        shadows = state.get("shadows")
        if state.get("names") != [group.names for group in self._groups] or not isinstance(shadows, list):
            raise UserError("checkpoint EMA shadows do not match this model's parameters")
        counters = [state.get("num_updates"), state.get("num_calls")]
        if not all(isinstance(c, int) and c >= 0 for c in counters):
            raise UserError(f"checkpoint EMA counters {counters} are not counts")
        for group, shadow in zip(self._groups, shadows):
            if not isinstance(shadow, Tensor) or shadow.shape != group.shadow.shape:
                raise UserError("checkpoint EMA shadows do not match this model's parameters")
        for group, shadow in zip(self._groups, shadows):
            group.shadow.copy_(shadow)
        self.num_updates, self.num_calls = counters

    def horizon(self, decay: float) -> float:
        """Optimizer steps over which a decay averages: ``update_every / (1 − d)``."""
        return math.inf if decay == 1.0 else self.options.update_every / (1.0 - decay)


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
    return first.new_empty(0).set_(storage, start, (offset - start,))


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
