"""A stream of tasks: Avalanche defines the tasks, the tensors live on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.scenarios.supervised import (
    class_incremental_benchmark,
    with_classes_timeline,
)
from avalanche.benchmarks.utils.classification_dataset import (
    _as_taskaware_supervised_classification_dataset,
)
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from cl_ema.building import Spec
from cl_ema.config import DataConfig, Scenario, data_root
from cl_ema.data.storage import CropFlip, DataSpec, TensorStore
from cl_ema.errors import UserError


@dataclass
class TaskStream:
    """Everything a run needs to know about its data: Avalanche's tasks, the tensors on the device."""

    benchmark: CLScenario  # Avalanche stream of index datasets: items are (index, label, task)
    train: TensorStore
    test: TensorStore
    task_classes: list[list[int]]  # classes of each task, sorted
    test_indices: list[Tensor]  # per task, indices into ``test`` (on the device)
    class_order: list[int]
    num_classes: int
    augment: CropFlip | None

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def spec(self) -> DataSpec:
        return DataSpec(tuple(self.train.inputs.shape[1:]), self.num_classes, self.train.norm)  # type: ignore[arg-type]


def build_stream(dataset: Spec, data: DataConfig, *, seed: int, device: torch.device) -> TaskStream:
    """The checked dataset of the ``data`` section, split into tasks on ``device``."""
    train, test = dataset.build(root=data_root(data.root), download=data.download)
    return stream_from_stores(
        train,
        test,
        Scenario(data.scenario),
        data.n_tasks,
        seed=seed,
        device=device,
        class_order=list(data.class_order) if data.class_order is not None else None,
        permute_first_task=bool(data.permute_first_task),
        augment=data.augment,
    )


def stream_from_stores(
    train: TensorStore,
    test: TensorStore,
    scenario: Scenario,
    n_tasks: int,
    *,
    seed: int,
    device: torch.device,
    class_order: list[int] | None = None,
    permute_first_task: bool = False,
    augment: bool = False,
) -> TaskStream:
    """Split train / test stores into the tasks of ``scenario``."""
    num_classes = int(train.base_targets.max()) + 1
    present = set(train.base_targets.unique().tolist()) | set(test.base_targets.unique().tolist())
    if min(present) < 0 or len(present) != num_classes or max(present) >= num_classes:
        odd = sorted(present - set(range(num_classes)) or set(range(num_classes)) - present)[:5]
        raise UserError(
            f"the dataset's labels are not the classes 0..{num_classes - 1} of a classification set (labels such as "
            f"{odd} make them so): its label files are corrupt; delete them to re-download"
        )
    if scenario == Scenario.split:
        order = _class_order(class_order, num_classes, seed)
        if num_classes % n_tasks:
            raise UserError(f"data.n_tasks={n_tasks}: must divide the {num_classes} classes of the dataset")
        benchmark = class_incremental_benchmark(
            {"train": _index_dataset(train), "test": _index_dataset(test)},
            class_order=order,
            num_experiences=n_tasks,
        )
    else:
        if class_order is not None:
            raise UserError(f"data.class_order: not used by the {scenario} scenario (every task has all classes)")
        order = list(range(num_classes))
        shape = tuple(train.inputs.shape[1:])
        if scenario == Scenario.permuted:
            maps = _permutations(n_tasks, int(np.prod(shape)), seed, permute_first_task)
        else:
            maps = rotation_maps(task_angles(n_tasks, seed), shape)  # type: ignore[arg-type]
        train, test = train.remapped(maps), test.remapped(maps)
        benchmark = with_classes_timeline(
            benchmark_from_datasets(
                train=[_index_dataset(train, task) for task in range(n_tasks)],
                test=[_index_dataset(test, task) for task in range(n_tasks)],
            )
        )

    task_classes = [sorted(int(c) for c in exp.classes_in_this_experience) for exp in benchmark.train_stream]
    train, test = train.to(device), test.to(device)
    test_indices = [experience_indices(exp.dataset).to(device) for exp in benchmark.test_stream]
    return TaskStream(
        benchmark=benchmark,
        train=train,
        test=test,
        task_classes=task_classes,
        test_indices=test_indices,
        class_order=[int(c) for c in order],
        num_classes=num_classes,
        augment=CropFlip(padding=4, flip=True, seed=seed) if augment else None,
    )


