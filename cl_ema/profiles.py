"""Post-hoc averages of the weights: averaging profiles, exact in optimizer steps, and their least-squares fit.

The idea is EDM2's post-hoc EMA (Karras et al., CVPR 2024, NVlabs/edm2 ``training/phema.py``), done on
discrete steps with any ``cl_ema.ema.Rule``: during training a small *basis* of averages (say two
constant-decay EMAs) is snapshotted at a fixed cadence and at every task end; after the run any other
average at a step ``T`` is rebuilt as the combination of the snapshots taken at or before ``T`` whose
*profiles* best match the wanted one.

**Profile.** Any average of the weights is ``Σ_s p(s) θ_s`` over the iterates ``θ_0`` (the weights at
``register()``) … ``θ_T`` (after optimizer step ``T``); ``p`` is its profile. A shadow that follows a rule
does ``shadow ← (1 − w_s) shadow + w_s θ_s`` after step ``s`` with ``w_s = rule.next_weight(s)``, and
starts as ``θ_0``; so with ``w_0 = 1``

    p_T(s) = w_s · Π_{u=s+1..T} (1 − w_u),        Σ_s p_T(s) = 1.

A restart at step ``r`` (an average started again at a task start) sets the shadow to ``θ_r`` and resets
the rule: ``w_r = 1``, and every iterate before ``r`` gets weight 0. The weights ``w_s`` come from
simulating a copy of the rule step by step, so every schedule, ``update_every`` (``w_s = 0`` between
updates, the per-update decay applied once per update) and restart is exact; only the products are
vectorized. Check: a constant EMA of decay ``d`` has ``p_T(s) = (1 − d) d^(T−s)`` for ``s ≥ 1`` and
``p_T(0) = d^T``.

**Reconstruction.** With the basis profiles as the rows of ``B`` (K, T+1), each zero past its own
snapshot step, the coefficients are ``c = argmin ||Bᵀc − p||₂`` and the rebuilt weights ``Σ_k c_k σ_k``
(``σ_k`` the snapshots' tensors). EDM2 solves the normal equations ``(B Bᵀ) c = B p``, which squares the
condition number of ``Bᵀ`` (about 10³ for the default basis; snapshots close in time are close to
collinear, and two EMAs saved one step apart are exactly dependent), so here ``Bᵀ`` itself goes to a
least-squares solver (SVD, with a relative cut-off of the singular values), its columns first scaled to
unit norm so that the cut-off compares directions, not lengths. ``Σ_k |c_k|`` is how much the rebuilt
weights magnify the rounding of the stored snapshots (2⁻⁹ relative each in bf16).

The default that ``benchmarks/posthoc_basis.py`` measured: EMAs of horizons Δ and 4Δ with Δ = S/16 (S the
steps of a task), saved 16 times per task and at step 0, rebuild a constant EMA of any horizon from 0.05 to
8 tasks (as long as it is at most the training seen so far) within 0.9 % (relative L2 of the profile), the
means of the stream or task within 1 %, with ``Σ|c| ≤ 3.5``. Averages restarted at task starts also need the
live weights saved at each task end (``θ_r``, where they restart from).

    rules = [EMARule(horizon_decay(1 / 16, S)), EMARule(horizon_decay(4 / 16, S))]   # cl_ema.rules.horizon_decay
    steps = snapshot_steps(task_ends, 16)                    # when the training saves the basis
    basis = basis_profiles(rules, [t for t in steps if t <= T], T)
    fit = reconstruct(basis, ema_target(horizon_decay(2, S), T))
    weights = combine(fit.coefficients, snapshot_tensors)    # rows of ``basis``, in the same order
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cl_ema.rules import EMAOptions, EMARule, MeanRule, Rule, StochasticEMARule, Weighting


def step_weights(rule: Rule, steps: int, *, restarts: Sequence[int] = ()) -> Tensor:
    """``w_0 … w_steps`` (float64) of a shadow that follows a fresh copy of ``rule``: ``w_0 = 1`` (it starts as
    ``θ_0``), ``w_s`` the weight of ``θ_s`` in the update after step ``s``, 1 at each restart."""
    if steps < 0:
        raise ValueError(f"steps={steps}: must be >= 0")
    if isinstance(rule, StochasticEMARule):  # a copy would still draw from, and advance, the caller's generator
        raise ValueError("a stochastic EMA (CLS-ER's) has no profile fixed in advance: its updates are random draws")
    simulated = copy.deepcopy(rule)  # the caller's rule keeps its count of due updates
    simulated.reset()
    restart_steps = set(restarts)
    weights = [1.0]
    for step in range(1, steps + 1):
        weight = simulated.next_weight(step)  # before a restart's reset, as the plugin updates, then restarts
        if step in restart_steps:
            simulated.reset()
            weight = 1.0
        weights.append(weight)
    return torch.tensor(weights, dtype=torch.float64)


def profiles_at(rule: Rule, steps: Sequence[int], total: int, *, restarts: Sequence[int] = ()) -> Tensor:
    """Profiles (len(steps), total + 1) of the average that follows ``rule`` after each of ``steps`` optimizer
    steps (each ≤ ``total``), from one simulation; row ``i`` is zero past ``steps[i]``."""
    weights = step_weights(rule, total, restarts=restarts)
    rows = torch.zeros(len(steps), total + 1, dtype=torch.float64)
    for row, step in zip(rows, steps):
        if not 0 <= step <= total:
            raise ValueError(f"step {step} is outside 0…{total}")
        # survival[s] = Π_{u=s+1..step} (1 − w_u): a reversed cumulative product, 1 at s = step
        survival = torch.cumprod((1.0 - weights[1 : step + 1]).flip(0), 0).flip(0)
        row[:step] = weights[:step] * survival
        row[step] = weights[step]
    return rows


def profile(rule: Rule, steps: int, *, restarts: Sequence[int] = ()) -> Tensor:
    """Profile (steps + 1,) float64 of the average that follows ``rule`` after ``steps`` optimizer steps:
    entry ``s`` is the weight of ``θ_s``; a restart at ``r`` sets the average to ``θ_r`` and resets the rule."""
    return profiles_at(rule, [steps], steps, restarts=restarts)[0]


def snapshot_steps(task_ends: Sequence[int], per_task: int) -> list[int]:
    """Steps at which the basis is saved: 0 (``θ_0``, which long averages weigh early on) and ``per_task`` evenly
    spaced steps in each task (``task_ends``: cumulative step counts), the last at its end.

    Evenly spaced within each task rather than every multiple of a fixed cadence, so that no cadence snapshot
    falls a few steps before a task end: two snapshots one step apart of two EMAs span only three directions
    (``p_{t+1} = d p_t + (1 − d) e_{t+1}`` for both), which makes the basis singular and costs disk for nothing.
    """
    if per_task < 1:
        raise ValueError(f"per_task={per_task}: must be at least one snapshot per task")
    steps, start = {0}, 0
    for end in task_ends:
        if end <= start:
            raise ValueError(f"task ends {list(task_ends)} must increase")
        steps |= {start + round(j * (end - start) / per_task) for j in range(1, per_task + 1)}
        start = end
    return sorted(steps)


def basis_profiles(rules: Sequence[Rule], steps: Sequence[int], total: int) -> Tensor:
    """Profiles (len(steps) · len(rules), total + 1) of the basis snapshots: row ``i · len(rules) + k`` is the
    average that follows ``rules[k]``, saved after step ``steps[i]``."""
    per_rule = [profiles_at(rule, steps, total) for rule in rules]
    return torch.stack(per_rule, dim=1).reshape(len(steps) * len(rules), total + 1)


# ---------------------------------------------------------------------------------------------- targets
def task_start(task_ends: Sequence[int], step: int) -> int:
    """Where the task that holds optimizer step ``step`` started: the last task end before ``step`` (0 in the
    first task). At a task end, that is the task that has just ended."""
    return max((end for end in task_ends if end < step), default=0)


def ema_target(decay: float, steps: int, options: EMAOptions | None = None) -> Tensor:
    """Profile after ``steps`` steps of an EMA of ``decay`` over the whole stream."""
    return profile(EMARule(decay, options), steps)


def task_ema_target(decay: float, steps: int, task_ends: Sequence[int], options: EMAOptions | None = None) -> Tensor:
    """Profile after ``steps`` steps of an EMA restarted (from the live weights) at each task start."""
    return profile(EMARule(decay, options), steps, restarts=[task_start(task_ends, steps)])


def mean_target(steps: int, weighting: Weighting = Weighting.uniform, every: int = 1) -> Tensor:
    """Profile after ``steps`` steps of the ``weighting``-weighted mean of the iterates of the whole stream
    (its first update copies the weights, so ``θ_0`` has weight 0 from then on)."""
    return profile(MeanRule(weighting, every), steps)


def task_mean_target(
    steps: int, task_ends: Sequence[int], weighting: Weighting = Weighting.uniform, every: int = 1
) -> Tensor:
    """Profile after ``steps`` steps of the ``weighting``-weighted mean of the current task's iterates."""
    return profile(MeanRule(weighting, every), steps, restarts=[task_start(task_ends, steps)])


