"""CLS-ER (Arani, Sarfraz & Zonooz, ICLR 2022): two EMAs of the weights as teachers on replayed samples.

Following the authors' code (NeurAI-Lab/CLS-ER, ``models/clser.py``), with ``s`` the number of
optimizer steps so far (never reset between tasks), after every step each EMA model ``k`` of the
plastic and the stable one is updated with probability ``p_k``, and then with decay

    α_k(s) = min(1 − 1/(s + 1), α_k):     θ_k ← α_k(s) · θ_k + (1 − α_k(s)) · θ

On the replayed part of each mini-batch (inputs x, labels y) the teacher of each sample is the
EMA model that gives its true label the higher softmax probability (the stable one only when
strictly higher), and the loss gains

    λ · mean((f_θ(x) − f_teacher(x))²)        (over samples and classes)

on top of the cross-entropy of the whole batch (current and replayed samples). The replay itself
is the ``replay`` plugin of the strategy (Mammoth's reservoir buffer in CLS-ER's protocols).

Both EMAs live in one ``cl_ema.ema.WeightAverages``, each with CLS-ER's rule (``StochasticEMARule``;
one flat buffer, its fused update: a step that updates one of them updates only that one). The
coin flips come from the plugin's own generator, seeded by ``seed`` and saved in checkpoints.
Evaluation tracks: ``ema_plastic`` and ``ema_stable`` (the one CLS-ER reports).

Differences from the authors' code, none of which matters for networks without BatchNorm (the
MNIST MLPs of the published tables): their EMA models keep BatchNorm statistics of their own,
accumulated by the teacher passes over replayed samples, while cl_ema averages the live model's
(``buffers="average"``); and their live network makes a second forward pass over the replayed
samples for the consistency loss, where cl_ema uses the replayed part of the one pass over the
whole batch (the same outputs without BatchNorm).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_ema.ema import row
from cl_ema.plugins import Position, Track, needs_template
from cl_ema.plugins.averaging import AveragingPlugin
from cl_ema.plugins.options import CLSER
from cl_ema.rules import Rule, StochasticEMARule

TEACHERS = ("plastic", "stable")


class CLSERPlugin(AveragingPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """CLS-ER's plastic and stable EMA teachers (options: ``cl_ema.plugins.options.CLSER``); needs cl_ema's
    template (the replayed part of each batch). ``seed``: of the coin flips (the run's)."""

    needs = "replay"  # the teachers act on the replayed samples: without them the plugin changes nothing

    def __init__(self, options: CLSER | None = None, /, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.options = options if options is not None else CLSER(**kwargs)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: no device sync per step
        self._teacher_logits: Tensor | None = None

    def engine_rules(self) -> list[Rule]:
        o = self.options
        return [
            StochasticEMARule(getattr(o, f"{name}_decay"), getattr(o, f"{name}_update_prob"), self._draw)
            for name in TEACHERS
        ]

    def _draw(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def tracks(self) -> list[Track]:
        engine = self.engine
        return [
            Track(
                f"ema_{name}",
                partial(engine.swapped, k),
                "stochastic_ema",
                rule.decay,
                rule.horizon,
                state=partial(engine.state, row(k)),
            )
            for k, (name, rule) in enumerate(zip(TEACHERS, engine.rules))
            if isinstance(rule, StochasticEMARule)
        ]

    def before_forward(self, strategy, **kwargs) -> None:
        # the teachers run before the live forward pass: swapping their weights in afterwards would
        # modify tensors the backward pass needs
        needs_template(strategy, "CLSERPlugin reads the replayed part of each batch")
        replayed = strategy.mb_replayed
        self._teacher_logits = None
        if replayed == 0 or self.options.reg_weight == 0:
            return
        engine = self.engine
        inputs, labels = strategy.mb_x[-replayed:], strategy.mb_y[-replayed:]
        logits = []
        with torch.no_grad(), strategy.autocast():
            for k in range(len(TEACHERS)):
                with engine.swapped(k):
                    logits.append(engine.model(inputs).float())
        self._teacher_logits = choose_teacher(logits[0], logits[1], labels)

    def before_backward(self, strategy, **kwargs) -> None:
        if self._teacher_logits is None:
            return
        live = strategy.mb_output[-len(self._teacher_logits) :].float()
        strategy.loss += self.options.reg_weight * F.mse_loss(live, self._teacher_logits)

    def after_update(self, strategy, **kwargs) -> None:
        self.engine.update()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.engine.state_dict(), "generator": self.generator.get_state()}

    def check_position(self, at: Position) -> None:
        self.check_steps(at)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        generator = state.get("generator")
        if not isinstance(state.get("ema"), dict) or not isinstance(generator, torch.Tensor):
            raise ValueError("the CLS-ER state lacks its averages or its generator")
        if generator.dtype != torch.uint8 or generator.shape != self.generator.get_state().shape:
            raise ValueError("the CLS-ER generator state is not a CPU generator's")
        self.engine.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])


def choose_teacher(plastic: Tensor, stable: Tensor, labels: Tensor) -> Tensor:
    """Per sample, the logits of the EMA model more confident in the true label (stable only if strictly)."""
    on_label = labels.unsqueeze(1)
    stable_wins = F.softmax(stable, 1).gather(1, on_label) > F.softmax(plastic, 1).gather(1, on_label)
    return torch.where(stable_wins, stable, plastic)
