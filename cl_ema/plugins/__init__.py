"""What cl_ema's plugins may ask of a strategy, what they may offer a run, and the tracks they add.

A plugin is an Avalanche ``SupervisedPlugin``: its lifecycle callbacks do the work, and it reads
the strategy through Avalanche's own protocol (``model``, ``optimizer``, ``mbatch``, ``mb_x``,
``mb_y``, ``mb_output``, ``loss``, ``experience``, ``clock``, ``dataloader``, ``device``,
``train_mb_size``, ``train_epochs``). cl_ema's training template adds what ``DeviceTemplate``
below lists; a plugin that uses it needs that template, and every plugin meant to work in a stock
Avalanche strategy (the evaluation-only averaging plugins: EMA, means, interpolations, merges)
reaches it only through the helpers here, which fall back to what any strategy has.

A plugin's **options** are an options class of ``cl_ema.plugins.options`` (torch-free, checked by
``cl_ema.options``), which its config file ``conf/plugin/<name>.yaml`` names as ``_target_`` and mirrors
(a test holds the two equal); the plugin takes the options object first. Besides its callbacks a plugin
may have, checked once when the run is assembled:

- ``attach(model)``: called once before training with the (unwrapped) model; an average registers
  its shadows from the initial weights here. In a stock strategy it attaches itself in
  ``before_training``;
- ``tracks() -> list[Track]``: more sets of weights to evaluate besides ``live``;
- ``state_dict()`` / ``load_state_dict(state)``: what it keeps across experiences, saved in each
  checkpoint under its config name and restored on resume (a state that does not fit raises
  ``ValueError``). A plugin without them is refused while checkpoints are on, unless its class
  declares ``stateless = True``: a resumed run must be the same run. ``load_state_dict`` checks what it
  loads (dtypes, shapes, index and label ranges) and maps tensors to the run's device;
- ``summary()``: one line the run prints before training (``Summarized``);
- ``check_position(position)``: after a resume, its counters and ranges agree with the run's (``Positioned``).

In a stock strategy the tracks are evaluated by swapping them in around Avalanche's own eval::

    for track in plugin.tracks():
        with track.swap_in():
            strategy.eval(benchmark.test_stream)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the report reads track names without importing torch
    from torch import Tensor, nn

LIVE = "live"  # the track of the weights being trained


@dataclass(frozen=True)
class Track:
    """A set of weights to evaluate; ``with track.swap_in():`` puts them in the model.

    ``rule`` names the averaging rule (``live``, ``ema``, ``swa``, ``wise``, …: the rule's function in
    ``cl_ema.rules``); ``decay`` and ``horizon`` (the optimizer steps it averages over) describe an
    exponential average; ``extra``: more of its description (an EMA's horizon in tasks). ``state``, when
    given, returns the weights ``swap_in`` would load (the averaged tensors by name) without loading them, so
    that several tracks can be evaluated in one stacked forward; ``live`` is the model's own.
    """

    name: str
    swap_in: Callable[[], AbstractContextManager[None]]
    rule: str = LIVE
    decay: float | None = None
    horizon: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    state: Callable[[], dict[str, Tensor]] | None = None

    def info(self) -> dict[str, Any]:
        """What results.json records of the track (JSON: an infinite horizon is ``null``; 12 significant
        digits, so that a horizon of 100 steps is not 99.99999999999991)."""
        horizon = self.horizon if self.horizon is None or math.isfinite(self.horizon) else None
        return {"rule": self.rule, "decay": self.decay, "horizon": _rounded(horizon), **self.extra}


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.12g}")


def live_track() -> Track:
    return Track(LIVE, nullcontext)


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
class Summarized(Protocol):
    def summary(self) -> str:
        """One line the run prints before training (what the plugin keeps, and what it costs)."""
        ...


@dataclass(frozen=True)
class Position:
    """Where a resumed run stands, for a plugin to check the state it loaded against."""

    tasks_done: int
    steps: int  # optimizer steps so far
    last_task_start: int  # optimizer steps before the last finished task began
    samples_seen: int  # current (not replayed) training samples of every step so far
    num_classes: int
    train_samples: int  # training samples of the stream: sample indices lie in [0, train_samples)


@runtime_checkable
class Positioned(Protocol):
    def check_position(self, at: Position) -> None:
        """ValueError unless the counters and ranges of a loaded state agree with where the run stands."""
        ...


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
