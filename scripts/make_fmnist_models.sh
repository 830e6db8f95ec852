#!/usr/bin/env bash
# Remake the shipped Fashion-MNIST models (data/README.md records the run that made them: one H100, this script's
# commands with these settings; the classifier was trained on the 2-core CPU machine).
#   bash scripts/make_fmnist_models.sh OUT_DIR [FMNIST_ROOT]
# Wall-clock limits, not step counts, bound the runs (time_limit_s ends a run cleanly with its model written), so on
# another device the same script trains for the same time and a different number of steps.
set -euo pipefail
OUT=${1:?usage: make_fmnist_models.sh OUT_DIR [FMNIST_ROOT]}; ROOT=${2:-}
ROOT_SET=${ROOT:+data_root=$ROOT}
mkdir -p "$OUT"
dmd2lab train-classifier --out "$OUT/fmnist_classifier.safetensors" ${ROOT:+--data-root $ROOT} --steps 3000
dmd2lab train-teacher --config configs/fmnist.yaml --out "$OUT/teacher" --set progress=False time_limit_s=170 \
  log_every=500 $ROOT_SET
# Three learning rates side by side on the one GPU (the 0.6M-parameter models are launch-bound, so three runs cost
# little more than one); the shipped student is the one with the lowest classifier FID.
pids=()
for lr in 3e-5 1e-4 3e-4; do
  dmd2lab distill --config configs/fmnist.yaml --out "$OUT/distill-$lr" --set progress=False lr=$lr steps=100000 \
    time_limit_s=210 eval_every=0 checkpoint_every=0 log_every=250 teacher="$OUT/teacher/teacher.safetensors" \
    $ROOT_SET > "$OUT/distill-$lr.txt" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for lr in 3e-5 1e-4 3e-4; do
  dmd2lab eval --model "$OUT/distill-$lr/student.safetensors" --num 1000 --classifier "$OUT/fmnist_classifier.safetensors" \
    ${ROOT:+--data-root $ROOT} --json "$OUT/distill-$lr/eval.json" > /dev/null
  python3 -c "import json; print('lr $lr', 'classifier FID %.2f' % json.load(open('$OUT/distill-$lr/eval.json'))['classifier_fid'])"
done
