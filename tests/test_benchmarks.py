"""The benchmark scripts run (tiny sizes): their numbers go into the README."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_ema_update_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, "benchmarks/ema_update.py", "--repeats", "2", "--widths", "4", "8", "--no-train-step"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("flat lerp_ (floor)", "cl_ema K=1", "cl_ema K=4", "per-parameter loop", "torch AveragedModel"):
        assert row in proc.stdout
    assert "K=1 / floor" in proc.stdout and "device: cpu" in proc.stdout


def test_throughput_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--width", "4",
         "--batch-size", "8", "--samples", "1000", "--workers", "0", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("(a) cl_ema", "(a) cl_ema + EMA", "(b) Avalanche Naive + DataLoader", "(c) bare loop", "(a) / (b) ="):
        assert row in proc.stdout


def test_loader_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, "benchmarks/loader.py", "--rounds", "1", "--batch-size", "1024"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "TaskBalancedDataLoader" in proc.stdout and "ReplayDataLoader" in proc.stdout and "IndexBatches" in proc.stdout
    )
