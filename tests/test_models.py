"""The model zoo: sizes from the literature, starting weights (files and torchvision's), bad weights."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from fake_datasets import skip_cifar_md5, write_cifar  # noqa: F401
from helpers import run_experiment
from torch import nn

from cl_ema.building import check_node
from cl_ema.data.sources import CIFAR100_NORM, MNIST_NORM
from cl_ema.data.storage import DataSpec
from cl_ema.errors import UserError
from cl_ema.models import CNN, MLP, ResNet18, TorchvisionClassifier, build_model

CIFAR = DataSpec((3, 32, 32), 100, CIFAR100_NORM)
CIFAR10 = DataSpec((3, 32, 32), 10, CIFAR100_NORM)
DIGITS = DataSpec((1, 8, 8), 10, MNIST_NORM)


def from_config(spec: DataSpec, target: str, weights: str | None = None, **options):
    """A model as the runner builds it, from a config node checked against its code, and its ``weights``."""
    return build_model(
        check_node({"_target_": f"cl_ema.models.{target}", **options}, "model", given=("spec",)), spec, weights
    )


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sizes_match_the_literature():
    assert num_parameters(ResNet18(CIFAR, width=64)) == 11_220_132  # Mammoth / DER: 11.2 M
    assert num_parameters(ResNet18(CIFAR, width=20)) == 1_109_240  # GEM's reduced, nf=20
    mnist = DataSpec((1, 28, 28), 10, MNIST_NORM)
    assert num_parameters(MLP(mnist, hidden=400, layers=2)) == 478_410  # 784-400-400-10
    assert num_parameters(MLP(mnist, hidden=100, layers=2)) == 89_610  # Mammoth's MNISTMLP 784-100-100-10
    out = CNN(CIFAR10, width=8)(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_mammoth_mlp_starts_from_xavier_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    model = MLP(DataSpec((1, 28, 28), 10, MNIST_NORM), hidden=100, layers=2, init="xavier_uniform")
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        bound = (6 / (layer.in_features + layer.out_features)) ** 0.5  # Glorot & Bengio 2010
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_a_model_too_large_for_memory_is_one_line_with_its_size():
    huge = DataSpec((1, 100_000, 100_000), 10, MNIST_NORM)  # 10¹⁰ inputs: no machine allocates the first layer
    with pytest.raises(
        UserError,
        match=r"model: MLP with these options has 1,000,000,001,110 "
        r"parameters \(3725.3 GiB in fp32\), more than this machine's memory holds",
    ):
        from_config(huge, "MLP", hidden=100, layers=1)


def test_weights_from_a_state_dict_or_a_checkpoint(tmp_path):
    source = MLP(DIGITS, hidden=16, layers=1)
    torch.save(source.state_dict(), tmp_path / "state.pt")
    torch.save({"format": "cl_ema-checkpoint-2", "model": source.state_dict()}, tmp_path / "last.pt")
    for name in ("state.pt", "last.pt"):
        model = from_config(DIGITS, "MLP", hidden=16, layers=1, weights=str(tmp_path / name))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize(
    "content,expected",
    [
        (None, "no such file"),
        (b"not a checkpoint", "not a readable torch checkpoint"),
        ("other", r"does not fit model MLP \(size mismatch for features.1.weight"),
    ],
)
def test_bad_weights_are_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "w.pt"
    if content == "other":
        torch.save(MLP(DIGITS, hidden=32, layers=1).state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=rf"model.weights={path}: {expected}"):
        from_config(DIGITS, "MLP", hidden=16, layers=1, weights=str(path))


@pytest.fixture
def imagenet_resnet18(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """Stands in for torchvision's ResNet-18 ImageNet weights: a seeded file in the hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_torchvision_model_starts_from_its_pretrained_weights(imagenet_resnet18):
    model = TorchvisionClassifier(CIFAR10, arch="resnet18", pretrained="IMAGENET1K_V1")
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in imagenet_resnet18.items() if not k.startswith("fc."))
    assert model.backbone.fc.out_features == 10 and model.adapter.size == 224  # the weights' crop size
    seen = []
    model.backbone.conv1.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    # a dataset-normalized image whose pixels are ImageNet's mean reaches the network as zeros
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    x = (imagenet_mean - torch.tensor(CIFAR100_NORM.mean).view(1, 3, 1, 1)) / torch.tensor(CIFAR100_NORM.std).view(
        1, 3, 1, 1
    )
    assert model(x).shape == (2, 10)
    assert seen[0].shape == (2, 3, 224, 224) and seen[0].abs().max() < 1e-5
    assert not any(k.startswith("_") for k in model.state_dict())  # the adapter's constants are not state


