"""The evaluation-only averaging rules and CoMA / CoFiMA: each against an independent reference,
none changes training, all resume exactly, and the plugins work in a stock Avalanche strategy."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FakeTemplate, run_experiment, stop_and_resume
from pinned import pinned_overrides
from torch import nn

from cl_ema.plugins.averaging import AveragesPlugin
from cl_ema.plugins.coma import CoMAPlugin
from cl_ema.plugins.ema import EMAPlugin
from cl_ema.rules import trim


def set_weights(model: nn.Module, value: torch.Tensor) -> None:
    """In place (torch's vector_to_parameters would replace the tensors the averages are linked to)."""
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(value[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def weights(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def swapped_weights(track, model: nn.Module) -> torch.Tensor:
    with track.swap_in():
        return weights(model)


def tracks_of(plugin) -> dict:
    return {track.name: track for track in plugin.tracks()}


class Experience(SimpleNamespace):
    pass


def test_wise_interpolates_with_the_start_and_the_previous_tasks_weights():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    plugin = AveragesPlugin(
        rules=[
            {"rule": "wise", "anchor": anchor, "alpha": alpha}
            for anchor in ("init", "prev_task")
            for alpha in (0.0, 0.3, 1.0)
        ]
    )
    plugin.attach(model)
    start = weights(model)
    plugin.before_training_exp(None)  # task 1 starts: its previous weights are the start
    set_weights(model, start + 1.0)
    plugin.before_training_exp(None)  # task 2 starts from θ_1 = start + 1
    end = start + torch.linspace(1, 2, len(start))
    set_weights(model, end)
    got = {name: swapped_weights(t, model) for name, t in tracks_of(plugin).items()}
    assert torch.equal(got["wise_init_0"], start) and torch.equal(got["wise_init_1"], end)  # α = 0 and 1 exactly
    torch.testing.assert_close(got["wise_init_0.3"], 0.7 * start + 0.3 * end)
    torch.testing.assert_close(got["wise_prev_task_0.3"], 0.7 * (start + 1.0) + 0.3 * end)
    assert torch.equal(weights(model), end)  # restored


def ties_by_magmax_code(vectors: torch.Tensor, keep: float, scale: float) -> torch.Tensor:
    """TIES as MagMax's src/merging/ties.py runs it, on stacked flattened task vectors (the reference)."""
    d = vectors.shape[1]
    k = d - int(d * keep)
    kth, _ = vectors.abs().kthvalue(k, dim=1, keepdim=True)
    trimmed = vectors * (vectors.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep_rows = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep_rows
    return scale * selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)


def test_merges_of_hand_made_task_vectors_match_their_definitions():
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    plugin = AveragesPlugin(rules=[{"rule": "merge_mean"}, {"rule": "magmax"}, {"rule": "ties"}])
    plugin.attach(model)
    start = weights(model)
    merged = tracks_of(plugin)
    assert all(torch.equal(swapped_weights(t, model), start) for t in merged.values())  # before any task ends: θ_0
    vectors = torch.randn(3, len(start))
    vectors[1, :4] = -vectors[0, :4]  # ties of magnitude: MagMax takes the later task
    for vector in vectors:
        set_weights(model, start + vector)
        plugin.after_training_exp(None)
    got = {name: swapped_weights(t, model) for name, t in merged.items()}
    torch.testing.assert_close(got["merge_mean"], start + vectors.mean(0))
    pick = vectors.abs().flip(0).argmax(0)  # per entry the largest |τ|, the later task on a tie
    largest = vectors.flip(0).gather(0, pick.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(got["magmax"], start + 0.5 * largest)
    torch.testing.assert_close(got["ties"], start + ties_by_magmax_code(vectors, 0.2, 0.55))
    assert len(trim([vectors[0]], 0.2)[0].nonzero()) == int(len(start) * 0.2) + 1  # the k-th largest and above


def test_a_mean_of_the_current_task_starts_at_the_weights_of_the_task_start():
    model = nn.Linear(2, 1, bias=False)
    plugin = AveragesPlugin(rules=[{"rule": "mean", "scope": "task"}])
    plugin.attach(model)
    for task_values in ([1.0, 2.0], [5.0, 7.0, 9.0]):
        plugin.before_training_exp(None)
        (track,) = tracks_of(plugin).values()
        assert torch.equal(swapped_weights(track, model), weights(model))  # no step of this task yet
        for value in task_values:
            set_weights(model, torch.full((2,), value))
            plugin.after_update(None)
    assert torch.equal(swapped_weights(track, model), torch.full((2,), 7.0))  # the mean of this task's iterates


@pytest.mark.parametrize("fisher", [False, True], ids=["coma", "cofima"])
def test_coma_and_cofima_merge_two_tasks_as_computed_by_hand(fisher):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    batches = [(torch.randn(5, 4), torch.randint(0, 4, (5,))) for _ in range(3)]
    plugin = CoMAPlugin(fisher=fisher, fisher_max=1.0)
    plugin.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def end_task(classes):
        plugin.after_training_exp(
            FakeTemplate(
                model=model,
                optimizer=optimizer,
                batches=batches,
                experience=Experience(classes_in_this_experience=classes),
            )
        )

    def fisher_by_hand() -> torch.Tensor:
        total = torch.zeros_like(weights(model))
        for x, y in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            total += torch.cat([p.grad.flatten() for p in model.parameters()]) ** 2
        model.zero_grad()
        return (total / len(batches)).clamp(max=1.0)

    theta_1 = weights(model) + 0.3
    set_weights(model, theta_1)
    f_1 = fisher_by_hand()
    end_task([0, 1])
    assert torch.equal(weights(model), theta_1)  # the first task: nothing to merge with
    theta_2 = theta_1 + torch.linspace(-1, 1, len(theta_1))
    set_weights(model, theta_2)
    f_2 = fisher_by_hand()
    end_task([2, 3])
    if fisher:
        expected = (0.5 * f_1 * theta_1 + 0.5 * f_2 * theta_2) / (0.5 * f_1 + 0.5 * f_2)
    else:
        expected = 0.5 * theta_1 + 0.5 * theta_2
    weight_rows = torch.zeros(4, 4, dtype=torch.bool)
    weight_rows[[2, 3]] = True
    new_rows = torch.cat([weight_rows.flatten(), torch.tensor([False, False, True, True])])
    expected = torch.where(new_rows, theta_2, expected)  # the new classes' head rows come from θ_2
    torch.testing.assert_close(weights(model), expected)


def test_a_coma_run_merges_at_each_task_end_and_trains_on_from_the_merge(tmp_path, monkeypatch):
    """A two-task run: the live weights after task 2 are the hand-computed merge of the task ends."""
    ends = []
    original = CoMAPlugin.after_training_exp

    def spy(self, strategy, **kwargs):
        ends.append(weights(self.engine.model))
        original(self, strategy, **kwargs)
        ends.append(weights(self.engine.model))

    monkeypatch.setattr(CoMAPlugin, "after_training_exp", spy)
    results, _ = run_experiment(tmp_path, "strategy=coma", "data.n_tasks=2", "checkpoint=true")
    trained_1, merged_1, trained_2, merged_2 = ends
    assert torch.equal(trained_1, merged_1)
    head = results.meta["task_classes"][1]  # rows of the head (last layer: 100 → 10) the second task brings
    new = torch.zeros_like(trained_2, dtype=torch.bool)
    weight_end = len(new) - 10
    for c in head:
        new[weight_end - 10 * 100 + c * 100 : weight_end - 10 * 100 + (c + 1) * 100] = True
        new[weight_end + c] = True
    torch.testing.assert_close(merged_2, torch.where(new, trained_2, 0.5 * merged_1 + 0.5 * trained_2))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["plugins"]["coma"]["tasks"] == 2


@pytest.fixture
def averages_runs(shared_runs):
    return lambda *overrides: shared_runs(*overrides)[0]


@pytest.mark.parametrize("strategy,trained_alone", [("averages", "plain"), ("averages_replay", "replay")])
def test_no_evaluation_only_rule_changes_training(averages_runs, strategy, trained_alone):
    every_rule, alone = averages_runs(*pinned_overrides(strategy)), averages_runs(*pinned_overrides(trained_alone))
    for setting in ("class_il", "task_il"):
        assert np.array_equal(every_rule.matrices["live", setting], alone.matrices["live", setting])
    rules = {every_rule.meta["track_info"][t]["rule"] for t in every_rule.tracks}
    assert rules == {"live", "ema", "swa", "wise", "merge_mean", "magmax", "ties", "bema", "lines"}
    assert len(every_rule.tracks) == 22


def test_a_run_with_every_rule_stopped_mid_task_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    resumed, whole = stop_and_resume(
        tmp_path, monkeypatch, "strategy=averages_replay", "replay.policy=reservoir", "train.epochs=2", task=2, step=5
    )
    assert resumed == whole


def test_cofima_resumes_exactly(tmp_path, monkeypatch):
    resumed, whole = stop_and_resume(tmp_path, monkeypatch, "strategy=cofima", "train.epochs=2", task=2, step=5)
    assert resumed == whole


def test_horizons_in_tasks_resolve_to_decays_and_say_both(tmp_path):
    results, text = run_experiment(tmp_path, "strategy=ema", "ema.horizons=[0.5,1]")
    steps = results.meta["steps_per_task"][0]  # 270 samples of split digits' task 1, batch 32, 10 epochs
    decays = [results.meta["track_info"][t]["decay"] for t in results.tracks[1:]]
    assert decays == [pytest.approx(1 - 1 / (0.5 * steps)), pytest.approx(1 - 1 / steps)]
    assert results.tracks[1:] == [f"ema_h0.5_{decays[0]:.6g}", f"ema_h1_{decays[1]:.6g}"]
    assert f"decay {decays[1]:.6g}, averages over ~{steps:,} steps; task 1 has {steps:,} steps" in text
    saved = json.loads((tmp_path / "results.json").read_text())["track_info"]
    assert saved[results.tracks[2]]["horizon"] == pytest.approx(steps)


# ---------------------------------------------------------------------------- in a stock Avalanche strategy
@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_the_averaging_plugins_work_in_a_stock_avalanche_naive_strategy():
    """EMAPlugin and the generic averaging plugin in avalanche.training.Naive: the shadows follow the engine's
    formula over the iterates Naive made, and each track is evaluated by swapping it in."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(120, 8), torch.arange(120) % 4
    data = TensorDataset(x, y)
    data.targets = y
    dataset = as_classification_dataset(data)
    benchmark = class_incremental_benchmark({"train": dataset, "test": dataset}, num_experiences=2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    class Iterates(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.seen = []

        def after_update(self, strategy, **kwargs):
            self.seen.append(weights(strategy.model))

    ema, iterates = EMAPlugin(decay=0.9), Iterates()
    others = AveragesPlugin(
        rules=[
            {"rule": "mean"},
            {"rule": "wise"},
            {"rule": "merge_mean"},
            {"rule": "ties"},
            {"rule": "bema", "update_every": 2},
            {"rule": "lines"},
        ]
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=2,
        device="cpu",
        plugins=[ema, others, iterates],
        evaluator=None,
    )
    start = weights(model)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    expected_ema, expected_mean = start.clone(), torch.zeros_like(start)
    for n, theta in enumerate(iterates.seen, 1):
        expected_ema = 0.9 * expected_ema + 0.1 * theta
        expected_mean += (theta - expected_mean) / n
    with ema.tracks()[0].swap_in():
        torch.testing.assert_close(weights(model), expected_ema, rtol=1e-5, atol=1e-6)
    with others.tracks()[0].swap_in():
        torch.testing.assert_close(weights(model), expected_mean, rtol=1e-5, atol=1e-6)
    live = weights(model)
    for plugin in (ema, others):
        for track in plugin.tracks():
            with track.swap_in():
                accuracy = strategy.eval(benchmark.test_stream)  # Avalanche's own evaluation
            assert isinstance(accuracy, dict)
    assert torch.equal(weights(model), live)
