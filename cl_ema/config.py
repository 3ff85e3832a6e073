"""The config: its schema (the keys of a run outside its plugins, their types and ranges, which change
results), how it is composed, and its one check.

``conf/`` holds the values; this module declares the keys. ``check(cfg)`` checks a composed config once
per run, by one validator (pydantic, ``cl_ema.options``): the schema's sections against these dataclasses,
and every node with a ``_target_`` (dataset, model, optimizer, loggers, and the strategy's plugins)
against the typed signature of the code it builds (``cl_ema.building``). A plugin's options are an
options class (``cl_ema.plugins.options``), torch-free, so a bad value is refused before torch or
Avalanche is imported; a plugin's node sits at the top level under its name, so users type
``ema.decay=0.99``. A top-level node with a ``_target_`` that is not a key of this schema is a plugin of
the run (``plugin_nodes``); a strategy (``conf/strategy/*.yaml``) is the list of plugin configs it places
there, and its name is its file's. The checked values are written back into the config, so that
``results.json`` records them as the run used them (``1`` and ``1.0`` are one value).

``NEUTRAL`` keys, marked on their fields, never change a run's results: resume may change them, the
report and W&B grouping ignore them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from platformdirs import user_cache_dir
from pydantic import AfterValidator, Field, Strict, TypeAdapter, ValidationError

from cl_ema.building import Spec, check_node
from cl_ema.errors import UserError
from cl_ema.options import STRICT, Choice, Flag, OptionError, Positive, Size

NEUTRAL = {"neutral": True}  # the key never changes results
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
MISSING = "???"  # OmegaConf's mark of a value the config must give
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]  # numpy's RandomState takes seeds below 2³²
Epochs = Annotated[int, Strict(), Field(ge=1, le=100_000)]


def _device(name: str) -> str:
    if not re.fullmatch(r"auto|cpu|cpu:0|cuda|cuda:\d+", name):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return name


Device = Annotated[str, AfterValidator(_device)]  # whether this machine has it is known once torch is loaded


class Scenario(Choice):
    split = "split"  # type: ignore[assignment]  # class-incremental: the classes are dealt out to the tasks
    permuted = "permuted"  # every task has all classes, its own pixel permutation (domain-incremental)
    rotated = "rotated"  # every task has all classes, rotated by its own angle (domain-incremental)


class Precision(Choice):
    auto = "auto"  # bf16 autocast on CUDA GPUs that support it, fp32 otherwise
    fp32 = "fp32"
    bf16 = "bf16"


class LossClasses(Choice):
    all = "all"  # cross-entropy over every output
    task = "task"  # over the classes of each sample's own task (SLCA's and CoMA's current-task logits)


# ---------------------------------------------------------------------------- the schema
@dataclass
class DataConfig:
    __pydantic_config__ = STRICT

    dataset: Any = MISSING  # `_target_` returning (train, test) TensorStores; conf/dataset/
    scenario: Scenario = Scenario.split
    n_tasks: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 5
    class_order: list[int] | None = None  # split: None draws a permutation from `seed`
    # permuted (null elsewhere): False keeps task 1 unpermuted (van de Ven), Mammoth permutes all
    permute_first_task: Flag | None = False
    augment: Flag = False  # random crop (pad 4) + horizontal flip, on the device
    root: str | None = None  # None: $CL_EMA_DATA, else the user cache dir (another folder may hold other data)
    download: Flag = field(default=True, metadata=NEUTRAL)


@dataclass
class TrainConfig:
    __pydantic_config__ = STRICT

    epochs: Epochs = 1
    batch_size: Size = 32  # the global batch, whatever the number of processes
    eval_batch_size: Size = 1024
    drop_last: Flag = False  # drop each task's last, smaller batch (CLS-ER's loaders do)
    precision: Precision = Precision.auto  # weights and averages stay fp32
    channels_last: Flag = False  # NHWC layout for conv nets (faster with bf16 on recent GPUs)
    compile: Flag = False  # torch.compile the model in place (its state-dict keys stay the same)
    sync_batchnorm: Flag = False  # with several processes: BatchNorm statistics over the global batch
    loss_classes: LossClasses = LossClasses.all
    lr_milestones: list[Epochs] = field(default_factory=list)  # epochs of each task after which the lr is cut
    lr_gamma: Positive = 0.1  # … by this factor (every task starts again from the optimizer's lr)

    def __post_init__(self) -> None:
        if not all(m <= self.epochs for m in self.lr_milestones):
            raise OptionError("lr_milestones", list(self.lr_milestones), f"each must be an epoch in [1, {self.epochs}]")


@dataclass
class EvalConfig:
    __pydantic_config__ = STRICT

    every_n_steps: Annotated[int, Strict(), Field(ge=0)] = (
        0  # continual evaluation every N optimizer steps (0: after each task)
    )
    subset_size: Annotated[int, Strict(), Field(ge=1)] = (
        200  # test samples per task for continual evaluation (fixed, seeded)
    )


@dataclass
class Choices:
    """What ``experiment=`` and ``strategy=`` selected: set from Hydra's choices, never by hand."""

    __pydantic_config__ = STRICT

    experiment: str = "custom"
    strategy: str = "custom"


