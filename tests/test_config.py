"""Every config composes and builds; every bad value is one clear error naming its key."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import CONF, cli_in_process, compose_config
from omegaconf import OmegaConf

from cl_ema.checkpoint import config_differences
from cl_ema.config import NEUTRAL_KEYS, check, plugin_nodes, setting, setting_id, to_container
from cl_ema.errors import UserError


def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


EXPERIMENTS, STRATEGIES = options("experiment"), options("strategy")


def strategy_plugins(strategy: str) -> list[str]:
    """The plugin configs a strategy file places, in its order (its defaults list: `/plugin@<name>: config`
    entries, or another strategy's name)."""
    entries = yaml.safe_load((CONF / "strategy" / f"{strategy}.yaml").read_text()) or {}
    names = []
    for entry in entries.get("defaults", []):
        names += strategy_plugins(entry) if isinstance(entry, str) else [next(iter(entry)).split("@")[1]]
    return names


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_experiment_and_strategy_composes_and_builds_its_plugins(experiment, strategy, tmp_path):
    import torch
    from avalanche.core import SupervisedPlugin

    from cl_ema.strategies import build_plugins

    cfg = compose_config(f"experiment={experiment}", f"strategy={strategy}", "device=cpu")
    plugins = build_plugins(
        check(cfg).plugins, True, seed=0, task_steps=90, device=torch.device("cpu"), run_dir=tmp_path
    )
    assert list(plugins) == list(plugin_nodes(cfg)) == strategy_plugins(strategy)
    assert all(isinstance(p, SupervisedPlugin) for p in plugins.values())
    assert cfg.choices.strategy == strategy and cfg.choices.experiment == experiment
    OmegaConf.to_container(cfg, resolve=True)


def plugin_parameters(target: str) -> dict[str, object]:
    """The options a plugin's options class declares, with their defaults."""
    import dataclasses

    from hydra.utils import get_object

    return {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(get_object(target))
    }


@pytest.mark.parametrize("plugin", options("plugin"))
def test_every_plugin_config_mirrors_the_options_its_code_declares(plugin):
    """The code declares each option (type, default, range); conf/plugin/<name>.yaml shows them all, unchanged
    (a list the code leaves empty, the rules of the averages plugin, is the config's own)."""
    node = yaml.safe_load((CONF / "plugin" / f"{plugin}.yaml").read_text())
    declared = plugin_parameters(node.pop("_target_"))
    assert node.keys() == declared.keys()
    for name, default in declared.items():
        if default == []:
            continue
        assert node[name] == getattr(default, "value", default), name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_builds_its_model_and_optimizer(experiment):
    from cl_ema.data.sources import UNIT_NORM
    from cl_ema.data.storage import DataSpec
    from cl_ema.models import build_model
    from cl_ema.strategies import build_optimizer

    offline = ["model.pretrained=false"] if "vit" in experiment else []  # the architecture, without a download
    cfg = compose_config(f"experiment={experiment}", "device=cpu", *offline)
    checked = check(cfg)
    shape = (3, 32, 32) if "cifar" in experiment else (1, 28, 28) if "mnist" in experiment else (1, 8, 8)
    model = build_model(checked.model, DataSpec(shape, 100 if experiment == "split_cifar" else 10, UNIT_NORM))
    optimizer = build_optimizer(checked.optimizer, model)
    assert optimizer.param_groups[-1]["lr"] == cfg.optimizer.lr  # the head's, when the backbone has its own
    if experiment == "split_cifar_vit":  # SLCA's slow learner: the pretrained layers at 1/100 of the head's lr
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr / 100)
        assert len(optimizer.param_groups[1]["params"]) == 2  # head weight and bias


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in ("model", "optimizer", "dataset", "logger") for o in options(g)]
)
def test_every_group_option_composes(group, option):
    target = "dataset@data.dataset" if group == "dataset" else group
    extra = {"torchvision": ["model.arch=resnet18"], "timm": ["model.arch=test_vit.r160_in1k"]}.get(option, [])
    check(compose_config(f"{target}={option}", "device=cpu", *extra))


def test_several_loggers_at_once_and_none():
    assert set(compose_config("logger=[wandb,tensorboard]").logger) == {"wandb", "tensorboard"}
    assert dict(compose_config("logger=none").logger) == {}


