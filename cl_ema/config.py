"""The config schema: the keys of a run outside its plugins, their types, ranges, and which change results.

``conf/`` holds the values; this module declares the keys. Types and choices are enforced by
OmegaConf when Hydra merges overrides (``train.batch_size=abc`` fails there); ranges by each
section's ``__post_init__``, run once per run by ``check()``. Nodes with a ``_target_`` (dataset,
model, optimizer, loggers, and the strategy's plugins) are checked against the signature of the
code they build (``cl_ema.building``): a plugin's options are the typed parameters of its class,
declared beside its code (``cl_ema/plugins/``), and its node sits at the top level under its
name, so users type ``ema.decay=0.99``. A top-level node with a ``_target_`` that is not a key of
this schema is a plugin of the run (``plugin_nodes``); a strategy (``conf/strategy/*.yaml``) is
the list of plugin configs it places there, and its name is its file's.

``NEUTRAL`` keys, marked on their fields, never change a run's results: resume may change them,
the report and W&B grouping ignore them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue
from platformdirs import user_cache_dir

from cl_ema.errors import UserError
from cl_ema.options import Choice, OptionError, count, positive

if typing.TYPE_CHECKING:
    import torch

NEUTRAL = {"neutral": True}  # the key never changes results
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
SEED_LIMIT = 2**32  # numpy's RandomState takes seeds below 2³²


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
    dataset: Any = MISSING  # `_target_` returning (train, test) TensorStores; conf/dataset/
    scenario: Scenario = Scenario.split
    n_tasks: int = 5
    class_order: list[int] | None = None  # split: None draws a permutation from `seed`
    permute_first_task: bool = False  # permuted: False keeps task 1 unpermuted (van de Ven), Mammoth permutes all
    augment: bool = False  # random crop (pad 4) + horizontal flip, on the device
    root: str | None = None  # None: $CL_EMA_DATA, else the user cache dir (another folder may hold other data)
    download: bool = field(default=True, metadata=NEUTRAL)

    def __post_init__(self) -> None:
        count("data.n_tasks", self.n_tasks, 1, 100_000)


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32  # the global batch, whatever the number of processes
    eval_batch_size: int = 1024
    drop_last: bool = False  # drop each task's last, smaller batch (CLS-ER's loaders do)
    precision: Precision = Precision.auto  # weights and averages stay fp32
    channels_last: bool = False  # NHWC layout for conv nets (faster with bf16 on recent GPUs)
    compile: bool = False  # torch.compile the model in place (its state-dict keys stay the same)
    sync_batchnorm: bool = False  # with several processes: BatchNorm statistics over the global batch
    loss_classes: LossClasses = LossClasses.all
    lr_milestones: list[int] = field(default_factory=list)  # epochs of each task after which the lr is cut
    lr_gamma: float = 0.1  # … by this factor (every task starts again from the optimizer's lr)

    def __post_init__(self) -> None:
        count("train.epochs", self.epochs, 1, 100_000)
        count("train.batch_size", self.batch_size, 1, 1 << 24)
        count("train.eval_batch_size", self.eval_batch_size, 1, 1 << 24)
        if not all(1 <= m <= self.epochs for m in self.lr_milestones):
            raise OptionError(
                "train.lr_milestones", list(self.lr_milestones), f"each must be an epoch in [1, {self.epochs}]"
            )
        positive("train.lr_gamma", self.lr_gamma)
        self.loss_classes = LossClasses(self.loss_classes)


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # continual evaluation every N optimizer steps (0: only after each task)
    subset_size: int = 200  # test samples per task for continual evaluation (fixed, seeded)

    def __post_init__(self) -> None:
        count("eval.every_n_steps", self.every_n_steps, 0)
        count("eval.subset_size", self.subset_size, 1)


@dataclass
class Choices:
    """What ``experiment=`` and ``strategy=`` selected: set from Hydra's choices, never by hand."""

    experiment: str = "custom"
    strategy: str = "custom"


@dataclass
class BestArgsScope:
    """What a published protocol (``best_args=…``) was tuned for; another experiment or strategy is refused."""

    experiment: str = MISSING
    strategies: list[str] = MISSING


