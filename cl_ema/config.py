"""The config schema: every key a user types, its type, its range, and whether it changes results.

``conf/`` holds the values; this module declares the keys. Types and choices are enforced by
OmegaConf when Hydra merges overrides (``train.batch_size=abc`` and ``ema.buffers=median`` fail
there); ranges by each section's ``__post_init__``, run once per run by ``check()``. Nodes with a
``_target_`` (dataset, model, optimizer, plugins, loggers) are checked against the signature of
the code they build (``cl_ema.building``).

Two facts live on the fields themselves, as metadata, and are read from here by everyone who
needs them: ``NEUTRAL`` keys never change a run's results (resume may change them, the report and
W&B grouping ignore them), and ``PLUGIN_OPTIONS`` sections only feed a plugin node under
``strategy.plugins`` (the resolved plugin node is what the run used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from platformdirs import user_cache_dir

if typing.TYPE_CHECKING:
    import torch

from cl_ema.errors import UserError

NEUTRAL = {"neutral": True}  # the key never changes results
PLUGIN_OPTIONS = {"plugin_options": True}  # the section is read by a plugin node, through interpolation
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
INT32_MAX = 2**31 - 1  # sizes and counts: torch indexes with int64, but no sane run needs more
SEED_LIMIT = 2**32  # numpy's RandomState takes seeds below 2³²


class Choice(str, Enum):
    """A config choice: OmegaConf checks overrides against the members; compares equal to its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Scenario(Choice):
    split = "split"  # class-incremental: the classes are dealt out to the tasks
    permuted = "permuted"  # every task has all classes, its own pixel permutation (domain-incremental)


class Precision(Choice):
    auto = "auto"  # bf16 autocast on CUDA GPUs that support it, fp32 otherwise
    fp32 = "fp32"
    bf16 = "bf16"


class Buffers(Choice):
    average = "average"  # BatchNorm statistics are averaged like the weights
    copy = "copy"  # an EMA model evaluates with the live model's statistics


class Sync(Choice):
    none = "none"
    task_end = "task_end"  # the EMA weights are loaded into the live model after each task


class LossClasses(Choice):
    all = "all"  # cross-entropy over every output
    task = "task"  # over the classes of each sample's own task (SLCA's and CoMA's current-task logits)


class ReplayPolicy(Choice):
    class_balanced = "class_balanced"  # Avalanche's ClassBalancedBuffer, updated after each task
    reservoir = "reservoir"  # Mammoth's ER: reservoir sampling over the stream, updated every step


# ---------------------------------------------------------------------------- range checks
def _fail(key: str, value: Any, expected: str) -> typing.NoReturn:
    raise UserError(f"{key}={value!r}: {expected}")


def at_least(key: str, value: float, low: float, high: float = INT32_MAX) -> None:
    """``low <= value <= high`` and finite."""
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, value, "must be a finite number")
    if value < low:
        _fail(key, value, f"must be >= {low:g}")
    if value > high:
        _fail(key, value, f"must be <= {high:,}" if isinstance(high, int) else f"must be <= {high:g}")


def positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        _fail(key, value, "must be a finite number > 0")


def probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # NaN fails too
        _fail(key, value, "must be a number in [0, 1]")


