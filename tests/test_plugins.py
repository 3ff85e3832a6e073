"""The plugin protocol, reservoir replay, CLS-ER and LwF: what each promises, and that resuming keeps it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FakeTemplate, compose_config, run_experiment, stop_and_resume
from torch import nn

from cl_ema.errors import UserError
from cl_ema.plugins.cls_er import CLSERPlugin, choose_teacher
from cl_ema.plugins.replay import StreamReservoir


# ---------------------------------------------------------------------------- reservoir
def test_reservoir_keeps_every_sample_with_probability_mem_size_over_stream_length():
    """Algorithm R: after a stream of N samples each is in a memory of M with probability M/N.

    400 seeded streams of N=1,000 samples (batches of 10) into M=100 slots: each sample's inclusion
    count is Binomial(400, 0.1), mean 40, std 6; all 1,000 counts lie within 40 ± 5 std (a false
    alarm has probability below 1e-3), and early, middle and late samples are kept equally often.
    """
    counts = torch.zeros(1000)
    for seed in range(400):
        memory = StreamReservoir(100, seed)
        for start in range(0, 1000, 10):
            index = torch.arange(start, start + 10)
            memory.add(index, index % 7)
            assert memory.filled == min(start + 10, 100)
        assert (memory.index >= 0).all() and len(memory.index.unique()) == 100  # full, no sample twice
        assert torch.equal(memory.labels, memory.index % 7)  # labels travel with their samples
        counts[memory.index] += 1
    assert counts.sum() == 400 * 100
    assert ((counts - 40).abs() <= 5 * 6).all(), (counts.min(), counts.max())
    thirds = [chunk.mean().item() for chunk in counts.chunk(3)]
    assert max(thirds) - min(thirds) < 2.0  # a third of the samples: std of its mean ~0.33


def test_reservoir_samples_without_replacement_and_only_what_it_holds():
    memory = StreamReservoir(50, seed=3)
    index, labels = memory.sample(10, torch.device("cpu"))
    assert len(index) == 0  # nothing seen yet: nothing replayed (Mammoth's first step)
    memory.add(torch.arange(4), torch.arange(4))
    index, _ = memory.sample(10, torch.device("cpu"))
    assert sorted(index.tolist()) == [0, 1, 2, 3]  # capped at what is filled
    memory.add(torch.arange(4, 500), torch.arange(4, 500))
    index, labels = memory.sample(32, torch.device("cpu"))
    assert len(index.unique()) == 32 and torch.equal(index, labels)


def test_reservoir_replay_in_a_run_replays_from_the_second_step_and_never_exceeds_its_memory(tmp_path):
    from cl_ema.plugins.replay import ReservoirReplayPlugin

    replayed = []
    original = ReservoirReplayPlugin.after_training_iteration

    def record(self, strategy, **kwargs):
        replayed.append(strategy.mb_replayed)
        original(self, strategy, **kwargs)
        assert self.memory.filled <= 30

    monkey = pytest.MonkeyPatch()
    monkey.setattr(ReservoirReplayPlugin, "after_training_iteration", record)
    try:
        run_experiment(
            tmp_path,
            "strategy=replay",
            "replay.policy=reservoir",
            "replay.mem_size=30",
            "replay.batch_size_mem=16",
            "train.epochs=1",
            "data.n_tasks=2",
        )
    finally:
        monkey.undo()
    assert replayed[0] == 0 and replayed[1] == 16 and all(r == 16 for r in replayed[1:])


# ---------------------------------------------------------------------------- CLS-ER
def test_the_teacher_of_each_sample_is_the_ema_model_more_confident_in_its_label():
    plastic = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    stable = torch.tensor([[0.0, 2.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    chosen = choose_teacher(plastic, stable, labels)
    # sample 0: plastic is surer of class 0; sample 1: stable of class 1; sample 2: a tie goes to plastic
    assert torch.equal(chosen, torch.stack([plastic[0], stable[1], plastic[2]]))


def test_consistency_loss_uses_the_replayed_samples_only():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    plugin = CLSERPlugin(reg_weight=2.0)
    plugin.attach(model)
    with torch.no_grad():
        model.weight.add_(1.0)  # the live weights move away from the (initial) EMA teachers
    inputs, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    strategy = FakeTemplate(mb_x=inputs, mb_y=labels, mb_replayed=2, loss=torch.zeros(()))
    plugin.before_forward(strategy)
    strategy.mb_output = model(inputs)
    plugin.before_backward(strategy)
    with plugin.engine.swapped(0):
        teacher = model(inputs[-2:])
    expected = 2.0 * ((strategy.mb_output[-2:] - teacher) ** 2).mean()
    torch.testing.assert_close(strategy.loss, expected)
    # outputs on the current samples do not enter the term
    strategy.loss, strategy.mb_output = torch.zeros(()), torch.cat([model(inputs[:4]) * 7, model(inputs[4:])])
    plugin.before_backward(strategy)
    torch.testing.assert_close(strategy.loss, expected)
    strategy = FakeTemplate(mb_x=inputs, mb_y=labels, mb_replayed=0, loss=torch.zeros(()))
    plugin.before_forward(strategy)
    strategy.mb_output = model(inputs)
    plugin.before_backward(strategy)
    assert strategy.loss == 0  # nothing replayed (the first step): cross-entropy alone


def clser_decays(plugin: CLSERPlugin, steps: int) -> np.ndarray:
    """The decay each of CLS-ER's EMAs uses at each step (1: not updated), as its engine asks its rules."""
    plugin.attach(nn.Linear(2, 2))
    return np.array([[1 - rule.next_weight(step) for rule in plugin.engine.rules] for step in range(1, steps + 1)])


