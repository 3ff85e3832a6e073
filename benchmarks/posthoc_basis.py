"""Which basis of EMAs, snapshotted how often, rebuilds other averages post hoc: measured on exact step profiles.

    python benchmarks/posthoc_basis.py [--streams 5x1200 20x469] [--per-task 4 8 16] [--horizons 16]

For each stream (tasks × steps per task S: 5 × 1,200 as seq-MNIST, 20 × 469 as perm-MNIST) and each
candidate basis (constant-decay EMAs whose horizons are multiples of the cadence Δ = S / per-task) the
basis is snapshotted at step 0, ``per_task`` times per task evenly and at every task end
(``cl_ema.profiles.snapshot_steps``). At every task end, the profile of a constant EMA of each horizon h
of a geometric grid from 0.05 to 8 tasks is fitted by the snapshots taken so far
(``cl_ema.profiles.reconstruct_all``), and the relative L2 residual ||Bᵀc − p|| / ||p|| recorded, split
by ``h ≤ tasks elapsed`` (an EMA that has seen at least one horizon of training) and ``h >`` (an EMA
still dominated by θ_0, the weights before training). Also fitted: the means of the stream (uniform,
linear, quadratic) and of the current task, an EMA restarted at each task start, warmup EMAs. Then the
disk each basis takes per run, the issue's claim, which cadence short horizons need, a recommended
default, and bases that would cost one EMA update a step instead of two. Pure arithmetic on profiles: no
model is trained. Takes 1 to 3 minutes on one core.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cl_ema.ema import EMAOptions, EMARule, MeanRule, Weighting
from cl_ema.profiles import (
    basis_profiles,
    profiles_at,
    reconstruct_all,
    snapshot_steps,
    task_ema_target,
    task_mean_target,
)
from cl_ema.rules import Schedule, horizon_decay

# basis horizons in units of the cadence Δ
BASES: dict[str, tuple[float, ...]] = {
    "(1)": (1,),
    "(0.5,2)": (0.5, 2),
    "(1,2)": (1, 2),
    "(1,4)": (1, 4),
    "(2,8)": (2, 8),
    "(1,4,16)": (1, 4, 16),
}
MODELS = {"MLP": 89_610, "ResNet-18": 11_200_000, "ViT-B/16": 86_000_000}  # parameters
BYTES = {"fp32": 4, "bf16": 2}
RESTARTED = (
    "task EMA 0.3"  # an EMA of horizon 0.3 task (no basis horizon), restarted from the live weights at each task start
)
WARMUP = EMAOptions(schedule=Schedule.warmup)  # timm's ModelEmaV3 ramp: γ = 1, p = 2/3


@dataclass
class Stream:
    tasks: int
    steps_per_task: int

    @property
    def name(self) -> str:
        return f"{self.tasks}x{self.steps_per_task}"

    @property
    def task_ends(self) -> list[int]:
        return [self.steps_per_task * (i + 1) for i in range(self.tasks)]


@dataclass
class Targets:
    """The profiles to fit at each task end: constant EMAs over the horizon grid, then the other averages."""

    horizons: list[float]  # tasks
    ema: list[torch.Tensor]  # per horizon: (tasks, N + 1), row i at task end i
    other_names: list[str]
    other: list[list[torch.Tensor]]  # per task end: one profile (T + 1,) per other name


@dataclass
class Measure:
    within: list[float]  # residuals of EMA targets with h ≤ tasks elapsed
    beyond: list[float]  # … with h > tasks elapsed
    other: dict[str, float]  # worst residual of each other target over the task ends
    gain: float  # the largest Σ|c_k|: how much the rebuilt weights magnify the snapshots' rounding
    tensors: int  # distinct snapshot tensors per run (θ_0 once)


def geometric(low: float, high: float, count: int) -> list[float]:
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


def stream_targets(stream: Stream, horizons: Sequence[float]) -> Targets:
    ends, total, steps = stream.task_ends, stream.task_ends[-1], stream.steps_per_task
    ema = [profiles_at(EMARule(horizon_decay(h, steps)), ends, total) for h in horizons]
    stream_means = {f"mean {w.value}": profiles_at(MeanRule(w), ends, total) for w in Weighting}
    warmups = {
        f"warmup EMA {h:g}": profiles_at(EMARule(horizon_decay(h, steps), WARMUP), ends, total) for h in (0.25, 1, 4)
    }
    names = [*stream_means, *warmups, "task mean", RESTARTED]
    other = []
    for i, end in enumerate(ends):
        rows = [p[i, : end + 1] for p in (*stream_means.values(), *warmups.values())]
        rows.append(task_mean_target(end, ends))
        rows.append(task_ema_target(horizon_decay(0.3, steps), end, ends))
        other.append(rows)
    return Targets(list(horizons), ema, names, other)


def measure(
    stream: Stream, targets: Targets, per_task: int, basis_horizons: Sequence[float], live_at_task_ends: bool = False
) -> Measure:
    """Fit every target at every task end by the snapshots of ``basis_horizons`` (in Δ) taken up to then, and with
    ``live_at_task_ends`` the live weights saved at each task end too (an EMA of decay 0: profile e_t)."""
    ends, total = stream.task_ends, stream.task_ends[-1]
    steps = snapshot_steps(ends, per_task)
    rules = [EMARule(horizon_decay(a / per_task, stream.steps_per_task)) for a in basis_horizons]
    basis = basis_profiles(rules, steps, total)
    saved_at = torch.tensor(steps).repeat_interleave(len(rules))
    if live_at_task_ends:
        basis = torch.cat([basis, profiles_at(EMARule(0.0), ends, total)])
        saved_at = torch.cat([saved_at, torch.tensor(ends)])
    # θ_0 is the same for every basis EMA: saved once
    tensors = 1 + len(rules) * (len(steps) - 1) + (len(ends) if live_at_task_ends else 0)
    return fit_targets(stream, targets, basis, saved_at, tensors)


def fit_targets(stream: Stream, targets: Targets, basis: torch.Tensor, saved_at: torch.Tensor, tensors: int) -> Measure:
    """Fit every target at every task end by the rows of ``basis`` saved (``saved_at``) up to then."""
    ends = stream.task_ends
    within: list[float] = []
    beyond: list[float] = []
    other = dict.fromkeys(targets.other_names, 0.0)
    gain = 0.0
    for i, end in enumerate(ends):
        wanted = torch.stack([p[i, : end + 1] for p in targets.ema] + targets.other[i])
        fits = reconstruct_all(basis[saved_at <= end, : end + 1], wanted)
        for horizon, fit in zip(targets.horizons, fits):
            if horizon <= i + 1:
                within.append(fit.residual)
                gain = max(gain, float(fit.coefficients.abs().sum()))
            else:
                beyond.append(fit.residual)
        for name, fit in zip(targets.other_names, fits[len(targets.horizons) :]):
            other[name] = max(other[name], fit.residual)
    return Measure(within, beyond, other, gain, tensors)


def fed_profiles(source: EMARule, every: int, horizon: float, steps: Sequence[int], total: int) -> torch.Tensor:
    """Profiles (len(steps), total + 1) of a shadow fed by the shadow of ``source`` rather than the weights, every
    ``every`` steps, with the weight of an EMA of ``horizon`` steps over that many steps: one lerp a step for two
    shadows' worth of profiles, instead of two."""
    fed_at = list(range(every, total + 1, every))
    source_rows = profiles_at(source, fed_at, total)
    weight = 1 - (1 - 1 / horizon) ** every
    rows = torch.zeros(len(steps), total + 1, dtype=torch.float64)
    shadow = torch.zeros(total + 1, dtype=torch.float64)
    shadow[0] = 1.0  # θ_0, as every shadow starts
    fed = 0
    for row, step in zip(rows, steps):
        while fed < len(fed_at) and fed_at[fed] <= step:
            shadow = (1 - weight) * shadow + weight * source_rows[fed]
            fed += 1
        row.copy_(shadow)
    return rows


