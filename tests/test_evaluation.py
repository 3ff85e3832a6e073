"""Every track evaluated in one pass gives exactly what evaluating one track at a time gave: stacked (the MLP)
and swapped (a conv net with BatchNorm, tracks without ``state``), over one block of test batches or several."""

from __future__ import annotations

import dataclasses
import functools
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import FakeTemplate
from torch import nn

from cl_ema import evaluation
from cl_ema.config import Scenario
from cl_ema.continual_eval import ContinualEvalPlugin
from cl_ema.data import sources
from cl_ema.data.stream import TaskStream, experience_indices, stream_from_stores
from cl_ema.evaluation import evaluate, evaluate_tracks, plan, stackable
from cl_ema.models import CNN, MLP
from cl_ema.plugins import LIVE, Track, live_track
from cl_ema.plugins.averaging import AveragesPlugin
from cl_ema.plugins.ema import EMAPlugin

CPU = torch.device("cpu")
RULES = [
    {"rule": "ema", "decay": 0.8},
    {"rule": "mean"},
    {"rule": "mean", "scope": "task"},
    {"rule": "wise", "anchor": "prev_task", "alpha": 0.5},
    {"rule": "ties"},
    {"rule": "bema"},
    {"rule": "lines"},
]


class Template(FakeTemplate):
    """Gives the EMA the task's unaugmented batches (to re-estimate BatchNorm statistics)."""

    def input_batches(self):
        return lambda: iter(self.unaugmented)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the models' initial weights


@functools.cache  # read-only: a test that patches the stream undoes it
def digits(scenario: Scenario = Scenario.split) -> TaskStream:
    return stream_from_stores(*sources.load_digits(), scenario, 5, seed=1, device=CPU)


def trained(model: nn.Module, stream: TaskStream, recompute_bn: bool = False, tasks: int = 3) -> list[Track]:
    """``model`` trained on ``tasks`` tasks with averages beside it (an EMA re-estimating BatchNorm statistics when
    ``recompute_bn``: tracks without ``state``); its tracks, ``live`` first."""
    plugins = [AveragesPlugin(rules=RULES), EMAPlugin(decays=[0.9, 0.95], recompute_bn=recompute_bn)]
    for plugin in plugins:
        plugin.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for task in range(tasks):
        index = experience_indices(stream.benchmark.train_stream[task].dataset)
        for plugin in plugins:
            plugin.before_training_exp(None)
        for _ in range(40):
            batch = index[torch.randint(len(index), (32,))]
            loss = F.cross_entropy(model(stream.train.batch(batch)), stream.train.targets_at(batch))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for plugin in plugins:
                plugin.after_update(None)
        template = Template(unaugmented=[stream.train.batch(b) for b in index.split(64)])
        for plugin in plugins:
            plugin.after_training_exp(template)
    return [live_track(), *(track for plugin in plugins for track in plugin.tracks())]


def one_at_a_time(model: nn.Module, tracks: list[Track], stream: TaskStream, task: int, **kw) -> dict:
    """What the runner did before: each track swapped in and evaluated on its own, its batches built again."""
    results = {}
    for track in tracks:
        with track.swap_in():
            results[track.name] = evaluate(model, stream, task, **kw)
    return results


def counted(tracks: list[Track]) -> tuple[list[Track], dict[str, int]]:
    """The tracks, counting how often each is swapped in."""
    swaps = dict.fromkeys((t.name for t in tracks), 0)

    def counting(track: Track):
        @contextmanager
        def swap_in():
            swaps[track.name] += 1
            with track.swap_in():
                yield

        return swap_in

    return [dataclasses.replace(t, swap_in=counting(t)) for t in tracks], swaps


def same(a: dict, b: dict) -> None:
    """Equal accuracies: the same counts of correct predictions, class-IL and task-IL, on every task."""
    assert list(a) == list(b)
    for name in a:
        assert a[name].class_il == b[name].class_il, name
        assert a[name].task_il == b[name].task_il, name


