#!/usr/bin/env bash
# Issue 19's speed target, on this machine's two cores: the decoupling methods with 2 stages on
# 2 pinned worker cores (`--devices 'cpu:0 cpu:1'`) against single-process backprop pinned to one
# core, on the wide FCN of docs/BENCHMARKS.md section 5 (four hidden layers of 1,024 with
# BatchNorm), 2 epochs of full MNIST, test accuracy every 50 iterations; the report's table gives
# samples/s and the time to 97%. Run it on a quiet machine: `uptime` before and after is printed.
#
#     bash scripts/bench_pinned.sh [MNIST_DIR] [OUT] [MODES]
#
# MODES: zdni methods run in 2 stages on the 2 pinned cores (cdni is sg --conditioned), and
# torch2: the same single-process backprop with 2 threads on both cores (the honest row).
# MODEL (a string of zdni options) replaces the wide FCN, e.g. MODEL="--model fcn8 --model-arg
# width=1024 --data-dir ../shared/data/mnist" (the issue-19 table's fcn8).
set -euo pipefail
DATA=${1:-../shared/data/mnist}
OUT=${2:-runs/pinned}
MODES=${3:-pipedream dgl fr sg}
Z=${Z:-.venv/bin/zdni}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -f "$OUT/mnist.npz" ] || "$PY" examples/make_npz.py "$DATA" "$OUT/mnist.npz" > /dev/null
if [ -n "${MODEL:-}" ]; then
  read -r -a NET <<< "$MODEL"
else
  NET=(--model examples/my_models.py:mlp --model-arg 'widths=[1024,1024,1024,1024]'
       --model-arg batchnorm=true --dataset "$OUT/mnist.npz")
fi
M=("${NET[@]}" --epochs 2 --eval-every 50 --quiet)
echo "before: $(uptime)"
taskset -c 0 "$Z" train --inproc --mode backprop --threads 1 "${M[@]}" --out "$OUT/backprop-1core" \
    --label "backprop, 1 core" > /dev/null
for mode in $MODES; do
  if [ "$mode" = torch2 ]; then
    taskset -c 0,1 "$Z" train --inproc --mode backprop --threads 2 "${M[@]}" \
        --out "$OUT/backprop-2threads" --label "backprop, 2 threads on 2 cores" > /dev/null
    continue
  fi
  extra=(--mode "$mode")
  [ "$mode" = cdni ] && extra=(--mode sg --conditioned)
  "$Z" train "${extra[@]}" --stages 2 --devices 'cpu:0 cpu:1' "${M[@]}" \
      --out "$OUT/$mode-2cores" --label "$mode, 2 stages on 2 pinned cores" > /dev/null
done
echo "after: $(uptime)"
runs=("$OUT"/backprop-1core)
[ -d "$OUT/backprop-2threads" ] && runs+=("$OUT/backprop-2threads")
shopt -s nullglob
"$Z" report "${runs[@]}" "$OUT"/*-2cores -o "$OUT/report" \
    --title "2 pinned worker cores against one" > /dev/null
sed -n '/^| variant/,/^$/p' "$OUT/report/report.md"
