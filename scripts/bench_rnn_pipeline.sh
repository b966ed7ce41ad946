#!/usr/bin/env bash
# The stacked LSTM on chunked Copy through the broker (each layer a worker) against the
# in-process reference, same settings and seeds (docs/RESULTS.md section 8):
#     bash scripts/bench_rnn_pipeline.sh > docs/bench/rnn_pipeline.txt
set -uo pipefail
cd "$(dirname "$0")/.."
ZDNI=${ZDNI:-.venv/bin/zdni}
COMMON="--model copy-lstm --dataset copy-L1-T3 --batch-size 32 --eval-batch-size 32 --stages 3
  --lr 0.003 --train-limit 6400 --test-limit 960 --quiet"
out=$(mktemp -d)
for seed in 0 1; do
  for args in "--mode backprop --epochs 8" "--mode sg --conditioned --epochs 12"; do
    for runner in "" "--inproc"; do
      name="seed$seed${args// /}${runner// /}"
      $ZDNI train $COMMON $args $runner --seed "$seed" --out "$out/$name" > /dev/null 2>&1 \
        || echo "failed: $args $runner seed $seed"
      python3 - "$out/$name" "$args $runner seed $seed" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
curve = " ".join(f"{h['test_accuracy']:.3f}" for h in s["history"])
print(f"{sys.argv[2]:<52} final {s['test_accuracy']:.3f} wall {s['wall_s']:6.1f} s "
      f"{s['samples_per_s']:6.0f}/s  per epoch: {curve}", flush=True)
PY
    done
  done
done
