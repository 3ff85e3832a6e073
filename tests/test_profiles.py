"""Post-hoc averaging: exact step profiles against closed forms and the engine itself, and their least-squares fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_ema.ema import EMAOptions, EMARule, MeanRule, Rule, StochasticEMARule, WeightAverages, Weighting
from cl_ema.options import OptionError
from cl_ema.profiles import (
    basis_profiles,
    combine,
    ema_target,
    mean_target,
    profile,
    profiles_at,
    reconstruct,
    reconstruct_all,
    snapshot_steps,
    task_ema_target,
    task_mean_target,
)
from cl_ema.rules import Schedule, horizon_decay


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12, atol: float = 1e-15, what: str = ""
) -> None:
    """Elementwise ``|actual − expected| ≤ atol + rtol · |expected|`` (lighter to import than torch.testing)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    gap = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert gap.max().item() <= 0, f"{what} off by up to {(actual - expected).abs().max().item():.3g}"


def sequential_profile(rule: Rule, steps: int, restarts: tuple[int, ...] = ()) -> torch.Tensor:
    """The reference: the weight vector itself updated as a shadow is, one step at a time (O(steps²))."""
    weights = torch.zeros(steps + 1, dtype=torch.float64)
    weights[0] = 1.0
    for step in range(1, steps + 1):
        w = rule.next_weight(step)
        if step in restarts:
            rule.reset()
            weights.zero_()
            weights[step] = 1.0
        else:
            weights[: step + 1] *= 1.0 - w
            weights[step] += w
    return weights


def rules_to_check() -> list[tuple[str, Rule, tuple[int, ...]]]:
    """Every schedule and option the profile must follow exactly: (name, rule, restart steps)."""
    return [
        ("constant", EMARule(0.9), ()),
        ("warmup", EMARule(0.95, EMAOptions(schedule=Schedule.warmup, warmup_gamma=2.0)), ()),
        ("step", EMARule(0.9, EMAOptions(schedule=Schedule.step, step_decay=0.3, step_updates=4)), ()),
        ("update_every=3", EMARule(0.8, EMAOptions(update_every=3)), ()),
        ("warmup, every 3, restarted", EMARule(0.9, EMAOptions(schedule=Schedule.warmup, update_every=3)), (10, 20)),
        ("uniform mean", MeanRule(Weighting.uniform), ()),
        ("linear mean, every 2", MeanRule(Weighting.linear, every=2), ()),
        ("quadratic mean, restarted", MeanRule(Weighting.quadratic), (13,)),
        ("EMA restarted per task", EMARule(0.85), (10, 20)),
    ]


def test_a_constant_ema_has_the_closed_form_profile():
    decay, steps = 0.93, 60
    p = profile(EMARule(decay), steps)
    s = torch.arange(1, steps + 1, dtype=torch.float64)
    assert p[0].item() == pytest.approx(decay**steps, rel=1e-13)
    assert_close(p[1:], (1 - decay) * decay ** (steps - s), rtol=1e-13, atol=0)
    assert p.dtype == torch.float64 and p.sum().item() == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize(("name", "rule", "restarts"), rules_to_check(), ids=[r[0] for r in rules_to_check()])
def test_the_profile_is_the_step_by_step_update(name, rule, restarts):
    p = profile(rule, 30, restarts=restarts)
    assert rule.due == 0  # the caller's rule is left as it was: the profile followed a copy
    assert_close(p, sequential_profile(rule, 30, restarts), rtol=1e-12, atol=1e-15)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-13)


def test_profiles_at_many_steps_are_the_profiles_at_each():
    rule, steps = EMARule(0.9, EMAOptions(schedule=Schedule.warmup, update_every=2)), [0, 1, 7, 20, 33]
    rows = profiles_at(rule, steps, 40, restarts=(15,))
    assert rows.shape == (5, 41)
    for row, step in zip(rows, steps):
        assert_close(row[: step + 1], profile(rule, step, restarts=(15,)), rtol=1e-13, atol=0)
        assert not row[step + 1 :].any()


