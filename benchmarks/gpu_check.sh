#!/usr/bin/env bash
# The GPU benchmark run behind the README's accelerator tables (one short script per device call).
# Usage: OUT=dir bash benchmarks/gpu_check.sh
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # keep a caller's path (carried wheels)
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
python3 benchmarks/loss_cost.py --batch 4096 --repeats 10 --out "$OUT/loss_cost_mlp.md" > "$OUT/mlp.log" 2>&1
tail -40 "$OUT/loss_cost_mlp.md"
python3 benchmarks/attention_jvp.py --seq 1024 4096 8192 --heads 8 --repeats 5 --out "$OUT/attention.md" > "$OUT/attention.log" 2>&1
tail -20 "$OUT/attention.md"
python3 benchmarks/loss_cost.py --model dit --size small --batch 64 --repeats 10 \
  --rules lsd,psd,shortcut,meanflow,meanflow+cfg --out "$OUT/loss_cost_dit.md" > "$OUT/dit.log" 2>&1
tail -20 "$OUT/loss_cost_dit.md"
# The MNIST few-step FID (~4 min per rule by estimate) runs as its own call:
#   OUT=$OUT/mnist bash benchmarks/gpu_mnist_fid.sh      (RULES="lsd" etc. for one rule per call)