@dataclass
class Config:
    seed: int = 0
    device: str = field(default="auto", metadata=NEUTRAL)  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # `_target_` + options (conf/model/), and `weights`: a file to start from
    optimizer: Any = MISSING  # `_target_` (a torch.optim class, partial) + options (conf/optimizer/)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    choices: Choices = field(default_factory=Choices)
    best_args: BestArgsScope | None = None  # set by a best_args=<experiment>/<method> file
    logger: dict[str, Any] = field(default_factory=dict, metadata=NEUTRAL)  # name → node with a `_target_`
    checkpoint: bool = field(default=True, metadata=NEUTRAL)  # save checkpoints/last.pt after each task
    # a run directory to continue, true: the newest run of this configuration, false/null: no resume
    resume: str | None = field(default=None, metadata=NEUTRAL)
    deterministic: bool = field(default=False, metadata=NEUTRAL)  # torch deterministic algorithms (CUDA)
    # torch's CPU threads (null: OMP_NUM_THREADS, else the usable CPUs over the processes sharing them)
    threads: int | None = field(default=None, metadata=NEUTRAL)

    def __post_init__(self) -> None:
        count("seed", self.seed, 0, SEED_LIMIT - 1)
        if self.threads is not None:
            count("threads", self.threads, 1, 4096)


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
    # not in struct mode at the top: config files add the plugins' nodes beside the schema's keys
    schema = OmegaConf.structured(Config)
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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    record_choices(cfg, choices)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check(cfg: DictConfig) -> Config:
    """The config's schema keys as typed objects; a UserError names the first unknown key or value out of
    range, or published values (``best_args=``) used with an experiment or strategy they were not tuned for.
    Then the plugins are built once, which checks their options (and imports their code)."""
    for key in _unknown_keys(cfg, Config):  # `+key=value` overrides get past Hydra's own check
        raise UserError(f"{key}: unknown config key (the keys are declared in cl_ema/config.py)")
    core = OmegaConf.structured(Config)
    try:
        core = OmegaConf.merge(core, {k: cfg[k] for k in cfg if k in SCHEMA_KEYS})
        config: Config = OmegaConf.to_object(core)  # type: ignore[assignment]  # runs every __post_init__
    except MissingMandatoryValue as err:
        raise UserError(f"{err.full_key}: needs a value (set {err.full_key}=…)") from None
    except OptionError as err:
        raise UserError(str(err)) from None
    scope, experiment, strategy = config.best_args, config.choices.experiment, config.choices.strategy
    if scope and (experiment != scope.experiment or strategy not in scope.strategies):
        raise UserError(
            f"best_args: these published values were tuned for experiment={scope.experiment} with "
            f"strategy={'|'.join(scope.strategies)}, not experiment={experiment} with strategy={strategy} "
            "(override best_args.experiment / best_args.strategies to use them anyway)"
        )
    resume = resume_request(cfg.resume)
    if isinstance(resume, Path) and not (resume / LAST_CHECKPOINT).is_file():
        from cl_ema.rundirs import restartable

        if not restartable(resume):
            raise UserError(f"resume={cfg.resume}: no {LAST_CHECKPOINT} in that directory (and no run of cl_ema "
                            "that finished no task, which would start again there)")  # fmt: skip
    resolve_device(cfg.device)  # it imports torch
    from cl_ema.strategies import build_plugins  # last: it imports the plugins' code (Avalanche)

    build_plugins(cfg)
    return config


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


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a device this machine lacks is a UserError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device={name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UserError(f"device={name!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")  # cpu:0 is the one CPU device
    if not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine (use device=cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training (None: plain fp32)."""
    import torch

    if precision == Precision.auto:
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if precision == Precision.bf16 else None


def data_root(root: str | None) -> Path:
    """``data.root``, else ``$CL_EMA_DATA``, else the user cache dir (e.g. ~/.cache/cl_ema/data)."""
    return Path(root).expanduser() if root else Path(user_cache_dir("cl_ema")) / "data"


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain values (choices as strings), as results.json and W&B record it."""
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
