"""Avalanche's LwFPlugin, able to save and restore what it keeps across tasks.

Learning without Forgetting (Li & Hoiem 2017) distills, on every mini-batch, the model as it was
after the previous task into the current one. Avalanche's plugin keeps that previous model, the
classes it was trained on and the task count in memory only; a run resumed without them would
silently train without distillation (Avalanche returns a zero loss when there is no previous
model). This subclass saves them in checkpoints.
"""

from __future__ import annotations

import copy
from typing import Any

from avalanche.training.plugins import LwFPlugin as AvalancheLwFPlugin
from torch import Tensor, nn

from cl_ema.errors import first_line
from cl_ema.plugins import Position
from cl_ema.plugins.options import LwF


class LwFPlugin(AvalancheLwFPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Options: ``cl_ema.plugins.options.LwF``."""

    def __init__(self, options: LwF | None = None, /, **kwargs: Any) -> None:
        self.options = options if options is not None else LwF(**kwargs)
        super().__init__(alpha=self.options.alpha, temperature=self.options.temperature)
        self._model: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        self._model = model  # the architecture to rebuild the previous model into, on resume

    def state_dict(self) -> dict[str, Any]:
        lwf = self.lwf
        return {
            "prev_model": None if lwf.prev_model is None else lwf.prev_model.state_dict(),
            "expcount": lwf.expcount,
            "prev_classes_by_task": {int(t): sorted(int(c) for c in cs) for t, cs in lwf.prev_classes_by_task.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count, classes = state.get("expcount"), state.get("prev_classes_by_task")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or not isinstance(classes, dict):
            raise ValueError("the LwF state lacks its task count or previous classes")
        lwf = self.lwf
        lwf.prev_model = None
        if state["prev_model"] is not None:
            own = self._model.state_dict() if self._model is not None else {}
            kinds = {name: t.dtype for name, t in state["prev_model"].items() if isinstance(t, Tensor)}
            if any(name in own and own[name].dtype != dtype for name, dtype in kinds.items()):
                raise ValueError("its previous model's tensors are not of the model's dtypes")
            lwf.prev_model = copy.deepcopy(self._model)
            try:
                lwf.prev_model.load_state_dict(state["prev_model"])
            except (RuntimeError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"its previous model does not fit this model ({first_line(err, past_headings=True)})"
                ) from None
            lwf.prev_model.train()  # as Avalanche's copy of the model in training
        lwf.expcount = int(state["expcount"])
        lwf.prev_classes_by_task.clear()
        lwf.prev_classes_by_task.update({int(t): set(cs) for t, cs in state["prev_classes_by_task"].items()})

    def check_position(self, at: Position) -> None:
        classes = [c for cs in self.lwf.prev_classes_by_task.values() for c in cs]
        if self.lwf.expcount != at.tasks_done:
            raise ValueError(f"its task count {self.lwf.expcount} is not the run's {at.tasks_done}")
        if classes and not (min(classes) >= 0 and max(classes) < at.num_classes):
            raise ValueError(f"its previous classes lie outside the stream's 0..{at.num_classes - 1}")
