"""Data: digits, torchvision loaders on generated files, index streams, device batches, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_datasets import skip_cifar_md5, write_cifar, write_mnist  # noqa: F401
from helpers import run_experiment
from torch.utils.data import DataLoader

from cl_ema.config import Scenario
from cl_ema.data import sources
from cl_ema.data.storage import CropFlip, Normalization, TensorStore
from cl_ema.data.stream import experience_indices, stream_from_stores
from cl_ema.errors import UserError

CPU = torch.device("cpu")
LOADERS = {
    "digits": lambda root: sources.load_digits(),
    "mnist": lambda root: sources.load_mnist(root, download=False),
    "cifar10": lambda root: sources.load_cifar10(root, download=False),
    "cifar100": lambda root: sources.load_cifar100(root, download=False),
}


def stream(name: str, root=None, scenario: str = "split", n_tasks: int = 5, seed: int = 0, **kw):
    train, test = LOADERS[name](root)
    return stream_from_stores(train, test, Scenario(scenario), n_tasks, seed=seed, device=CPU, **kw)


def test_digits_is_a_fixed_stratified_split_in_five_tasks():
    s = stream("digits")
    assert (len(s.train), len(s.test)) == (1347, 450)
    assert s.num_tasks == 5 and all(len(c) == 2 for c in s.task_classes)
    assert sorted(c for cs in s.task_classes for c in cs) == list(range(10))
    test_counts = np.bincount(s.test.base_targets.numpy())
    all_counts = test_counts + np.bincount(s.train.base_targets.numpy())
    assert np.all(np.abs(test_counts - 0.25 * all_counts) <= 1)  # stratified 75/25
    other = stream("digits", seed=1)
    assert torch.equal(other.test.inputs, s.test.inputs)  # the split does not depend on the seed
    assert other.class_order != s.class_order  # the class order does
    assert stream("digits", seed=0).class_order == s.class_order


def test_each_experience_holds_exactly_its_classes_samples():
    s = stream("digits")
    targets = s.train.base_targets
    for exp, classes in zip(s.benchmark.train_stream, s.task_classes):
        index = experience_indices(exp.dataset)
        expected = torch.nonzero(torch.isin(targets, torch.tensor(classes))).flatten()
        assert torch.equal(index.sort().values, expected)  # none lost, none duplicated
        # one shuffled epoch through Avalanche's loader sees each sample once
        seen = torch.cat([batch[0] for batch in DataLoader(exp.dataset, batch_size=32, shuffle=True)])
        assert torch.equal(seen.sort().values, expected)
        assert torch.equal(torch.cat([b[1] for b in DataLoader(exp.dataset, batch_size=64)]), targets[index])
    for exp, index in zip(s.benchmark.test_stream, s.test_indices):
        assert torch.equal(experience_indices(exp.dataset), index)


def test_fixed_class_order_and_bad_task_count():
    s = stream("digits", class_order=list(range(10)))
    assert s.task_classes[0] == [0, 1]
    with pytest.raises(UserError, match="data.n_tasks=3: must divide the 10 classes"):
        stream("digits", n_tasks=3)
    with pytest.raises(UserError, match="data.class_order"):
        stream("digits", class_order=[0, 1, 2])


@pytest.mark.parametrize("num_classes,name", [(10, "cifar10"), (100, "cifar100")])
def test_cifar_loads_from_torchvision_layout(tmp_path, skip_cifar_md5, num_classes, name):  # noqa: F811
    files = write_cifar(tmp_path, num_classes, per_class=2)
    s = stream(name, root=tmp_path, n_tasks=num_classes // 2 if num_classes == 10 else 10, augment=True)
    assert s.train.inputs.shape == (2 * num_classes, 3, 32, 32) and s.train.inputs.dtype == torch.uint8
    # torchvision's sample i, channels first
    first = torch.from_numpy(files["train"][0][0].reshape(3, 32, 32))
    order = torch.tensor(np.concatenate([np.asarray(files["train"][1])]))
    assert torch.equal(s.train.base_targets, order)
    assert torch.equal(s.train.inputs[0], first)
    assert s.augment is not None


def test_rotated_mnist_is_torchvisions_rotate_of_each_image_by_its_tasks_angle(tmp_path):
    """Mammoth's rot-mnist: each task's images (train and test) are torchvision's rotate of the
    originals, as Mammoth applies it to PIL images, by that task's angle drawn from the seed."""
    from PIL import Image
    from torchvision.transforms.functional import rotate

    from cl_ema.data.stream import task_angles

    write_mnist(tmp_path)
    original = stream("mnist", root=tmp_path)
    rotated = stream("mnist", root=tmp_path, scenario="rotated", n_tasks=4, seed=3)
    angles = task_angles(4, 3)
    assert angles == task_angles(4, 3) != task_angles(4, 4)  # from the seed
    assert all(0 <= a < 180 for a in angles) and len(set(angles)) == 4
    assert rotated.task_classes == [list(range(10))] * 4 and len(rotated.train) == 4 * 50
    for task, angle in enumerate(angles):
        for store, base, i in ((rotated.train, original.train, 11), (rotated.test, original.test, 3)):
            image = base.inputs[i, 0].numpy()
            expected = np.array(rotate(Image.fromarray(image), angle))  # Mammoth: PIL image, defaults
            got = store.raw(torch.tensor([task * base.num_base + i]))[0, 0].numpy()
            assert (got == expected).mean() >= 0.99, (task, angle)  # nearest neighbour: rounding at most
            assert not np.array_equal(got, image) or angle == 0


