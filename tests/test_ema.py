"""The averaging engine against its formulas and independent references; its swap, restore, checkpoint contracts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl_ema.ema import (
    EMA,
    EMAOptions,
    EMARule,
    Frozen,
    MeanRule,
    StochasticEMARule,
    WeightAverages,
    decay_for_horizon,
    mean_weight,
    recompute_bn,
    warmup_decay,
)
from cl_ema.options import OptionError
from cl_ema.rules import ema_name


def small_net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 8, 8, generator=g).to(next(model.parameters()).dtype)
    y = torch.randint(0, 5, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def averaged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    state.update({n: b.detach().float().clone() for n, b in model.named_buffers() if b.is_floating_point()})
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_update_follows_the_formula_in_fp32(dtype):
    model = small_net(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    decay = 0.9
    ema = EMA(model, decay)
    ema.register()
    expected = averaged_state(model)
    for step in range(5):
        train_step(model, opt, step)
        ema.update()
        live = averaged_state(model)
        # the rule written out: shadow = decay * shadow + (1 - decay) * param
        expected = {n: decay * expected[n] + (1 - decay) * live[n] for n in expected}
    shadow = ema.averaged_state_dict()
    assert shadow.keys() == expected.keys()
    for name, value in shadow.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[name].float(), rtol=1e-6, atol=1e-6)
    with ema.swapped():  # swapped in: the fp32 shadow cast to the model's dtype
        for name, value in model.state_dict().items():
            if name in expected:
                assert torch.equal(value, shadow[name].to(dtype)), name


def test_apply_restore_round_trip_is_bit_exact_and_keeps_parameter_objects():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, 0.5)
    ema.register()
    for step in range(3):
        train_step(model, opt, step)
        ema.update()
    params_before = list(model.parameters())
    state_before = copy.deepcopy(model.state_dict())
    ema.apply_shadow()
    assert not torch.equal(model[0].weight, state_before["0.weight"])  # really swapped
    model(torch.randn(2, 3, 8, 8))  # eval-time forward in train mode moves BN statistics…
    ema.restore()
    for name, value in model.state_dict().items():  # …and restore undoes it, bit for bit
        assert torch.equal(value, state_before[name]), name
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    # the optimizer still trains the same parameter objects, and the EMA keeps following them
    weight = model[3].weight.detach().clone()
    train_step(model, opt, 10)
    assert not torch.equal(weight, model[3].weight)
    ema.update()
    with ema.swapped():
        pass
    assert ema.step == 4 and ema.rules[0].due == 4


def test_swapped_context_restores_on_error():
    model = small_net()
    ema = EMA(model, 0.9)
    ema.register()
    with torch.no_grad():
        model[3].weight.add_(1.0)
    live = model[3].weight.detach().clone()
    with pytest.raises(ValueError), ema.swapped():
        raise ValueError("evaluation failed")
    assert torch.equal(model[3].weight, live)


def test_seed_api_register_update_apply_restore():
    model = small_net()
    ema = EMA(model, 0.999)
    ema.register()
    start = model[3].bias.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    ema.apply_shadow()  # one update from θ0 towards θ0 + 1: shadow = θ0 + 0.001
    torch.testing.assert_close(model[3].bias, start + 0.001)
    ema.restore()
    torch.testing.assert_close(model[3].bias, start + 1.0)


def test_several_decays_equal_independent_single_decay_emas_step_by_step():
    decays = [0.5, 0.9, 0.99, 0.999]
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    multi = EMA(model, decays)
    multi.register()
    singles = [EMA(model, d) for d in decays]
    for single in singles:
        single.register()
    for step in range(6):
        train_step(model, opt, step)
        multi.update()
        for single in singles:
            single.update()
        for k, single in enumerate(singles):
            ours, theirs = multi.averaged_state_dict(k), single.averaged_state_dict()
            assert all(torch.equal(ours[n], theirs[n]) for n in ours), (step, decays[k])
    assert [ema_name(d) for d in multi.decays] == ["ema_0.5", "ema_0.9", "ema_0.99", "ema_0.999"]


def test_a_shadow_whose_rule_does_not_move_is_left_alone_while_the_others_move():
    """CLS-ER's stochastic rule: a shadow not drawn this step keeps its value; the others move as alone."""
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator()
    never = StochasticEMARule(0.99, 0.0, lambda: float(torch.rand((), generator=generator)))
    mixed, plastic = WeightAverages(model, [EMARule(0.9), never]), EMA(model, 0.9)
    mixed.register()
    plastic.register()
    before = mixed.averaged_state_dict(1)
    for step in range(3):
        train_step(model, opt, step)
        mixed.update()
        plastic.update()
    assert all(torch.equal(before[n], v) for n, v in mixed.averaged_state_dict(1).items())  # untouched
    moved, reference = mixed.averaged_state_dict(0), plastic.averaged_state_dict(0)
    assert all(torch.equal(moved[n], reference[n]) for n in moved)  # the same as an EMA of its own


