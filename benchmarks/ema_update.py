"""Time one update of the weight averages: each of cl_ema's rules, K of them at once, and the usual ways.

    python benchmarks/ema_update.py [--device cuda] [--repeats 30]

For a ResNet-18 (11.2 M parameters) and a wider one (~22 M), prints the median time of one
update for: one in-place ``lerp_`` over a flat buffer of the model's size (the memory-bandwidth
floor); cl_ema's engine with one shadow of each per-step rule (EMA with a constant, warmup and
step schedule; the uniform, linear and quadratic means; CLS-ER's stochastic EMA, drawn to update);
K=4 EMA decays, and K shadows of all those rules together in one engine; a per-parameter Python
loop like the original ``register/update`` class; timm's ModelEmaV3; torch's AveragedModel with
get_ema_multi_avg_fn. Then the ratios the README reports (each against the floor; K shadows
against K floors), and a ResNet-18 training step at batch 128 for scale. All from this one run.
The task-end rules (interpolations, merges) cost nothing per step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cl_ema.data.sources import CIFAR100_NORM
from cl_ema.data.storage import DataSpec
from cl_ema.ema import EMAOptions, EMARule, MeanRule, Rule, StochasticEMARule, WeightAverages
from cl_ema.models import ResNet18

CIFAR100 = DataSpec((3, 32, 32), 100, CIFAR100_NORM)


class LoopEMA:
    """The per-parameter loop of the project's origin document (for comparison only)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.shadow = {n: p.data.clone() for n, p in model.named_parameters() if p.requires_grad}

    def update(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                new_average = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new_average.clone()


def measure(contenders: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per call; contenders take turns, so drift in machine load hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(_time_once(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def _time_once(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(width: int, device: torch.device, repeats: int, with_timm: bool) -> dict[str, float]:
    def make() -> nn.Module:
        return ResNet18(CIFAR100, width=width).to(device)

    n_params = sum(p.numel() for p in make().parameters())
    flat_live = torch.randn(n_params, device=device)
    flat_shadow = torch.randn(n_params, device=device)
    contenders: dict[str, Callable[[], None]] = {"flat lerp_ (floor)": lambda: flat_shadow.lerp_(flat_live, 1e-3)}
    for label, rules in per_step_rules().items():
        averages = WeightAverages(make(), rules, buffers="copy")  # parameters only, like the others
        averages.register()
        contenders[label] = averages.update
    contenders["per-parameter loop"] = LoopEMA(make(), 0.999).update
    averaged_model = make()
    averaged = torch.optim.swa_utils.AveragedModel(
        averaged_model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999)
    )
    contenders["torch AveragedModel"] = lambda: averaged.update_parameters(averaged_model)
    if with_timm:
        from timm.utils import ModelEmaV3

        timm_model = make()
        timm_ema = ModelEmaV3(timm_model, decay=0.999, exclude_buffers=True)
        contenders["timm ModelEmaV3"] = lambda: timm_ema.update(timm_model)
    return {"params": n_params, **measure(contenders, device, repeats)}


def per_step_rules() -> dict[str, list[Rule]]:
    """The engines timed: one shadow of each per-step rule, then several shadows in one engine."""

    def every_rule() -> list[Rule]:
        always = torch.Generator().manual_seed(0)  # probability 1: the shadow moves every step
        return [
            EMARule(0.999),
            EMARule(0.999, EMAOptions(schedule="warmup")),
            EMARule(0.99, EMAOptions(schedule="step", step_updates=1e9)),
            MeanRule("uniform"),
            MeanRule("linear"),
            MeanRule("quadratic"),
            StochasticEMARule(0.999, 1.0, lambda: float(torch.rand((), generator=always))),
        ]

    names = ["ema", "ema warmup", "ema step", "mean uniform (SWA)", "mean linear", "mean quadratic", "CLS-ER ema"]
    engines: dict[str, list[Rule]] = {f"cl_ema K=1 {n}": [r] for n, r in zip(names, every_rule())}
    engines["cl_ema K=4 ema"] = [EMARule(d) for d in (0.9, 0.99, 0.999, 0.9999)]
    engines[f"cl_ema K={len(names)} every rule"] = every_rule()
    return engines


def train_step_time(device: torch.device, repeats: int) -> float:
    model = ResNet18(CIFAR100).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (128,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return measure({"step": step}, device, repeats)["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 90], help="ResNet-18 base widths (64: 11.2 M)")
    parser.add_argument("--no-train-step", action="store_true", help="skip timing a training step")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        import timm  # noqa: F401

        with_timm = True
    except ImportError:
        with_timm = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    results = {width: bench_model(width, device, args.repeats, with_timm) for width in args.widths}
    rows = [k for k in results[args.widths[0]] if k != "params"]
    labels = [f"ResNet-18 w={w} ({results[w]['params'] / 1e6:.1f} M)" for w in results]
    header = "".join(f"{label:>28}" for label in labels)
    print(f"\n{'one update, median':<32}{header}")
    for row in rows:
        print(f"{row:<32}" + "".join(f"{1e3 * results[w][row]:>25.3f} ms" for w in results))
    print("\nratios (same run): each cl_ema engine of K shadows against K floors")
    for r in results.values():
        floor, k1 = r["flat lerp_ (floor)"], r["cl_ema K=1 ema"]
        engines = [row for row in rows if row.startswith("cl_ema K=")]
        per_floor = ", ".join(f"{row[7:]} {r[row] / (int(row.split()[1][2:]) * floor):.2f}x" for row in engines)
        print(f"  {r['params'] / 1e6:.1f} M: {per_floor}")
        print(
            f"  {r['params'] / 1e6:.1f} M: loop / K=1 = {r['per-parameter loop'] / k1:.1f}x, "
            f"AveragedModel / K=1 = {r['torch AveragedModel'] / k1:.1f}x"
            + (f", timm / K=1 = {r['timm ModelEmaV3'] / k1:.2f}x" if "timm ModelEmaV3" in r else "")
        )
    if not args.no_train_step:
        step = train_step_time(device, max(3, args.repeats // 5))
        k1 = results[args.widths[0]]["cl_ema K=1 ema"]
        print(
            f"\nResNet-18 training step, batch 128: {1e3 * step:.1f} ms; "
            f"EMA update (K=1, width {args.widths[0]}) = {100 * k1 / step:.2f} % of it"
        )


if __name__ == "__main__":
    main()