def test_each_ema_is_updated_with_its_probability_and_clsers_decay_ramp():
    options = {"plastic_decay": 0.99, "plastic_update_prob": 0.9, "stable_decay": 0.999, "stable_update_prob": 0.3}
    decays = clser_decays(CLSERPlugin(**options, seed=5), 4000)
    assert decays.shape == (4000, 2)
    # Binomial(4000, p): std 19 and 29; 5 std bounds
    assert abs((decays[:, 0] < 1).sum() - 3600) < 95 and abs((decays[:, 1] < 1).sum() - 1200) < 145
    first = decays[0]  # step 1: min(1 - 1/2, α) whenever it updates
    assert all(d in (0.5, 1.0) for d in first)
    assert set(decays[1000:, 0].round(9)) <= {0.99, 1.0} and set(decays[1000:, 1].round(9)) <= {0.999, 1.0}
    assert np.array_equal(clser_decays(CLSERPlugin(**options, seed=5), 4000), decays)  # seeded: the same coin flips


def test_stable_ema_moves_less_than_the_plastic_one_and_live_training_is_replay_with_a_loss(tmp_path):
    results, text = run_experiment(
        tmp_path,
        "strategy=cls_er",
        "replay.policy=reservoir",
        "replay.mem_size=40",
        "cls_er.reg_weight=0.5",
        "checkpoint=true",
        "data.n_tasks=2",
    )
    assert results.tracks == ["live", "ema_plastic", "ema_stable"]
    assert "ema_stable: decay 0.999, averages over ~1,429 steps" in text  # 1 / (0.7 · (1 − 0.999))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    live = torch.cat([v.flatten() for k, v in state["model"].items()])
    plastic, stable = state["plugins"]["cls_er"]["ema"]["shadows"][0]
    initial = torch.cat([p.detach().flatten() for p in _digits_mlp().parameters()])
    assert (stable - initial).norm() < (plastic - initial).norm() < (live - initial).norm()
    assert state["plugins"]["cls_er"]["ema"]["step"] == sum(results.meta["steps_per_task"])


