"""Avalanche plugins of cl_ema, and the protocol a run speaks with every plugin.

A strategy (``conf/strategy/*.yaml``) names its plugins under ``strategy.plugins``: config name →
node with a ``_target_``. Each is an Avalanche ``SupervisedPlugin`` (its lifecycle callbacks do
the work) and may also have, checked once when the strategy is built:

- ``attach(model)``: called once before training with the model (an EMA registers its shadows
  from the initial weights here);
- ``tracks() -> list[Track]``: more sets of weights to evaluate besides ``live``;
- ``state_dict()`` / ``load_state_dict(state)``: what it keeps across experiences, saved in each
  checkpoint under its config name and restored on resume.

A plugin without ``state_dict`` is refused while checkpoints are on, unless its class declares
``stateless = True`` (it keeps nothing from one experience to the next): a resumed run must be
the same run.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from cl_ema.evaluation import Track


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
