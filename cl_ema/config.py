"""Structured-config schema (types checked by OmegaConf at composition) and value checks.

Every key a user types is declared here; ``conf/`` holds the values. Types are enforced when
Hydra merges overrides (``train.batch_size=abc`` fails there), ranges and choices by ``check()``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from platformdirs import user_cache_dir

if typing.TYPE_CHECKING:
    import torch

from cl_ema.errors import UserError

# Choices, checked here before any heavy import; the modules that implement them import these.
DATASETS = ("digits", "mnist", "cifar10", "cifar100")
SCENARIOS = ("split", "permuted")
MODEL_NAMES = ("mlp", "cnn", "resnet18", "torchvision")
BUFFER_POLICIES = ("average", "copy")
SYNC_MODES = ("none", "task_end")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("auto", "fp32", "bf16")
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
LOGGERS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class DataConfig:
    name: str = "digits"
    scenario: str = "split"  # split (class-incremental) | permuted
    n_tasks: int = 5
    root: str | None = None  # None: $CL_EMA_DATA, else the user cache dir
    download: bool = True
    class_order: list[int] | None = None  # None: a permutation drawn from ``seed``
    augment: bool = False  # random crop (pad 4) + horizontal flip, on the device


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: int | None = None  # mlp
    layers: int | None = None  # mlp
    width: int | None = None  # cnn, resnet18
    arch: str | None = None  # torchvision: a classification model of torchvision.models (resnet18, vit_b_16, …)
    pretrained: str | None = None  # torchvision: its weights (IMAGENET1K_V1, DEFAULT, …); None: random init
    input_size: int | None = None  # torchvision: inputs are resized to this (None: the weights' crop size)
    weights: str | None = None  # start from this state dict / checkpoint


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 1024
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16 support, else fp32) | fp32 | bf16
    channels_last: bool = False  # NHWC layout for conv nets (faster with bf16 on recent GPUs)
    compile: bool = False  # torch.compile the model in place (its state-dict keys stay the same)


@dataclass
class EMAConfig:
    decay: float = 0.999
    decays: list[float] | None = None  # several decays from one run; overrides ``decay``
    update_every: int = 1
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 2 / 3
    buffers: str = "average"  # average | copy (BatchNorm statistics)
    recompute_bn: bool = False
    sync: str = "none"  # none | task_end


@dataclass
class ReplayConfig:
    mem_size: int = 200
    batch_size_mem: int | None = None  # None: train.batch_size


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # continual evaluation every N optimizer steps (0: only after each task)
    subset_size: int = 200  # test samples per task for continual evaluation (fixed, seeded)


@dataclass
class StrategyConfig:
    name: str = "plain"
    plugins: dict[str, Any] = field(default_factory=dict)  # name → Hydra-instantiable plugin


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "cl_ema"
    entity: str | None = None
    mode: str = "auto"  # auto: online when logged in or under `wandb agent`, else offline
    group: str | None = None  # None: experiment-strategy-decays, so seeds aggregate
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: bool = True  # save checkpoints/last.pt after each task
    resume: str | None = None  # a run directory, or true: the newest run of this configuration
    deterministic: bool = False  # torch deterministic algorithms (CUDA); CPU runs are deterministic anyway


def check_decay(decay: float, key: str = "ema.decay") -> float:
    """Return ``decay`` as a float, or raise a UserError naming ``key``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise UserError(f"{key}={decay!r}: an EMA decay must be a number in [0, 1]")
    return float(decay)


def check_ema_options(
    decay: float | Sequence[float], update_every: int, warmup_gamma: float, warmup_power: float, buffers: str
) -> list[float]:
    """Validate EMA options; return the decays as a list of floats."""
    decays = [decay] if isinstance(decay, (int, float)) else list(decay)
    if not decays:
        raise UserError("ema.decays: give at least one decay")
    key = "ema.decays" if len(decays) > 1 else "ema.decay"
    decays = [check_decay(d, key) for d in decays]
    if len(set(decays)) != len(decays):
        raise UserError(f"ema.decays={decays}: decays must be distinct")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise UserError(f"ema.update_every={update_every!r}: must be an integer >= 1")
    if buffers not in BUFFER_POLICIES:
        raise UserError(f"ema.buffers={buffers!r}: must be one of {', '.join(BUFFER_POLICIES)}")
    if warmup_gamma <= 0 or warmup_power <= 0:
        raise UserError(f"ema.warmup_gamma={warmup_gamma}, ema.warmup_power={warmup_power}: both must be > 0")
    return decays