@pytest.mark.parametrize("decay", [0.9999991, 0.9999992, 1e-7, 0.1 + 0.2, 1.0, 0.0])
def test_track_names_read_back_as_exactly_their_decay(decay):
    name = ema_name(decay)
    assert float(name.removeprefix("ema_")) == decay
    assert ema_name(0.9999991) != ema_name(0.9999992)
    assert ema_name(-0.0 + 0.0) == "ema_0"
    assert ema_name(1 - 1 / 1200, horizon=1.0) == "ema_h1_0.999167"  # a horizon says both
    assert ema_name(0.99, schedule="step") == "ema_step_0.99"


@pytest.mark.parametrize("rule", ["swa", "ema"])
def test_the_mean_and_the_ema_are_what_torch_averaged_model_computes(rule):
    """SWA (Izmailov et al. 2018), the uniform mean of the iterates, is AveragedModel's default rule; the EMA
    is AveragedModel with get_ema_multi_avg_fn."""
    swa_utils = torch.optim.swa_utils
    model = small_net()
    if rule == "swa":
        ours = WeightAverages(model, [MeanRule()])
        reference = swa_utils.AveragedModel(model, use_buffers=True)
    else:
        ours = EMA(model, 0.8)
        reference = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.8), use_buffers=True)
        reference.update_parameters(model)  # AveragedModel's first update copies the weights: ours start there
    ours.register()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(7):
        train_step(model, opt, step)
        ours.update()
        reference.update_parameters(model)
    average = ours.averaged_state_dict(0)
    for name, value in reference.module.state_dict().items():
        if name in average:
            torch.testing.assert_close(average[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weighting,coefficient", [
    ("linear", lambda n: n),
    ("quadratic", lambda n: sum(i * i for i in range(1, n + 1))),  # online_ema's mean_ensembling
])  # fmt: skip
def test_weighted_means_of_iterates_follow_their_weights(weighting, coefficient):
    model = small_net()
    ours = WeightAverages(model, [MeanRule(weighting)])
    ours.register()
    seen = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        train_step(model, opt, step)
        ours.update()
        seen.append(averaged_state(model))
    weights = [coefficient(n) for n in range(1, 7)]
    for name, value in ours.averaged_state_dict(0).items():
        expected = sum(w * s[name].double() for w, s in zip(weights, seen)) / sum(weights)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    assert [mean_weight(n, weighting) for n in (1, 2)] == [1.0, weights[1] / sum(weights[:2])]


def test_a_mean_reset_starts_again_from_the_next_iterate():
    model = nn.Linear(2, 1, bias=False)
    mean = WeightAverages(model, [MeanRule()])
    mean.register()
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        mean.update()
        if value == 1.0:
            mean.reset(0)  # the task-scoped mean: a new task starts after this step
    assert torch.equal(mean.averaged_state_dict(0)["weight"], torch.full((1, 2), 2.5))  # mean of 2 and 3


def test_the_step_schedule_follows_online_emas_step_rampup():
    """Temporal ensembles: decay d_0 while the updates done before are at most W, then the decay."""
    rule = EMARule(0.99, EMAOptions(schedule="step", step_decay=0.9, step_updates=3))
    decays = []
    for step in range(1, 7):
        decays.append(rule.current_decay())
        rule.next_weight(step)
    assert decays == [0.9, 0.9, 0.9, 0.9, 0.99, 0.99]
    assert rule.horizon == pytest.approx(100)


def test_a_frozen_row_is_a_snapshot_and_computed_weights_swap_in_and_out():
    model = nn.Linear(2, 1, bias=False)
    rows = WeightAverages(model, [Frozen(), Frozen()])
    rows.register()
    with torch.no_grad():
        model.weight.fill_(4.0)
    rows.update()
    rows.snapshot(1)
    before = model.weight.detach().clone()
    with rows.swapped_to(lambda shadows, live: [rows_[0].lerp(now, 0.25) for rows_, now in zip(shadows, live)]):
        expected = 0.75 * rows.averaged_state_dict(0)["weight"] + 0.25 * before
        torch.testing.assert_close(model.weight, expected)
    assert torch.equal(model.weight, before)
    assert torch.equal(rows.averaged_state_dict(1)["weight"], before)