@dataclass
class BestArgsScope:
    """What a published protocol (``best_args=…``) was tuned for; another experiment or strategy is refused."""

    __pydantic_config__ = STRICT

    experiment: str = MISSING
    strategies: list[str] = field(default_factory=list)


@dataclass
class Config:
    __pydantic_config__ = STRICT

    seed: Seed = 0
    device: Device = field(default="auto", metadata=NEUTRAL)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # `_target_` + options (conf/model/), and `weights`: a file to start from
    optimizer: Any = MISSING  # `_target_` (a torch.optim class, partial) + options (conf/optimizer/)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    choices: Choices = field(default_factory=Choices)
    best_args: BestArgsScope | None = None  # set by a best_args=<experiment>/<method> file
    logger: dict[str, Any] = field(default_factory=dict, metadata=NEUTRAL)  # name → node with a `_target_`
    checkpoint: Flag = field(default=True, metadata=NEUTRAL)  # save checkpoints/last.pt after each task
    # a run directory to continue, true: the newest run of this configuration, false/null: no resume
    resume: str | bool | None = field(default=None, metadata=NEUTRAL)
    deterministic: Flag = field(default=False, metadata=NEUTRAL)  # torch deterministic algorithms (CUDA)
    # torch's CPU threads (null: the CPUs this process may use, over torchrun's processes on this node);
    # on the CPU the thread count changes results (the order of a matrix product's sums), so it is recorded
    threads: Annotated[int, Strict(), Field(ge=1, le=4096)] | None = None


SCHEMA_KEYS = frozenset(f.name for f in dataclasses.fields(Config))