def check_decay(decay: Any, key: str = "ema.decay") -> float:
    """``decay`` as a float in [0, 1] (``-0.0`` becomes ``0.0``), or a UserError naming ``key``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        _fail(key, decay, "an EMA decay must be a number in [0, 1]")
    return float(decay) + 0.0


def check_decays(decays: Sequence[Any], key: str = "ema.decays", distinct: bool = True) -> list[float]:
    """Decays in [0, 1], at least one, distinct unless told otherwise (each names a track)."""
    if not decays:
        raise UserError(f"{key}=[]: give at least one decay (or null to use ema.decay)")
    checked = [check_decay(d, key) for d in decays]
    if distinct and len(set(checked)) != len(checked):
        _fail(key, list(decays), "decays must be distinct")
    return checked


# ---------------------------------------------------------------------------- the schema
@dataclass
class DataConfig:
    dataset: Any = MISSING  # `_target_` returning (train, test) TensorStores; conf/dataset/
    scenario: Scenario = Scenario.split
    n_tasks: int = 5
    class_order: list[int] | None = None  # split: None draws a permutation from `seed`
    permute_first_task: bool = False  # permuted: False keeps task 1 unpermuted (van de Ven), Mammoth permutes all
    augment: bool = False  # random crop (pad 4) + horizontal flip, on the device
    root: str | None = field(default=None, metadata=NEUTRAL)  # None: $CL_EMA_DATA, else the user cache dir
    download: bool = field(default=True, metadata=NEUTRAL)

    def __post_init__(self) -> None:
        at_least("data.n_tasks", self.n_tasks, 1, 100_000)


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32  # the global batch, whatever the number of processes
    eval_batch_size: int = 1024
    drop_last: bool = False  # drop each task's last, smaller batch (CLS-ER's loaders do)
    precision: Precision = Precision.auto  # weights and EMA shadows stay fp32
    channels_last: bool = False  # NHWC layout for conv nets (faster with bf16 on recent GPUs)
    compile: bool = False  # torch.compile the model in place (its state-dict keys stay the same)
    sync_batchnorm: bool = False  # with several processes: BatchNorm statistics over the global batch
    loss_classes: LossClasses = LossClasses.all
    lr_milestones: list[int] = field(default_factory=list)  # epochs of each task after which the lr is cut
    lr_gamma: float = 0.1  # … by this factor (every task starts again from the optimizer's lr)

    def __post_init__(self) -> None:
        at_least("train.epochs", self.epochs, 1, 100_000)
        at_least("train.batch_size", self.batch_size, 1, 1 << 24)
        at_least("train.eval_batch_size", self.eval_batch_size, 1, 1 << 24)
        if not all(1 <= m <= self.epochs for m in self.lr_milestones):
            _fail("train.lr_milestones", list(self.lr_milestones), f"each must be an epoch in [1, {self.epochs}]")
        positive("train.lr_gamma", self.lr_gamma)
        self.loss_classes = LossClasses(self.loss_classes)


@dataclass
class EMAOptions:
    """How EMA shadows follow the weights (``cl_ema.ema.EMA``, whose docstring has the formulas)."""

    update_every: int = 1  # update on every N-th optimizer step
    warmup: bool = False  # decay ramp of timm's ModelEmaV3 / ema-pytorch
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    buffers: Buffers = Buffers.average  # BatchNorm statistics

    def __post_init__(self) -> None:
        at_least("ema.update_every", self.update_every, 1)
        positive("ema.warmup_gamma", self.warmup_gamma)
        positive("ema.warmup_power", self.warmup_power)
        self.buffers = Buffers(self.buffers)


@dataclass
class EMAConfig(EMAOptions):
    """The ``ema`` section: the EMAPlugin's decays (one track each) and options."""

    decay: float = 0.999
    decays: list[float] | None = None  # several decays from one run; replaces `decay`
    recompute_bn: bool = False  # re-estimate BatchNorm statistics of each EMA model before evaluating it
    sync: Sync = Sync.none

    def __post_init__(self) -> None:
        super().__post_init__()
        decays = self.decay_list()
        self.sync = Sync(self.sync)
        if self.sync == Sync.task_end and len(decays) > 1:
            raise UserError("ema.sync=task_end changes training, so it takes one decay, not ema.decays")

    def decay_list(self) -> list[float]:
        return check_decays(self.decays) if self.decays is not None else [check_decay(self.decay)]

    def options(self) -> EMAOptions:
        return EMAOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EMAOptions)})


@dataclass
class ReplayConfig:
    mem_size: int = 200
    batch_size_mem: int | None = None  # replayed samples per step (None: train.batch_size)
    policy: ReplayPolicy = ReplayPolicy.class_balanced

    def __post_init__(self) -> None:
        at_least("replay.mem_size", self.mem_size, 1, 1 << 28)
        if self.batch_size_mem is not None:
            at_least("replay.batch_size_mem", self.batch_size_mem, 1, 1 << 24)
        self.policy = ReplayPolicy(self.policy)


@dataclass
class CLSERConfig:
    """CLS-ER (Arani et al., ICLR 2022): a plastic and a stable EMA, teachers on replayed samples."""

    reg_weight: float = 0.1  # λ of the consistency loss
    plastic_decay: float = 0.999
    plastic_update_prob: float = 0.9
    stable_decay: float = 0.999
    stable_update_prob: float = 0.7

    def __post_init__(self) -> None:
        at_least("cls_er.reg_weight", self.reg_weight, 0.0, math.inf)
        for name in ("plastic", "stable"):
            check_decay(getattr(self, f"{name}_decay"), f"cls_er.{name}_decay")
            probability(f"cls_er.{name}_update_prob", getattr(self, f"{name}_update_prob"))


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # continual evaluation every N optimizer steps (0: only after each task)
    subset_size: int = 200  # test samples per task for continual evaluation (fixed, seeded)

    def __post_init__(self) -> None:
        at_least("eval.every_n_steps", self.every_n_steps, 0)
        at_least("eval.subset_size", self.subset_size, 1)


