#!/bin/bash
# The robustness benchmark (benchmarks/robustness.py) in one call of a lent GPU machine (16 CPU cores),
# sized for about 9 minutes. Run from the repository root; the machine has no internet, so the
# working tree brings Fashion-MNIST's four .gz files in .fmnist/ and Torch-Pruning's wheel in .whl/
# (both git-ignored; how to fill them: docs/gpu.md).
#
#   OUT=$OUT bash benchmarks/robustness_gpu.sh      # results in $OUT (or ./gpu-out): robustness.tgz, logs
#
# New base models (seeds 3-7, trained side by side on the GPU), then pruning trajectories (every
# method on calibration draw 0 of every base before draw 1), one worker process per trajectory with
# one CPU thread. The loops that pass 256 calibration images through the model at every step (loss
# gradients, BatchNorm refresh) run on the GPU, where that pass is cheap; the data-free ones on their
# CPU core (small Python steps, slower when time-sliced on the GPU). Evaluation and fine-tuning: GPU.
# No job starts after DEADLINE seconds or when it could not end by HARD (killed then); what finished
# is packed, with the base models, and packed every minute too. The same command continues a
# root unpacked from an earlier call's robustness.tgz (finished jobs are skipped).
#
# Settings (environment): SEEDS, DRAWS, METHODS, FINETUNE (methods fine-tuned right after pruning),
# WORKERS, DEADLINE, HARD, ROOT, DEVICE, PRUNE_DEVICE (auto, cpu or cuda); TINY=1 for a smoke test
# of the script on a CPU.
set -u
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-420}
HARD=${HARD:-490}
WORKERS=${WORKERS:-15}
ROOT=${ROOT:-runs/robustness-gpu}
SEEDS=${SEEDS:-3 4 5 6 7}
DRAWS=${DRAWS:-0 1}
METHODS=${METHODS:-connect l2 l1 connect-k100 connect-kinf connect-kinf-bngamma lamp random taylor uniform connect+refresh}
FINETUNE=${FINETUNE:-$METHODS}  # at 16x only the fine-tuned accuracy tells criteria apart (BN re-est.: ~10 %)
TINY=${TINY:-0}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/torch_pruning-*.whl >/dev/null 2>&1 && [ "$DEVICE" != cpu ]; then
  # always the carried version (an image may hold another torch_pruning)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/torch_pruning-*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 - <<'EOF' 2>&1 | tee "$OUT/machine.txt"
import os, torch, torch_pruning
print("torch", torch.__version__, "torch_pruning", getattr(torch_pruning, "__version__", None), torch_pruning.__file__,
      "cpus", os.cpu_count(), "load", os.getloadavg())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
DATA=.fmnist
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
EXTRA=""
[ "$TINY" = 1 ] && EXTRA="--tiny"

pack() {  # what has finished: every JSON, the base models and the logs (no pruned snapshots: too large)
  mkdir -p "$ROOT"
  tar czf "$1.tmp" $(find "$ROOT" -name '*.json') $(find "$ROOT/bases" -name '*.pt' 2>/dev/null) "$ROOT/logs" 2>/dev/null
  mv "$1.tmp" "$1"
}
( while sleep 60; do pack "$OUT/partial.tgz"; done ) &
PACKER=$!
python3 -m benchmarks.robustness run --root "$ROOT" --device "$DEVICE" --prune-device "${PRUNE_DEVICE:-auto}" --data-dir "$DATA" \
  --seeds $SEEDS --draws $DRAWS --methods $METHODS --finetune $FINETUNE --workers "$WORKERS" \
  --deadline "$DEADLINE" --hard-deadline "$HARD" $EXTRA 2>&1 | tee "$OUT/driver.log"
kill $PACKER 2>/dev/null
pkill -P $PACKER 2>/dev/null  # its sleep, so that it ends now
wait $PACKER 2>/dev/null
pack "$OUT/robustness.tgz"
rm -f "$OUT/partial.tgz"
python3 -m benchmarks.robustness summarize "$ROOT" --output "$OUT/summary" > /dev/null 2>&1 \
  && cp "$OUT/summary/table.md" "$OUT/table.md"
rm -rf "$OUT/summary"
echo "packed $(find "$ROOT/traj" -name 's*-d*.json' ! -name '*-ft.json' | wc -l) trajectories," \
  "$(find "$ROOT/traj" -name '*-ft.json' | wc -l) fine-tunings, $(find "$ROOT/bases" -name '*.json' | wc -l) base models"
