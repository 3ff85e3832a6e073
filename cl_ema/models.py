"""Models used for these benchmarks in the continual-learning literature.

Each class is the ``_target_`` of a config in ``conf/model/``; it takes the stream's ``DataSpec``
(input shape, number of classes, normalization) as ``spec`` and its own options as keywords. A
new model is one such class and its config.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, Strict
from torch import Tensor, nn

from cl_ema.building import Spec
from cl_ema.data.stream import DataSpec
from cl_ema.errors import UserError, first_line
from cl_ema.options import Count

LRScale = Annotated[float, Strict(), Field(gt=0, le=1e3)]  # the backbone's learning rate over the head's


class MLP(nn.Module):
    """Fully connected ReLU network (2×400 for split MNIST as in van de Ven & Tolias 2019).

    ``init="xavier_uniform"``: Glorot-uniform weights and zero biases, as Mammoth's ``MNISTMLP``;
    ``"default"``: torch's own initialization of ``nn.Linear``.
    """

    def __init__(
        self,
        spec: DataSpec,
        hidden: Count = 400,
        layers: Annotated[int, Strict(), Field(ge=0, le=1000)] = 2,  # 0: a linear model
        init: Literal["default", "xavier_uniform"] = "default",
    ) -> None:
        super().__init__()
        widths = [math.prod(spec.input_shape)] + [hidden] * layers
        body: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths, widths[1:]):
            body += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.features = nn.Sequential(*body)
        self.classifier = nn.Linear(widths[-1], spec.num_classes)
        if init == "xavier_uniform":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """Small convolutional network: two conv-BN-ReLU blocks with max pooling, then a linear head."""

    def __init__(self, spec: DataSpec, width: Count = 32) -> None:
        super().__init__()
        channels = spec.input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs: 3×3 stride-1 stem, no max pool (He et al. 2016, CIFAR variant).

    ``width=64`` is the full network (11.2 M parameters, as in Mammoth / DER); ``width=20`` is the
    reduced ResNet-18 of GEM (Lopez-Paz & Ranzato 2017).
    """

    def __init__(self, spec: DataSpec, width: Count = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(spec.input_shape[0], width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_planes, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class InputAdapter(nn.Module):
    """Gives a pretrained network what its weights were trained on, on the device.

    Inputs arrive at the dataset's size, normalized with the dataset's mean μ_d and std σ_d; the
    adapter makes 3 channels (grayscale is repeated), renormalizes to the weights' statistics
    μ_w, σ_w and resizes to ``size`` (bilinear)::

        x' = resize((x · σ_d + μ_d − μ_w) / σ_w)

    Its constants are not state: non-persistent buffers, identical under any weight averaging.
    """

    _scale: Tensor
    _shift: Tensor

    def __init__(self, spec: DataSpec, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = size
        data_mean, data_std = torch.tensor(spec.norm.mean), torch.tensor(spec.norm.std)
        scale = data_std / torch.tensor(std)
        shift = (data_mean - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("_scale", scale.view(1, -1, 1, 1).expand(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("_shift", shift.view(1, -1, 1, 1).expand(1, 3, 1, 1).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1) * self._scale + self._shift
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


class PretrainedClassifier(nn.Module):
    """A backbone with a new head, fed through an ``InputAdapter``.

    ``backbone_lr_scale`` < 1 trains the pretrained layers slower than the new head (the "slow
    learner" of SLCA, Zhang et al. 2023: 0.01): ``param_groups(lr)`` gives the optimizer two groups.
    """

    backbone: nn.Module
    adapter: InputAdapter
    backbone_lr_scale: float = 1.0

    def head(self) -> nn.Module:
        raise NotImplementedError

    def _set_lr_scale(self, scale: float) -> None:
        self.backbone_lr_scale = scale

    def param_groups(self, lr: float) -> list[dict]:
        head = {id(p) for p in self.head().parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) not in head]
        return [
            {"params": backbone, "lr": lr * self.backbone_lr_scale},
            {"params": [p for p in trainable if id(p) in head]},
        ]

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.adapter(x))


class TorchvisionClassifier(PretrainedClassifier):
    """A torchvision classification model, from its pretrained weights when given, with a new head.

    ``arch``: any classification model of ``torchvision.models``; ``pretrained``: one of its
    weights (``IMAGENET1K_V1``, ``DEFAULT``, …; null: random initialization). The head (the last
    ``nn.Linear``) gets one output per class; an ``InputAdapter`` resizes to ``input_size``
    (default: the weights' crop size, e.g. 224) and renormalizes to the weights' statistics.
    """

    def __init__(
        self,
        spec: DataSpec,
        arch: str,
        pretrained: str | None = None,
        input_size: int | None = None,
        backbone_lr_scale: LRScale = 1.0,
    ) -> None:
        super().__init__()
        weights = _torchvision_weights(arch, pretrained)
        self.backbone = _torchvision_model(arch, weights)
        self._head_name = _replace_head(self.backbone, arch, spec.num_classes)
        preset = weights.transforms() if weights is not None else None
        size = input_size or (preset.crop_size[0] if preset is not None else spec.input_shape[-1])
        mean, std = (preset.mean, preset.std) if preset is not None else (spec.norm.mean, spec.norm.std)
        self.adapter = InputAdapter(spec, size, mean, std)
        self._set_lr_scale(backbone_lr_scale)

    def head(self) -> nn.Module:
        return self.backbone.get_submodule(self._head_name)


class TimmClassifier(PretrainedClassifier):
    """Any timm model (``timm.list_models()``), from its pretrained weights when asked, with a new head.

    ``arch``: a timm model name with its weights tag, e.g. ``vit_base_patch16_224.augreg_in21k``;
    ``pretrained=true`` loads those weights from the Hugging Face hub cache (downloading them on
    first use). timm builds the head over the stream's classes; an ``InputAdapter`` resizes to
    ``input_size`` (default: the model's, e.g. 224) and, with pretrained weights, renormalizes to
    their statistics (timm's pretrained config).
    """

    def __init__(
        self,
        spec: DataSpec,
        arch: str,
        pretrained: bool = False,
        input_size: int | None = None,
        backbone_lr_scale: LRScale = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = _timm_model(arch, pretrained, spec.num_classes)
        config: dict = self.backbone.pretrained_cfg  # type: ignore[assignment]
        size = input_size or config["input_size"][-1]
        mean, std = (config["mean"], config["std"]) if pretrained else (spec.norm.mean, spec.norm.std)
        self.adapter = InputAdapter(spec, size, mean, std)
        self._set_lr_scale(backbone_lr_scale)

    def head(self) -> nn.Module:
        return self.backbone.get_classifier()  # type: ignore[operator]


def _timm_model(arch: str, pretrained: bool, num_classes: int) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise UserError(
            f"model.arch={arch!r}: not a timm model (list them with timm.list_models('vit_*', pretrained=True))"
        )
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, each of the hub's retries logs a line: the error below says it all
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as err:  # hub errors are OSErrors; no weights for the tag: RuntimeError
        if not pretrained:
            raise
        from huggingface_hub import constants

        config = timm.models.get_pretrained_cfg(arch)
        repo = (config.hf_hub_id if config is not None else None) or f"timm/{arch}"
        where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        raise UserError(
            f"model.pretrained=true: cannot load timm's {arch} weights ({first_line(err, with_type=True)}); put "
            f"model.safetensors from https://huggingface.co/{repo} into {where}/snapshots/<revision>/ (on a machine "
            f"with network: hf download {repo}, with HF_HUB_CACHE pointing there)"
        ) from None
    finally:
        hub_log.setLevel(level)


def _torchvision_weights(arch: str, pretrained: str | None):
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(
            f"model.arch={arch!r}: not a torchvision classification model (e.g. resnet18, resnet50, vit_b_16)"
        )
    if pretrained is None:
        return None
    available = torchvision.models.get_model_weights(arch)
    if pretrained not in available.__members__:
        raise UserError(f"model.pretrained={pretrained!r}: {arch} has {', '.join(available.__members__)}")
    return available[pretrained]


def _torchvision_model(arch: str, weights) -> nn.Module:
    import torchvision

    if weights is None:
        return torchvision.models.get_model(arch)
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise UserError(
            f"model.pretrained={weights.name}: cannot load torchvision's {arch} weights ({type(err).__name__}: "
            f"{first_line(err)}); download {weights.url} to {cache}"
        ) from err


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> str:
    """Give the last ``nn.Linear`` ``num_classes`` outputs; its name."""
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise UserError(f"model.arch={arch}: has no linear classification head to replace")
    parent_name, _, attribute = heads[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attribute)
    setattr(parent, attribute, nn.Linear(old.in_features, num_classes))
    return heads[-1]


def build_model(checked: Spec, spec: DataSpec, weights: str | None = None) -> nn.Module:
    """The checked ``model`` section's model for ``spec``, starting from the file ``weights`` when given."""
    try:
        model = checked.build(spec=spec)
    except (RuntimeError, MemoryError) as err:  # the allocator's refusal
        if not isinstance(err, MemoryError) and "alloc" not in str(err).lower():
            raise
        raise UserError(
            f"model: {_size(checked, spec)}, more than this machine's memory holds ({first_line(err, with_type=True)})"
        ) from err
    if weights:
        load_weights(model, Path(weights))
    return model


def _size(checked: Spec, spec: DataSpec) -> str:
    """The model's parameter count and fp32 size, counted without allocating it."""
    with torch.device("meta"):
        count = sum(p.numel() for p in checked.build(spec=spec).parameters())
    return (
        f"{checked.target.__name__} with these options has {count:,} parameters ({4 * count / 2**30:.1f} GiB in fp32)"
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict (or a cl_ema checkpoint's ``model`` entry) saved with ``torch.save``."""
    if not path.is_file():
        raise UserError(f"model.weights={path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"model.weights={path}: not a readable torch checkpoint ({type(err).__name__})") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = first_line(err, past_headings=True)
        raise UserError(f"model.weights={path}: does not fit model {type(model).__name__} ({first})") from err