@dataclass
class StrategyConfig:
    name: str = "plain"
    plugins: dict[str, Any] = field(default_factory=dict)  # config name → node with a `_target_`


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
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    ema: EMAConfig = field(default_factory=EMAConfig, metadata=PLUGIN_OPTIONS)
    replay: ReplayConfig = field(default_factory=ReplayConfig, metadata=PLUGIN_OPTIONS)
    cls_er: CLSERConfig = field(default_factory=CLSERConfig, metadata=PLUGIN_OPTIONS)
    eval: EvalConfig = field(default_factory=EvalConfig)
    best_args: BestArgsScope | None = None  # set by a best_args=<experiment>/<method> file
    logger: dict[str, Any] = field(default_factory=dict, metadata=NEUTRAL)  # name → node with a `_target_`
    checkpoint: bool = field(default=True, metadata=NEUTRAL)  # save checkpoints/last.pt after each task
    # a run directory to continue, true: the newest run of this configuration, false/null: no resume
    resume: str | None = field(default=None, metadata=NEUTRAL)
    deterministic: bool = field(default=False, metadata=NEUTRAL)  # torch deterministic algorithms (CUDA)

    def __post_init__(self) -> None:
        at_least("seed", self.seed, 0, SEED_LIMIT - 1)


def _fields_with(flag: str, schema: type = Config, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(schema):
        if f.metadata.get(flag):
            yield prefix + f.name
        elif dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            yield from _fields_with(flag, f.type, f"{prefix}{f.name}.")
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            yield from _fields_with(flag, f.default_factory, f"{prefix}{f.name}.")


NEUTRAL_KEYS: tuple[str, ...] = ("resume", *(k for k in _fields_with("neutral") if k != "resume"))
PLUGIN_OPTION_SECTIONS: tuple[str, ...] = tuple(_fields_with("plugin_options"))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def _is_under(key: str, sections: Sequence[str]) -> bool:
    return any(key == s or key.startswith(f"{s}.") for s in sections)


def result_keys(config: dict) -> dict[str, str]:
    """The resolved config's keys that decide a run's results, as JSON strings (seed included): all but
    the neutral keys and the plugin-option sections (the plugins' resolved nodes under
    ``strategy.plugins`` hold what the run really used; an option no plugin reads changes nothing)."""
    ignored = (*NEUTRAL_KEYS, *PLUGIN_OPTION_SECTIONS)
    return {k: json.dumps(v, sort_keys=True) for k, v in flatten(config).items() if not _is_under(k, ignored)}


def short_key(key: str) -> str:
    """``strategy.plugins.ema.config.decay`` → ``ema.decay``: a plugin's option as users type it."""
    parts = key.split(".")
    if parts[:2] == ["strategy", "plugins"] and len(parts) > 4 and parts[3] == "config":
        return ".".join([parts[2], *parts[4:]])
    return key


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
    ConfigStore.instance().store(name="cl_ema_schema", node=Config)
    if not OmegaConf.has_resolver("cl_ema.neutral_keys"):  # Hydra's run-dir names leave these out
        OmegaConf.register_new_resolver("cl_ema.neutral_keys", lambda: list(NEUTRAL_KEYS))


def compose(*overrides: str) -> DictConfig:
    """The config ``python -m cl_ema <overrides>`` would run (for scripts and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def check(cfg: DictConfig, experiment: str | None = None) -> Config:
    """The config as typed objects; a UserError names the first unknown key or value out of range, or
    published values (``best_args=``) used with an ``experiment`` or strategy they were not tuned for."""
    for key in _unknown_keys(cfg, Config):  # `+key=value` overrides get past Hydra's own check
        raise UserError(f"{key}: unknown config key (the keys are declared in cl_ema/config.py)")
    try:
        config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]  # runs every __post_init__
    except MissingMandatoryValue as err:
        raise UserError(f"{err.full_key}: needs a value (set {err.full_key}=…)") from None
    scope, strategy = config.best_args, config.strategy.name
    if scope and experiment and (experiment != scope.experiment or strategy not in scope.strategies):
        raise UserError(
            f"best_args: these published values were tuned for experiment={scope.experiment} with "
            f"strategy={'|'.join(scope.strategies)}, not experiment={experiment} with strategy={strategy} "
            "(override best_args.experiment / best_args.strategies to use them anyway)"
        )
    resume = resume_request(cfg.resume)
    if isinstance(resume, Path) and not (resume / LAST_CHECKPOINT).is_file():
        raise UserError(f"resume={cfg.resume}: no {LAST_CHECKPOINT} in that directory")
    resolve_device(cfg.device)  # last: it imports torch
    return config


def experiment_name(hydra_node: Any) -> str:
    """The ``experiment=`` a run was composed with (Hydra records it among its choices)."""
    return hydra_node.runtime.choices.get("experiment") or "custom"


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
            yield f"{prefix}{key}"
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