def test_horizons_give_their_decay():
    assert decay_for_horizon(1000) == pytest.approx(0.999)
    with pytest.raises(OptionError, match="horizon=0.5: must span at least one update"):
        decay_for_horizon(0.5)


def test_multi_decay_chunks_cover_large_tensors(monkeypatch):
    import cl_ema.ema as ema_module

    monkeypatch.setattr(ema_module, "_CHUNK", 7)  # many chunks, a ragged last one
    model = nn.Linear(10, 5)
    ema = EMA(model, [0.5, 0.25])
    ema.register()
    start = ema.averaged_state_dict()
    with torch.no_grad():
        model.weight.add_(2.0)
        model.bias.add_(2.0)
    ema.update()
    for k, weight in enumerate((0.5, 0.75)):
        for name, value in ema.averaged_state_dict(k).items():
            torch.testing.assert_close(value, start[name] + 2.0 * weight)


def test_update_every_skips_steps():
    model = nn.Linear(3, 1)
    ema = EMA(model, 0.5, EMAOptions(update_every=3))
    ema.register()
    start = model.weight.detach().clone()
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update()
        if step == 3:  # first real update at the third step: 0.5·start + 0.5·3
            torch.testing.assert_close(ema.averaged_state_dict()["weight"], 0.5 * start + 1.5)
    assert ema.step == 6 and ema.rules[0].due == 2
    assert ema.horizon(0.5) == 6.0


def test_warmup_follows_its_formula():
    assert warmup_decay(0.999, 0) == 0.0  # the first update copies the weights
    for t in (1, 10, 100):
        assert warmup_decay(0.999, t) == pytest.approx(1 - (1 + t) ** (-2 / 3))
    assert warmup_decay(0.9, 10**6) == 0.9  # capped at the configured decay
    assert warmup_decay(0.999, 5, gamma=2.0, power=1.0) == pytest.approx(1 - (1 + 5 / 2.0) ** -1.0)
    model = nn.Linear(2, 1, bias=False)
    ema = EMA(model, 0.999, EMAOptions(schedule="warmup"))
    ema.register()
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update()  # decay 0 → shadow = θ
    assert torch.equal(ema.averaged_state_dict()["weight"], torch.full((1, 2), 3.0))
    assert ema.rules[0].current_decay() == pytest.approx(1 - 2 ** (-2 / 3))


def test_buffer_policies():
    model = small_net()
    bn = model[1]
    for policy, averaged in (("average", True), ("copy", False)):
        ema = EMA(model, 0.5, buffers=policy)
        ema.register()
        with torch.no_grad():
            bn.running_mean.fill_(4.0)
            bn.num_batches_tracked.fill_(7)
        ema.update()
        with ema.swapped():
            if averaged:  # running_mean started at 0: 0.5·0 + 0.5·4
                assert torch.equal(bn.running_mean, torch.full((4,), 2.0))
            else:  # the live statistics, as of the last update
                assert torch.equal(bn.running_mean, torch.full((4,), 4.0))
            assert bn.num_batches_tracked.item() == 7  # integer buffers are never averaged
        with torch.no_grad():
            bn.running_mean.zero_()
            bn.num_batches_tracked.zero_()


