#!/usr/bin/env bash
# Stage 1 of the shipped Fashion-MNIST models, on one GPU: the feature classifier, the EDM teacher, the teacher's
# classifier FID against its number of sampler steps, and a learning-rate sweep of DMD2 (4 runs side by side on
# the one GPU: the 0.6M-parameter models are launch-bound, so runs in parallel cost little more than one).
# Usage: OUT=runs/gpu bash scripts/gpu_fmnist_stage1.sh   (FMNIST_ROOT: where the IDX files are; TEACHER_SET,
# SWEEP_SET: extra --set pairs; CLS_STEPS, EVAL_NUM, SWEEP_STEPS, SWEEP_EVAL: sizes, for a small rehearsal on a CPU)
set -euo pipefail
OUT=${OUT:-runs/gpu}; FMNIST_ROOT=${FMNIST_ROOT:-}
ROOT_SET=${FMNIST_ROOT:+data_root=$FMNIST_ROOT}
mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt") || true
SECONDS=0
dmd2lab train-classifier --out "$OUT/fmnist_classifier.safetensors" ${FMNIST_ROOT:+--data-root $FMNIST_ROOT} --steps ${CLS_STEPS:-3000}
echo "classifier: ${SECONDS}s"
SECONDS=0
timeout ${TEACHER_SECONDS:-270} dmd2lab train-teacher --config configs/fmnist.yaml --out "$OUT/teacher" --set progress=False ${TEACHER_SET:-} $ROOT_SET \
  || { step=$(cat "$OUT/teacher/latest" | sed 's/step-0*//'); echo "teacher stopped at step $step; exporting it";
       dmd2lab train-teacher --config configs/fmnist.yaml --out "$OUT/teacher" --set progress=False ${TEACHER_SET:-} steps=$step $ROOT_SET; }
echo "teacher: ${SECONDS}s"
for steps in 1 2 4 8 12 18 25 40; do
  dmd2lab eval --model "$OUT/teacher/teacher.safetensors" --steps $steps --num ${EVAL_NUM:-5000} \
    --classifier "$OUT/fmnist_classifier.safetensors" ${FMNIST_ROOT:+--data-root $FMNIST_ROOT} --json "$OUT/teacher_eval_$steps.json" >/dev/null
  ${PYTHON:-python3} -c "import json;d=json.load(open('$OUT/teacher_eval_$steps.json'));print('teacher steps $steps nfe',d['nfe'],'cFID %.3f'%d['classifier_fid'],'img/s %.0f'%d['images_per_s'])"
done
SECONDS=0
for lr in 2e-5 5e-5 1e-4 2e-4; do
  timeout ${SWEEP_SECONDS:-170} dmd2lab distill --config configs/fmnist.yaml --out "$OUT/sweep-$lr" --set progress=False lr=$lr steps=${SWEEP_STEPS:-3000} \
    teacher="$OUT/teacher/teacher.safetensors" classifier="$OUT/fmnist_classifier.safetensors" eval_every=${SWEEP_EVAL:-500} ${SWEEP_SET:-} \
    checkpoint_every=0 $ROOT_SET > "$OUT/sweep-$lr.txt" 2>&1 &
done
wait
echo "sweep: ${SECONDS}s"
for lr in 2e-5 5e-5 1e-4 2e-4; do echo "lr $lr"; ${PYTHON:-python3} - "$OUT/sweep-$lr/log.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows:
    if r.get("classifier_fid"):
        print(f"  step {r['step']} cFID {float(r['classifier_fid']):.3f} dm {float(r['dm_loss'] or 0):.4f} elapsed {r['elapsed_s']}")
PY
done
