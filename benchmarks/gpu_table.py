"""The one table of ``benchmarks/gpu.sh``: what its three measurements printed, for the README.

python benchmarks/gpu_table.py OUT        (OUT: the folder gpu.sh wrote its outputs to)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

EPOCHS = 50  # split_cifar's epochs per task (conf/experiment/split_cifar.yaml)


def lines_with(text: str, *starts: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(starts)]


def main() -> None:
    out = Path(sys.argv[1])
    rows: list[tuple[str, str]] = []
    if (out / "gpu.txt").exists():
        rows.append(("device", (out / "gpu.txt").read_text().strip()))
    ema = (out / "ema_update.txt").read_text()
    for line in lines_with(ema, "flat lerp_", "cl_ema K=", "timm", "torch AveragedModel"):
        name, *values = re.split(r"\s{2,}", line)
        rows.append((f"EMA update: {name}", " / ".join(values)))
    for line in lines_with(ema, "ResNet-18 training step"):
        rows.append(("EMA share of a ResNet-18 step", line.split(": ", 1)[1]))
    for line in ema.split("ratios")[1].splitlines()[1:] if "ratios" in ema else []:
        if line.strip():
            rows.append(("EMA update ratios", line.strip()))
    throughput = (out / "throughput.txt").read_text()
    for line in lines_with(throughput, "(a)", "(b)", "(c)"):
        name = line.split("  ")[0]
        rows.append((f"throughput {name}", line[len(name) :].strip()))
    results = json.loads((out / "split_cifar" / "results.json").read_text())
    steps, train, total = sum(results["steps_per_task"]), results["train_s"], results["elapsed_s"]
    tasks = results["tasks_done"]
    full = EPOCHS * train + (total - train)  # training scales with the epochs, evaluation does not
    rows.append(
        (
            "split_cifar, 1 epoch a task",
            f"{tasks} tasks, {steps} steps: {train:.0f} s training, {total - train:.0f} s evaluation",
        )
    )
    rows.append((f"split_cifar, {EPOCHS} epochs a task (extrapolated)", f"{full / 3600:.2f} h"))
    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
