#!/usr/bin/env bash
# Every GPU measurement the README marks "not measured", in one go (< 8 min on one modern GPU), ending
# in one table to paste into the README:
#   bash benchmarks/gpu.sh            (or: make bench-gpu)
# 1. one update of each averaging rule and of K shadows against the one-lerp_ floor, on ResNet-18,
#    and the EMA's share of a ResNet-18 training step (benchmarks/ema_update.py);
# 2. training throughput on split CIFAR-100's first task: (a) cl_ema's assembled run ± EMA,
#    (b) stock Avalanche Naive + DataLoader, (c) a bare loop; bf16 autocast and channels-last
#    (benchmarks/throughput.py, generated CIFAR-shaped data);
# 3. a short split_cifar run (one epoch per task, generated data), extrapolated to the protocol's
#    50 epochs per task.
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh runs the same path tiny, on the CPU (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if [[ -n "${QUICK:-}" ]]; then
  ema_args=(--repeats 2 --widths 4 --no-train-step)
  throughput_args=(--steps 3 --warmup 1 --width 4 --batch-size 8 --samples 2000 --workers 0 --rounds 1)
  run_args=(model.width=4 train.batch_size=64 data.dataset.train_size=2000 data.dataset.test_size=200 data.n_tasks=2)
else
  ema_args=(--repeats 30)
  throughput_args=(--bf16 --channels-last --steps 200 --rounds 3 --workers 8)
  run_args=()
fi
[[ $DEVICE == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" benchmarks/ema_update.py --device "$DEVICE" "${ema_args[@]}" | tee "$OUT/ema_update.txt"
"$PY" benchmarks/throughput.py --device "$DEVICE" "${throughput_args[@]}" | tee "$OUT/throughput.txt"
"$PY" -m cl_ema experiment=split_cifar dataset@data.dataset=random_cifar100 train.epochs=1 device="$DEVICE" \
  logger=none checkpoint=false hydra.run.dir="$OUT/split_cifar" "${run_args[@]}" | tail -n 3
"$PY" benchmarks/gpu_table.py "$OUT"