def test_the_shadows_of_the_engine_are_the_profiles_times_the_iterates():
    """A tiny nn.Linear whose weights are scripted, followed by WeightAverages: shadow = Σ_s p(s) θ_s."""
    steps, cases = 30, rules_to_check()
    model = nn.Linear(2, 1)
    averages = WeightAverages(model, [rule for _, rule, _ in cases])
    averages.register()
    iterates = [averages.live_values()[0].double()]
    script = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.randn(param.shape, generator=script))
        averages.update()
        for k, (_, _, restarts) in enumerate(cases):
            if step in restarts:  # the plugin restarts an average from the live weights at a task start
                averages.snapshot(k)
                averages.reset(k)
        iterates.append(averages.live_values()[0].double())
    thetas = torch.stack(iterates)  # (steps + 1, parameters)
    for k, (name, rule, restarts) in enumerate(cases):
        expected = profile(rule, steps, restarts=restarts) @ thetas
        assert_close(averages.shadow_rows(k)[0].double(), expected, rtol=0, atol=2e-6, what=name)


def test_the_means_weigh_their_iterates_as_their_weighting_says():
    steps = 12
    n = torch.arange(1, steps + 1, dtype=torch.float64)
    uniform = mean_target(steps)
    assert uniform[0] == 0  # the first update copies θ_1: θ_0 is out of the mean
    assert_close(uniform[1:], torch.full((steps,), 1 / steps, dtype=torch.float64))
    assert_close(mean_target(steps, Weighting.linear)[1:], n / n.sum())
    quadratic = torch.cumsum(n**2, 0)  # c_n = Σ_{i≤n} i²
    assert_close(mean_target(steps, Weighting.quadratic)[1:], quadratic / quadratic.sum())
    every_third = mean_target(steps, every=3)
    assert_close(every_third[3::3], torch.full((4,), 0.25, dtype=torch.float64))
    assert every_third.sum().item() == pytest.approx(1.0) and every_third[0] == 0


def test_averages_restarted_at_each_task_start():
    task_ends, decay = [10, 25, 40], 0.8
    at_task_end, mid_task = 25, 32  # the task that has just ended starts at 10; the one holding 32 at 25
    uniform_over_task = torch.full((15,), 1 / 15, dtype=torch.float64)
    assert_close(task_mean_target(at_task_end, task_ends)[11:26], uniform_over_task)
    assert not task_mean_target(at_task_end, task_ends)[:11].any()
    ema = task_ema_target(decay, mid_task, task_ends)
    assert not ema[:25].any() and ema[25].item() == pytest.approx(decay**7)  # it restarted from θ_25
    assert_close(ema[26:], ema_target(decay, mid_task)[26:])
    assert horizon_decay(0.5, 200) == pytest.approx(0.99) and horizon_decay(2, 100, update_every=4) == pytest.approx(
        0.98
    )
    with pytest.raises(OptionError, match="must span one update"):
        horizon_decay(0.001, 100)


def test_snapshots_are_spread_evenly_over_each_task_and_end_on_its_last_step():
    steps = snapshot_steps([469, 938], 16)
    assert steps[0] == 0 and 469 in steps and steps[-1] == 938 and len(steps) == 33
    assert min(b - a for a, b in zip(steps, steps[1:])) >= 29  # none a few steps before a task end
    assert snapshot_steps([1200], 8) == list(range(0, 1201, 150))


def test_a_target_that_is_a_basis_profile_comes_back_exactly():
    rules = [EMARule(0.9), EMARule(0.975)]
    basis = basis_profiles(rules, snapshot_steps([40, 80], 4), 80)
    picked = 9  # EMA 0.975 at step 40
    target = basis[picked]
    with_duplicate_and_zero = torch.cat([basis, basis[picked : picked + 1], torch.zeros(1, 81, dtype=torch.float64)])
    fit = reconstruct(with_duplicate_and_zero, target)
    expected = torch.zeros(with_duplicate_and_zero.shape[0], dtype=torch.float64)
    expected[picked] = 1.0
    assert_close(fit.coefficients, expected, rtol=0, atol=1e-10)
    assert fit.residual < 1e-12
    left_out = {1, len(basis), len(basis) + 1}  # θ_0 again (every EMA starts there), the duplicate, the zero row
    assert left_out.isdisjoint(fit.used) and len(fit.used) == len(basis) - 1 and picked in fit.used


def claim_worst_residual(steps_per_task: int, horizons: list[float]) -> float:
    """Worst residual of EMAs of ``horizons`` (tasks), at every task end of 5 tasks, fitted by EMAs of horizons
    Δ and 4Δ snapshotted every Δ = S/8."""
    task_ends = [steps_per_task * (i + 1) for i in range(5)]
    steps = snapshot_steps(task_ends, 8)
    rules = [EMARule(horizon_decay(a / 8, steps_per_task)) for a in (1, 4)]
    basis = basis_profiles(rules, steps, task_ends[-1])
    targets = [profiles_at(EMARule(horizon_decay(h, steps_per_task)), task_ends, task_ends[-1]) for h in horizons]
    worst = 0.0
    for i, end in enumerate(task_ends):
        rows = 2 * sum(1 for step in steps if step <= end)  # the snapshots taken so far: a prefix of the rows
        fits = reconstruct_all(basis[:rows, : end + 1], torch.stack([t[i, : end + 1] for t in targets]))
        worst = max(worst, *(fit.residual for fit in fits))
    return worst