@pytest.mark.parametrize("scenario", [Scenario.split, Scenario.permuted])
def test_the_mlp_stacks_its_tracks_and_gets_what_one_at_a_time_got(scenario):
    stream = digits(scenario)
    model = MLP(stream.spec, hidden=32)
    tracks, swaps = counted(trained(model, stream))
    assert len(tracks) == 10 and all(t.state is not None for t in tracks if t.name != LIVE)
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    got = evaluate_tracks(model, tracks, stream, 2, stack=True)
    assert swaps == {t.name: int(t.name == LIVE) for t in tracks}  # the averages in the stacked forward, live swapped
    same(got, one_at_a_time(model, tracks, stream, 2))
    assert len({tuple(a.class_il + a.task_il) for a in got.values()}) > 5  # the tracks differ: the test is not void
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())  # the live weights stay
    assert model.training  # and so does the model's mode


def test_on_a_cpu_the_tracks_are_swapped_by_default_with_each_batch_built_once(monkeypatch):
    stream = digits()
    model = MLP(stream.spec, hidden=32)
    tracks, swaps = counted(trained(model, stream))
    built = []
    monkeypatch.setattr(stream.test, "batch", lambda index, batch=stream.test.batch: built.append(1) or batch(index))
    got = evaluate_tracks(model, tracks, stream, 2)
    assert set(swaps.values()) == {1}
    batches = sum(len(index.split(1024)) for index in stream.test_indices)
    assert len(built) == batches  # not once per track
    same(got, one_at_a_time(model, tracks, stream, 2))


@pytest.mark.parametrize("several_groups", [False, True])
def test_a_runs_evaluations_build_its_test_batches_once(monkeypatch, several_groups):
    """Given a ``KeptBatches``, the test sets built by one evaluation serve the next ones, the same values; test
    subsets (continual evaluation) and test sets over the budget are built each time."""
    stream = digits(Scenario.permuted)
    model = MLP(stream.spec, hidden=32)
    tracks = trained(model, stream) if several_groups else [live_track()]
    built = []
    monkeypatch.setattr(stream.test, "batch", lambda index, batch=stream.test.batch: built.append(1) or batch(index))
    kept = evaluation.KeptBatches()
    got = [evaluate_tracks(model, tracks, stream, task, batch_size=64, kept=kept) for task in (1, 2)]
    batches = sum(len(index.split(64)) for index in stream.test_indices)
    assert len(built) == batches and len(kept.inputs) == batches  # at the first evaluation only
    same(got[1], evaluate_tracks(model, tracks, stream, 2, batch_size=64))
    built.clear()
    subsets = [index[:10] for index in stream.test_indices]
    evaluate_tracks(model, tracks, stream, 2, indices=subsets, kept=kept)
    monkeypatch.setattr(evaluation, "CACHE_BYTES", 100 * 4 * 64)
    over = evaluation.KeptBatches()
    evaluate_tracks(model, tracks, stream, 2, batch_size=64, kept=over)
    assert len(built) == len(subsets) + batches and not over.inputs


def test_held_batches_a_model_wrote_into_are_built_again(monkeypatch):
    """Held for the next track or kept for the next evaluation, a batch the forward changed is built again."""

    class Scaling(MLP):  # scales its inputs in place, as a careless user model might
        def forward(self, x):
            return super().forward(x.mul_(2.0))

    stream = digits()
    model = Scaling(stream.spec, hidden=32)
    tracks = trained(model, stream)
    built = []
    monkeypatch.setattr(stream.test, "batch", lambda index, batch=stream.test.batch: built.append(1) or batch(index))
    kept = evaluation.KeptBatches()
    got = [evaluate_tracks(model, tracks, stream, 2, kept=kept) for _ in range(2)]
    assert len(built) == 2 * len(tracks) * sum(len(index.split(1024)) for index in stream.test_indices)
    same(got[0], got[1])
    same(got[0], one_at_a_time(model, tracks, stream, 2))


def test_a_conv_net_with_batchnorm_is_swapped_and_gets_what_one_at_a_time_got():
    stream = digits()
    model = CNN(stream.spec, width=8)
    tracks, swaps = counted(trained(model, stream, recompute_bn=True))
    assert not stackable(model) and stackable(MLP(stream.spec, hidden=8))
    ema = [t for t in tracks if t.name.startswith("ema_0.9")]
    assert len(ema) == 2 and all(t.state is None for t in ema)  # re-estimated statistics: only the swap has them
    got = evaluate_tracks(model, tracks, stream, 2, stack=True)
    assert set(swaps.values()) == {1}  # every track swapped in, once
    same(got, one_at_a_time(model, tracks, stream, 2))
    assert len({tuple(a.class_il + a.task_il) for a in got.values()}) > 5


