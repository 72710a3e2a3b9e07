#!/usr/bin/env bash
# One device-machine session: install without network, run the tests natively, the main job,
# accuracy vs SDPA, and the speed benchmarks. Logs go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step=${1:-all}
if [[ $step == all || $step == tests ]]; then
  python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [[ $step == all || $step == verify ]]; then
  flashverify verify --json "$OUT/verify.json" 2>&1 | tee "$OUT/verify.log" | tail -12
fi
if [[ $step == all || $step == accuracy ]]; then
  python3 benchmarks/accuracy.py 2048 128 2>&1 | tee "$OUT/accuracy.log"
fi
if [[ $step == all || $step == bench ]]; then
  python3 -m pytest -q -p no:cacheprovider benchmarks/test_speed.py --benchmark-json="$OUT/bench.json" \
    --benchmark-disable-gc >"$OUT/bench.log" 2>&1; tail -3 "$OUT/bench.log"
  python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/bench_summary.txt"
fi