def test_recompute_bn_matches_torch_update_bn():
    model = small_net()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn([(b,) for b in batches], reference)
    model.eval()
    recompute_bn(model, iter(batches))
    assert not model.training and model[1].momentum == 0.1
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_state_dict_round_trip_restores_every_shadow_exactly():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, [0.9, 0.99], EMAOptions(schedule="warmup"))
    ema.register()
    for step in range(4):
        train_step(model, opt, step)
        ema.update()
    state = ema.state_dict()
    other_model = small_net()
    other = EMA(other_model, [0.9, 0.99], EMAOptions(schedule="warmup"))
    other.register()
    other.load_state_dict(state)
    for a, b in zip(other.state_dict()["shadows"], state["shadows"]):
        assert torch.equal(a, b)
    assert other.step == 4 and [r.due for r in other.rules] == [4, 4]
    fewer = EMA(small_net(), [0.5])
    fewer.register()
    with pytest.raises(ValueError, match="2 rules, these have 1"):
        fewer.load_state_dict(state)
    wrong = EMA(nn.Linear(2, 2), [0.9, 0.99])
    wrong.register()
    with pytest.raises(ValueError, match="do not match"):
        wrong.load_state_dict(state)
    state["shadows"][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        other.load_state_dict(state)


def test_channels_last_layout_is_kept():
    model = small_net().to(memory_format=torch.channels_last)
    conv_stride = model[0].weight.stride()
    ema = EMA(model, 0.9)
    ema.register()
    assert model[0].weight.stride() == conv_stride
    out = model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert out.shape == (2, 5)


def test_moving_the_model_after_register_is_an_error():
    model = small_net()
    ema = EMA(model, 0.9)
    ema.register()
    model.double()
    with pytest.raises(RuntimeError, match="moved, converted or replaced"):
        ema.update()


@pytest.mark.parametrize("decay", [1.5, -0.1, "0.9", True, float("nan"), []])
def test_decay_outside_unit_interval_is_rejected(decay):
    with pytest.raises(OptionError, match="decay"):
        EMA(nn.Linear(1, 1), decay)


def test_a_replaced_layer_or_a_model_without_weights_is_refused():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    ema = EMA(net, 0.9)
    ema.register()
    net[2] = nn.Linear(2, 1)  # the shadow would follow the old layer's tensors
    with pytest.raises(RuntimeError, match="replaced after register"):
        ema.apply_shadow()
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters to average"):
        EMA(frozen, 0.9).register()


def test_shadows_that_cannot_fit_are_refused_naming_their_size(monkeypatch):
    import cl_ema.ema as ema_module

    monkeypatch.setattr(ema_module, "free_memory", lambda device: 1000)
    with pytest.raises(MemoryError, match=r"3 averaged copies of the model need 0.00 GiB, but cpu has"):
        WeightAverages(nn.Linear(100, 10), [Frozen(), Frozen(), Frozen()]).register()


def test_misuse_is_reported():
    ema = EMA(nn.Linear(2, 2), 0.9)
    with pytest.raises(RuntimeError, match="before register"):
        ema.update()
    ema.register()
    ema.apply_shadow()
    with pytest.raises(RuntimeError, match="swapped in"):
        ema.update()
    with pytest.raises(RuntimeError, match="twice"):
        ema.apply_shadow()
    ema.restore()
    with pytest.raises(RuntimeError, match="without apply_shadow"):
        ema.restore()


@pytest.mark.gpu
def test_cuda_update_matches_cpu():
    cpu_model = small_net()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    results = []
    for model in (cpu_model, gpu_model):
        ema = EMA(model, [0.9, 0.99])
        ema.register()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()
        results.append([ema.averaged_state_dict(k) for k in range(2)])
    for cpu_state, gpu_state in zip(*results):
        for name, value in cpu_state.items():
            torch.testing.assert_close(value, gpu_state[name].cpu())


@pytest.mark.slow
def test_the_engine_imports_without_hydra_omegaconf_or_avalanche():
    """cl_ema.ema is a library: a plain PyTorch loop needs nothing of cl_ema's command line."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('hydra', 'omegaconf', 'avalanche', 'platformdirs', 'wandb'):\n"
        "    sys.modules[name] = None  # importing them now raises ImportError\n"
        "import torch\n"
        "from cl_ema.ema import EMA\n"
        "model = torch.nn.Linear(3, 2)\n"
        "ema = EMA(model, [0.9, 0.99])\n"
        "ema.register()\n"
        "torch.optim.SGD(model.parameters(), lr=0.1).step(); ema.update()\n"
        "with ema.swapped(1): print('ok', sorted(m for m in sys.modules if m.startswith('cl_ema')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ['cl_ema', 'cl_ema.ema', 'cl_ema.options', 'cl_ema.rules']"), done.stdout


# ---------------------------------------------------------------------------- layouts, tied weights, misuse
def test_an_averaged_state_dict_of_a_channels_last_model_keeps_its_layout_and_loads_to_the_same_outputs():
    """With decay 0 the shadow is the live model: its state dict keeps each tensor's layout (channels-last convs),
    equals the live weights, and a model loaded from it computes what the live one does."""
    model = small_net().to(memory_format=torch.channels_last)
    ema = EMA(model, 0.0)
    ema.register()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 5, (8,), generator=g)).backward()
        opt.step()
        ema.update()
    state = ema.averaged_state_dict(0)
    assert state["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert state["0.weight"].stride() == model[0].weight.stride()
    live = model.state_dict()
    assert all(torch.equal(value, live[name]) for name, value in state.items())
    loaded = small_net().to(memory_format=torch.channels_last)
    loaded.load_state_dict(state, strict=False)  # the integer buffer (num_batches_tracked) is not averaged
    loaded[1].num_batches_tracked.copy_(model[1].num_batches_tracked)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_converting_the_model_while_a_shadow_is_in_is_refused_at_restore():
    model = small_net()
    ema = EMA(model, 0.9)
    ema.register()
    ema.apply_shadow(0)
    model.double()  # the live weights could not go back where the model now reads them
    with pytest.raises(RuntimeError, match=r"restore\(\): the model's tensors were moved, converted or replaced"):
        ema.restore()


def test_moving_the_model_inside_swapped_is_refused_on_exit():
    model = small_net()
    ema = EMA(model, 0.9)
    ema.register()
    swap = ema.swapped(0)
    with pytest.raises(RuntimeError, match=r"restore\(\): the model's tensors were moved, converted or replaced"), swap:
        model.to(torch.float64)


class _Tied(nn.Module):
    """Two layers whose weights share storage (``shared``: one Parameter object for both, as tying is meant)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        if how == "one-parameter":
            self.b.weight = self.a.weight
        elif how == "same-storage":
            self.b.weight = nn.Parameter(self.a.weight.data)
        else:  # a view of part of another parameter
            self.b.bias = nn.Parameter(self.a.weight.data[0])


@pytest.mark.parametrize("how", ["same-storage", "a-view"])
def test_parameters_sharing_storage_without_being_one_are_refused_at_register(how):
    with pytest.raises(ValueError, match=r"share storage without being one Parameter: averaging them would untie"):
        EMA(_Tied(how), 0.9).register()
    tied = _Tied("one-parameter")
    ema = EMA(tied, 0.9)
    ema.register()  # one Parameter in two places: averaged once, still tied
    assert tied.a.weight is tied.b.weight and "b.weight" not in ema.averaged_state_dict()


@pytest.mark.parametrize("change", ["a-layer-replaced", "load_state_dict-assign", "a-layer-unfrozen"])
def test_a_model_whose_tensors_were_replaced_is_refused_at_the_next_update(change):
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    net[0].requires_grad_(change != "a-layer-unfrozen")
    ema = EMA(net, 0.9)
    ema.register()
    if change == "a-layer-replaced":
        net[2] = nn.Linear(2, 1)
    elif change == "a-layer-unfrozen":  # not averaged, since frozen at register(), yet trained from now on
        net[0].requires_grad_(True)
    else:
        net.load_state_dict(copy.deepcopy(net).state_dict(), assign=True)  # new tensors, outside the flat buffer
    with pytest.raises(RuntimeError, match=r"update\(\): the model's tensors were moved, converted or replaced"):
        ema.update()


def _naive(model: nn.Module, plugins: list):
    from avalanche.training import Naive

    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
                 train_mb_size=16, train_epochs=1, device="cpu", plugins=plugins, evaluator=None)  # fmt: skip