# ---------------------------------------------------------------------------------------------- the fit
@dataclass
class Reconstruction:
    """Least-squares fit of a target profile by basis profiles."""

    coefficients: Tensor  # (K,) float64, one per basis row; 0 on the rows left out
    residual: float  # ||Bᵀc − p||₂ / ||p||₂
    used: list[int]  # basis rows that went into the solve: not all zero, first of exact duplicates


def usable_rows(basis: Tensor) -> list[int]:
    """Rows of ``basis`` that are not all zero, each exact duplicate but the first left out (ascending)."""
    if basis.shape[0] == 0:
        return []
    unique, inverse = torch.unique(basis, dim=0, return_inverse=True)
    order = torch.arange(basis.shape[0])
    first = torch.full((unique.shape[0],), basis.shape[0]).scatter_reduce(0, inverse, order, "amin")
    nonzero = unique.ne(0).any(dim=1)
    return sorted(first[nonzero].tolist())


def reconstruct_all(basis: Tensor, targets: Tensor, *, rcond: float | None = None) -> list[Reconstruction]:
    """``reconstruct`` of each row of ``targets`` (n, T+1) by the same ``basis`` (K, T+1), with one factorization.

    ``rcond``: singular values of the column-normalized ``Bᵀ`` below ``rcond`` × the largest are cut
    (default: machine precision × T+1, torch's), so near-collinear snapshots do not blow up the coefficients.
    """
    basis, targets = basis.to("cpu", torch.float64), targets.to("cpu", torch.float64)  # gelsd: CPU only
    if basis.dim() != 2 or targets.dim() != 2 or basis.shape[1] != targets.shape[1]:
        raise ValueError(f"basis {tuple(basis.shape)} and targets {tuple(targets.shape)}: want (K, N) and (n, N)")
    target_norms = targets.norm(dim=1)
    if bool((target_norms == 0).any()):
        raise ValueError("a target profile is all zero")
    used = usable_rows(basis)
    coefficients = torch.zeros(targets.shape[0], basis.shape[0], dtype=torch.float64)
    if used:
        columns = basis[used].T  # (N, k)
        lengths = columns.norm(dim=0)
        solution = torch.linalg.lstsq(columns / lengths, targets.T, rcond=rcond, driver="gelsd").solution
        coefficients[:, used] = (solution / lengths[:, None]).T
    residuals = (coefficients @ basis - targets).norm(dim=1) / target_norms
    return [Reconstruction(coefficients=c, residual=float(r), used=list(used)) for c, r in zip(coefficients, residuals)]


def reconstruct(basis: Tensor, target: Tensor, *, rcond: float | None = None) -> Reconstruction:
    """Coefficients ``c`` (K,) of the basis profiles (rows of ``basis``, (K, T+1), zero past their own step)
    minimizing ``||basisᵀ c − target||₂``; see ``reconstruct_all`` for ``rcond``."""
    if target.dim() != 1:
        raise ValueError(f"target {tuple(target.shape)}: want one profile (T+1,)")
    return reconstruct_all(basis, target[None], rcond=rcond)[0]


def combine(coefficients: Tensor | Sequence[float], tensors: Sequence[Tensor]) -> Tensor:
    """``Σ_k c_k · tensors[k]``, accumulated in float64 (the coefficients of near-collinear snapshots are large
    and of both signs), returned as float32; tensors with a zero coefficient are not read."""
    weights = [float(c) for c in coefficients]
    if len(weights) != len(tensors) or not tensors:
        raise ValueError(f"{len(weights)} coefficients for {len(tensors)} tensors")
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for weight, tensor in zip(weights, tensors):
        if weight != 0.0:
            total.add_(tensor.to(torch.float64), alpha=weight)
    return total.to(torch.float32)
