"""Models used for these benchmarks in the continual-learning literature."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_ema.data.storage import Normalization
from cl_ema.errors import UserError


class MLP(nn.Module):
    """Fully connected ReLU network (2×400 for split MNIST as in van de Ven & Tolias 2019)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 400, layers: int = 2) -> None:
        super().__init__()
        widths = [math.prod(input_shape)] + [hidden] * layers
        body: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths, widths[1:]):
            body += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.features = nn.Sequential(*body)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNN(nn.Module):
    """Small convolutional network: two conv-BN-ReLU blocks with max pooling, then a linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> None:
        super().__init__()
        channels = input_shape[0]
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
        self.classifier = nn.Linear(2 * width, num_classes)

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

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model, from its pretrained weights when given, with a new head.

    The head (the last ``nn.Linear``) gets ``num_classes`` outputs. Inputs arrive at the dataset's
    size, normalized with the dataset's mean μ_d and std σ_d; an adapter on the device gives the
    network what its weights were trained on: 3 channels, ``input_size`` pixels (bilinear resize;
    default: the weights' crop size, e.g. 224), and their statistics μ_w, σ_w::

        x' = resize((x · σ_d + μ_d − μ_w) / σ_w)
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        arch: str,
        pretrained: str | None = None,
        input_size: int | None = None,
        input_norm: Normalization | None = None,
    ) -> None:
        super().__init__()
        weights = _torchvision_weights(arch, pretrained)
        self.backbone = _torchvision_model(arch, weights)
        _replace_head(self.backbone, arch, num_classes)
        preset = weights.transforms() if weights is not None else None
        self.input_size = input_size or (preset.crop_size[0] if preset is not None else input_shape[-1])
        data_mean, data_std = (input_norm.mean, input_norm.std) if input_norm else ((0.0,), (1.0,))
        mean, std = (preset.mean, preset.std) if preset is not None else (data_mean, data_std)
        scale = torch.tensor(data_std) / torch.tensor(std)
        shift = (torch.tensor(data_mean) - torch.tensor(mean)) / torch.tensor(std)
        # constants, not state: non-persistent, and identical under any weight averaging
        self.register_buffer("_scale", scale.view(1, -1, 1, 1).expand(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("_shift", shift.view(1, -1, 1, 1).expand(1, 3, 1, 1).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1) * self._scale + self._shift  # grayscale → 3 channels
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.backbone(x)


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
            f"{str(err).splitlines()[0] if str(err) else ''}); download {weights.url} to {cache}"
        ) from err


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> None:
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise UserError(f"model.arch={arch}: has no linear classification head to replace")
    parent_name, _, attribute = heads[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attribute)
    setattr(parent, attribute, nn.Linear(old.in_features, num_classes))


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": ResNet18,
    "torchvision": TorchvisionClassifier,
}
_ARGS = {
    "mlp": ("hidden", "layers"),
    "cnn": ("width",),
    "resnet18": ("width",),
    "torchvision": ("arch", "pretrained", "input_size"),
}


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    weights: str | None = None,
    input_norm: Normalization | None = None,
    **options: int | str | None,
) -> nn.Module:
    """Build ``MODELS[name]`` with the options it takes (others are ignored), then load ``weights``."""
    if name not in MODELS:
        raise UserError(f"model.name={name!r}: must be one of {', '.join(MODELS)}")
    kwargs = {key: options[key] for key in _ARGS[name] if options.get(key) is not None}
    for key, value in kwargs.items():
        if key not in ("arch", "pretrained") and (not isinstance(value, int) or value < 1):
            raise UserError(f"model.{key}={value!r}: must be an integer >= 1")
    if name == "torchvision":
        if "arch" not in kwargs:
            raise UserError("model.arch: name a torchvision model, e.g. model.arch=resnet18")
        kwargs["input_norm"] = input_norm
    model = MODELS[name](input_shape, num_classes, **kwargs)
    if weights:
        load_weights(model, Path(weights))
    return model


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
        first = str(err).strip().splitlines()[0]
        raise UserError(f"model.weights={path}: does not fit model {type(model).__name__} ({first})") from err
