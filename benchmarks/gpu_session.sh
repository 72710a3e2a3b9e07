#!/usr/bin/env bash
# Device-machine steps (no network there): install, then the named steps. Logs and results go
# to $OUT (or ./out). Usage: bash benchmarks/gpu_session.sh STEP [STEP ...]
#   tune     measure the kernel's tile table for this GPU (benchmarks/tune.py), copy it to $OUT
#   tests    the harness's tests, natively on the GPU
#   golden   write this GPU's golden file (flashverify, naive) and copy it to $OUT
#   gate     flashverify golden check against the committed golden file of this GPU
#   report   the H100 report: flashverify, SDPA flash/efficient, naive (+ FlexAttention as a second
#            measurement, merged), as $OUT/report.tgz
#   props-release-a, props-release-b   the release profile on the bundled kernel, in two halves
#   props-torch   torch's kernels (SDPA backends, FlexAttention) with the ci profile
#   bench-fp16, bench-bf16   half the speed grid each (one 10-minute call each), with the floors
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for step in "$@"; do
  start=$SECONDS
  case $step in
    tune)
      timeout 200 python3 benchmarks/tune.py 2>&1 | tee "$OUT/tune.log" | tail -14
      for f in kernels/tiles/*.json; do cp "$f" "$OUT/tiles-$(basename "$f")"; done ;;
    tests)
      timeout -s INT 300 python3 -m pytest -q -p no:cacheprovider -n 14 -rfE --tb=short tests 2>&1 | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" ;;
    golden)
      timeout 90 python3 benchmarks/warm_cache.py 2>&1 | tail -3
      timeout -s INT 150 flashverify golden update 2>&1 | tee "$OUT/golden.log" | grep -v "errors \["
      cp golden/nvidia-*.json "$OUT/" ;;
    gate)
      timeout 240 flashverify golden check 2>&1 | grep -v "errors \[" | tee "$OUT/gate.log" | tail -20 ;;
    report)
      rm -rf rep && mkdir rep
      timeout 90 python3 benchmarks/warm_cache.py 2>&1 | tail -1
      timeout 300 flashverify report --impl flashverify --impl sdpa-flash --impl sdpa-efficient --impl naive \
        --search-examples 30 --out rep/main 2>&1 | grep -v "errors \[" | tail -5
      timeout 200 flashverify report --impl flex --search-examples 10 --out rep/flex 2>&1 | grep -v "errors \[" | tail -5
      flashverify report --data rep/main/report.json --data rep/flex/report.json --out rep/h100 | tail -3
      tar czf "$OUT/report.tgz" rep ;;
    props-release-a|props-release-b)   # the release profile in two halves (two 10-minute calls)
      half=${step#props-release-}; k="shard1of4 or shard2of4"; [ "$half" = b ] && k="shard3of4 or shard4of4"
      timeout -s INT 540 python3 -m pytest -q -p no:cacheprovider -n 14 --pyargs flashverify.properties \
        --attn-profile release --attn-shards 4 -k "$k" --attn-report "$OUT/props-release-$half.json" 2>&1 \
        | tee "$OUT/props-release-$half.log" | grep -v PytestBenchmarkWarning | tail -25 ;;
    props-torch)
      timeout -s INT 300 python3 -m pytest -q -p no:cacheprovider -n 14 --pyargs flashverify.properties --attn-profile ci \
        --attn-impl sdpa-flash --attn-impl sdpa-efficient --attn-impl sdpa-cudnn --attn-impl sdpa-math \
        --attn-impl flex --attn-report "$OUT/props-torch.json" 2>&1 | tee "$OUT/props-torch.log" \
        | sed -n '/properties per implementation/,$p' | head -90 ;;
    bench-fp16|bench-bf16)
      dt=${step#bench-}
      python3 benchmarks/floors.py "$OUT/floors.json" >/dev/null
      timeout 520 python3 -m pytest -q -p no:cacheprovider benchmarks/test_speed.py -k "$dt" \
        --benchmark-json="$OUT/bench-$dt.json" --benchmark-disable-gc >"$OUT/bench-$dt.log" 2>&1
      tail -3 "$OUT/bench-$dt.log"
      python3 benchmarks/summarize.py "$OUT/bench-$dt.json" --floors "$OUT/floors.json" | tee "$OUT/bench-$dt.txt" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step: $((SECONDS - start)) s"
done
