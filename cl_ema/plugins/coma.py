"""CoMA and CoFiMA (Marouf et al., ECCV 2024, "Weighted Ensemble Models Are Strong Continual Learners"):
averaging that changes training. At the end of each task t > 1 the trained weights θ_t are merged
with the previous merge θ*_{t−1}, and training goes on from the merge:

    CoMA:    θ*_t = (1 − λ) · θ*_{t−1} + λ · θ_t
    CoFiMA:  θ*_t = ((1 − λ) F_{t−1} θ*_{t−1} + λ F_t θ_t) / ((1 − λ) F_{t−1} + λ F_t)     (per parameter)

with λ = 0.5, as the authors' code runs (``IemProg/CoFiMA``, ``models/cofima.py``; its configs say
``wt_alpha`` 0.4 for CIFAR, but ``main.py`` overrides it with its command-line default, 0.5, which
their CIFAR log shows). F_t is the diagonal Fisher of θ_t, estimated as their ``getFisherDiagonal``
does: one pass over the task's training batches (augmented, train mode), the cross-entropy of the
true labels over all outputs, the squared gradient of each batch's mean loss averaged over the
batches and capped at ``fisher_max`` = 1e-4; F_{t−1} is the previous task's Fisher, not
accumulated. After the first task θ*_1 = θ_1.

Differences from their code, which has a head per task and a classifier-alignment stage: the
classes a task brings keep their rows of the single head from θ_t (their new head is copied from
θ_t); where both Fishers of an entry are 0 (a buffer, or a parameter no batch moved) CoFiMA's
weighted mean is undefined (their code gives NaN) and the entry takes CoMA's; and training goes on
from the merged head as well, where their code restores the head trained before the merge.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_ema.plugins import Position, autocast, needs_template
from cl_ema.plugins.averaging import AveragingPlugin
from cl_ema.plugins.options import CoMA
from cl_ema.rules import Frozen, Rule

MERGED, FISHER = 0, 1  # shadow rows: θ*_{t−1}, and F_{t−1} for CoFiMA


class CoMAPlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """CoMA (``fisher=false``) or CoFiMA (``fisher=true``) (options: ``cl_ema.plugins.options.CoMA``)."""

    def __init__(self, options: CoMA | None = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.options = options if options is not None else CoMA(**kwargs)
        self.fisher = self.options.fisher
        self.buffers = self.options.buffers
        self.tasks = 0  # tasks merged so far
        self.seen_classes: set[int] = set()

    def engine_rules(self) -> list[Rule]:
        return [Frozen(), Frozen()] if self.fisher else [Frozen()]

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs) -> None:
        engine = self.engine
        classes = {int(c) for c in strategy.experience.classes_in_this_experience}
        new_classes = sorted(classes - self.seen_classes)
        self.seen_classes |= classes
        fisher = self._fisher(strategy) if self.fisher else None
        if self.tasks:
            head = _head(engine.model)
            kept = (head.weight[new_classes].clone(), head.bias[new_classes].clone() if head.bias is not None else None)
            previous = engine.shadow_rows(FISHER) if fisher is not None else None
            merges = self._merge_weights(previous, fisher)
            engine.load_into_live(
                lambda shadows, live: [merge(rows[MERGED], now) for merge, rows, now in zip(merges, shadows, live)]
            )
            head.weight[new_classes] = kept[0]
            if head.bias is not None and kept[1] is not None:
                head.bias[new_classes] = kept[1]
        engine.snapshot(MERGED)
        if fisher is not None:
            for row, value in zip(engine.shadow_rows(FISHER), fisher):
                row.copy_(value)
        self.tasks += 1

    def _merge_weights(self, previous: list[Tensor] | None, fisher: list[Tensor] | None):
        """Per group, the function of (θ*_{t−1}, θ_t) that merges them."""
        lam = self.options.weight
        if previous is None or fisher is None:
            return [lambda old, new: old.lerp(new, lam)] * len(self.engine.groups)

        def weighted(old_f: Tensor, new_f: Tensor):
            def merge(old: Tensor, new: Tensor) -> Tensor:
                w_old, w_new = (1 - lam) * old_f, lam * new_f
                total = w_old + w_new
                return torch.where(total > 0, (w_old * old + w_new * new) / total, old.lerp(new, lam))

            return merge

        return [weighted(old_f, new_f) for old_f, new_f in zip(previous, fisher)]

    @torch.enable_grad()
    def _fisher(self, strategy) -> list[Tensor]:
        """The diagonal Fisher of the live weights on this task's training batches (their getFisherDiagonal)."""
        needs_template(strategy, "CoFiMA's Fisher is estimated on the task's training batches")
        model, engine = strategy.model, self.engine
        total = [torch.zeros_like(row) for row in engine.shadow_rows(MERGED)]
        batches = 0
        model.train()
        for inputs, labels in strategy.training_batches():
            strategy.optimizer.zero_grad(set_to_none=True)
            with autocast(strategy):
                loss = F.cross_entropy(model(inputs).float(), labels)
            loss.backward()
            for acc, squared in zip(total, engine.flat(lambda t: None if t.grad is None else t.grad.square())):
                acc.add_(squared)
            batches += 1
        strategy.optimizer.zero_grad(set_to_none=True)
        return [(acc / max(batches, 1)).clamp_(max=self.options.fisher_max) for acc in total]

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.engine.state_dict(), "tasks": self.tasks, "seen_classes": sorted(self.seen_classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tasks, seen = state.get("tasks"), state.get("seen_classes")
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0 or not isinstance(seen, list):
            raise ValueError("the merge's task count or seen classes are not readable")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in seen):
            raise ValueError(f"the merge's seen classes {seen[:5]} are not class numbers")
        self.engine.load_state_dict(state.get("averages") or {})
        self.tasks, self.seen_classes = tasks, set(seen)

    def check_position(self, at: Position) -> None:
        if self.tasks != at.tasks_done:
            raise ValueError(f"its task count {self.tasks} is not the run's {at.tasks_done}")
        if self.seen_classes and not (min(self.seen_classes) >= 0 and max(self.seen_classes) < at.num_classes):
            raise ValueError(f"its seen classes lie outside the stream's 0..{at.num_classes - 1}")


def _head(model: nn.Module) -> nn.Linear:
    """The classification head: the model's last ``nn.Linear``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError("CoMA keeps the new classes' rows of the classification head: the model has no nn.Linear")
    return linears[-1]
