"""Does EMA shrink the stability gap? Continual evaluation of live vs EMA weights over seeds.

    python benchmarks/stability_gap.py [--seeds 5] [--every 10]

Runs ``strategy=ema`` with ``eval.every_n_steps`` on split digits and on split-MNIST-shaped
data: scikit-learn's digits upscaled to 28×28 and written in MNIST's on-disk layout, trained
with the split_mnist protocol (real MNIST cannot be downloaded everywhere). Prints mean ± std
over seeds of min-ACC, WC-ACC, AAA, the stability gap and final ACC per track, and the cost of
continual evaluation (wall time with and without it, one seed, same process).
"""

from __future__ import annotations

import argparse
import io
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cl_ema.config import check, compose
from cl_ema.console import Console
from cl_ema.data.sources import load_digits
from cl_ema.runner import run


def write_mnist_shaped_digits(root: Path) -> None:
    """The digits split, upscaled to 28×28 uint8, as MNIST idx files under root/MNIST/raw."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, store in zip(("train", "t10k"), load_digits()):
        images = F.interpolate(store.inputs.float() * (255 / 16), size=(28, 28), mode="bilinear", align_corners=False)
        images = images.clamp(0, 255).round().to(torch.uint8)[:, 0].numpy()
        labels = store.base_targets.numpy().astype(np.uint8)
        for name, magic, array in (("images-idx3", 2051, images), ("labels-idx1", 2049, labels)):
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header + array.tobytes())


def run_once(out: Path, *overrides: str):
    cfg = compose("logger=none", "checkpoint=false", *overrides)
    check(cfg)
    started = time.perf_counter()
    results = run(cfg, out, "study", console=Console(file=io.StringIO()))
    return results, time.perf_counter() - started


def summary(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    return f"{100 * np.mean(present):5.1f} ± {100 * np.std(present, ddof=1 if len(present) > 1 else 0):4.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--every", type=int, default=10, help="eval.every_n_steps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cl_ema_gap_"))
    write_mnist_shaped_digits(work / "data")
    studies = {
        "split_digits": ["experiment=split_digits", "ema.decays=[0.9,0.99]"],
        "split_mnist (digits, 28×28)": ["experiment=split_mnist", f"data.root={work / 'data'}", "data.download=false",
                                        "ema.decays=[0.99,0.998]", "device=cpu"],
    }  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, eval.every_n_steps={args.every}, "
          f"eval.subset_size=200, seeds 0..{args.seeds - 1}\n")  # fmt: skip
    keys = ("min_acc", "wc_acc", "aaa", "stability_gap")
    print(f"{'experiment':<30}{'track':<10}" + "".join(f"{k:>16}" for k in (*keys, "final ACC")))
    for name, overrides in studies.items():
        runs = []
        for seed in range(args.seeds):
            results, _ = run_once(work / name / str(seed), "strategy=ema", f"eval.every_n_steps={args.every}",
                                  f"seed={seed}", *overrides)  # fmt: skip
            runs.append(results)
        for track in runs[0].tracks:
            cells = [summary([r.stability[track][k] for r in runs]) for k in keys]
            final = summary([r.metrics(track, r.num_tasks - 1)["avg_acc"] for r in runs])
            print(f"{name:<30}{track:<10}" + "".join(f"{c:>16}" for c in (*cells, final)))
        _, with_eval = run_once(
            work / name / "timed_eval", "strategy=ema", f"eval.every_n_steps={args.every}", *overrides
        )
        _, without = run_once(work / name / "timed_plain", "strategy=ema", *overrides)
        evaluations = sum(runs[0].meta["steps_per_task"]) // args.every
        print(
            f"{'':<30}cost: {with_eval:.1f} s with continual evaluation vs {without:.1f} s without "
            f"({with_eval / without:.2f}x; ~{evaluations} evaluations of {len(runs[0].tracks)} tracks)\n"
        )


if __name__ == "__main__":
    main()