def test_tracks_without_state_are_swapped_beside_the_stacked_ones_over_several_blocks(monkeypatch):
    stream = digits()
    model = MLP(stream.spec, hidden=32)
    tracks, swaps = counted(trained(model, stream, recompute_bn=True))  # the EMA tracks have no state
    monkeypatch.setattr(evaluation, "CACHE_BYTES", 100 * 4 * 64)  # blocks of at most 100 test images
    groups = plan(model, tracks, stream.test.batch(stream.test_indices[0][:1]), stack=True)
    assert [(g.stacked, [tracks[k].name for k in g.rows]) for g in groups] == [
        (True, [t.name for t in tracks[1:-2]]),
        (False, [LIVE]),
        (False, ["ema_0.9"]),
        (False, ["ema_0.95"]),
    ]
    got = evaluate_tracks(model, tracks, stream, 2, batch_size=64, stack=True)
    batches = [(0, 0, b) for i in stream.test_indices for b in i.split(64)]
    blocks = len(list(evaluation._blocks(batches, 256, 100 * 256)))
    assert blocks > 3 and swaps == {t.name: blocks if t.state is None else 0 for t in tracks}  # live too
    same(got, one_at_a_time(model, tracks, stream, 2, batch_size=64))


def test_the_stacked_forward_is_chunked_to_its_memory_budget(monkeypatch):
    stream = digits()
    model = MLP(stream.spec, hidden=32)
    tracks = trained(model, stream)
    weights = sum(t.nbytes for t in evaluation.own_weights(model).values())
    monkeypatch.setattr(evaluation, "STACK_BYTES", 3 * weights)
    sample = stream.test.batch(stream.test_indices[0][:1])
    assert [len(g.rows) for g in plan(model, tracks, sample, stack=True)] == [3, 3, 3, 1]  # 9 averages, live
    same(evaluate_tracks(model, tracks, stream, 4, stack=True), one_at_a_time(model, tracks, stream, 4))
    monkeypatch.setattr(evaluation, "STACK_BYTES", weights)  # one model's weights: nothing to stack
    assert not any(g.stacked for g in plan(model, tracks, sample, stack=True))


def test_a_model_that_vmap_cannot_batch_is_swapped():
    class Branching(MLP):
        def forward(self, x):
            logits = super().forward(x)
            return logits if logits.sum() > float("-inf") else -logits  # data-dependent control flow

    stream = digits()
    model = Branching(stream.spec, hidden=8)
    tracks, swaps = counted(trained(model, stream))
    assert stackable(model)  # by its type; the test forward finds out
    got = evaluate_tracks(model, tracks, stream, 2, stack=True)
    assert set(swaps.values()) == {1}
    same(got, one_at_a_time(model, tracks, stream, 2))


def test_continual_evaluation_gets_what_one_at_a_time_got():
    stream = digits()
    model = MLP(stream.spec, hidden=32)
    tracks = trained(model, stream)
    plugin = ContinualEvalPlugin(stream, tracks, every_n_steps=10, subset_size=30, seed=0)
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(current_experience=2),
                               clock=SimpleNamespace(train_iterations=60, train_exp_iterations=25))  # fmt: skip
    plugin.after_training_exp(strategy)  # 25 steps into the task: not just evaluated
    for track in tracks:
        with track.swap_in():
            expected = evaluate(model, stream, 2, range(3), plugin.subsets).class_il
        curve = plugin.curves[track.name]
        assert curve.steps == [60] and curve.tasks == [2] and curve.accuracies == [expected]


def test_names_must_differ():
    stream = digits()
    with pytest.raises(ValueError, match="same name"):
        evaluate_tracks(MLP(stream.spec, hidden=8), [live_track(), live_track()], stream, 0)


def test_counting_shares_one_arg_max_between_equal_settings_and_matches_masked_argmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (3, 500, 6), generator=generator).float()  # ties everywhere
    logits[0, :20, 2], logits[1, :20] = float("nan"), float("-inf")
    labels = torch.randint(0, 6, (500,), generator=generator)
    every, some = torch.ones(6, dtype=torch.bool), torch.tensor([True, True, False, True, False, False])
    for settings in [(every, every), (some, some), (every, some), (some, every)]:
        expected = torch.stack(
            [(logits.masked_fill(~allowed, float("-inf")).argmax(-1) == labels).sum(-1) for allowed in settings], -1
        )
        assert torch.equal(evaluation._correct(logits, labels, settings), expected)