_PACKAGE = Path(__file__).resolve().parent
# Installed wheels carry the configs inside the package; a source checkout has them at the top.
CONFIG_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


def register_schema() -> None:
    store = ConfigStore.instance()
    store.store(name="cl_ema_schema", node=Config)


def compose(*overrides: str) -> DictConfig:
    """The config ``python -m cl_ema <overrides>`` would run (for scripts and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r}: must be one of {', '.join(choices)}")


def _at_least(key: str, value: Any, low: float, *, strict: bool = False) -> None:
    bad = value <= low if strict else value < low
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        raise UserError(f"{key}={value!r}: must be {'>' if strict else '>='} {low:g}")


def check(cfg: DictConfig) -> None:
    """Raise a UserError naming the first unknown key, or key with a value outside its range or choices."""
    for key in _unknown_keys(cfg, Config):  # `+key=value` overrides get past Hydra's own check
        raise UserError(f"{key}: unknown config key (the keys are declared in cl_ema/config.py)")
    _at_least("seed", cfg.seed, 0)
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("data.scenario", cfg.data.scenario, SCENARIOS)
    _at_least("data.n_tasks", cfg.data.n_tasks, 1)
    _choice("model.name", cfg.model.name, MODEL_NAMES)
    for key in ("hidden", "layers", "width", "input_size"):
        if cfg.model[key] is not None:
            _at_least(f"model.{key}", cfg.model[key], 1)
    _at_least("train.epochs", cfg.train.epochs, 1)
    _at_least("train.batch_size", cfg.train.batch_size, 1)
    _at_least("train.eval_batch_size", cfg.train.eval_batch_size, 1)
    _at_least("train.lr", cfg.train.lr, 0, strict=True)
    _choice("train.optimizer", cfg.train.optimizer, OPTIMIZERS)
    _choice("train.precision", cfg.train.precision, PRECISIONS)
    _at_least("train.weight_decay", cfg.train.weight_decay, 0)
    if not 0 <= cfg.train.momentum < 1:
        raise UserError(f"train.momentum={cfg.train.momentum!r}: must be in [0, 1)")
    ema = cfg.ema
    check_ema_options(
        list(ema.decays) if ema.decays else ema.decay, ema.update_every, ema.warmup_gamma, ema.warmup_power, ema.buffers
    )
    _choice("ema.sync", ema.sync, SYNC_MODES)
    _at_least("replay.mem_size", cfg.replay.mem_size, 1)
    if cfg.replay.batch_size_mem is not None:
        _at_least("replay.batch_size_mem", cfg.replay.batch_size_mem, 1)
    _at_least("eval.every_n_steps", cfg.eval.every_n_steps, 0)
    _at_least("eval.subset_size", cfg.eval.subset_size, 1)
    _choice("logger", cfg.logger.name, LOGGERS)
    _choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    resume = str(cfg.resume or "")
    if resume.lower() not in ("", "true", "latest") and not (Path(resume).expanduser() / LAST_CHECKPOINT).is_file():
        raise UserError(f"resume={resume}: no {LAST_CHECKPOINT} in that directory")
    resolve_device(cfg.device)  # last: it imports torch


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in hints:
            yield f"{prefix}{key}"
        elif dataclasses.is_dataclass(hints[key]):
            yield from _unknown_keys(node[key], hints[key], f"{prefix}{key}.")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable CUDA device is a UserError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name!r}: must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine (use device=cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training (None: plain fp32)."""
    import torch

    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


def data_root(root: str | None) -> Path:
    """``data.root``, else ``$CL_EMA_DATA``, else the user cache dir (e.g. ~/.cache/cl_ema/data)."""
    return Path(root).expanduser() if root else Path(user_cache_dir("cl_ema")) / "data"


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