def _neutral(schema: type = Config, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(schema):
        if f.metadata.get("neutral"):
            yield prefix + f.name
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            yield from _neutral(f.default_factory, f"{prefix}{f.name}.")


NEUTRAL_KEYS: tuple[str, ...] = ("resume", *(k for k in _neutral() if k != "resume"))


def plugin_nodes(config: Any) -> dict[str, Any]:
    """The run's plugins: top-level nodes with a ``_target_`` outside the schema, in the strategy's order."""
    return {
        str(name): node
        for name, node in config.items()
        if name not in SCHEMA_KEYS and isinstance(node, (dict, DictConfig)) and "_target_" in node
    }


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def _is_under(key: str, sections: Any) -> bool:
    return any(key == s or key.startswith(f"{s}.") for s in sections)


def result_keys(config: dict) -> dict[str, str]:
    """The resolved config's keys that decide a run's results, as JSON strings (seed included): the
    schema's keys but the neutral ones, and the plugins' nodes (an option section no plugin reads,
    such as an experiment's ``ema.decay`` under ``strategy=plain``, changes nothing)."""
    kept = {k: v for k, v in config.items() if k in SCHEMA_KEYS or k in plugin_nodes(config)}
    return {k: json.dumps(v, sort_keys=True) for k, v in flatten(kept).items() if not _is_under(k, NEUTRAL_KEYS)}


def setting(config: dict) -> dict[str, str]:
    """What a run's seeds average over: its result keys without the seed."""
    return {k: v for k, v in result_keys(config).items() if k != "seed"}


def setting_id(config: dict) -> str:
    """A short, stable name of a setting (for W&B groups)."""
    return hashlib.sha1(json.dumps(sorted(setting(config).items())).encode()).hexdigest()[:8]


_PACKAGE = Path(__file__).resolve().parent
# Installed wheels carry the configs inside the package; a source checkout has them at the top.
CONFIG_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


def register_schema() -> None:
    """The schema's defaults as Hydra's ``cl_ema_schema`` config: plain values (every value is checked once,
    by ``check``), not in struct mode at the top, where config files add the plugins' nodes."""
    schema = OmegaConf.create(json.loads(json.dumps(dataclasses.asdict(Config()))))
    OmegaConf.set_struct(schema, False)
    ConfigStore.instance().store(name="cl_ema_schema", node=schema)
    if not OmegaConf.has_resolver("cl_ema.neutral_keys"):  # Hydra's run-dir names leave these out
        OmegaConf.register_new_resolver("cl_ema.neutral_keys", lambda: list(NEUTRAL_KEYS))


def record_choices(cfg: DictConfig, hydra_choices: Any) -> None:
    """Put what ``experiment=`` and ``strategy=`` selected into ``cfg.choices`` (results name runs by them)."""
    with read_write(cfg), open_dict(cfg):
        for name in ("experiment", "strategy"):
            cfg.choices[name] = str(hydra_choices.get(name) or "custom")


def compose(*overrides: str) -> DictConfig:
    """The config ``python -m cl_ema <overrides>`` would run (for scripts and notebooks)."""
    return composed(*overrides)[0]


def composed(*overrides: str) -> tuple[DictConfig, Path]:
    """The config ``python -m cl_ema <overrides>`` would run, and the folder it would run in."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the folder's name reads Hydra's choices and the time
    folder = Path(str(cfg.hydra.run.dir))
    record_choices(cfg, cfg.hydra.runtime.choices)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg, folder


SCHEMA = TypeAdapter(Config)
# what a run gives its plugins when it builds them
PLUGIN_CONTEXT = ("seed", "task_steps", "num_tasks", "device", "run_dir")


@dataclass
class Checked:
    """A config checked once (``check``): its schema as typed objects, its nodes ready to build once."""

    cfg: DictConfig  # the config, its checked values written back
    config: Config
    dataset: Spec
    model: Spec
    optimizer: Spec
    plugins: dict[str, Spec]  # by config name, in the strategy's order
    loggers: dict[str, Spec]


def check(cfg: DictConfig) -> Checked:
    """Check ``cfg`` once, in an order that refuses a bad value before torch or Avalanche is imported: the
    schema, the plugins' options (torch-free options classes), then the dataset, model, optimizer and loggers
    against their code. A UserError names the first unknown key or value that does not fit, or published
    values (``best_args=``) used with an experiment or strategy they were not tuned for. The checked values
    are written back into ``cfg``."""
    for key in _unknown_keys(cfg, Config):  # `+key=value` overrides get past Hydra's own check
        raise UserError(f"{key}: unknown config key (the keys are declared in cl_ema/config.py)")
    for key in sorted(OmegaConf.missing_keys(cfg)):
        raise UserError(f"{key}: needs a value (set {key}=…)")
    try:
        config = SCHEMA.validate_python(
            {k: to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k in SCHEMA_KEYS}
        )
    except ValidationError as err:
        raise UserError(str(OptionError.first(err))) from None
    scope, experiment, strategy = config.best_args, config.choices.experiment, config.choices.strategy
    if scope and (experiment != scope.experiment or strategy not in scope.strategies):
        raise UserError(
            f"best_args: these published values were tuned for experiment={scope.experiment} with "
            f"strategy={'|'.join(scope.strategies)}, not experiment={experiment} with strategy={strategy} "
            "(override best_args.experiment / best_args.strategies to use them anyway)"
        )
    plugins = {name: check_node(node, name, given=PLUGIN_CONTEXT) for name, node in plugin_nodes(cfg).items()}
    model_node = {k: v for k, v in to_container(cfg.model).items() if k != "weights"}
    checked = Checked(
        cfg,
        config,
        dataset=check_node(cfg.data.dataset, "data.dataset", given=("root", "download")),
        model=check_node(model_node, "model", given=("spec",)),
        optimizer=check_node(cfg.optimizer, "optimizer", given=("params",)),
        plugins=plugins,
        loggers={
            name: check_node(node, f"logger.{name}", given=("run", "resumed")) for name, node in cfg.logger.items()
        },
    )
    _write_back(checked)
    return checked


def _write_back(checked: Checked) -> None:
    """The checked values into the config, as the run uses them (``1`` → ``1.0`` for a float, options that
    another option replaced → null)."""
    cfg, plain = checked.cfg, json.loads(json.dumps(SCHEMA.dump_python(checked.config, mode="json")))
    if checked.config.data.scenario != Scenario.permuted:
        plain["data"]["permute_first_task"] = None  # only permuted streams read it
    with read_write(cfg), open_dict(cfg):
        for key in ("seed", "train", "eval", "threads"):
            cfg[key] = plain[key]
        for key, value in plain["data"].items():
            if key != "dataset":
                cfg.data[key] = value
        for name, spec in checked.plugins.items():
            cfg[name] = {"_target_": cfg[name]["_target_"], **spec.recorded()}
        for node, spec in ((cfg.model, checked.model), (cfg.optimizer, checked.optimizer),
                           (cfg.data.dataset, checked.dataset)):  # fmt: skip
            for key, value in spec.recorded().items():
                node[key] = value


def unused_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Overrides of option sections no plugin of the run reads (``replay.mem_size=500`` under ``strategy=plain``)."""
    plugins = plugin_nodes(cfg)
    unused = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        section = key.split(".", 1)[0]
        if section not in SCHEMA_KEYS and section not in plugins and section in cfg:
            unused.append(key)
    return unused


def resume_request(value: Any) -> Path | bool:
    """``resume=`` as False (no resume), True (the newest run of this configuration) or a run directory."""
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "false", "none", "null", "no"):
        return False
    if text.lower() in ("true", "latest", "yes"):
        return True
    return Path(text).expanduser()


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:
            # at the top level, sections outside the schema are plugin nodes, or options of plugins not in this run
            if prefix or not isinstance(node[key], DictConfig):
                yield f"{prefix}{key!s}"
        elif dataclasses.is_dataclass(hints[key]):
            yield from _unknown_keys(node[key], hints[key], f"{prefix}{key}.")


def data_root(root: str | None) -> Path:
    """``data.root``, else ``$CL_EMA_DATA``, else the user cache dir (e.g. ~/.cache/cl_ema/data)."""
    return Path(root).expanduser() if root else Path(user_cache_dir("cl_ema")) / "data"


def to_container(cfg: Any) -> Any:
    """The resolved config (or a node of it) as plain values (choices as strings), as results.json and W&B
    record it."""
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
