#!/usr/bin/env bash
# The accelerator checks at scale, in ONE device call of at most ~8 minutes (each step has its own
# time limit; every table is written row by row, so a step cut short still leaves its rows).
#   OUT=dir bash benchmarks/gpu_check_scale.sh          # on the GPU (needs ml_collections)
#   TINY=1 OUT=/tmp/gs bash benchmarks/gpu_check_scale.sh   # CPU smoke run of every step
# Writes under $OUT: device.txt, precision.md, throughput_dit_b2.md, throughput_dit_b2_flash.md, throughput_unet.md,
# throughput_dit_xl2.md (+ a .log per step), and whatever the marked lead section adds.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # keep a caller's path (carried wheels)
OUT=${OUT:-runs/gpu_scale}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
TINY=${TINY:-0}
START=$(date +%s)
stamp() { echo "[gpu_check_scale] $1 at +$(( $(date +%s) - START )) s" | tee -a "$OUT/device.txt"; }

# Compiled steps persist across calls on a warm machine (runs/ is ignored, so it stays there):
# a rerun after a cut-off call loads them instead of compiling again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/runs/jax_cache}
# Rows compile in parallel (the device machine has 16 cores), then are timed one by one.
WORKERS=${WORKERS:-6}
if [ "$TINY" = 1 ]; then
  TP_ARGS="--tiny --batch 8 --warmup 1 --repeats 2"; XL_ARGS="$TP_ARGS"; PREC_ARGS="--tiny"
  T_PREC=600; T_DIT=900; T_FLASH=900; T_UNET=900; T_XL=600; BUDGET_DIT=0; BUDGET_UNET=0
else
  TP_ARGS="--warmup 3 --repeats 10"; XL_ARGS="--warmup 2 --repeats 5"; PREC_ARGS="--batch 32"
  # Seconds per step (wall clock, compile included): precision 90, DiT-B/2 six rules 150,
  # DiT-B/2 flash rows 60, U-Net six rules 150, DiT-XL/2 one rule 75 = 525 s, plus ~15 s of start-up. Compile times on
  # the GPU are not known in advance (26-42 s per DiT-B/2 rule, one at a time, on the first
  # H100 run): --budget_s times no row after that many seconds.
  T_PREC=${T_PREC:-90}; T_DIT=${T_DIT:-150}; T_FLASH=${T_FLASH:-60}; T_UNET=${T_UNET:-150}; T_XL=${T_XL:-75}
  BUDGET_DIT=${BUDGET_DIT:-115}; BUDGET_UNET=${BUDGET_UNET:-115}
fi

(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

# 1. bfloat16 vs float32: loss and gradient of one DiT-B/2-width (4-block) step per rule (+ QK-norm).
stamp precision
timeout $T_PREC $PY benchmarks/precision_check.py $PREC_ARGS --out "$OUT/precision.md" > "$OUT/precision.log" 2>&1
tail -8 "$OUT/precision.md" 2>/dev/null || tail -5 "$OUT/precision.log"

# 2. Throughput and MFU: DiT-B/2 (batch 256, bf16) and the CIFAR-10 U-Net (batch 512, bf16),
#    every rule; DiT-XL/2 (batch 256) with MeanFlow only.
stamp dit-b2
timeout $T_DIT $PY benchmarks/train_throughput.py --model dit-b2 $TP_ARGS --budget_s $BUDGET_DIT \
  --compile_workers $WORKERS --out "$OUT/throughput_dit_b2.md" > "$OUT/throughput_dit_b2.log" 2>&1
tail -12 "$OUT/throughput_dit_b2.md" 2>/dev/null || tail -5 "$OUT/throughput_dit_b2.log"
# The fused attention at DiT-B/2's 256 tokens: cuDNN's forward and backward (flow matching),
# plus the Pallas jvp kernel (MeanFlow); 'auto' keeps naive attention below 1,024 tokens.
stamp dit-b2-flash
timeout $T_FLASH $PY benchmarks/train_throughput.py --model dit-b2 --rules flow_matching,meanflow \
  --attention flash $TP_ARGS --compile_workers 2 --out "$OUT/throughput_dit_b2_flash.md" \
  > "$OUT/throughput_dit_b2_flash.log" 2>&1
tail -6 "$OUT/throughput_dit_b2_flash.md" 2>/dev/null || tail -5 "$OUT/throughput_dit_b2_flash.log"
stamp unet
timeout $T_UNET $PY benchmarks/train_throughput.py --model unet $TP_ARGS --budget_s $BUDGET_UNET \
  --compile_workers $WORKERS --out "$OUT/throughput_unet.md" > "$OUT/throughput_unet.log" 2>&1
tail -8 "$OUT/throughput_unet.md" 2>/dev/null || tail -5 "$OUT/throughput_unet.log"
stamp dit-xl2
timeout $T_XL $PY benchmarks/train_throughput.py --model dit-xl2 --rules meanflow $XL_ARGS \
  --out "$OUT/throughput_dit_xl2.md" > "$OUT/throughput_dit_xl2.log" 2>&1
tail -3 "$OUT/throughput_dit_xl2.md" 2>/dev/null || tail -5 "$OUT/throughput_dit_xl2.log"
stamp throughput-done

# The MNIST few-step FID and the Inception images/s are benchmarks/gpu_mnist_fid.sh, a call of
# their own: three trainings of ~4 min each (estimated) do not fit beside the tables above.

stamp all-done
