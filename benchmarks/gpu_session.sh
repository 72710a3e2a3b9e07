#!/usr/bin/env bash
# Device-machine steps (no network there): install, then the named steps. Logs and results go
# to $OUT (or ./out). Usage: bash benchmarks/gpu_session.sh STEP [STEP ...]
#   tune     measure the kernel's tile table for this GPU (benchmarks/tune.py), copy it to $OUT (85 s, H200, session 12;
#            102 s in session 17, before the interleaved timings were added)
#   profile  host vs GPU time of single calls, ours, cuDNN, FlexAttention (benchmarks/profile_call.py;
#            three shapes took over 200 s on an H200, FlexAttention at 16K unfinished)
#   host-cost  host time of one call, piece by piece: checks, launches, streams (benchmarks/host_cost.py, ~20 s)
#   grid-vs-profile  the fp16 D=128 dense N=1K config timed by the grid's test alone, then by profile_call.py:
#            (session 12's grid: 0.82 of FlexAttention there, profile_call 1.29; alone, session 13: 1.04 and 1.06)
#   process-context  ours at N=1K before and after FlexAttention ran in the process (benchmarks/process_context.py),
#            with inductor's compile-worker pool, then without it (TORCHINDUCTOR_COMPILE_THREADS=1); ~3 min
#   b2b-window  the D=128 dense and causal N=1K backwards back to back over long windows, event by event
#            (benchmarks/back_to_back_window.py): session 18's back-to-back time above call + synchronize
#   b2b-window-bf16  the same in bf16 (the grid's bf16 D=128 dense 1K backward back to back: 0.92 and 0.91
#            of FlexAttention, sessions 20-21, from 3 short batches)
#   b2b-window-fwd  the fp16 D=128 causal and dense N=1K forwards so (session 21's grid: causal 0.99 of
#            FlexAttention by call + synchronize, 1.18 back to back; session 23's windows: 1.178 and 1.164)
#   b2b-window-fwd-d64  the D=64 dense N=1K forwards so, fp16 then bf16 (session 21's back-to-back grids:
#            1.01 and 0.995 of FlexAttention)
#   ab       this kernel against the copy of kernels/ in ./ab/base, in one process (benchmarks/ab_kernel.py)
#   ab-call-sync  the same, timed as the speed grid times (public function, autograd, synchronized calls)
#   ab-entry  one tile-table entry changed against the table as it is, both timings at that entry's N:
#            AB_ENTRY="D128-dense N1024 dq 128 64 8 3 true" (key, N, kernel, block_m block_n warps stages TMA).
#            Copies kernels/ to ab/base first; the changed table stays in kernels/ for the steps after it
#            (77 s at N=1024 on an H200, session 21)
#   tests    the harness's tests, natively on the GPU, less the golden check (run gate with it); no longer
#            fits one call: cut at 540 s with 334 done, session 24. Run tests-kernel and tests-rest instead
#   tests-rest  the harness's tests less tests/test_kernel.py and the golden check
#   tests-kernel  tests/test_kernel.py alone on the GPU (H200: 118 tests in 295 s, session 10; 121 in 161-228 s, session 11; 124 in 164-280 s, session 13;
#            131 in 287 s, session 18)
#   props     the property suite as the README's test command runs it (its default profile, through the
#            plugin's call-timeout threads, which tests-kernel does not use): after any kernel change (H200: 90 s, session 18)
#   props-thorough-1, props-thorough-2  the thorough profile on the bundled kernel in halves: 16 shards,
#            8 per call, 128 tests on 16 workers each (whole, it was cut at 455 s: 116-121 of 8 shards' 128
#            tests finished on an H200, sessions 10-12 and 15; the halves took 315 s and 205 s, session 18); join the two
#            reports with flashverify merge-properties
#   golden   write this GPU's golden file (flashverify, naive) and copy it to $OUT
#   gate     flashverify golden check against the committed golden file of this GPU
#   report   the H100 report: flashverify, SDPA flash/efficient, naive (+ FlexAttention as a second
#            measurement, merged), as $OUT/report.tgz
#   props-release-1 .. props-release-3   the release profile on the bundled kernel, a third each
#   props-torch   torch's kernels (SDPA backends, FlexAttention) with the ci profile
#   bench-fp16, bench-bf16   half the speed grid each (about 4 min each with timed rounds: 241 s for fp16 on an H200,
#            before the back-to-back time was added to each test), with the floors; tables of both timings
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
harness_tests() {   # LOG [PYTEST ARGS...]: tests/ less the committed-golden test, the gate step's check
  local log=$1; shift
  timeout -s INT 540 python3 -m pytest -q -p no:cacheprovider -n 16 -rfE --tb=short --durations=15 tests "$@" \
    --deselect tests/test_golden.py::test_committed_golden_for_this_platform_holds 2>&1 \
    | tee "$OUT/$log" | grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)"
}
for step in "$@"; do
  start=$SECONDS
  case $step in
    tune)
      timeout 300 python3 benchmarks/tune.py 2>&1 | tee "$OUT/tune.log" | tail -14
      for f in kernels/tiles/*.json; do cp "$f" "$OUT/tiles-$(basename "$f")"; done ;;
    host-cost)
      timeout 120 python3 benchmarks/host_cost.py 2>&1 | tee "$OUT/host-cost.log" ;;
    grid-vs-profile)
      python3 benchmarks/test_speed.py -k "fp16 and D128 and dense and N1K" >/dev/null 2>&1   # compile first, as the grid's step does
      timeout 120 python3 -m pytest -q -p no:cacheprovider benchmarks/test_speed.py -k "fp16 and D128 and dense and N1K" \
        --benchmark-json="$OUT/grid-alone.json" --benchmark-disable-gc >"$OUT/grid-alone.log" 2>&1
      python3 benchmarks/summarize.py "$OUT/grid-alone.json" | tee "$OUT/grid-alone.txt"
      python3 benchmarks/summarize.py "$OUT/grid-alone.json" --back-to-back | tee -a "$OUT/grid-alone.txt"
      timeout 200 python3 benchmarks/profile_call.py 128 1024 0 2>&1 | tee "$OUT/profile-128-1024.log" | grep -E "call\+sync" ;;
    process-context)   # as the grid runs (inductor's pool of compile workers), then without that pool
      timeout 200 python3 benchmarks/process_context.py 2>&1 | tee "$OUT/process-context.log"
      TORCHINDUCTOR_COMPILE_THREADS=1 timeout 200 python3 benchmarks/process_context.py 2>&1 \
        | tee "$OUT/process-context-one-compile-thread.log" ;;
    b2b-window)   # the D=128 1K backwards back to back over 2 s windows, ours/FlexAttention/cuDNN (138 s, H200, session 20)
      timeout 200 python3 benchmarks/back_to_back_window.py 2>&1 | tee "$OUT/b2b-window.log" | tail -14 ;;
    b2b-window-bf16)
      timeout 200 python3 benchmarks/back_to_back_window.py --dtype bf16 2>&1 | tee "$OUT/b2b-window-bf16.log" | tail -14 ;;
    b2b-window-fwd)
      timeout 200 python3 benchmarks/back_to_back_window.py --direction fwd 128 1024 1 128 1024 0 2>&1 \
        | tee "$OUT/b2b-window-fwd.log" | tail -14 ;;
    b2b-window-fwd-d64)
      for dt in fp16 bf16; do
        timeout 150 python3 benchmarks/back_to_back_window.py --dtype $dt --direction fwd 64 1024 0 2>&1 \
          | tee "$OUT/b2b-window-fwd-d64-$dt.log" | tail -4
      done ;;
    ab)
      timeout 200 python3 benchmarks/ab_kernel.py ab/base 2>&1 | tee "$OUT/ab.log" | tail -13 ;;
    ab-call-sync)
      timeout 240 python3 benchmarks/ab_kernel.py ab/base --call-sync 2>&1 | tee "$OUT/ab-call-sync.log" | tail -13 ;;
    ab-entry)
      rm -rf ab/base && mkdir -p ab && cp -r kernels ab/base
      n=$(python3 benchmarks/set_tile.py ${AB_ENTRY:?"set AB_ENTRY, e.g. AB_ENTRY=\"D128-dense N1024 dq 128 64 8 3 true\""}) || exit 1
      timeout 100 python3 benchmarks/ab_kernel.py ab/base --n "$n" 2>&1 | tee "$OUT/ab-entry.log" | tail -8
      timeout 150 python3 benchmarks/ab_kernel.py ab/base --n "$n" --call-sync 2>&1 | tee "$OUT/ab-entry-call-sync.log" | tail -8 ;;
    profile)
      timeout 300 python3 benchmarks/profile_call.py 2>&1 | tee "$OUT/profile.log" | grep -E "call\+sync" ;;
    tests)
      harness_tests tests.log ;;
    tests-rest)
      harness_tests tests-rest.log --ignore tests/test_kernel.py ;;
    tests-kernel)   # the kernel's own tests alone (3-5 min): after a launch or tile change
      timeout -s INT 420 python3 -m pytest -q -p no:cacheprovider -n 16 -rfE --tb=short tests/test_kernel.py 2>&1 \
        | tee "$OUT/tests-kernel.log" | grep -E "^(FAILED|ERROR)|passed|failed" ;;
    golden)
      timeout -s INT 240 flashverify golden update --jobs 14 2>&1 | tee "$OUT/golden.log" | grep -v "errors \["
      cp golden/nvidia-*.json "$OUT/" ;;
    gate)
      timeout 240 flashverify golden check --jobs 14 2>&1 | grep -v "errors \[" | tee "$OUT/gate.log" | tail -20 ;;
    report)   # FlexAttention beside the others: its compiles (one per shape) overlap theirs
      rm -rf rep && mkdir rep
      timeout 470 flashverify report --impl flex --jobs 7 --search-examples 14 --out rep/flex >rep/flex.log 2>&1 &
      timeout 470 flashverify report --impl flashverify --impl sdpa-flash --impl sdpa-efficient --impl naive \
        --jobs 9 --search-examples 27 --out rep/main >rep/main.log 2>&1
      wait
      grep -hv "errors \[" rep/main.log rep/flex.log | tail -8
      data=(); for d in main flex; do [ -f rep/$d/report.json ] && data+=(--data rep/$d/report.json); done
      flashverify report "${data[@]}" --out rep/h100 | tail -3
      tar czf "$OUT/report.tgz" rep ;;
    props-release-[1-3])   # the release profile in thirds: 12 shards of 25 examples per property, 4 per call,
      q=${step#props-release-}   # so 16 workers share 64 short tests (quarters of one long test per
      k=$(seq -f "shard%gof12" $((4 * q - 3)) $((4 * q)) | paste -sd' ' | sed 's/ / or /g')   # property idled workers)
      timeout -s INT 575 python3 -m pytest -q -p no:cacheprovider -n 16 --pyargs flashverify.properties \
        --attn-profile release --attn-shards 12 -k "$k" --attn-report "$OUT/props-release-$q.json" \
        --durations=20 2>&1 \
        | tee "$OUT/props-release-$q.log" | grep -v PytestBenchmarkWarning | sed -n '/properties per implementation/,$p' ;;
    props)
      timeout -s INT 400 python3 -m pytest -q -p no:cacheprovider -n 16 --pyargs flashverify.properties \
        --attn-report "$OUT/props.json" 2>&1 | tee "$OUT/props.log" | grep -v PytestBenchmarkWarning \
        | sed -n '/properties per implementation/,$p' ;;
    props-thorough-[12])
      h=${step#props-thorough-}
      k=$(seq -f "shard%gof16" $((8 * h - 7)) $((8 * h)) | paste -sd' ' | sed 's/ / or /g')
      timeout -s INT 540 python3 -m pytest -q -p no:cacheprovider -n 16 --pyargs flashverify.properties \
        --attn-profile thorough --attn-shards 16 -k "$k" --attn-report "$OUT/props-thorough-$h.json" \
        --durations=20 2>&1 \
        | tee "$OUT/props-thorough-$h.log" | grep -v PytestBenchmarkWarning | sed -n '/properties per implementation/,$p' ;;
    props-torch)
      timeout -s INT 300 python3 -m pytest -q -p no:cacheprovider -n 14 --pyargs flashverify.properties --attn-profile ci \
        --attn-impl sdpa-flash --attn-impl sdpa-efficient --attn-impl sdpa-cudnn --attn-impl sdpa-math \
        --attn-impl flex --attn-report "$OUT/props-torch.json" 2>&1 | tee "$OUT/props-torch.log" \
        | sed -n '/properties per implementation/,$p' | head -90 ;;
    bench-fp16|bench-bf16)
      dt=${step#bench-}
      python3 benchmarks/floors.py "$OUT/floors.json" >/dev/null
      timeout 200 python3 benchmarks/test_speed.py -k "$dt" 2>&1 | tail -4
      timeout -s INT 330 python3 -m pytest -q -p no:cacheprovider benchmarks/test_speed.py -k "$dt" \
        --benchmark-json="$OUT/bench-$dt.json" --benchmark-disable-gc >"$OUT/bench-$dt.log" 2>&1
      tail -3 "$OUT/bench-$dt.log"
      python3 benchmarks/summarize.py "$OUT/bench-$dt.json" --floors "$OUT/floors.json" | tee "$OUT/bench-$dt.txt"
      python3 benchmarks/summarize.py "$OUT/bench-$dt.json" --floors "$OUT/floors.json" --back-to-back \
        | tee "$OUT/bench-$dt-back-to-back.txt" ;;
    *) echo "unknown step $step; the steps: tune profile host-cost grid-vs-profile process-context b2b-window b2b-window-bf16 b2b-window-fwd b2b-window-fwd-d64 ab ab-call-sync ab-entry tests tests-kernel tests-rest golden gate report" \
         "props props-release-1 props-release-2 props-release-3 props-thorough-1 props-thorough-2 props-torch bench-fp16 bench-bf16" >&2; exit 2 ;;
  esac
  echo "== $step: $((SECONDS - start)) s"
done
