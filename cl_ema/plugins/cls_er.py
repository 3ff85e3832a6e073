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

Both EMAs live in one ``cl_ema.ema.EMA`` (one flat buffer, its fused update: a step that updates
one of them updates only that one). The coin flips come from the plugin's own generator, seeded by
``seed`` and saved in checkpoints. Evaluation tracks: ``ema_plastic`` and ``ema_stable`` (the one
CLS-ER reports).

Differences from the authors' code, none of which matters for networks without BatchNorm (the
MNIST MLPs of the published tables): their EMA models keep BatchNorm statistics of their own,
accumulated by the teacher passes over replayed samples, while cl_ema averages the live model's
(``buffers="average"``); and their live network makes a second forward pass over the replayed
samples for the consistency loss, where cl_ema uses the replayed part of the one pass over the
whole batch (the same outputs without BatchNorm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_ema.config import CLSERConfig
from cl_ema.ema import EMA
from cl_ema.errors import UserError
from cl_ema.evaluation import Track

TEACHERS = ("plastic", "stable")


class CLSERPlugin(SupervisedPlugin, supports_distributed=True):
    """CLS-ER's plastic and stable EMA teachers (``config``: the ``cls_er`` section)."""

    def __init__(self, config: CLSERConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or CLSERConfig()
        self.decays = [getattr(self.config, f"{name}_decay") for name in TEACHERS]
        self.update_probs = [getattr(self.config, f"{name}_update_prob") for name in TEACHERS]
        self.ema: EMA | None = None
        self.global_step = 0
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: no device sync per step
        self._teacher_logits: Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        if self.ema is None or self.ema.model is not model:
            self.ema = EMA(model, self.decays)
            self.ema.register()

    def tracks(self) -> list[Track]:
        return [
            Track(
                f"ema_{name}", lambda k=k: self.ema.swapped(k), decay, 1 / (prob * (1 - decay)) if decay < 1 else None
            )
            for k, (name, decay, prob) in enumerate(zip(TEACHERS, self.decays, self.update_probs))
        ]

    def before_forward(self, strategy, **kwargs) -> None:
        # the teachers run before the live forward pass: swapping their weights in afterwards would
        # modify tensors the backward pass needs
        replayed = strategy.mb_replayed
        self._teacher_logits = None
        if replayed == 0 or self.config.reg_weight == 0:
            return
        inputs, labels = strategy.mb_x[-replayed:], strategy.mb_y[-replayed:]
        logits = []
        with torch.no_grad(), strategy.autocast():
            for k in range(len(TEACHERS)):
                with self.ema.swapped(k):
                    logits.append(self.ema.model(inputs).float())
        self._teacher_logits = choose_teacher(*logits, labels)

    def before_backward(self, strategy, **kwargs) -> None:
        if self._teacher_logits is None:
            return
        live = strategy.mb_output[-len(self._teacher_logits) :].float()
        strategy.loss += self.config.reg_weight * F.mse_loss(live, self._teacher_logits)

    def after_update(self, strategy, **kwargs) -> None:
        self.global_step += 1
        warm = 1.0 - 1.0 / (self.global_step + 1)
        draws = torch.rand(len(TEACHERS), generator=self.generator).tolist()
        self.ema.update(
            [
                min(warm, decay) if draw < prob else 1.0
                for decay, prob, draw in zip(self.decays, self.update_probs, draws)
            ]
        )

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "global_step": self.global_step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("global_step"), int) or state["global_step"] < 0:
            raise UserError(f"checkpoint CLS-ER step count {state.get('global_step')!r} is not a count")
        self.ema.load_state_dict(state["ema"])
        self.global_step = state["global_step"]
        self.generator.set_state(state["generator"])


def choose_teacher(plastic: Tensor, stable: Tensor, labels: Tensor) -> Tensor:
    """Per sample, the logits of the EMA model more confident in the true label (stable only if strictly)."""
    on_label = labels.unsqueeze(1)
    stable_wins = F.softmax(stable, 1).gather(1, on_label) > F.softmax(plastic, 1).gather(1, on_label)
    return torch.where(stable_wins, stable, plastic)