def dataset_columns(dataset) -> list[Tensor]:
    """The items of an Avalanche index dataset as columns: sample index, label, task label."""
    if not len(dataset):
        return [torch.empty(0, dtype=torch.long) for _ in range(3)]
    # a private generator: a DataLoader draws a base seed even unshuffled, and reading a replay
    # buffer for a checkpoint must not move the training run's random state
    loader = DataLoader(dataset, batch_size=8192, shuffle=False, generator=torch.Generator())
    return [torch.cat(column) for column in zip(*loader)]


def experience_indices(dataset) -> Tensor:
    """All sample indices of an Avalanche index dataset, in its order."""
    return dataset_columns(dataset)[0]


def _class_order(given: list[int] | None, num_classes: int, seed: int) -> list[int]:
    if given is None:
        # Fixed per seed, independent of any other random state.
        return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
    if sorted(given) != list(range(num_classes)):
        raise UserError(f"data.class_order: must be a permutation of 0..{num_classes - 1}")
    return list(given)


def _permutations(n_tasks: int, size: int, seed: int, permute_first: bool) -> Tensor:
    """Pixel permutations per task, drawn from ``seed``; unless ``permute_first``, task 0 sees the
    original images (van de Ven et al.; Mammoth's perm-mnist permutes every task)."""
    rng = np.random.RandomState(seed)
    perms = [] if permute_first else [np.arange(size)]
    perms += [rng.permutation(size) for _ in range(n_tasks - len(perms))]
    return torch.as_tensor(np.stack(perms), dtype=torch.long)


def task_angles(n_tasks: int, seed: int) -> list[float]:
    """Each task's rotation in degrees, uniform in [0, 180) and drawn from ``seed`` (Mammoth's rot-mnist
    draws one per task from NumPy's unseeded global generator)."""
    return [float(a) for a in np.random.RandomState(seed).uniform(0.0, 180.0, n_tasks)]


def rotation_maps(angles: list[float], shape: tuple[int, int, int]) -> Tensor:
    """Pixel maps (``TensorStore``) that rotate (C, H, W) images by each angle, counter-clockwise about
    the centre, nearest neighbour, corners filled with 0: torchvision's ``rotate`` with its defaults,
    which Mammoth applies (found by rotating an image of pixel numbers, exact up to 2²⁴ pixels)."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    channels, height, width = shape
    plane = height * width
    numbers = torch.arange(1, plane + 1, dtype=torch.float32).view(1, height, width)
    maps = []
    for angle in angles:
        source = rotate(numbers, angle, interpolation=InterpolationMode.NEAREST, fill=0).flatten().long() - 1
        per_channel = [torch.where(source < 0, channels * plane, source + c * plane) for c in range(channels)]
        maps.append(torch.cat(per_channel))
    return torch.stack(maps)


def _index_dataset(store: TensorStore, copy: int | None = None):
    """Avalanche dataset of indices into ``store`` (one remapped copy, or all)."""
    if copy is None:
        index = torch.arange(len(store))
    else:
        index = torch.arange(store.num_base) + copy * store.num_base
    return index_dataset(index, store.targets[index])


def index_dataset(index: Tensor, targets: Tensor):
    """Avalanche classification dataset whose items are ``(index, label, task 0)``."""
    dataset = TensorDataset(index, targets)
    dataset.targets = targets  # type: ignore[attr-defined]
    # the converter Avalanche's own benchmark generators use for plain datasets
    return _as_taskaware_supervised_classification_dataset(dataset)