def test_mnist_split_and_permuted(tmp_path):
    files = write_mnist(tmp_path)
    split = stream("mnist", root=tmp_path)
    assert split.train.inputs.shape == (50, 1, 28, 28)
    assert torch.equal(split.train.inputs[:, 0], torch.from_numpy(files["train"][0]))
    permuted = stream("mnist", root=tmp_path, scenario="permuted", n_tasks=3)
    assert len(permuted.train) == 150 and permuted.task_classes == [list(range(10))] * 3
    x0 = permuted.train.raw(torch.tensor([7]))
    assert torch.equal(x0, split.train.inputs[7:8])  # task 0 is unpermuted
    mammoth = stream("mnist", root=tmp_path, scenario="permuted", n_tasks=3, permute_first_task=True)
    assert not torch.equal(mammoth.train.raw(torch.tensor([7])), x0)  # Mammoth permutes every task
    assert not torch.equal(mammoth.train.pixel_maps[0], torch.arange(784))
    x1 = permuted.train.raw(torch.tensor([50 + 7]))
    perm = permuted.train.pixel_maps[1]
    assert not torch.equal(x1, x0)
    assert torch.equal(x1.flatten(), x0.flatten()[perm])
    assert torch.equal(permuted.train.targets_at(torch.tensor([57])), split.train.base_targets[7:8])
    assert torch.equal(permuted.test_indices[2], torch.arange(20) + 40)


def test_missing_dataset_with_downloads_off_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=rf"MNIST train set not found in {tmp_path} and data.download=false"):
        stream("mnist", root=tmp_path)
    with pytest.raises(UserError, match="CIFAR-10 train set not found"):
        stream("cifar10", root=tmp_path)


def test_corrupt_dataset_is_a_clear_error(tmp_path, skip_cifar_md5):  # noqa: F811
    files = write_cifar(tmp_path, 10)
    (files["folder"] / "data_batch_3").write_bytes(b"\x80\x04truncated")
    with pytest.raises(UserError, match="CIFAR-10 train set in .* is corrupt"):
        stream("cifar10", root=tmp_path)
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(UserError, match="MNIST test set in .* is corrupt"):
        stream("mnist", root=tmp_path)


@pytest.mark.parametrize("maps", ["none", "permutations", "with fills"])
@pytest.mark.parametrize("stored", [torch.uint8, torch.float32])
def test_batches_are_the_plain_gather_and_normalization(maps, stored):
    """``raw`` and ``normalize`` take shortcuts (index_select, one broadcast map, in-place arithmetic); their
    values are those of the plain definitions, bit for bit, for batches of one map and of several."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (40, 3, 4, 4), generator=g).to(stored)
    pixel_maps = None if maps == "none" else torch.stack([torch.randperm(48, generator=g) for _ in range(3)])
    if maps == "with fills":
        pixel_maps[:, :10] = 48  # a 0 where a rotation's corners leave the image
    norm = Normalization(1 / 255, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    store = TensorStore(inputs, torch.zeros(40, dtype=torch.long), norm, pixel_maps)
    mixed, one_map = torch.randint(0, len(store), (33,), generator=g), torch.arange(len(store))[-25:]
    for index in (mixed, one_map, torch.tensor([3])):
        if pixel_maps is None:
            plain = inputs[index]
        else:
            pixels = torch.cat([inputs.flatten(1), torch.zeros(40, 1, dtype=stored)], 1)[index % 40]
            plain = pixels.gather(1, pixel_maps[index // 40]).view(-1, 3, 4, 4)
        raw = store.raw(index)
        assert torch.equal(raw, plain)
        assert torch.equal(store.normalize(raw), (plain.float() * (1 / 255) - store._mean) / store._std)
        assert torch.equal(raw, plain)  # normalize wrote into a copy


def test_crop_flip_shapes_determinism_and_effect():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32).repeat(8, 1, 1, 1)
    a, b = CropFlip(seed=3)(x), CropFlip(seed=3)(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # same seed, same batch
    assert not torch.equal(CropFlip(seed=4)(x), a)
    assert not torch.equal(a, x)  # the crop / flip really happened
    # zero padding shows up as zero borders for some samples; every sample is a shifted/flipped window
    flips = CropFlip(padding=0, seed=0)(x)
    for sample, original in zip(flips, x):
        assert torch.equal(sample, original) or torch.equal(sample, original.flip(2))
    crops = CropFlip(padding=4, flip=False, seed=0)(x)
    assert (crops == 0).any()
    u8 = CropFlip(seed=0)(torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8))
    assert u8.dtype == torch.uint8


def test_end_to_end_on_generated_cifar10(tmp_path, skip_cifar_md5):  # noqa: F811
    write_cifar(tmp_path / "data", 10, per_class=4, test_per_class=2)
    results, text = run_experiment(
        tmp_path / "out",
        "experiment=split_cifar10",
        "strategy=ema_replay",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        "model.width=4",
        "train.epochs=1",
        "train.batch_size=8",
        "replay.mem_size=10",
        "device=cpu",
    )
    assert results.status == "completed" and results.tasks_done == 5
    assert results.tracks == ["live", "ema_0.9997"]


def _avalanche_loaders(s):
    """Avalanche's own train loaders for task 2 of ``s``: task-balanced, and replay with a memory."""
    from avalanche.benchmarks.utils.data_loader import ReplayDataLoader, TaskBalancedDataLoader

    current, previous = s.benchmark.train_stream[1].dataset, s.benchmark.train_stream[0].dataset
    memory = previous.subset(range(0, len(previous), 7))
    return {
        "task-balanced": TaskBalancedDataLoader(current, oversample_small_groups=True, batch_size=16, shuffle=True),
        "replay": ReplayDataLoader(
            current, memory, oversample_small_tasks=True, batch_size=16, batch_size_mem=8, shuffle=True
        ),
    }