def cheaper_bases(streams: Sequence[Stream], all_targets: dict[str, Targets], per_task: int) -> None:
    """Bases with one EMA updated each step instead of two (the plugin's cost), against the default (1, 4)."""
    print(
        f"\nbases that update one shadow a step against the default's two, Δ = S/{per_task}, live weights at task "
        "ends: worst residual in % (h ≤ el)"
    )
    for stream in streams:
        targets, ends, total = all_targets[stream.name], stream.task_ends, stream.task_ends[-1]
        steps = snapshot_steps(ends, per_task)
        short = EMARule(horizon_decay(1 / per_task, stream.steps_per_task))
        delta = stream.steps_per_task / per_task
        first, live = profiles_at(short, steps, total), profiles_at(EMARule(0.0), ends, total)
        candidates = {
            "(1, 4), both updated each step": profiles_at(
                EMARule(horizon_decay(4 / per_task, stream.steps_per_task)), steps, total
            ),
            **{
                f"(1) and a 4Δ shadow fed by it every {k} steps": fed_profiles(short, k, 4 * delta, steps, total)
                for k in (4, 8, 16)
            },
            "(1) and the live weights at every snapshot": profiles_at(EMARule(0.0), steps, total),
        }
        for name, second in candidates.items():
            basis = torch.cat([first, second, live])
            saved_at = torch.tensor([*steps, *steps, *ends])
            m = fit_targets(stream, targets, basis, saved_at, 2 * len(steps) + len(ends))
            print(f"  {stream.name:8} {name:46} {percent(m.within, 'worst'):>8}")


