"""Merging task vectors, and interpolating weights: the task-end averaging rules, as functions.

With θ_0 the weights training started from (pretrained ones where a run starts from them) and θ_i
the weights at the end of task i, the task vectors are ``τ_i = θ_i − θ_0`` (MagMax, Marczak et al.,
ECCV 2024, ``danielm1405/magmax``: sequential fine-tuning, so each τ_i is cumulative). After t tasks:

- mean merge: ``θ_0 + (1/t) Σ_i τ_i`` (= the mean of the θ_i; their ``sum`` with coefficient 1/t);
- MagMax: ``θ_0 + λ · m`` with ``m`` per entry the τ_i of largest magnitude, the later task on a
  tie (their ``merge_max_abs``, λ = 0.5);
- TIES (Yadav et al., NeurIPS 2023, as MagMax's ``merge_splitted.py`` runs it): each τ_i keeps its
  ``keep`` = 20 % largest magnitudes over all its entries (the rest 0); per entry the elected sign is
  that of Σ_i τ̂_i (0: the majority of elected signs); the merge is the mean of the τ̂_i that agree
  with it (disjoint mean), ``θ_0 + λ · mean`` with λ = 0.55.

All three are kept incrementally, one task at a time, in buffers of the model's size: the mean in a
running sum, MagMax in ``m``, TIES in the sums and counts of the positive and of the negative trimmed
entries (``P, N, c_P, c_N``: the elected sign is ``sign(P + N)``, the disjoint mean ``P / c_P`` or
``N / c_N``) — so no rule keeps one snapshot per task.

Interpolation (WiSE-FT, Wortsman et al., CVPR 2022): ``θ_α = (1 − α) · θ_a + α · θ`` for an anchor
θ_a (the starting weights, or the previous task's final weights), computed as ``θ_a.lerp(θ, α)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def interpolate(anchor: Tensor, weights: Tensor, alpha: float) -> Tensor:
    """``(1 − α) · anchor + α · weights`` (α = 0: the anchor, α = 1: the weights, exactly)."""
    return anchor.lerp(weights, alpha)


def magmax_step(largest: Tensor, task_vector: Tensor) -> None:
    """``largest`` ← per entry the larger in magnitude of itself and the new task vector (the new one on a tie)."""
    torch.where(task_vector.abs() >= largest.abs(), task_vector, largest, out=largest)


def trim(task_vectors: list[Tensor], keep: float) -> list[Tensor]:
    """TIES's trimming of one task vector (given per group): all but the ``keep`` fraction largest
    magnitudes, counted over all its entries, set to 0 (entries equal to the threshold are kept)."""
    magnitudes = torch.cat([t.abs().flatten() for t in task_vectors])
    k = magnitudes.numel() - int(magnitudes.numel() * keep)
    if k <= 0:
        return [t.clone() for t in task_vectors]
    threshold = magnitudes.kthvalue(k).values
    return [t * (t.abs() >= threshold) for t in task_vectors]


def ties_step(positive: Tensor, negative: Tensor, positives: Tensor, negatives: Tensor, trimmed: Tensor) -> None:
    """Add one trimmed task vector to TIES's sums and counts of positive and negative entries."""
    positive.add_(trimmed.clamp(min=0))
    negative.add_(trimmed.clamp(max=0))
    positives.add_(trimmed > 0)
    negatives.add_(trimmed < 0)


def ties_merge(positive: Tensor, negative: Tensor, positives: Tensor, negatives: Tensor, majority: Tensor) -> Tensor:
    """The disjoint mean of the trimmed task vectors that agree with the elected sign of each entry.

    ``majority``: the sign of the sum of the elected signs over every entry of the model (TIES elects it
    where an entry's own sum is 0); see ``election``."""
    elected = torch.sign(positive + negative)
    elected = torch.where(elected == 0, majority, elected)
    return torch.where(elected > 0, positive / positives.clamp(min=1), negative / negatives.clamp(min=1))


def election(positive: list[Tensor], negative: list[Tensor]) -> Tensor:
    """The sign TIES gives entries whose own sum is 0: that of the sum of every entry's elected sign."""
    return torch.sign(torch.stack([torch.sign(p + n).sum() for p, n in zip(positive, negative)]).sum())
