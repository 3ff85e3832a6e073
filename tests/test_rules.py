"""The averaging rules of the newest literature, each against a hand computation of its sources' formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_ema.plugins.averaging import AveragesPlugin


def set_weights(model: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(value[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def weights(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


@pytest.mark.parametrize("update_after", [0, 3])
def test_bema_follows_the_authors_formula(update_after):
    """θ'_s = α_s (θ_s − θ_τ) + EMA_s, with the authors' t_s = max(s − τ + ρ, 1), β_s = (1 + γ t_s)^(−κ)
    every φ-th step after τ, α_s = (1 + γ t_s)^(−η) (abblock/bema, src/core_online.py)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    every, kappa, eta, rho, gamma = 2, 0.5, 0.2, 10.0, 1.0
    plugin = AveragesPlugin(rules=[{"rule": "bema", "update_every": every, "update_after": update_after}])
    plugin.attach(model)
    theta = weights(model)
    anchor, ema = theta.clone(), theta.clone()
    for step in range(1, 10):
        theta = theta + torch.randn_like(theta)
        set_weights(model, theta)
        plugin.after_update(None)
        t = max(step - update_after + rho, 1)
        if step == update_after:
            anchor, ema = theta.clone(), theta.clone()
        elif step > update_after and (step - update_after) % every == 0:
            beta = (1 + gamma * t) ** -kappa
            ema = (1 - beta) * ema + beta * theta
        (track,) = plugin.tracks()
        with track.swap_in():
            got = weights(model)
        expected = theta if step <= update_after else (1 + gamma * t) ** -eta * (theta - anchor) + ema
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(weights(model), theta)  # restored


@pytest.mark.parametrize("alpha,anchor", [(0.5, "init"), (0.25, "prev_task"), (0.0, "init"), (1.0, "init")])
def test_lines_scales_each_layers_task_vector_by_its_depth(alpha, anchor):
    """θ_a + λ(ℓ)(θ − θ_a), λ(ℓ) = α + (1 − α) ℓ / (L − 1): the first layer keeps α of its change, the last all
    (wang-kee/LiNeS, single-task form); α = 1 is the live weights, α = 0 resets the first layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    plugin = AveragesPlugin(rules=[{"rule": "lines", "alpha": alpha, "anchor": anchor}])
    plugin.attach(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    plugin.before_training_exp(None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if anchor == "prev_task":
        plugin.before_training_exp(None)  # the next task starts from these weights
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    (track,) = plugin.tracks()
    assert track.name == f"lines_{anchor}_{alpha:g}"
    with track.swap_in():
        got = {name: p.detach().clone() for name, p in model.named_parameters()}
    depth = {"0": 0, "2": 1, "4": 2}  # the three layers that own parameters
    for name, value in got.items():
        scale = alpha + (1 - alpha) * depth[name.split(".")[0]] / 2
        torch.testing.assert_close(value, start[name] + scale * (live[name] - start[name]))
    if alpha == 1.0:
        assert all(torch.equal(got[n], live[n]) for n in got)


def test_both_rules_are_evaluated_by_strategy_averages():
    from helpers import compose_config

    from cl_ema.config import check

    rules = [entry["rule"] for entry in check(compose_config("strategy=averages")).plugins["averages"].options.rules]
    assert "bema" in rules and "lines" in rules