def percent(values: Sequence[float], how: str) -> str:
    if not values:
        return "-"
    value = max(values) if how == "worst" else statistics.median(values)
    return f"{100 * value:.3f}"


def disk(tensors: int, parameters: int, dtype: str) -> str:
    size = tensors * parameters * BYTES[dtype]
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def worst_other(m: Measure, restarted: bool) -> float:
    """Worst residual of the other targets: the EMA restarted at task starts, or all the rest."""
    return max(v for k, v in m.other.items() if (k == RESTARTED) == restarted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", nargs="+", default=["5x1200", "20x469"], help="TASKSxSTEPS_PER_TASK")
    parser.add_argument("--per-task", nargs="+", type=int, default=[4, 8, 16], help="snapshots per task (S / Δ)")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--horizons", type=int, default=16, help="points of the horizon grid 0.05…8 tasks")
    parser.add_argument("--threshold", type=float, default=0.02, help="worst residual (h ≤ elapsed) of a default")
    parser.add_argument("--max-gain", type=float, default=10.0, help="largest Σ|c| of a default")
    args = parser.parse_args()
    started = time.perf_counter()
    streams = [Stream(*map(int, text.split("x"))) for text in args.streams]
    horizons = geometric(0.05, 8, args.horizons)
    print(
        f"targets: constant EMAs of {len(horizons)} horizons h = {horizons[0]:g}…{horizons[-1]:g} tasks (geometric) "
        "at every task end; residual ||Bᵀc − p|| / ||p|| in %, split by h ≤ / > tasks elapsed (el); "
        "Σ|c|: largest sum of |coefficients| (h ≤ el); means: of the stream (uniform, linear, quadratic) and "
        f"of the task, warmup EMAs; {RESTARTED}: restarted at each task start"
    )
    header = (
        f"{'stream':8} {'basis/Δ':9} {'per task':>8} {'Δ':>5} {'tensors':>7} {'worst h≤el':>10} {'median h≤el':>11} "
        f"{'worst h>el':>10} {'median all':>10} {'Σ|c|':>6} {'means':>6} {RESTARTED:>13}"
    )
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, str, int], Measure] = {}
    all_targets = {}
    for stream in streams:
        targets = all_targets[stream.name] = stream_targets(stream, horizons)
        for basis in args.bases:
            for per_task in args.per_task:
                m = results[stream.name, basis, per_task] = measure(stream, targets, per_task, BASES[basis])
                cadence = stream.steps_per_task / per_task
                print(
                    f"{stream.name:8} {basis:9} {per_task:8} {cadence:5.0f} {m.tensors:7} "
                    f"{percent(m.within, 'worst'):>10} {percent(m.within, 'median'):>11} "
                    f"{percent(m.beyond, 'worst'):>10} {percent(m.within + m.beyond, 'median'):>10} {m.gain:6.1f} "
                    f"{100 * worst_other(m, False):6.3f} {100 * worst_other(m, True):13.3f}"
                )

    print("\ndisk per run (tensors × parameters × bytes): MLP 784-100-100-10 89,610, ResNet-18 11.2 M, ViT-B/16 86 M")
    columns = [(model, dtype) for dtype in BYTES for model in MODELS]
    print(f"{'stream':8} {'K':>2} {'per task':>8} {'tensors':>7} " + " ".join(f"{m + ' ' + d:>14}" for m, d in columns))
    seen = set()
    for (name, basis, per_task), m in results.items():
        key = (name, len(BASES[basis]), per_task)
        if key not in seen:
            seen.add(key)
            sizes = " ".join(f"{disk(m.tensors, MODELS[model], dtype):>14}" for model, dtype in columns)
            print(f"{name:8} {key[1]:2} {per_task:8} {m.tensors:7} {sizes}")

    claim_stream = Stream(5, 1200)
    claim = measure(claim_stream, stream_targets(claim_stream, geometric(0.1, 4, 25)), 8, (1, 4))
    worst = max(claim.within + claim.beyond)
    print(
        f"\nclaim: EMAs (Δ, 4Δ), Δ = S/8, 5 x 1200, 25 horizons 0.1…4 tasks at every task end: worst residual "
        f"{100 * worst:.3f} % ({100 * max(claim.within):.3f} % where h ≤ elapsed) -> "
        f"{'holds' if worst < 0.01 else 'FAILS'} (< 1 %)"
    )

    # the default: the fewest tensors per task with a worst residual (h ≤ elapsed) and Σ|c| under the bounds
    candidates = sorted({(basis, per_task) for _, basis, per_task in results})
    worst_of = {c: max(max(m.within) for (_, *key), m in results.items() if tuple(key) == c) for c in candidates}
    gain_of = {c: max(m.gain for (_, *key), m in results.items() if tuple(key) == c) for c in candidates}
    passing = [c for c in candidates if worst_of[c] <= args.threshold and gain_of[c] <= args.max_gain]
    best = min(passing or candidates, key=lambda c: (len(BASES[c[0]]) * c[1], worst_of[c]))
    basis, per_task = best
    per_task_tensors = len(BASES[basis]) * per_task
    print(
        f"\nrecommended default: basis {basis} × Δ, Δ = S/{per_task} ({per_task_tensors} tensors per task): worst "
        f"residual {100 * worst_of[best]:.3f} % over h = 0.05…8 tasks ≤ elapsed, Σ|c| ≤ {gain_of[best]:.1f}, all "
        "streams" + ("" if passing else " (none within the bounds: the best one)")
    )
    others = [f"{b}@S/{q} ({len(BASES[b]) * q}, {100 * worst_of[b, q]:.2f} %)" for b, q in passing if (b, q) != best]
    print(
        f"  the fewest tensors per task with worst ≤ {100 * args.threshold:g} % and Σ|c| ≤ {args.max_gain:g}; "
        f"the others within those bounds (tensors per task, worst): {', '.join(others) or 'none'}"
    )
    for stream in streams:
        without = results[stream.name, basis, per_task].other
        live = measure(stream, all_targets[stream.name], per_task, BASES[basis], live_at_task_ends=True).other
        pairs = ", ".join(f"{k} {100 * v:.3f} / {100 * live[k]:.3f}" for k, v in without.items())
        print(
            f"  {stream.name}: worst residual in % of the other targets, without / with the live weights saved at "
            f"each task end too: {pairs}"
        )

    print("\nshort horizons, basis (1,4): worst residual in % at every task end, by snapshots per task")
    print(f"{'stream':8} {'h (tasks)':>9} " + " ".join(f"{f'S/{q}':>7}" for q in (8, 16, 24, 32)))
    for stream in streams:
        short = stream_targets(stream, [0.05, 0.1])
        fits = {q: measure(stream, short, q, BASES["(1,4)"]) for q in (8, 16, 24, 32)}
        for j, horizon in enumerate(short.horizons):
            cells = " ".join(f"{100 * max(fits[q].within[j :: len(short.horizons)]):7.3f}" for q in fits)
            print(f"{stream.name:8} {horizon:9g} {cells}")
    cheaper_bases(streams, all_targets, 16)
    print(f"\n{time.perf_counter() - started:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