def test_torchvision_grayscale_and_random_init():
    model = TorchvisionClassifier(DataSpec((1, 28, 28), 10, MNIST_NORM), arch="resnet18")
    assert model.adapter.size == 28 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "options,expected",
    [
        ({}, "model.arch: needs a value"),
        ({"arch": "resnet7"}, "model.arch='resnet7': not a torchvision classification model"),
        ({"arch": "resnet18", "pretrained": "CIFAR"}, "model.pretrained='CIFAR': resnet18 has IMAGENET1K_V1, DEFAULT"),
    ],
)
def test_torchvision_bad_options(options, expected):
    from helpers import compose_config
    from hydra.errors import HydraException

    from cl_ema.config import check
    from cl_ema.errors import one_line

    with pytest.raises((UserError, HydraException)) as caught:
        cfg = compose_config("model=torchvision", *(f"model.{k}={v}" for k, v in options.items()))
        build_model(check(cfg).model, CIFAR10)
    message = one_line(caught.value) if isinstance(caught.value, HydraException) else str(caught.value)
    assert re.search(expected.replace("(", r"\("), message), message


def test_pretrained_weights_that_cannot_be_downloaded_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    file = "resnet18-f37072fd.pth"
    expected = (
        rf"model.pretrained=IMAGENET1K_V1: cannot load torchvision's resnet18 weights \(URLError: .*\); "
        rf"download https://download.pytorch.org/models/{file} to {tmp_path}/hub/checkpoints/{file}"
    )
    with pytest.raises(UserError, match=expected):
        TorchvisionClassifier(CIFAR10, arch="resnet18", pretrained="IMAGENET1K_V1")


def test_fine_tuning_from_imagenet_weights_end_to_end(tmp_path, imagenet_resnet18, skip_cifar_md5):  # noqa: F811
    write_cifar(tmp_path / "data", 10, per_class=4, test_per_class=2)
    results, text = run_experiment(
        tmp_path / "out",
        "experiment=split_cifar10",
        "model=resnet18_imagenet",
        "model.input_size=32",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "train.epochs=1",
        "train.batch_size=8",
        "device=cpu",
        "checkpoint=true",
    )
    assert results.status == "completed" and "model=TorchvisionClassifier" in text
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert state["backbone.fc.weight"].shape == (10, 512)
    assert not torch.equal(state["backbone.conv1.weight"], imagenet_resnet18["conv1.weight"])  # it was fine-tuned


TINY_VIT = "test_vit.r160_in1k"  # timm's own 0.3 M-parameter test ViT, 160×160 inputs


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def put_in_hub_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """A seeded weight file where the hub client looks for ``repo``'s weights (no download)."""
    import safetensors.torch

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(state, folder / "snapshots" / ("0" * 40) / "model.safetensors")


def test_timm_model_starts_from_the_weights_in_the_hub_cache(hub_cache):
    import timm

    from cl_ema.models import TimmClassifier

    torch.manual_seed(3)
    seeded = timm.create_model(TINY_VIT).state_dict()
    put_in_hub_cache(hub_cache, f"timm/{TINY_VIT}", seeded)
    model = TimmClassifier(CIFAR10, arch=TINY_VIT, pretrained=True)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in seeded.items() if not k.startswith("head."))
    assert model.backbone.head.out_features == 10  # a new head over the stream's classes
    assert model.adapter.size == 160  # the weights' input size
    seen = []
    model.backbone.patch_embed.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    half = torch.full((1, 3, 1, 1), 0.5)  # the weights' mean: a pixel there reaches the network as 0
    x = (half - torch.tensor(CIFAR100_NORM.mean).view(1, 3, 1, 1)) / torch.tensor(CIFAR100_NORM.std).view(1, 3, 1, 1)
    assert model(x.expand(2, 3, 32, 32)).shape == (2, 10)
    assert seen[0].shape == (2, 3, 160, 160) and seen[0].abs().max() < 1e-5


def test_timm_weights_missing_offline_name_the_cache_folder(hub_cache):
    from cl_ema.models import TimmClassifier

    expected = (
        rf"model.pretrained=true: cannot load timm's {TINY_VIT} weights \(.*\); put model.safetensors from "
        rf"https://huggingface.co/timm/{TINY_VIT} into {hub_cache}/models--timm--{TINY_VIT}/snapshots/"
    )
    with pytest.raises(UserError, match=expected):
        TimmClassifier(CIFAR10, arch=TINY_VIT, pretrained=True)
    with pytest.raises(UserError, match="model.arch='vit_nope': not a timm model"):
        TimmClassifier(CIFAR10, arch="vit_nope")


def test_timm_random_init_fine_tunes_end_to_end(tmp_path):
    results, text = run_experiment(
        tmp_path,
        "model=timm",
        f"model.arch={TINY_VIT}",
        "model.input_size=32",
        "train.epochs=1",
        "data.n_tasks=2",
        "strategy=ema",
    )
    assert results.status == "completed" and "model=TimmClassifier" in text
