"""The benchmark scripts run (tiny sizes): their numbers go into the README."""

from __future__ import annotations

import re

from helpers import ROOT, run_experiment, run_script


def test_the_gpu_checks_scripts_run_and_make_one_table(tmp_path):
    """What benchmarks/gpu.sh runs on a CUDA machine, tiny on the CPU: the EMA-update and throughput
    benchmarks and a one-epoch run, then the one table gpu_table.py makes of them."""
    import json
    import subprocess

    ema = run_script("ema_update.py", "--repeats", "2", "--widths", "4", "8", "--no-train-step")
    for row in (
        "flat lerp_ (floor)",
        "cl_ema K=1 ema",
        "cl_ema K=1 mean uniform (SWA)",
        "cl_ema K=1 CLS-ER ema",
        "cl_ema K=4 ema",
        "cl_ema K=7 every rule",
        "per-parameter loop",
        "torch AveragedModel",
    ):
        assert row in ema, row
    assert "K=7 every rule" in ema.split("ratios")[1] and "device: cpu" in ema
    throughput = run_script(
        "throughput.py",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--width",
        "4",
        "--batch-size",
        "8",
        "--samples",
        "1000",
        "--workers",
        "0",
        "--rounds",
        "1",
    )
    for row in ("(a) cl_ema", "(a) cl_ema + EMA", "(b) Avalanche Naive + DataLoader", "(c) bare loop", "(a) / (b) ="):
        assert row in throughput
    (tmp_path / "ema_update.txt").write_text(ema)
    (tmp_path / "throughput.txt").write_text(throughput)
    run_experiment(tmp_path / "split_cifar", "data.n_tasks=2", "train.epochs=1")
    table = run_script("gpu_table.py", str(tmp_path))
    for row in ("| EMA update: flat lerp_ (floor) |", "| throughput (a) cl_ema + EMA |", "(extrapolated) |"):
        assert row in table, row
    steps = sum(json.loads((tmp_path / "split_cifar" / "results.json").read_text())["steps_per_task"])
    assert f"2 tasks, {steps} steps" in table
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=True)  # the script parses


def test_loader_benchmark_smoke():
    out = run_script("loader.py", "--rounds", "1", "--batch-size", "1024")
    assert "TaskBalancedDataLoader" in out and "ReplayDataLoader" in out and "IndexBatches" in out


def test_stability_gap_study_smoke():
    out = run_script("stability_gap.py", "--seeds", "2", "--every", "30", "--experiments", "split_digits")
    assert "split_digits    ema_0.99" in out and "cost:" in out and "min-ACC" in out


def test_paper_tables_script_on_generated_mnist(tmp_path):
    from fake_datasets import write_mnist

    write_mnist(tmp_path / "data", per_class=6, test_per_class=3)
    run_script(
        "paper_tables.py",
        "--data-root",
        str(tmp_path / "data"),
        "--seeds",
        "2",
        "--experiments",
        "seq_mnist",
        "--timing-rounds",
        "1",
        "--out",
        str(tmp_path / "out"),
    )
    table = (tmp_path / "out" / "paper_tables.md").read_text()
    assert "| ER 200 |" in table and "(80.43" in table and "| CLS-ER 500 |" in table and "(92.05" in table
    assert "| DER++ 500 |" in table and "(91.00" in table and "| DER 200 + EMA |" in table and ", Δ " in table
    assert "derpp's protocol with buffer 200: ER" in table and "cls_er's protocol with buffer 500" in table
    assert len(list((tmp_path / "out" / "seq_mnist").glob("*/seed1/results.json"))) == 9
    assert len(list((tmp_path / "out" / "timing0" / "seq_mnist").iterdir())) == 8  # ER and the method, per protocol
    # finished runs are read back, not rerun: a third seed of one job runs that one run alone
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("results.json")}
    (tmp_path / "out" / "seq_mnist" / "sgd" / "seed0" / "results.json").write_text("{not json")  # run again
    run_script(
        "paper_tables.py",
        "--data-root",
        str(tmp_path / "data"),
        "--seeds",
        "3",
        "--experiments",
        "seq_mnist",
        "--timing-rounds",
        "0",
        "--only",
        "sgd",
        "--out",
        str(tmp_path / "out"),
    )
    changed = {p for p in (tmp_path / "out").rglob("results.json") if written.get(p) != p.stat().st_mtime_ns}
    assert {p.relative_to(tmp_path / "out").as_posix() for p in changed} == {
        "seq_mnist/sgd/seed0/results.json",
        "seq_mnist/sgd/seed2/results.json",
    }
    only = (tmp_path / "out" / "paper_tables.md").read_text()
    assert "| SGD + EMA |" in only and "| ER 200 |" not in only and "over 3 seeds" in only


def test_posthoc_overhead_benchmark_says_where_the_plugins_time_goes():
    out = run_script("posthoc_overhead.py", "--rounds", "1", "--hooks")
    assert "with post-hoc snapshots" in out, out
    spent = dict(re.findall(r"(basis updates|snapshots|flushes) ([0-9.]+) s", out))
    assert set(spent) == {"basis updates", "snapshots", "flushes"} and all(float(s) > 0 for s in spent.values()), out
