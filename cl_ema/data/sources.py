"""Datasets as tensors: scikit-learn digits (offline) and torchvision MNIST / CIFAR.

Each function here is the ``_target_`` of a config in ``conf/dataset/`` and returns the train and
test splits as ``TensorStore``s on the CPU; a new dataset is one such function and its config.
torchvision does the downloading (into ``root`` when ``download`` is true) and the checksum
checks; its errors become one-line ``UserError``s naming the dataset, the folder and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import Field, Strict

from cl_ema.data.storage import Normalization, TensorStore
from cl_ema.errors import UserError, first_line
from cl_ema.options import Count

MNIST_NORM = Normalization(1 / 255, (0.1307,), (0.3081,))
UNIT_NORM = Normalization(1 / 255, (0.0,), (1.0,))  # pixels in [0, 1], as torchvision's ToTensor leaves them
CIFAR10_NORM = Normalization(1 / 255, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_NORM = Normalization(1 / 255, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
DIGITS_NORM = Normalization(1 / 16, (0.0,), (1.0,))  # pixel values 0..16 → [0, 1]
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0  # the split is fixed; ``seed`` only changes class order and training


def load_digits() -> tuple[TensorStore, TensorStore]:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes), a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED
    )
    return _store(x_tr, y_tr, DIGITS_NORM), _store(x_te, y_te, DIGITS_NORM)


def load_mnist(root: Path, download: bool, normalize: bool = True) -> tuple[TensorStore, TensorStore]:
    """MNIST, 60,000 / 10,000; ``normalize=false`` keeps pixels in [0, 1] (Mammoth's protocols)."""
    from torchvision.datasets import MNIST

    norm = MNIST_NORM if normalize else UNIT_NORM
    train, test = (_torchvision(MNIST, "MNIST", root, download, train=flag) for flag in (True, False))
    return (
        _store(train.data.numpy()[:, None], train.targets.numpy(), norm, f"MNIST train set in {root}"),
        _store(test.data.numpy()[:, None], test.targets.numpy(), norm, f"MNIST test set in {root}"),
    )


def load_cifar10(root: Path, download: bool) -> tuple[TensorStore, TensorStore]:
    from torchvision.datasets import CIFAR10

    return _cifar(CIFAR10, "CIFAR-10", CIFAR10_NORM, root, download)


def load_cifar100(root: Path, download: bool) -> tuple[TensorStore, TensorStore]:
    from torchvision.datasets import CIFAR100

    return _cifar(CIFAR100, "CIFAR-100", CIFAR100_NORM, root, download)


def _cifar(
    cls: Callable, name: str, norm: Normalization, root: Path, download: bool
) -> tuple[TensorStore, TensorStore]:
    train, test = (_torchvision(cls, name, root, download, train=flag) for flag in (True, False))
    # torchvision keeps CIFAR as (N, 32, 32, 3) uint8; the models want channels first.
    return (
        _store(train.data.transpose(0, 3, 1, 2), np.asarray(train.targets), norm, f"{name} train set in {root}"),
        _store(test.data.transpose(0, 3, 1, 2), np.asarray(test.targets), norm, f"{name} test set in {root}"),
    )


Samples = Annotated[int, Strict(), Field(ge=1, le=1 << 26)]


def random_images(
    classes: Samples = 100,
    shape: tuple[Count, Count, Count] = (3, 32, 32),
    train_size: Samples = 50_000,
    test_size: Samples = 10_000,
    seed: int = 0,
) -> tuple[TensorStore, TensorStore]:
    """Uniform noise of a dataset's shape (uint8, ``train_size`` / ``test_size`` images of ``shape`` [channels,
    height, width], labels cycling through ``classes``), normalized like CIFAR: for timing runs where the real
    data is not at hand. Nothing to learn."""
    rng = np.random.default_rng(seed)
    norm = Normalization(1 / 255, (0.5,) * shape[0], (0.25,) * shape[0])
    split = [
        _store(rng.integers(0, 256, size=(size, *shape), dtype=np.uint8), np.arange(size) % classes, norm)
        for size in (train_size, test_size)
    ]
    return split[0], split[1]


def _store(images: np.ndarray, labels: np.ndarray, norm: Normalization, name: str = "the dataset") -> TensorStore:
    if len(images) != len(labels):
        raise UserError(f"{name} has {len(images):,} images but {len(labels):,} labels; delete it to re-download")
    inputs = torch.from_numpy(np.ascontiguousarray(images))
    return TensorStore(inputs, torch.as_tensor(np.asarray(labels), dtype=torch.long), norm)


def _torchvision(cls: Callable, name: str, root: Path, download: bool, *, train: bool):
    split = "train" if train else "test"
    try:
        return cls(root=str(root), train=train, download=download)
    except RuntimeError as err:
        first = first_line(err)
        if not download and "not found" in str(err).lower():
            raise UserError(
                f"{name} {split} set not found in {root} and data.download=false: "
                "set data.root to the folder holding it, or allow data.download=true"
            ) from err
        if first.startswith("Error downloading"):  # MNIST: every mirror failed
            urls = ", ".join(getattr(cls, "mirrors", []))
            raise UserError(
                f"could not download {name} into {root} ({first} from {urls}; no network?): "
                f"put the files in {Path(root) / cls.__name__ / 'raw'}, or set data.root to a folder holding {name}"
            ) from err
        raise UserError(
            f"{name} {split} set in {root} is corrupt or incomplete ({first}); delete it to re-download"
        ) from err
    except OSError as err:  # network failures (URLError is an OSError) and unreadable files
        action = "download" if download else "read"
        url = getattr(cls, "url", "")
        where = Path(root) / getattr(cls, "filename", cls.__name__)  # torchvision's archive (CIFAR), else its folder
        raise UserError(
            f"could not {action} {name} {split} set in {root}{' from ' + url if url else ''} ({first_line(err)}): put "
            f"{where.name} there ({where}; torchvision extracts it), or set data.root to a folder holding {name}"
        ) from err
    except Exception as err:  # truncated pickles / idx files surface as assorted errors
        raise UserError(
            f"{name} {split} set in {root} is corrupt ({type(err).__name__}: {err}); delete it to re-download"
        ) from err
