"""Training throughput on one split CIFAR-100 task: cl_ema vs stock Avalanche vs a bare loop.

    python benchmarks/throughput.py [--device cuda] [--steps 200] [--batch-size 128]
    python benchmarks/throughput.py --device cpu --steps 4 --width 8 --batch-size 16   # smoke test
    python benchmarks/throughput.py --model linear --no-augment                           # host overhead

The same work three ways — ResNet-18 on the first task of split CIFAR-100 (generated data of
CIFAR's shape and dtype: 50,000 uint8 images, or real CIFAR-100 with --cifar-root), random crop
(pad 4) + flip, SGD, the same batch size and number of steps:

(a) cl_ema: the run ``python -m cl_ema experiment=split_cifar strategy=plain|ema`` assembles
    (``cl_ema.assembly``, the dataset swapped for the same generated images), trained on its first
    task: Avalanche's SupervisedTemplate fed by device-resident tensors and batch augmentation on
    the device, with the plugins every run has, without and with the EMA plugin;
(b) stock Avalanche ``Naive`` with torchvision transforms on PIL images through a DataLoader
    (what a user would otherwise write);
(c) a bare PyTorch loop over device-resident tensors (the bound).

Prints samples/s, ms per step, peak GPU memory and the ratios the README reports: the median
of ``--rounds`` rounds in which the four contenders take turns.

``--model linear --no-augment`` swaps ResNet-18 for one linear layer: the compute vanishes and
what is left is each path's per-step host work (loader, callbacks, kernel launches), which on a
GPU must stay below the network's step time or the GPU waits.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_ema.assembly import assemble
from cl_ema.config import Scenario, check, compose
from cl_ema.data.sources import CIFAR100_NORM, load_cifar100, random_images
from cl_ema.data.storage import CropFlip, DataSpec, TensorStore
from cl_ema.data.stream import experience_indices, stream_from_stores
from cl_ema.distributed import Processes
from cl_ema.models import ResNet18
from cl_ema.strategies import silent_evaluator


def cifar_like(root: Path | None, samples: int) -> tuple[TensorStore, TensorStore]:
    """Real CIFAR-100, or the generated images cl_ema's (a) trains on (``dataset=random_cifar100``)."""
    if root is not None:
        return load_cifar100(root, download=False)
    return random_images(100, (3, 32, 32), samples, 1000)


def model_and_optimizer(args, device: torch.device):
    from cl_ema.models import TimmClassifier

    torch.manual_seed(0)
    spec = DataSpec((3, 32, 32), 100, CIFAR100_NORM)
    if args.model == "linear":
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100)).to(device)
    elif args.model == "vit":
        model = TimmClassifier(spec, arch="vit_base_patch16_224", pretrained=False, input_size=224).to(device)
    else:
        model = ResNet18(spec, width=args.width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()
    return model, torch.optim.SGD(model.parameters(), lr=0.03)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def epochs_for(args, task_size: int) -> int:
    """Enough epochs over one task for warmup + timed steps; the stop plugin ends the run."""
    return math.ceil((args.steps + args.warmup) * args.batch_size / task_size) + 1


def cl_ema_overrides(args, strategy: str) -> list[str]:
    """What ``python -m cl_ema`` is given for (a): split CIFAR-100 with this benchmark's sizes."""
    data = (
        [f"data.root={args.cifar_root}", "data.download=false"]
        if args.cifar_root
        else [
            "dataset@data.dataset=random_cifar100",
            f"data.dataset.train_size={args.samples}",
            "data.dataset.test_size=1000",
        ]
    )
    experiment, model = "split_cifar", [f"model.width={args.width}"]
    if args.model == "linear":
        model = ["model=mlp", "model.layers=0"]
    elif args.model == "vit":  # split_cifar_vit's network, random weights: speed does not depend on them
        experiment, model = "split_cifar_vit", ["model.pretrained=false"]
    return [
        f"experiment={experiment}",
        f"strategy={strategy}",
        *data,
        *model,
        f"train.batch_size={args.batch_size}",
        f"data.augment={args.augment}",
        f"train.precision={'bf16' if args.bf16 else 'fp32'}",
        f"train.channels_last={args.channels_last}",
        f"train.compile={args.compile}",
        f"device={args.device}",
        "logger=none",
        "checkpoint=false",
        "ema.decay=0.999",
    ]


def cl_ema_run(args, device, strategy: str, processes: Processes | None = None) -> float:
    """Time ``args.steps`` steps of the first task of the run cl_ema assembles for these overrides."""
    checked = check(compose(*cl_ema_overrides(args, strategy)))
    with tempfile.TemporaryDirectory() as out:
        run = assemble(checked, Path(out), processes or Processes(), device)
        stop = _StopAfter(args.steps, args.warmup)
        run.strategy.plugins.append(stop)
        run.strategy.train(run.stream.benchmark.train_stream[0])
    return stop.elapsed


def avalanche_naive_run(stores, args, device) -> float:
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.training import Naive
    from PIL import Image
    from torchvision import transforms

    train, _ = stores
    norm = train.norm
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if args.augment else []
    transform = transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)])

    class PILDataset(torch.utils.data.Dataset):
        """How torchvision's CIFAR100 serves samples: a PIL image through the transforms."""

        def __init__(self, store: TensorStore) -> None:
            self.images = store.inputs.permute(0, 2, 3, 1).numpy()
            self.targets = store.base_targets.tolist()

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(self.images[i])), self.targets[i]

    dataset = as_classification_dataset(PILDataset(train))
    benchmark = class_incremental_benchmark(
        {"train": dataset, "test": dataset}, class_order=list(range(100)), num_experiences=10
    )
    model, optimizer = model_and_optimizer(args, device)
    stop = _StopAfter(args.steps, args.warmup)
    experience = benchmark.train_stream[0]
    strategy = Naive(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size,
        train_epochs=epochs_for(args, len(experience.dataset)),
        device=device,
        plugins=[stop],
        evaluator=silent_evaluator(),
    )
    strategy.train(experience, num_workers=args.workers, persistent_workers=args.workers > 0)
    return stop.elapsed


