"""DER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning"),
as Mammoth's ``models/der.py`` and ``models/derpp.py`` at the paper's tag (``neurips2020``, commit
cb9a36d) run them.

A reservoir over the whole stream (``utils/buffer.py``: Vitter's algorithm R, the sample, its label
and the logits of the step's forward pass, made before that step's update) is filled after every
optimizer step with the step's samples, unaugmented. From its second step on, each step's loss is

    CE(f(x), y)  +  α · MSE(f(x'), z')  [ +  β · CE(f(x''), y'') ]

with (x, y) the step's batch, (x', z') a batch of ``batch_size_mem`` memory samples and their stored
logits, and, for DER++ (β > 0), (x'', y'') a second batch drawn independently; each buffer batch
is drawn uniformly without replacement and passes the model on its own (three forward passes per
step, as Mammoth's), its inputs augmented as training augments them (Mammoth's ``get_data(...,
transform)``). The draws come from the plugin's own generator (seeded, saved in checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_ema.options import at_least, count
from cl_ema.plugins import autocast, needs_template
from cl_ema.plugins.replay import StreamReservoir


@dataclass(eq=False)
class DERPlugin(SupervisedPlugin):  # not data parallel: its extra forward passes would go around DDP
    """DER (``beta=0``) and DER++ (``beta>0``); needs cl_ema's template (its batches' sample indices).
    ``batch_size_mem``: Mammoth's ``minibatch_size`` (None: as many as the training batch)."""

    mem_size: int = 200
    batch_size_mem: int | None = None
    alpha: float = 0.5
    beta: float = 0.0
    seed: int = 0  # of the reservoir's draws (the run's seed)

    def __post_init__(self) -> None:
        super().__init__()
        count("mem_size", self.mem_size, 1, 1 << 28)
        if self.batch_size_mem is not None:
            count("batch_size_mem", self.batch_size_mem, 1, 1 << 24)
        at_least("alpha", self.alpha, 0.0, float("inf"))
        at_least("beta", self.beta, 0.0, float("inf"))
        self.memory = StreamReservoir(self.mem_size, self.seed)

    def before_backward(self, strategy, **kwargs) -> None:
        needs_template(strategy, "DERPlugin stores the batches' sample indices")
        memory = self.memory
        if memory.filled == 0:
            return
        assert memory.index is not None and memory.labels is not None and memory.logits is not None
        size = self.batch_size_mem or strategy.train_mb_size
        slots = memory.slots(size, strategy.device)
        strategy.loss += self.alpha * F.mse_loss(self._outputs(strategy, memory.index[slots]), memory.logits[slots])
        if self.beta:
            slots = memory.slots(size, strategy.device)  # a second, independent draw
            outputs = self._outputs(strategy, memory.index[slots])
            strategy.loss += self.beta * F.cross_entropy(outputs, memory.labels[slots])

    def _outputs(self, strategy: Any, index: torch.Tensor) -> torch.Tensor:
        with autocast(strategy):
            return strategy.model(strategy.inputs(index)).float()

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.memory.add(strategy.mb_index, strategy.mb_y, strategy.mb_output.detach().float())

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)