def _digits_mlp():
    from cl_ema.data.sources import DIGITS_NORM
    from cl_ema.data.storage import DataSpec
    from cl_ema.models import MLP

    torch.manual_seed(0)
    return MLP(DataSpec((1, 8, 8), 10, DIGITS_NORM), hidden=100, layers=2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=cls_er", "replay.policy=reservoir", "replay.mem_size=40", "cls_er.reg_weight=0.5"],
        ["strategy=ema_lwf", "ema.decays=[0.9,0.99]"],
        ["strategy=ema_replay", "replay.policy=reservoir", "eval.every_n_steps=20"],
        ["strategy=ema_derpp", "der.mem_size=40"],
    ],
    ids=["cls_er", "ema_lwf", "reservoir+continual", "derpp"],
)
def test_a_run_stopped_mid_task_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch, overrides):
    resumed, whole = stop_and_resume(tmp_path, monkeypatch, *overrides, "train.epochs=2")
    assert resumed == whole


# ---------------------------------------------------------------------------- LwF and the protocol
def test_lwf_distills_from_the_second_task_on(tmp_path):
    plain, _ = run_experiment(tmp_path / "plain", "strategy=plain", "train.epochs=2")
    lwf, _ = run_experiment(tmp_path / "lwf", "strategy=lwf", "train.epochs=2")
    assert np.array_equal(plain.matrices["live", "class_il"][0], lwf.matrices["live", "class_il"][0])  # no teacher yet
    assert not np.array_equal(plain.matrices["live", "class_il"][1:], lwf.matrices["live", "class_il"][1:])


def test_a_plugin_that_cannot_save_its_state_is_refused_while_checkpointing():
    from cl_ema.config import check
    from cl_ema.strategies import build_plugins

    def built(*overrides: str):
        cfg = compose_config(*overrides)
        return build_plugins(check(cfg).plugins, cfg.checkpoint)

    avalanche_lwf = "lwf._target_=avalanche.training.plugins.LwFPlugin"
    with pytest.raises(
        UserError,
        match=r"lwf: avalanche.training.plugins.lwf.LwFPlugin cannot "
        r"save what it keeps across tasks .* or set checkpoint=false",
    ):
        built("strategy=lwf", avalanche_lwf)
    assert set(built("strategy=lwf", avalanche_lwf, "checkpoint=false")) == {"lwf"}
    with pytest.raises(UserError, match="lwf: Linear is not an Avalanche SupervisedPlugin"):
        built(
            "strategy=lwf",
            "~lwf.alpha",
            "~lwf.temperature",
            "lwf._target_=torch.nn.Linear",
            "+lwf.in_features=1",
            "+lwf.out_features=1",
        )


# ---------------------------------------------------------------------------- protocol options of published methods
def test_lr_steps_restart_every_task():
    from cl_ema.plugins.training import LRStepsPlugin

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    strategy = SimpleNamespace(optimizer=optimizer)
    plugin = LRStepsPlugin([2, 3], 0.1)
    seen = []
    for _task in range(2):
        plugin.before_training_exp(strategy)
        for _epoch in range(4):
            seen.append(optimizer.param_groups[0]["lr"])
            plugin.after_training_epoch(strategy)
    assert seen == pytest.approx([0.5, 0.5, 0.05, 0.005] * 2)


def test_loss_over_each_samples_task_classes_keeps_old_classes_from_being_pushed_down(tmp_path):
    every, own = (
        run_experiment(tmp_path / name, "strategy=plain", f"train.loss_classes={name}")[0] for name in ("all", "task")
    )
    assert own.metrics("live", 4)["avg_acc"] > every.metrics("live", 4)["avg_acc"] + 0.1  # the "labels trick"
    assert own.metrics("live", 4, "task_il")["avg_acc"] > 0.9


def test_a_slow_backbone_trains_through_avalanches_optimizer_updates(tmp_path):
    results, _ = run_experiment(
        tmp_path,
        "model=timm",
        "model.arch=test_vit.r160_in1k",
        "model.input_size=32",
        "model.backbone_lr_scale=0.01",
        "train.epochs=1",
        "data.n_tasks=2",
        "train.lr_milestones=[1]",
        "checkpoint=true",
    )
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in state["param_groups"]] == pytest.approx([0.05 * 0.01 * 0.1, 0.05 * 0.1])


