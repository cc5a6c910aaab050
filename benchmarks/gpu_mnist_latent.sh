#!/usr/bin/env bash
# The latent MNIST table at the `h100` preset on one GPU, in one device call: flow matching and
# LSD (experiments/mnist_latent.py:RULE,h100) trained side by side on the one GPU, then every
# row of the table with 5,000 samples: flow matching's ODE at 8, 16, 32 NFE (Euler and Heun),
# LSD at 1, 2, 4 steps. FID is deferred (config.eval.fid_features='deferred'): the GPU machine
# has no Inception weights, so each row's decoded digits are written as an ADM sample batch and
# scored afterwards where the weights are; the classifier's share and class TV are computed
# on the GPU. Each stage has a time limit; a training run cut short by it is checkpointed on
# SIGTERM and evaluated at the step it reached (the eval JSON says which).
#
#   OUT=dir bash benchmarks/gpu_mnist_latent.sh                # on the GPU
#   OUT=/tmp/gl SIZE=tiny bash benchmarks/gpu_mnist_latent.sh  # CPU smoke run (minutes)
# then, where the Inception weights are:
#   python -m fmjax.evaluation.reference_batches REF.npz OUT/*/eval_images/step_*/*.npz --out OUT/fid.json
#
# Inputs (made by benchmarks/mnist_latent.sh): DATA (the tfds folder with mnist5k_latents), AE
# (the autoencoder), CLASSIFIER (the digit classifier). Writes under $OUT: flow_matching/, lsd/
# (workdirs; eval_images/step_N/*.npz), eval_<row set>.json, train_*.log, eval_*.log, times.txt.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # keep a caller's path (carried wheels)
# Two training processes share the GPU: each allocates as it goes instead of taking 75 % at start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-runs/gpu_mnist_latent}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
SIZE=${SIZE:-h100}
SRC=${SRC:-runs/mnist_latent}
DATA=${DATA:-$SRC/tfds}; AE=${AE:-$SRC/autoencoder}; CLASSIFIER=${CLASSIFIER:-$SRC/classifier}
T_TRAIN=${T_TRAIN:-280}; T_EVAL=${T_EVAL:-150}
START=$(date +%s)
stamp() { echo "$1 at +$(( $(date +%s) - START )) s" | tee -a "$OUT/times.txt"; }
for path in "$DATA/mnist5k_latents" "$AE" "$CLASSIFIER"; do
  [ -e "$path" ] || { echo "missing $path: make it with benchmarks/mnist_latent.sh (or set DATA, AE, CLASSIFIER)"; exit 1; }
done
COMMON=(--config.autoencoder="$AE" --config.data.data_dir="$DATA")

stamp "train flow_matching and lsd ($SIZE)"
for RULE in flow_matching lsd; do
  ( timeout "$T_TRAIN" $PY -m fmjax.main --config=experiments/mnist_latent.py:$RULE,$SIZE \
      --workdir="$OUT/$RULE" "${COMMON[@]}" --config.eval.at_end=False > "$OUT/train_$RULE.log" 2>&1
    stamp "train $RULE: exit $?" ) &
done
wait
for RULE in flow_matching lsd; do tail -2 "$OUT/train_$RULE.log"; done

# One --mode=eval of WORKDIR (its rule: the name without _heun), its final_metrics.json kept as eval_NAME.json.
evaluate() {   # evaluate NAME WORKDIR overrides...
  local name=$1 run=$2; shift 2
  local rule=${run%_heun}
  timeout "$T_EVAL" $PY -m fmjax.main --config=experiments/mnist_latent.py:$rule,$SIZE \
    --workdir="$OUT/$run" --mode=eval "${COMMON[@]}" --config.eval.fid_features=deferred \
    --config.eval.classifier_dir="$CLASSIFIER" "$@" > "$OUT/eval_$name.log" 2>&1
  local rc=$?
  cp "$OUT/$run/final_metrics.json" "$OUT/eval_$name.json" 2>/dev/null
  stamp "eval $name: exit $rc"
}
stamp "evaluate"
# Three evaluations side by side; Heun's rows read a copy of the flow-matching workdir (each
# --mode=eval writes its workdir's final_metrics.json).
rm -rf "$OUT/flow_matching_heun"; cp -r "$OUT/flow_matching" "$OUT/flow_matching_heun"
evaluate fm_euler flow_matching --config.eval.steps='()' --config.eval.ode_method=euler &
evaluate fm_heun flow_matching_heun --config.eval.steps='()' --config.eval.ode_method=heun &
evaluate lsd lsd --config.eval.ode_nfe='()' --config.eval.steps='(1,2,4)' &
wait
grep -h "confidently\|FID deferred" "$OUT"/eval_*.log | head -20
stamp done
