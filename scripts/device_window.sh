#!/usr/bin/env bash
# The second device call (docs/BENCHMARKS.md 6): cDNI with a window of 16 in flight, GPipe with 16
# micro-batches, on the lent GPU machine after scripts/device_check.sh (same carry).
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
B="python3 scripts/bench_pipeline.py --model fcn8 --model-arg width=1024 --data-dir $PWD/.mnist --synth-hidden 1 --synth-width 64 --test-limit 10000"
uptime
timeout 150 $B --pin --stages 2,4,8 --torch-threads 1 --epochs 1 --train-limit 15000 --max-inflight 16 --runners torch,zdni-cdni --json $OUT/pinned_w16.json 2>/tmp/a.err | grep -v "^\[bench\]" ; tail -3 /tmp/a.err
timeout 90 $B --pin --stages 4,8 --microbatches 16 --torch-threads "" --epochs 1 --train-limit 15000 --runners pipelining --json $OUT/pinned_pipe16.json 2>/tmp/b.err | grep -v "^\[bench\]"; tail -3 /tmp/b.err
timeout 80 $B --gpu --stages 4 --torch-threads "" --epochs 2 --max-inflight 16 --runners torch,zdni-cdni --json $OUT/gpu_w16.json 2>/tmp/c.err | grep -v "^\[bench\]"; tail -3 /tmp/c.err
uptime