def bare_loop(stores, args, device) -> float:
    """The same task's samples, reshuffled every epoch, straight from device tensors."""
    stream = stream_from_stores(*stores, Scenario.split, 10, seed=0, device=device)
    train, task = stream.train, experience_indices(stream.benchmark.train_stream[0].dataset).to(device)
    model, optimizer = model_and_optimizer(args, device)
    augment = CropFlip(seed=0) if args.augment else None
    loss_fn = nn.CrossEntropyLoss()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = iter(())
    started = 0.0
    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            sync(device)
            started = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # a new epoch
            batches = iter(task[torch.randperm(len(task), device=device)].split(args.batch_size))
            batch = next(batches)
        raw = train.raw(batch)
        x = train.normalize(augment(raw) if augment else raw).contiguous(memory_format=memory_format)
        y = train.targets_at(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - started


class _StopAfter(SupervisedPlugin):
    """Times ``steps`` training iterations after ``warmup`` ones, then stops the experience."""

    def __init__(self, steps: int, warmup: int) -> None:
        super().__init__()
        self.steps, self.warmup, self.count, self.started, self.elapsed = steps, warmup, 0, 0.0, 0.0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.count += 1
        if self.count == self.warmup:
            sync(strategy.device)
            self.started = time.perf_counter()
        if self.count == self.warmup + self.steps:
            sync(strategy.device)
            self.elapsed = time.perf_counter() - self.started
            strategy.stop_training()


def run_arguments(parser: argparse.ArgumentParser, model: str = "resnet18", steps: int = 200) -> None:
    """The options of a timed cl_ema run (this benchmark's and the scaling benchmark's)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--model", choices=("resnet18", "linear", "vit"), default=model)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64: the full model)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop + flip")
    parser.add_argument("--samples", type=int, default=50_000, help="generated CIFAR-100-shaped training images")
    parser.add_argument("--cifar-root", type=Path, help="use real CIFAR-100 from this torchvision root")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for stock Avalanche")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table is their median")
    args = parser.parse_args()
    device = torch.device(args.device)
    stores = cifar_like(args.cifar_root, args.samples)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = f"ResNet-18 width {args.width}" if args.model == "resnet18" else "one linear layer"
    print(
        f"device: {device} ({name}), torch {torch.__version__}, {model}, batch {args.batch_size}, {args.steps} "
        f"timed steps after {args.warmup}, augment={args.augment}, bf16={args.bf16}, "
        f"channels_last={args.channels_last}, compile={args.compile}"
    )
    runs = {
        "(a) cl_ema": lambda: cl_ema_run(args, device, "plain"),
        "(a) cl_ema + EMA": lambda: cl_ema_run(args, device, "ema"),
        "(b) Avalanche Naive + DataLoader": lambda: avalanche_naive_run(stores, args, device),
        "(c) bare loop": lambda: bare_loop(stores, args, device),
    }
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    memory: dict[str, float] = {}
    for _ in range(args.rounds):  # contenders take turns, so a slow spell of a shared machine hits all
        for label, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds[label].append(fn())
            if device.type == "cuda":
                memory[label] = torch.cuda.max_memory_allocated(device) / 2**30
    speed = {}
    for label, times in seconds.items():
        median = statistics.median(times)
        speed[label] = args.steps * args.batch_size / median
        peak = f"{memory[label]:.2f} GiB" if label in memory else "-"
        print(
            f"{label:<36}{speed[label]:>12,.0f} samples/s {1000 * median / args.steps:>8.2f} ms/step   "
            f"peak GPU memory {peak}"
        )
    a, ema, b, c = speed.values()
    print(
        f"\n(a) / (b) = {a / b:.2f}x   (a) / (c) = {a / c:.2f}x   EMA adds {100 * (a / ema - 1):.1f} % to (a)"
        f"   (median of {args.rounds} rounds)"
    )


if __name__ == "__main__":
    main()