@pytest.mark.parametrize("kind", ["task-balanced", "replay"])
def test_index_batches_are_avalanches_batches(kind):
    from cl_ema.data.loader import IndexBatches

    loader = _avalanche_loaders(stream("digits"))[kind]
    fast = IndexBatches(loader, CPU)
    assert len(fast) == len(loader)
    for epoch in range(2):
        torch.manual_seed(epoch)
        expected = list(loader)  # item by item, as Avalanche fetches them
        torch.manual_seed(epoch)
        torch.empty((), dtype=torch.int64).random_()  # the worker base seed a DataLoader draws first
        got = list(fast)
        assert len(got) == len(expected) > 1
        for batch, reference in zip(got, expected):
            assert all(torch.equal(a, b) for a, b in zip(batch, reference))


def recording_template(s, plugins):
    """A DeviceDataTemplate that records each mini-batch's indices, labels and inputs in ``seen``."""
    from torch import nn

    from cl_ema.strategies import silent_evaluator
    from cl_ema.template import DeviceDataTemplate

    class Recording(DeviceDataTemplate):
        def _unpack_minibatch(self) -> None:
            index, labels = self.mbatch[0].clone(), self.mbatch[1].clone()
            super()._unpack_minibatch()
            self.seen.append(
                (self.experience.current_experience, self.clock.train_exp_epochs, index, labels, self.mbatch[0].clone())
            )

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    strategy = Recording(
        stream=s,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=2,
        device=CPU,
        plugins=plugins,
        evaluator=silent_evaluator(),
    )
    strategy.seen = []
    return strategy


def test_training_batches_hold_each_task_sample_once_per_epoch_plus_replay_memory():
    from cl_ema.plugins.replay import ClassBalancedReplayPlugin

    s = stream("digits")
    replay = ClassBalancedReplayPlugin(mem_size=40)
    strategy = recording_template(s, [replay])
    memories = []
    for experience in s.benchmark.train_stream[:3]:
        memories.append(experience_indices(replay.storage_policy.buffer))
        strategy.train(experience)
    for task, experience in enumerate(s.benchmark.train_stream[:3]):
        current = experience_indices(experience.dataset)
        for epoch in range(2):
            batches = [b for b in strategy.seen if b[:2] == (task, epoch)]
            index = torch.cat([b[2] for b in batches])
            labels = torch.cat([b[3] for b in batches])
            inputs = torch.cat([b[4] for b in batches])
            assert torch.equal(labels, s.train.targets_at(index))
            assert torch.equal(inputs, s.train.batch(index))  # digits: no augmentation
            from_task = index[torch.isin(index, current)]
            assert torch.equal(from_task.sort().values, current.sort().values)  # none lost, none twice
            replayed = index[~torch.isin(index, current)]
            if task == 0:
                assert len(replayed) == 0
            else:  # the memory as it stood before the task, cycled through evenly (batches of 16, 16, 8)
                assert len(memories[task]) == 40
                values, counts = torch.unique(replayed, return_counts=True)
                assert torch.equal(values, memories[task].sort().values)
                assert counts.min() >= 1 and counts.max() - counts.min() <= 1


@pytest.mark.gpu
def test_device_data_path_on_cuda():
    from cl_ema.data.loader import IndexBatches

    cuda = torch.device("cuda")
    on_gpu, on_cpu = stream("digits"), stream("digits")
    on_gpu.train = on_gpu.train.to(cuda)
    for index, labels, tasks in IndexBatches(_avalanche_loaders(on_gpu)["replay"], cuda):
        assert index.is_cuda and labels.is_cuda and tasks.is_cuda
        assert torch.equal(on_gpu.train.targets_at(index), labels)
        assert torch.equal(on_gpu.train.batch(index).cpu(), on_cpu.train.batch(index.cpu()))
    augmented = CropFlip(seed=0)(on_gpu.train.raw(index))
    assert augmented.is_cuda and augmented.dtype == torch.uint8 and augmented.shape == (len(index), 1, 8, 8)