@pytest.mark.parametrize("protocol", options("best_args"))
def test_published_protocols_set_what_their_method_reads(protocol):
    experiment, method = protocol.split("/")
    scope = compose_config(f"best_args={protocol}").best_args
    assert scope.experiment == experiment
    name, buffer = method.split("_")
    tuned = {
        "clser": ["cls_er"],
        "er": ["replay", "ema_replay"],
        "der": ["der", "ema_der"],
        "derpp": ["derpp", "ema_derpp"],
    }
    assert list(scope.strategies) == tuned[name]
    for strategy in scope.strategies:
        cfg = compose_config(f"experiment={experiment}", f"strategy={strategy}", f"best_args={protocol}")
        check(cfg)
        memory = cfg.der if name.startswith("der") else cfg.replay
        assert memory.mem_size == int(buffer) and (name.startswith("der") or cfg.replay.policy == "reservoir")
        assert cfg.train.epochs == 1 and cfg.model._target_ == "cl_ema.models.MLP" and cfg.model.hidden == 100


@pytest.mark.parametrize(
    "overrides,experiment,refused",
    [
        (["best_args=seq_mnist/clser_200"], "split_digits", "experiment=split_digits with strategy=ema"),
        (
            ["experiment=seq_mnist", "strategy=replay", "best_args=seq_mnist/clser_200"],
            "seq_mnist",
            "experiment=seq_mnist with strategy=replay",
        ),
        (
            ["experiment=seq_mnist", "strategy=replay", "best_args=perm_mnist/er_200"],
            "seq_mnist",
            "experiment=seq_mnist with strategy=replay",
        ),
    ],
)
def test_published_protocols_are_refused_where_they_were_not_tuned(overrides, experiment, refused):
    with pytest.raises(UserError, match=f"^best_args: these published values were tuned for .*, not {refused} "):
        check(compose_config(*overrides))
    widened = compose_config(*overrides, f"best_args.experiment={experiment}", "best_args.strategies=[ema,replay]")
    check(widened)  # said explicitly, allowed


def test_default_is_split_digits_with_ema():
    cfg = compose_config()
    assert cfg.data.dataset._target_.endswith("load_digits") and cfg.data.n_tasks == 5 and cfg.choices.strategy == "ema"
    assert set(cfg.logger) == {"wandb"} and cfg.device == "cpu"


def test_decays_replace_decay_and_the_config_records_it():
    cfg = compose_config("ema.decays=[0.9,0.99]")
    assert check(cfg).plugins["ema"].options.decays == [0.9, 0.99]
    assert cfg.ema.decay is None  # replaced: the run's config names no decay it did not use


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CL_EMA_DATA", str(tmp_path))
    assert compose_config().data.root == str(tmp_path)
    monkeypatch.delenv("CL_EMA_DATA")
    assert compose_config().data.root is None


def test_keys_that_do_not_change_results_are_declared_once_and_read_by_all():
    assert set(NEUTRAL_KEYS) == {"resume", "device", "data.download", "logger", "checkpoint", "deterministic"}
    base = to_container(compose_config("strategy=ema", "ema.decay=0.9"))
    same = to_container(
        compose_config(
            "strategy=ema", "ema.decay=0.9", "seed=3", "device=cpu", "logger=none", "resume=true", "checkpoint=false"
        )
    )
    assert setting(base) == setting(same) and setting_id(base) == setting_id(same)
    other = to_container(compose_config("strategy=ema", "ema.decay=0.99"))
    assert setting_id(other) != setting_id(base)
    plain = to_container(compose_config("strategy=plain", "ema.decay=0.5"))
    assert setting(plain) == setting(to_container(compose_config("strategy=plain")))  # unused options do not count
    lwf = to_container(compose_config("strategy=lwf"))
    assert not config_differences(lwf, to_container(compose_config("strategy=lwf", "ema.decay=0.9")))  # resume too
    assert config_differences(base, other) == ["ema.decay: 0.9 in the checkpoint, 0.99 now"]


def test_hydra_job_folders_leave_out_the_same_keys():
    from hydra import compose, initialize_config_dir

    from cl_ema.config import CONFIG_DIR, register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == list(NEUTRAL_KEYS)


