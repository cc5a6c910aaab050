#!/usr/bin/env bash
# The attention kernels and the DiT step on one GPU, in one device call (each step time-limited,
# tables written as they go): the block-size search of the fused forward+jvp kernel at 4,096
# tokens (fmjax.models.flash_autotune; its cache then serves the attention rows), naive vs
# flash attention at 4,096 and 8,192 tokens in every mode, with LSD's grad(jvp) by the fused
# backward kernel ('flash') and by the blockwise JAX loop ('flash-bwd-blockwise'), and where
# DiT-B/2's flow-matching step spends its time (benchmarks/profile_step.py).
#   OUT=dir bash benchmarks/gpu_kernels.sh            # on the GPU
#   OUT=/tmp/gk TINY=1 bash benchmarks/gpu_kernels.sh # CPU smoke run (Pallas interpreter, tiny sizes)
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_kernels}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
# The autotune cache lands in $OUT (and is read back by the attention rows of this run).
export FMJAX_CACHE=$OUT/cache
START=$(date +%s)
stamp() { echo "$1 at +$(( $(date +%s) - START )) s" | tee -a "$OUT/times.txt"; }
if [ "${TINY:-0}" = 1 ]; then
  TUNE=(--seq 64 --heads 2 --head_dim 16 --dtype float32 --blocks 16,32 --num_warps 4 --num_stages 1 --repeats 1 --interpret)
  ATTN=(--seq 64 --heads 2 --head-dim 16 --impls naive,flash,flash-bwd-blockwise --repeats 1 --interpret)
  PROF=(--size tiny --batch 8)
else
  TUNE=(--seq 4096 --heads 24 --head_dim 128 --dtype bfloat16 --blocks 64,128 --num_warps 4,8 --num_stages 2,3 --repeats 5)
  ATTN=(--seq 4096 8192 --heads 24 --head-dim 128 --dtype bfloat16 --impls naive,flash,flash-bwd-blockwise --repeats 3)
  PROF=(--size B --batch 256)
fi
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
stamp autotune
timeout "${T_TUNE:-70}" $PY -m fmjax.models.flash_autotune "${TUNE[@]}" > "$OUT/autotune.log" 2>&1
tail -3 "$OUT/autotune.log"
stamp attention
timeout "${T_ATTN:-110}" $PY benchmarks/attention_jvp.py "${ATTN[@]}" --out "$OUT/attention.md" > "$OUT/attention.log" 2>&1
tail -14 "$OUT/attention.md" 2>/dev/null || tail -5 "$OUT/attention.log"
stamp profile
# No CUDA graphs: the trace then attributes every kernel to its HLO instruction.
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout "${T_PROF:-70}" $PY benchmarks/profile_step.py "${PROF[@]}" \
  --out "$OUT/profile_dit.json" > "$OUT/profile_dit.log" 2>&1
tail -16 "$OUT/profile_dit.log"
stamp done
