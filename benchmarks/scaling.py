"""Data-parallel scaling: samples/s of one split CIFAR-100 task on 1 and on N processes (torchrun).

    python benchmarks/scaling.py [--processes 1 8] [--model vit|resnet18] [--bf16]
    python benchmarks/scaling.py --device cpu --processes 1 2 --model resnet18 --width 4 --steps 5   # CPU, gloo

For each process count it starts ``torchrun --standalone --nproc-per-node=N`` on this file; every
process trains the run ``python -m cl_ema`` assembles (``cl_ema.assembly``: device-resident data,
the EMA plugin, DistributedDataParallel, each process its share of the same global batch) on
generated CIFAR-100-shaped data, and the main process reports the training samples/s over
``--steps`` steps after ``--warmup``. The table gives the
scaling efficiency ``samples/s(N) / (N · samples/s(1))`` at the same global batch.
``--model vit`` is split_cifar_vit's network (ViT-B/16 at 224×224, random weights: speed does not
depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cl_ema_run, run_arguments  # noqa: E402

from cl_ema import distributed  # noqa: E402

RESULT = "RESULT "


def worker(args) -> None:
    processes = distributed.from_environment()
    device = distributed.start(processes, torch.device(args.device))
    elapsed = cl_ema_run(args, device, "ema", processes)
    if processes.main:
        speed = args.steps * args.batch_size / elapsed
        row = {"processes": processes.world_size, "samples_per_s": speed, "ms_per_step": 1000 * elapsed / args.steps}
        print(RESULT + json.dumps(row), flush=True)
    distributed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_arguments(parser, model="vit", steps=50)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, max(torch.cuda.device_count(), 1)])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = []
    for count in dict.fromkeys(args.processes):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={count}",
            __file__,
            "--worker",
            *sys.argv[1:],
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode or not lines:
            sys.exit(f"error: torchrun with {count} processes failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(RESULT) :]))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (gloo)"
    print(
        f"{args.model}, global batch {args.batch_size}, {args.steps} steps after {args.warmup}, {name}, "
        f"bf16={args.bf16}, torch {torch.__version__}"
    )
    base = results[0]["samples_per_s"] / results[0]["processes"]
    for row in results:
        efficiency = row["samples_per_s"] / (row["processes"] * base)
        print(
            f"{row['processes']:>3} processes {row['samples_per_s']:>12,.1f} samples/s {row['ms_per_step']:>10.2f} "
            f"ms/step   scaling efficiency {100 * efficiency:5.1f} %"
        )


if __name__ == "__main__":
    main()
