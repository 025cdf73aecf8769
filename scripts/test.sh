#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches the small real models the tests
# use (SmolLM2-135M, the Qwen2.5-Coder 0.5B draft and its tokenizer.json, the 1.5B target; about 1.7 GB,
# once, into $OURO_MODELS_DIR), then builds and tests in one optimized profile, then checks
# that the CUDA build compiles and links (scripts/cuda-check.sh: nvcc from PyPI into .tools/), checks
# the Helm chart (scripts/test-chart.sh: helm and the validator are fetched into .tools/)
# and runs the three services as real processes under a Python grpcio client
# (tests/e2e/run.sh), and ends with a smoke run of the benchmark harness (`ouro-bench
# --quick`, the 0.5B model as target and draft).
# Tests that print SKIPPED (a model file missing) are counted apart and named; outside
# scripts/may-skip.txt they fail the run. Kernels this CPU cannot run are named too.
set -euo pipefail
cd "$(dirname "$0")/.."
# The 1.5B target (1.1 GB) too, so the tests on the real target run here as well.
scripts/fetch-models.sh smollm tokenizer qwen-draft qwen
cargo build --release --locked --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --show-output prints what passing tests printed, under a "---- NAME stdout ----" header,
# so a test that found nothing to run (its model missing, say) and said SKIPPED is seen.
cargo test --release --locked --workspace -- --show-output 2>&1 | tee "$log"
# One closing line over all test binaries: tests that skipped are counted apart from those
# that passed, by name.
skipped=$(awk '/^---- .* stdout ----$/ { name = $2 } /SKIPPED/ && name != "" { print name; name = "" }' "$log" | sort -u)
awk -v skipped="$(printf '%s' "$skipped" | grep -c . || true)" '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) g += $(i-1) } }
  END { printf "%d passed, %d failed, %d skipped, %d ignored\n", p - skipped, f, skipped, g }' "$log"
if [ -n "$skipped" ]; then
  echo "skipped tests:"; printf '  %s\n' $skipped
fi
# Kernel tests run every kernel this CPU runs and name the ones it cannot (not a skip:
# what runs here was checked, the portable paths always).
not_run=$(grep -o 'KERNEL NOT RUN: .*' "$log" | sort -u || true)
if [ -n "$not_run" ]; then
  echo "kernels this CPU cannot run, so not tested here:"; printf '%s\n' "$not_run" | sed 's/^KERNEL NOT RUN: /  /'
else
  echo "kernels: every SIMD kernel ran on this CPU"
fi
# A test may skip here only if scripts/may-skip.txt names it.
allowed=$(grep -v '^#' scripts/may-skip.txt | grep . || true)
unexpected=$(comm -23 <(printf '%s\n' $skipped | grep . | sort -u) <(printf '%s\n' $allowed | sort -u))
if [ -n "$unexpected" ]; then
  echo "tests skipped that must run here (scripts/may-skip.txt):"; printf '  %s\n' $unexpected
  exit 1
fi
# The GPU path compiled without a GPU: CUDA 13.4's nvcc from PyPI wheels, candle's CUDA
# kernels and our code type-checked with --features cuda (its own target folder).
scripts/cuda-check.sh
scripts/test-chart.sh
tests/e2e/run.sh
# Benchmark smoke: every strategy on two prompts, tables, JSON and chart written.
models="${OURO_MODELS_DIR:-$HOME/.cache/ouroboros/models}"
bench_out=$(mktemp -d)
target/release/ouro-bench --quick --window 2 --guess 2 --level 4 --gamma 4 \
  --target "$models/qwen2.5-coder-0.5b-instruct.gguf" \
  --draft "$models/qwen2.5-coder-0.5b-instruct.gguf" --out "$bench_out"
test -s "$bench_out/bench.md" && test -s "$bench_out/bench.json"
grep -q '"name": "auto"' "$bench_out/bench.json"
rm -rf "$bench_out"
echo "bench smoke: ok"
