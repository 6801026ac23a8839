#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension against the installed jaxlib,
# run the GPU tests, run compute-sanitizer over a small run of every kernel, and run
# the benchmarks. Writes logs, JSON and tables under OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR [build] [test] [sanitize] [profile] [trace] [bench] [bench-quick] [combine-probe] [split-probe] [group-probe] [route-probe]
# With no stage names, runs all four full stages. Each stage appends a line to
# OUT_DIR/summary.txt; the script exits non-zero if any stage failed.
# Narrowing a call (device time is short), all optional:
#   GPU_TEST_K="expr"       pytest -k expression for the test stage
#   SANITIZERS="memcheck"   compute-sanitizer tools (default: all four)
#   SANITIZE_ARGS="--small" arguments of scripts/sanitize_kernels.py
#   SANITIZE_TIMEOUT=300    seconds per sanitizer tool (default 600)
#   BENCHES="bench_route bench_gemv"   which benchmarks the bench stage runs
#   BENCH_ROUTE_ARGS, BENCH_COMBINE_ARGS, BENCH_GEMV_ARGS, BENCH_MOE_ARGS: extra args
#   TRACE_ARGS="--shapes gemma4 --tokens 1"   arguments of scripts/trace_chain.py
#   PROBE_TOKENS, PROBE_FORMS, PROBE_SETS     scripts/combine_xla_probe.py (combine-probe
#                           stage: XLA formulations of combine's sum, no extension needed)
#   SPLIT_PROBE_ARGS="gemma4,qwen3 1,2,4 100"  arguments of scripts/split_probe.cu (split-probe
#                           stage: expert_gemv's split kernels against the stream kernel, no JAX)
#   GROUP_PROBE_ARGS="gemma4,qwen3 1,2 200"  arguments of scripts/group_probe.cu (group-probe
#                           stage: expert_gemv's group kernel against the stream kernel, no JAX)
#   ROUTE_PROBE_ARGS="1,8,16 64"  arguments of scripts/route_probe.cu (route-probe stage:
#                           the route kernels and the cluster kernel's stages, no JAX)
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [stages...]}
shift
STAGES=${*:-build test sanitize bench}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
status=0
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }

if has build; then
  # In-place CMake build (equivalent to pip install --no-build-isolation -e .):
  # headers from this machine's jaxlib, sm_90a only to keep the build short.
  t0=$(date +%s)
  if cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
       -DPython_EXECUTABLE="$(command -v $PY)" -DJAX_MOE_CUDA=ON \
       -DJAX_MOE_CUDA_ARCHS="${JAX_MOE_CUDA_ARCHS:-90a-real}" >"$OUT/build.log" 2>&1 &&
     cmake --build build/gpu -j "$(nproc)" >>"$OUT/build.log" 2>&1; then
    cp build/gpu/_jax_moe_*.so jax_moe/
    note "build: ok ($(( $(date +%s) - t0 )) s)"
  else
    tail -30 "$OUT/build.log"; note "build: FAILED"; exit 1
  fi
  # The HBM floor's read bandwidth: a plain CUDA streaming read over 4 GiB, passed
  # to the benchmarks (harness.measure_read_bandwidth takes the fastest candidate).
  if nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc -DJAX_MOE_STREAM_TRACE scripts/stream_probe.cu \
       -o build/gpu/stream_probe >>"$OUT/build.log" 2>&1; then
    JAX_MOE_READ_BW_GBPS=$(build/gpu/stream_probe --read-bw) && export JAX_MOE_READ_BW_GBPS
    note "read bandwidth (CUDA read kernel): ${JAX_MOE_READ_BW_GBPS:-?} GB/s"
  else
    note "stream_probe: build FAILED (benchmarks use XLA's read rate alone)"
  fi
  $PY -c "import jax, jax_moe; print(jax.__version__, jax.devices()); print(jax_moe.build_info())" \
    2>&1 | tee "$OUT/env.txt"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv >>"$OUT/env.txt" 2>&1
fi

if has test; then
  if $PY -m pytest -m gpu -q -p no:cacheprovider ${GPU_TEST_K:+-k "$GPU_TEST_K"} tests/ \
       >"$OUT/gpu_tests.log" 2>&1; then
    note "gpu tests: $(tail -1 "$OUT/gpu_tests.log")"
  else
    grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
    note "gpu tests: FAILED: $(tail -1 "$OUT/gpu_tests.log")"; status=1
  fi
fi

