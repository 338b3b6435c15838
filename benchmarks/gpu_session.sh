#!/bin/bash
# One prepared run of the ranking benchmark on a lent GPU machine (ResNet-20 and ResNet-56), sized for a
# single call of about 9 minutes. Run from the repository root; the machine has no internet, so
# the working tree brings Fashion-MNIST's four .gz files in .fmnist/ and Torch-Pruning's wheel in
# .whl/ (both git-ignored; how to fill them: docs/gpu.md).
#
#   bash benchmarks/gpu_session.sh            # results in $OUT (or ./gpu-out): results.tgz, logs
#
# Two drivers share the machine: ResNet-20 (the CPU protocol, seeds 0-2, every method) on most
# cores, and ResNet-56 with 3 fine-tuning epochs (seed 0, a few methods) on the rest. Each stops
# starting jobs at its deadline; whatever finished is packed.
set -u
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-460}   # seconds after start; the drivers then stop within ~30 s
R20_WORKERS=${R20_WORKERS:-14}
R56_WORKERS=${R56_WORKERS:-2}
PRESET=${PRESET:-ranking}   # ranking-cosine: the lower-noise fine-tuning (docs/benchmarks.md)
mkdir -p "$OUT"
if [ -d .whl ]; then  # always the carried version (an image may hold another torch_pruning)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 - <<'EOF' 2>&1 | tee "$OUT/machine.txt"
import os, torch, torch_pruning
print("torch", torch.__version__, "torch_pruning", getattr(torch_pruning, "__version__", None), torch_pruning.__file__, "cpus", os.cpu_count())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
# Pack what has finished every minute too, so that a call cut off at its limit still returns it.
( while sleep 60; do tar czf "$OUT/partial.tgz" $(find runs/gpu -name '*.json') 2>/dev/null; done ) &
PACKER=$!
DATA=.fmnist
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
python3 -m benchmarks.ranking_parallel --seeds 0 1 2 --preset "$PRESET" --workers "$R20_WORKERS" --device "$DEVICE" \
  --data-dir "$DATA" --root "runs/gpu/$PRESET" --deadline "$DEADLINE" > "$OUT/driver-resnet20.log" 2>&1 &
python3 -m benchmarks.ranking_parallel --seeds 0 --preset ranking-resnet56 --workers "$R56_WORKERS" \
  --methods connect-kinf l2 taylor connect-k3 connect-k1 random uniform lamp l1 \
  --device "$DEVICE" --data-dir "$DATA" --root runs/gpu/ranking-resnet56 --deadline "$DEADLINE" \
  > "$OUT/driver-resnet56.log" 2>&1 &
wait %2 %3
kill $PACKER 2>/dev/null
tail -n 3 "$OUT"/driver-*.log
# Results, logs and the base models (about 1-3 MB each): a later lease continues from them when the
# tarball is unpacked into the working tree again (the drivers resume).
tar czf "$OUT/results.tgz" $(find runs/gpu -name '*.json') $(find runs/gpu -path '*/base/base.pt') runs/gpu/*/logs
echo "packed $(find runs/gpu -path '*results/*.json' | wc -l) results"