BAD_VALUES = [
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("ema.decay=-0.1", "ema.decay"),
    ("ema.decay=nan", "ema.decay"),
    ("ema.decays=[0.9,1.2]", "ema.decays"),
    ("ema.decays=[0.9,0.9]", "distinct"),
    ("ema.decays=[]", r"ema.decays=\[\]: List should have at least 1 item"),
    ("strategy=averages ema.decay=1.5", "ema.decay=1.5"),
    ("strategy=averages 'averages.rules=[{rule: mean, weighting: cubic}]'", "averages.rules\\[0\\].weighting='cubic'"),
    ("strategy=averages 'averages.rules=[{rule: bema, lag: -1}]'", "averages.rules\\[0\\].lag=-1"),
    ("strategy=averages 'averages.rules=[{rule: median}]'", "averages.rules\\[0\\].rule='median': must be one of"),
    ("ema.update_every=0", "ema.update_every"),
    ("ema.buffers=median", "ema.buffers"),
    ("ema.sync=always", "ema.sync"),
    ("ema.warmup_power=0", "ema.warmup_power"),
    ("ema.warmup_gamma=nan", "ema.warmup_gamma"),
    ("strategy=replay replay.mem_size=-5", "replay.mem_size=-5"),
    ("strategy=replay replay.mem_size=1000000000", "replay.mem_size"),
    ("strategy=replay replay.batch_size_mem=0", "replay.batch_size_mem"),
    ("strategy=replay replay.policy=fifo", "replay.policy"),
    ("strategy=cls_er cls_er.stable_update_prob=1.5", "cls_er.stable_update_prob"),
    ("strategy=cls_er cls_er.plastic_decay=2", "cls_er.plastic_decay"),
    ("strategy=cls_er cls_er.reg_weight=-1", "cls_er.reg_weight"),
    ("train.epochs=0", "train.epochs=0"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=100000000000", "train.batch_size"),
    ("train.precision=fp16", "train.precision"),
    ("eval.every_n_steps=-1", "eval.every_n_steps"),
    ("eval.subset_size=0", "eval.subset_size"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed=4294967296"),
    ("data.n_tasks=0", "data.n_tasks"),
    ("train.lr_milestones=[50]", r"train.lr_milestones=\[50\]: each must be an epoch in \[1, 10\]"),
    ("model=timm", r"model.arch: needs a value \(set model.arch=…\)"),
    ("data.scenario=twisted", "data.scenario"),
    ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
    ("device=tpu", "device"),
    ("device=cpu:1", "device"),
    ("+foo=1", "foo: unknown config key"),
    ("+train.foo=1", "train.foo: unknown config key"),
]


@pytest.mark.parametrize("override,expected", BAD_VALUES)
def test_bad_value_is_one_line_naming_the_key(override, expected, tmp_path):
    """Every value is checked once, by check(): its type, range and choices, against the code it reaches."""
    import shlex

    from hydra.errors import HydraException

    from cl_ema.errors import one_line

    try:
        check(compose_config(*shlex.split(override)))
    except UserError as err:
        message = str(err)
    except HydraException as err:
        message = one_line(err)
    else:
        pytest.fail(f"{override} was accepted")
    assert re.search(expected.replace("+", r"\+"), message), message
    assert "\n" not in message


BAD_TARGET_VALUES = [
    ("optimizer.lr=-1", "optimizer.*learning rate"),  # torch.optim's own check, when it is built
    ("optimizer.lr=nan", "optimizer.lr=nan: Input should be a finite number"),
    ("optimizer.weight_decay=-1", "optimizer.*weight_decay"),
    ("optimizer.lr=abc", "optimizer.lr='abc': Input should be a valid number"),
    ("+optimizer.foo=1", r"optimizer.foo=1: not an option here \(the options are: lr, momentum"),
    ("model.hidden=0", "model.hidden=0: Input should be greater than or equal to 1"),
    ("model.hidden=abc", "model.hidden='abc': Input should be a valid integer"),
    ("model.init=he", "model.init='he': Input should be 'default' or 'xavier_uniform'"),
    ("model._target_=cl_ema.models.Nope", "model._target_=cl_ema.models.Nope: cannot import it"),
]


@pytest.mark.parametrize("override,expected", BAD_TARGET_VALUES)
def test_bad_value_of_a_target_is_refused_once_by_its_signature_or_its_code(override, expected):
    from torch import nn

    from cl_ema.data.sources import UNIT_NORM
    from cl_ema.data.storage import DataSpec
    from cl_ema.models import build_model
    from cl_ema.strategies import build_optimizer

    with pytest.raises(UserError, match=expected):
        checked = check(compose_config(override))
        build_model(checked.model, DataSpec((1, 8, 8), 10, UNIT_NORM))
        build_optimizer(checked.optimizer, nn.Linear(2, 2))


@pytest.mark.parametrize(
    "override,expected",
    [
        ("ema.decay=1.5", "error: ema.decay=1.5: Input should be less than or equal to 1"),
        ("strategy=replay replay.mem_size=-3", "error: replay.mem_size=-3: Input should be greater than or equal to 1"),
        ("strategy=foo", "error: In 'config': Could not find 'strategy/foo' Available options in 'strategy': averages"),
        ("train.epochs=0", "error: train.epochs=0: Input should be greater than or equal to 1"),
        ("train.batch_size=abc", "error: train.batch_size='abc': Input should be a valid integer"),
        ("experiment=nope", "error: In 'config': Could not find 'experiment/nope'"),
        ("foo=1", "Could not override 'foo'"),
        ("train.lr=0.1", "Could not override 'train.lr'"),
        ("device=cuda:7", "error: device=cuda:7"),
        ("model=torchvision", "error: model.arch: needs a value (set model.arch=…)"),
        ("best_args=seq_mnist/er_200", "error: best_args: these published values were tuned for experiment=seq_mnist"),
        # checked by the code they reach, once the run has started: its folder is given back
        ("data.n_tasks=3", "error: data.n_tasks=3: must divide the 10 classes of the dataset"),
        ("optimizer.lr=inf", "error: optimizer.lr=inf: Input should be a finite number"),
        ("model.hidden=0", "error: model.hidden=0: Input should be greater than or equal to 1"),
    ],
)
def test_cli_prints_one_line_exits_2_and_writes_nothing(override, expected, tmp_path):
    status, out, err = cli_in_process(
        "logger=none", *override.split(), f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "run").exists()


def test_a_run_refused_by_its_code_leaves_no_folder_and_keeps_others(tmp_path):
    (tmp_path / "outputs" / "keep").mkdir(parents=True)
    status, _, err = cli_in_process("logger=none", "data.n_tasks=3", cwd=tmp_path)
    assert status == 2 and "data.n_tasks=3" in err
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["outputs", "outputs/keep"]


def test_precision_defaults_per_device():
    import torch

    from cl_ema.config import Precision
    from cl_ema.distributed import autocast_dtype

    assert autocast_dtype(Precision.auto, torch.device("cpu")) is None  # fp32 on CPU
    assert autocast_dtype(Precision.bf16, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(Precision.fp32, torch.device("cuda")) is None
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert autocast_dtype(Precision.auto, torch.device("cuda")) == expected


@pytest.mark.parametrize("name,expected", [("cpu", "cpu"), ("cpu:0", "cpu"), ("auto", None)])
def test_device_strings_torch_accepts(name, expected):
    import torch

    from cl_ema.distributed import resolve_device

    device = resolve_device(name)
    assert device == torch.device(expected or ("cuda" if torch.cuda.is_available() else "cpu"))


def test_a_run_checks_its_config_once_and_builds_each_plugin_once(tmp_path, monkeypatch):
    """One validation of the config per run, and the plugins built from it are the ones the run uses."""
    from types import SimpleNamespace

    import cl_ema.building
    import cl_ema.config

    checks, builds = [], []
    schema = cl_ema.config.SCHEMA
    counting = SimpleNamespace(
        validate_python=lambda value: checks.append(1) or schema.validate_python(value), dump_python=schema.dump_python
    )
    monkeypatch.setattr(cl_ema.config, "SCHEMA", counting)
    build = cl_ema.building.Spec.build
    monkeypatch.setattr(
        cl_ema.building.Spec, "build", lambda self, **context: builds.append(self.key) or build(self, **context)
    )
    status, _, err = cli_in_process(
        "logger=none",
        "strategy=averages_replay",
        "data.n_tasks=2",
        "train.epochs=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert status == 0, err
    assert len(checks) == 1
    assert sorted(key for key in builds if key in ("ema", "averages", "replay")) == ["averages", "ema", "replay"]