def test_two_emas_every_eighth_of_a_task_rebuild_any_horizon_from_a_tenth_to_four_tasks():
    """The issue's claim: bases of horizons Δ and 4Δ at Δ = S/8 fit every EMA horizon 0.1…4 tasks < 1 %."""
    horizons = [0.1 * 40 ** (i / 11) for i in range(12)]
    assert claim_worst_residual(80, horizons) < 0.01
    assert claim_worst_residual(1200, horizons[::3]) < 0.01


def test_weights_rebuilt_from_snapshots_follow_the_tracked_ema():
    """Train a tiny model on 4 tasks; save the basis (Δ, 4Δ) every Δ; at each task end the weights rebuilt for an
    EMA of another horizon are that EMA, tracked directly, within what the residual allows."""
    torch.manual_seed(0)
    steps_per_task, tasks = 40, 4
    task_ends = [steps_per_task * (i + 1) for i in range(tasks)]
    basis_rules = [EMARule(horizon_decay(a / 8, steps_per_task)) for a in (1, 4)]
    target_decay = horizon_decay(0.6, steps_per_task)
    model = nn.Linear(4, 3)
    averages = WeightAverages(model, [*basis_rules, EMARule(target_decay)])
    averages.register()
    save_at = snapshot_steps(task_ends, 8)
    snapshots = [averages.shadow_rows(k)[0].clone() for k in range(2)]  # step 0
    iterates = [averages.live_values()[0].double()]
    for task in range(tasks):
        teacher = torch.randn(3, 4)  # each task its own regression target
        for _ in range(steps_per_task):
            inputs = torch.randn(16, 4)
            loss = nn.functional.mse_loss(model(inputs), inputs @ teacher.T)
            with torch.no_grad():  # plain SGD, in place: the engine's flat buffer holds the parameters
                for param, grad in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))):
                    param.sub_(0.2 * grad)
            averages.update()
            iterates.append(averages.live_values()[0].double())
            if averages.step in save_at:
                snapshots += [averages.shadow_rows(k)[0].clone() for k in range(2)]
        end = task_ends[task]
        taken = 2 * sum(1 for step in save_at if step <= end)
        basis = basis_profiles(basis_rules, [s for s in save_at if s <= end], end)
        target = ema_target(target_decay, end)
        fit = reconstruct(basis, target)
        rebuilt, tracked = combine(fit.coefficients, snapshots[:taken]), averages.shadow_rows(2)[0]
        thetas = torch.stack(iterates)  # (end + 1, parameters)
        # the snapshots are what their profiles say, so the rebuilt weights are the fitted profile's average…
        assert_close(rebuilt.double(), (fit.coefficients @ basis) @ thetas, rtol=0, atol=1e-5)
        # …and differ from the tracked EMA by the residual profile's average
        error = (fit.coefficients @ basis - target).abs().sum().item() * thetas.abs().max().item()
        assert (rebuilt - tracked).abs().max().item() <= error + 1e-5
        assert fit.residual < 0.01 and (rebuilt - tracked).norm() < 0.01 * tracked.norm()


def test_combine_accumulates_in_float64_and_gives_float32():
    ones = torch.ones(3)
    out = combine([1e8, 1.0, -1e8], [ones, ones, ones])  # in float32, 1e8 + 1 would round to 1e8
    assert out.dtype == torch.float32 and torch.equal(out, ones)
    assert math.isclose(combine(torch.tensor([2.0, 0.0]), [torch.ones(1), torch.full((1,), math.nan)]).item(), 2.0)
    with pytest.raises(ValueError, match="2 coefficients for 1 tensors"):
        combine([1.0, 2.0], [ones])


def test_a_stochastic_ema_has_no_profile_and_its_draws_are_left_alone():
    draws = torch.Generator().manual_seed(0)
    rule = StochasticEMARule(0.99, 0.5, lambda: float(torch.rand((), generator=draws)))
    state = draws.get_state()
    with pytest.raises(ValueError, match="no profile fixed in advance"):
        profile(rule, 10)
    assert torch.equal(draws.get_state(), state)