if has sanitize; then
  for tool in ${SANITIZERS:-memcheck racecheck initcheck synccheck}; do
    log="$OUT/sanitizer_$tool.log"
    # Platform allocator: every buffer its own allocation, so overruns are caught.
    # API checks off: XLA copies our partly-unwritten scratch outputs (by design);
    # what we check is every device access made by the kernels.
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      timeout "${SANITIZE_TIMEOUT:-600}" compute-sanitizer --tool "$tool" --error-exitcode 7 --check-api-memory-access no \
      $PY scripts/sanitize_kernels.py ${SANITIZE_ARGS:-} >"$log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
    if [ $rc -eq 0 ]; then note "sanitizer $tool: ok ($summary)"; else
      grep -E "=========" "$log" | head -20; note "sanitizer $tool: FAILED rc=$rc ($summary)"; status=1; fi
  done
fi

if has profile; then
  # Per-kernel times with caches flushed (ncu's default), clocks left alone.
  # No preallocation: ncu itself holds device memory.
  XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name regex:'gemv_|route_|combine' --csv \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
      $PY scripts/profile_kernels.py "$OUT/profile_manifest.json" >"$OUT/ncu.csv" 2>"$OUT/ncu.err" &&
    $PY scripts/ncu_table.py "$OUT/ncu.csv" "$OUT/profile_manifest.json" "$OUT/ncu.json" \
      >"$OUT/bench_ncu.log" 2>&1 && note "ncu profile: ok" ||
    { tail -20 "$OUT/ncu.err"; note "ncu profile: FAILED"; status=1; }
fi

if has trace; then
  # Per-kernel durations and stream gaps of the decode chains (profiler trace).
  # shellcheck disable=SC2086
  if $PY scripts/trace_chain.py ${TRACE_ARGS:-} >"$OUT/trace_chain.log" 2>&1; then
    note "trace_chain: ok"
  else
    tail -20 "$OUT/trace_chain.log"; note "trace_chain: FAILED"; status=1
  fi
fi

if has combine-probe; then
  # PROBE_HLO_DIR: where the compiled HLO goes (many files; default under OUT_DIR)
  if $PY scripts/combine_xla_probe.py "${PROBE_HLO_DIR:-$OUT/combine_probe_hlo}" >"$OUT/combine_probe.log" 2>&1; then
    note "combine_xla_probe: ok"; grep -v -i warn "$OUT/combine_probe.log"
  else
    tail -20 "$OUT/combine_probe.log"; note "combine_xla_probe: FAILED"; status=1
  fi
fi

run_probe() {  # name, default arguments: build scripts/NAME.cu (CUDA only, no JAX) and run it
  local name=$1 args=$2
  if ! { mkdir -p build && nvcc -std=c++17 -O3 -arch=sm_90a -Icsrc "scripts/$name.cu" \
           -o "build/$name" >"$OUT/$name.build.log" 2>&1; }; then
    tail -20 "$OUT/$name.build.log"; note "$name: build FAILED"; status=1; return
  fi
  # shellcheck disable=SC2086
  if "build/$name" $args >"$OUT/$name.log" 2>&1; then
    note "$name: ok"; cat "$OUT/$name.log"
  else
    tail -20 "$OUT/$name.log"; note "$name: FAILED"; status=1
  fi
}
has split-probe && run_probe split_probe "${SPLIT_PROBE_ARGS:-gemma4,qwen3 1,2,4 100}"
has group-probe && run_probe group_probe "${GROUP_PROBE_ARGS:-gemma4,qwen3 1,2 200}"
has route-probe && run_probe route_probe "${ROUTE_PROBE_ARGS:-1,8,16 64}"

run_bench() {  # name, args...
  local name=$1; shift
  if $PY "benchmarks/$name.py" --out "$OUT" "$@" >"$OUT/$name.log" 2>&1; then
    note "$name: ok"
  else
    tail -20 "$OUT/$name.log"; note "$name: FAILED"; status=1
  fi
}
bench_args() {  # extra arguments of one benchmark, from BENCH_<NAME>_ARGS
  case $1 in
    bench_route) echo "${BENCH_ROUTE_ARGS:-}";; bench_combine) echo "${BENCH_COMBINE_ARGS:-}";;
    bench_gemv) echo "${BENCH_GEMV_ARGS:-}";; bench_moe) echo "${BENCH_MOE_ARGS:-}";;
  esac
}
if has bench; then
  for b in ${BENCHES:-bench_route bench_combine bench_gemv bench_moe}; do
    # shellcheck disable=SC2046
    [ -f "benchmarks/$b.py" ] && run_bench "$b" $(bench_args "$b")
  done
fi
if has bench-quick; then
  for b in bench_route bench_combine bench_gemv bench_moe; do
    [ -f "benchmarks/$b.py" ] && run_bench "$b" --quick
  done
fi
# The tables last, so they end up in the caller's output tail.
for f in "$OUT"/bench_*.log; do [ -f "$f" ] && { echo; sed -n '/^$/,$p' "$f" | tail -45; }; done
[ -f "$OUT/bench_ncu.log" ] && { echo; cat "$OUT/bench_ncu.log"; }
echo; cat "$OUT/summary.txt"
exit $status
