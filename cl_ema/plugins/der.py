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

from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_ema.plugins import Position, autocast, needs_template
from cl_ema.plugins.options import DER
from cl_ema.plugins.replay import StreamReservoir


class DERPlugin(SupervisedPlugin):  # not data parallel: its extra forward passes would go around DDP
    """DER (``beta=0``) and DER++ (``beta>0``) (options: ``cl_ema.plugins.options.DER``); needs cl_ema's
    template (its batches' sample indices). ``seed``: of the reservoir's draws (the run's); ``device``: where
    the memory lives (the run's training device)."""

    def __init__(
        self, options: DER | None = None, /, *, seed: int = 0, device: str | torch.device | None = None, **kwargs: Any
    ) -> None:
        super().__init__()
        self.options = options if options is not None else DER(**kwargs)
        self.memory = StreamReservoir(self.options.mem_size, seed, device)

    def before_backward(self, strategy, **kwargs) -> None:
        needs_template(strategy, "DERPlugin stores the batches' sample indices")
        memory, o = self.memory, self.options
        if memory.filled == 0:
            return
        assert memory.index is not None and memory.labels is not None and memory.logits is not None
        size = o.batch_size_mem or strategy.train_mb_size
        slots = memory.slots(size, strategy.device)
        strategy.loss += o.alpha * F.mse_loss(self._outputs(strategy, memory.index[slots]), memory.logits[slots])
        if o.beta:
            slots = memory.slots(size, strategy.device)  # a second, independent draw
            outputs = self._outputs(strategy, memory.index[slots])
            strategy.loss += o.beta * F.cross_entropy(outputs, memory.labels[slots])

    def _outputs(self, strategy: Any, index: torch.Tensor) -> torch.Tensor:
        with autocast(strategy):
            return strategy.model(strategy.inputs(index)).float()

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.memory.add(strategy.mb_index, strategy.mb_y, strategy.mb_output.detach().float())

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)

    def check_position(self, at: Position) -> None:
        self.memory.check_position(at, width=at.num_classes)
