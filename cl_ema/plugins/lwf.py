"""Avalanche's LwFPlugin, able to save and restore what it keeps across tasks.

Learning without Forgetting (Li & Hoiem 2017) distills, on every mini-batch, the model as it was
after the previous task into the current one. Avalanche's plugin keeps that previous model, the
classes it was trained on and the task count in memory only; a run resumed without them would
silently train without distillation (Avalanche returns a zero loss when there is no previous
model). This subclass saves them in checkpoints.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from avalanche.training.plugins import LwFPlugin as AvalancheLwFPlugin
from torch import nn

from cl_ema.options import at_least, positive


class LwFPlugin(AvalancheLwFPlugin, supports_distributed=True):  # type: ignore[call-arg]
    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        at_least("alpha", alpha, 0.0, math.inf)
        positive("temperature", temperature)  # the logits are divided by it
        super().__init__(alpha=alpha, temperature=temperature)
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
        if not (isinstance(state.get("expcount"), int) and isinstance(state.get("prev_classes_by_task"), dict)):
            raise ValueError("the LwF state lacks its task count or previous classes")
        lwf = self.lwf
        lwf.prev_model = None
        if state["prev_model"] is not None:
            lwf.prev_model = copy.deepcopy(self._model)
            lwf.prev_model.load_state_dict(state["prev_model"])
            lwf.prev_model.train()  # as Avalanche's copy of the model in training
        lwf.expcount = int(state["expcount"])
        lwf.prev_classes_by_task.clear()
        lwf.prev_classes_by_task.update({int(t): set(cs) for t, cs in state["prev_classes_by_task"].items()})