# ---------------------------------------------------------------------------- DER and DER++
def test_der_and_derpp_losses_against_hand_computation():
    from cl_ema.plugins.der import DERPlugin

    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    store = torch.randn(20, 3)  # the stored samples, by index
    plugin = DERPlugin(mem_size=8, batch_size_mem=3, alpha=0.7, beta=0.3, seed=1)
    index, labels = torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 1])
    old_logits = torch.randn(6, 4)
    plugin.memory.add(index, labels, old_logits)
    strategy = FakeTemplate(
        model=model,
        store=store,
        loss=torch.zeros(()),
        train_mb_size=10,
        device="cpu",
        mb_replayed=0,
        mb_index=index,
        mb_x=store[index],
    )
    twin = DERPlugin(mem_size=8, batch_size_mem=3, alpha=0.7, beta=0.3, seed=1)
    twin.memory.add(index, labels, old_logits)  # the same memory and generator: the same draws
    first, second = twin.memory.slots(3, "cpu"), twin.memory.slots(3, "cpu")
    plugin.before_backward(strategy)
    stored = twin.memory
    expected = 0.7 * ((model(store[stored.index[first]]) - stored.logits[first]) ** 2).mean()
    expected = expected + 0.3 * nn.functional.cross_entropy(model(store[stored.index[second]]), stored.labels[second])
    torch.testing.assert_close(strategy.loss, expected)
    empty = DERPlugin(mem_size=8, alpha=0.7, beta=0.3)
    strategy.loss = torch.zeros(())
    empty.before_backward(strategy)
    assert strategy.loss == 0  # the first step: nothing in memory yet


def test_ders_two_buffer_batches_are_drawn_independently():
    """Two independent draws of 10 of 50 entries share 2 on average (10·10/50); the same draw would share 10."""
    memory = StreamReservoir(50, seed=4)
    memory.add(torch.arange(50), torch.zeros(50, dtype=torch.long), torch.zeros(50, 2))
    overlaps = []
    for _ in range(2000):
        a, b = memory.slots(10, torch.device("cpu")), memory.slots(10, torch.device("cpu"))
        overlaps.append(len(set(a.tolist()) & set(b.tolist())))
    assert abs(np.mean(overlaps) - 2.0) < 0.1  # hypergeometric: std of the mean of 2000 draws ≈ 0.027


def test_der_keeps_the_logits_of_the_step_a_sample_entered_the_memory_with(tmp_path, monkeypatch):
    from cl_ema.plugins.der import DERPlugin

    seen = {}
    original = DERPlugin.after_training_iteration

    def spy(self, strategy, **kwargs):
        for i, logits in zip(strategy.mb_index.tolist(), strategy.mb_output.detach()):
            seen[i] = logits.clone()  # one epoch: each sample passes once
        original(self, strategy, **kwargs)
        spy.plugin = self

    monkeypatch.setattr(DERPlugin, "after_training_iteration", spy)
    run_experiment(tmp_path, "strategy=derpp", "train.epochs=1", "der.mem_size=60")
    memory = spy.plugin.memory
    assert memory.filled == 60 and memory.num_seen == 1347
    for index, logits in zip(memory.index.tolist(), memory.logits):
        assert torch.equal(logits, seen[index])


def test_der_runs_and_ema_der_evaluates_the_same_trajectory(tmp_path):
    derpp, _ = run_experiment(tmp_path / "derpp", "strategy=derpp")
    ema_derpp, _ = run_experiment(tmp_path / "ema", "strategy=ema_derpp")
    plain, _ = run_experiment(tmp_path / "plain", "strategy=plain")
    for setting in ("class_il", "task_il"):
        assert np.array_equal(derpp.matrices["live", setting], ema_derpp.matrices["live", setting])
    assert derpp.metrics("live", 4)["avg_acc"] > plain.metrics("live", 4)["avg_acc"] + 0.5  # 0.91 against 0.20
    assert ema_derpp.tracks == ["live", "ema_0.99"]
