"""What cl_ema's plugins may ask of a strategy, what they may offer a run, and the tracks they add.

A plugin is an Avalanche ``SupervisedPlugin``: its lifecycle callbacks do the work, and it reads
the strategy through Avalanche's own protocol (``model``, ``optimizer``, ``mbatch``, ``mb_x``,
``mb_y``, ``mb_output``, ``loss``, ``experience``, ``clock``, ``dataloader``, ``device``,
``train_mb_size``, ``train_epochs``). cl_ema's training template adds what ``DeviceTemplate``
below lists; a plugin that uses it needs that template, and every plugin meant to work in a stock
Avalanche strategy (the evaluation-only averaging plugins: EMA, means, interpolations, merges)
reaches it only through the helpers here, which fall back to what any strategy has.

A plugin's **options** are the typed parameters of its class (a dataclass's fields or an
``__init__``'s keywords), declared beside its code and checked there with ``cl_ema.options``; its
config file ``conf/plugin/<name>.yaml`` mirrors them (a test holds the two equal). Besides its
callbacks a plugin may have, checked once when the run is assembled:

- ``attach(model)``: called once before training with the (unwrapped) model; an average registers
  its shadows from the initial weights here. In a stock strategy it attaches itself in
  ``before_training``;
- ``tracks() -> list[Track]``: more sets of weights to evaluate besides ``live``;
- ``state_dict()`` / ``load_state_dict(state)``: what it keeps across experiences, saved in each
  checkpoint under its config name and restored on resume (a state that does not fit raises
  ``ValueError``). A plugin without them is refused while checkpoints are on, unless its class
  declares ``stateless = True``: a resumed run must be the same run.

In a stock strategy the tracks are evaluated by swapping them in around Avalanche's own eval::

    for track in plugin.tracks():
        with track.swap_in():
            strategy.eval(benchmark.test_stream)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the report reads track names without importing torch
    from torch import Tensor, nn

LIVE = "live"  # the track of the weights being trained


@dataclass(frozen=True)
class Track:
    """A set of weights to evaluate; ``with track.swap_in():`` puts them in the model.

    ``rule`` names the averaging rule (``live``, ``ema``, ``swa``, ``wise``, …); ``decay`` and
    ``horizon`` (the optimizer steps it averages over) describe an exponential average.
    """

    name: str
    swap_in: Callable[[], AbstractContextManager[None]]
    rule: str = LIVE
    decay: float | None = None
    horizon: float | None = None

    def info(self) -> dict[str, Any]:
        """What results.json records of the track (JSON: an infinite horizon is ``null``)."""
        horizon = self.horizon if self.horizon is None or math.isfinite(self.horizon) else None
        return {"rule": self.rule, "decay": self.decay, "horizon": horizon}


def live_track() -> Track:
    return Track(LIVE, nullcontext)


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
        parts += [f"h{horizon:g}", f"{decay:.6g}"]
    else:
        parts.append(number(decay))
    return "_".join(parts)


@runtime_checkable
class Attaches(Protocol):
    def attach(self, model: nn.Module) -> None: ...


@runtime_checkable
class HasTracks(Protocol):
    def tracks(self) -> list[Track]: ...


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class DeviceTemplate(Protocol):
    """What cl_ema's training template (``cl_ema.template.DeviceDataTemplate``) adds to Avalanche's strategy."""

    mb_replayed: int  # the mini-batch's last ``mb_replayed`` samples come from a replay memory
    mb_index: Tensor  # the mini-batch's sample indices (the stored, unaugmented samples)

    def autocast(self) -> AbstractContextManager[None]:
        """The forward pass's precision (bf16 autocast, or nothing)."""
        ...

    def inputs(self, index: Tensor, augment: bool = True) -> Tensor:
        """The model's input batch for training samples ``index`` (gathered on the device)."""
        ...

    def input_batches(self) -> Callable[[], Iterator[Tensor]]:
        """The current experience's training batches, unaugmented, drawing no random numbers."""
        ...

    def training_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One more pass over the current experience's batches as training sees them: (inputs, labels)."""
        ...


def needs_template(strategy: Any, why: str) -> None:
    """A TypeError unless ``strategy`` is cl_ema's template (``why``: what the plugin needs of it)."""
    if not isinstance(strategy, DeviceTemplate):
        raise TypeError(f"{why}: it needs cl_ema's training template (cl_ema.template.DeviceDataTemplate)")


def autocast(strategy: Any) -> AbstractContextManager[None]:
    """The strategy's forward-pass precision (a stock strategy: none)."""
    return strategy.autocast() if isinstance(strategy, DeviceTemplate) else nullcontext()


def unaugmented_batches(strategy: Any) -> Callable[[], Iterator[Tensor]]:
    """The current experience's training inputs in batches, without augmentation, for one more pass
    (re-estimating BatchNorm statistics); in a stock strategy, through the experience's eval view."""
    if isinstance(strategy, DeviceTemplate):
        return strategy.input_batches()
    import torch
    from torch.utils.data import DataLoader

    dataset, device, size = strategy.experience.dataset.eval(), strategy.device, strategy.train_mb_size

    def batches() -> Iterator[Tensor]:
        # a private generator: the loader would otherwise draw a seed from the training run's
        for mbatch in DataLoader(dataset, batch_size=size, generator=torch.Generator()):
            yield mbatch[0].to(device)

    return batches
