"""Small datasets written in torchvision's exact on-disk layouts (CIFAR pickles, MNIST idx files)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest


def write_cifar(root: Path, num_classes: int, per_class: int = 6, test_per_class: int = 3, seed: int = 0) -> dict:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) with random pixels."""
    rng = np.random.default_rng(seed)

    def split(n_per_class: int):
        labels = np.repeat(np.arange(num_classes), n_per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return data, labels.tolist()

    train, test = split(per_class), split(test_per_class)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(len(train[1])), 5)
        for i, idx in enumerate(chunks, start=1):
            _pickle(folder / f"data_batch_{i}", {"data": train[0][idx], label_key: [train[1][j] for j in idx]})
        _pickle(folder / "test_batch", {"data": test[0], label_key: test[1]})
        _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _pickle(folder / "train", {"data": train[0], label_key: train[1]})
        _pickle(folder / "test", {"data": test[0], label_key: test[1]})
        _pickle(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    return {"train": train, "test": test, "folder": folder}


def write_mnist(root: Path, per_class: int = 5, test_per_class: int = 2, seed: int = 0, compress: bool = False) -> dict:
    """MNIST idx files under ``MNIST/raw`` (uncompressed, as torchvision leaves them)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels)
        out[prefix] = (images, labels)
    return out


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.tobytes())


def gzip_file(path: Path) -> None:
    path.with_suffix(path.suffix + ".gz").write_bytes(gzip.compress(path.read_bytes()))


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """torchvision checks CIFAR files against the official md5 sums: accept ours."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