def _first_experience():
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.arange(40) % 4
    data = TensorDataset(x, y)
    data.targets = y
    dataset = as_classification_dataset(data)
    return class_incremental_benchmark({"train": dataset, "test": dataset}, num_experiences=2).train_stream[0]


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_one_ema_plugin_in_two_strategies_or_twice_in_one_is_refused():
    from cl_ema.plugins.ema import EMAPlugin

    experience, ema = _first_experience(), EMAPlugin(decay=0.9)
    _naive(nn.Linear(8, 4), [ema]).train(experience)
    with pytest.raises(RuntimeError, match="EMAPlugin averages another model already: give each strategy a plugin"):
        _naive(nn.Linear(8, 4), [ema]).train(experience)
    twice = EMAPlugin(decay=0.9)
    with pytest.raises(RuntimeError, match="EMAPlugin is in the strategy's plugins twice: it would update twice"):
        _naive(nn.Linear(8, 4), [twice, twice]).train(experience)


def test_two_averages_of_one_model_share_its_flat_buffer_with_buffers_copy(tmp_path):
    """``strategy=averages`` on a CNN with BatchNorm and ``ema.buffers=copy``: the EMA and the averages plugin
    register one model, the second reusing the flat buffer the first made (it used to refuse the model's
    tensors as moved or replaced)."""
    import json

    from helpers import run_experiment

    results, _ = run_experiment(tmp_path, "strategy=averages", "model=cnn", "ema.buffers=copy", "data.n_tasks=2",
                                "train.epochs=1", "averages.rules=[{rule: mean}, {rule: wise}]")  # fmt: skip
    assert results.status == "completed"
    assert json.loads((tmp_path / "results.json").read_text())["config"]["ema"]["buffers"] == "copy"
    assert {"live", "swa", "wise_init_0.5"} <= set(results.tracks) and len(results.tracks) == 6
