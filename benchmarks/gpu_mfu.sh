#!/usr/bin/env bash
# The DiT-B/2 training step against its MFU aim, in one device call (each part time-limited,
# tables written as they go): the trainer's step for flow matching, LSD, MeanFlow and iMF with
# XLA's naive attention and with flash attention (cuDNN's fused attention for the output and its
# backward, the Pallas kernels for the tangent), timed in one run so each rule's time ratio to
# flow matching sits beside its analytic FLOP ratio (benchmarks/train_throughput.py); then
# the DiT blocks' rematerialization policies (none, dots, block), unrolled and scanned
# (config.model.scan_blocks), for flow matching and LSD with flash attention, timed in one run as
# ratios to the step without remat and to the unrolled blocks; then where flow
# matching's step spends its time with flash attention (benchmarks/profile_step.py), to compare
# with the naive profile in docs/bench/profile_dit_b2_h100.md.
#   OUT=dir bash benchmarks/gpu_mfu.sh              # on the GPU (limits sized for one 10-minute call)
#   OUT=/tmp/mfu TINY=1 bash benchmarks/gpu_mfu.sh  # CPU smoke run (tiny sizes, Pallas interpreter)
# With JAX_COMPILATION_CACHE_DIR set (kept under $OUT by default), a rerun loads the compiled steps.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu_mfu}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
START=$(date +%s)
stamp() { echo "$1 at +$(( $(date +%s) - START )) s" | tee -a "$OUT/times.txt"; }
if [ "${TINY:-0}" = 1 ]; then
  # The CPU runs the Pallas kernels in their interpreter: minutes, not the device's seconds.
  T_STEP=${T_STEP:-600} T_REMAT=${T_REMAT:-600}
  STEP=(--tiny --warmup 1 --repeats 2 --compile_workers 1)
  PROF=(--size tiny --batch 8)
else
  STEP=(--warmup 3 --repeats 10 --compile_workers 6 --budget_s "${T_STEP:-280}")
  PROF=(--size B --batch 256)
fi
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
stamp steps
timeout "$(( ${T_STEP:-280} + 40 ))" $PY benchmarks/train_throughput.py --model dit-b2 \
  --rules flow_matching,lsd,meanflow,imf --attention naive,flash "${STEP[@]}" \
  --out "$OUT/steps.md" > "$OUT/steps.log" 2>&1
tail -20 "$OUT/steps.md" 2>/dev/null || tail -5 "$OUT/steps.log"
stamp remat
REMAT=("${STEP[@]}")
[ "${TINY:-0}" = 1 ] || REMAT=(--warmup 3 --repeats 10 --compile_workers 6 --budget_s "${T_REMAT:-130}")
timeout "$(( ${T_REMAT:-130} + 20 ))" $PY benchmarks/train_throughput.py --model dit-b2 \
  --rules flow_matching,lsd --attention flash --remat none,dots,block --blocks unrolled,scanned "${REMAT[@]}" \
  --out "$OUT/remat.md" > "$OUT/remat.log" 2>&1
tail -28 "$OUT/remat.md" 2>/dev/null || tail -5 "$OUT/remat.log"
stamp profile
# No CUDA graphs: the trace then attributes every kernel to its HLO instruction.
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout "${T_PROF:-90}" $PY benchmarks/profile_step.py \
  "${PROF[@]}" --attention flash --out "$OUT/profile_dit_flash.json" > "$OUT/profile_dit_flash.log" 2>&1
tail -16 "$OUT/profile_dit_flash.log"
stamp done
