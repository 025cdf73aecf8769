#!/usr/bin/env bash
# The prepared GPU check (issue #28), for a machine with an NVIDIA GPU. In one go, about
# 5-8 minutes on an H100 host with 16 cores (the CUDA build is most of it):
#   1. builds the workspace with --features cuda for this GPU's compute capability;
#   2. runs the GPU exactness tests: every strategy's greedy output equals plain greedy on
#      the GPU, seeded sampling equals plain sampling (decoding/tests/gpu.rs; the fetched
#      Qwen pair when present, else a generated pair);
#   3. with two GPUs or more, tensor parallelism over NCCL: the split equals the host-sum
#      split bit for bit and follows the whole model; a failing rank does not hang
#      (engine/tests/tensor_parallel.rs, module gpu);
#   4. when the fetched models and prompts are present: `ouro-bench --device cuda` over a
#      short HumanEval slice, every strategy against greedy, and the GPU cost table
#      (forward cost by rows); with two GPUs, the same greedy/Ouroboros rows at --tp 2.
# Everything goes to one folder (default results/gpu/<date>-<gpu>/): each step's log,
# summary.md (each step's status and time), the bench tables and the cost table. A step
# that fails is recorded and the rest still run; the exit status is 1 if any failed.
#
#   scripts/fetch-models.sh qwen qwen-draft humaneval   # beforehand, where a network is
#   scripts/gpu-check.sh [OUT_DIR]
#
# The CUDA toolkit: $CUDA_HOME, or /usr/local/cuda, or nvcc on PATH (the build links
# cuBLAS, cuRAND, NVRTC, the CUDA runtime and NCCL from it). The nvidia/cuda *-devel images
# have all of it (docker/Dockerfile.cuda).
set -uo pipefail
cd "$(dirname "$0")/.."
log() { printf '[gpu-check] %s\n' "$*" >&2; }

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  log "no NVIDIA GPU here (nvidia-smi finds none); scripts/cuda-check.sh compiles the GPU path without one"
  exit 2
fi
gpus=$(nvidia-smi -L | grep -c '^GPU ')
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '-' | sed 's/-*$//')
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.[:space:]')
out="${1:-results/gpu/$(date -u +%Y-%m-%d)-$name}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

for c in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
  if [ -n "$c" ] && [ -x "$c/bin/nvcc" ]; then cuda="$c"; break; fi
done
if [ -z "${cuda:-}" ]; then
  log "no CUDA toolkit (nvcc) found: set CUDA_HOME, or use an nvidia/cuda *-devel image"
  exit 2
fi
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
export LD_LIBRARY_PATH="$cuda/lib64:$cuda/lib:${LD_LIBRARY_PATH:-}"
export CARGO_TARGET_DIR="${OURO_GPU_TARGET_DIR:-$PWD/target/gpu}"
models="${OURO_MODELS_DIR:-$HOME/.cache/ouroboros/models}"

failed=0
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$gpus x $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)," \
    "compute capability $CUDA_COMPUTE_CAP, $(nvcc --version | grep -o 'release [0-9.]*'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$out/summary.md"

# step NAME LIMIT_S COMMAND...: runs it with a time limit, its output in NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  log "$name"
  local t0=$SECONDS status
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then status=ok; else
    status="FAILED (exit $?; see $name.log)"; failed=1
  fi
  echo "| $name | $status | $((SECONDS - t0)) |" >> "$out/summary.md"
  log "$name: $status"
}
# skip NAME WHY: a step that could not run here, and why.
skip() {
  echo "| $1 | not run: $2 | - |" >> "$out/summary.md"
  log "$1 not run: $2"
}

# (cargo takes only the features of the packages a command selects and their dependencies.)
step build 900 cargo build --release --locked --features engine/cuda,decoding/cuda,bench/cuda \
  -p decoding -p engine -p bench --tests --bins
step exactness 600 cargo test --release --locked --features decoding/cuda -p decoding \
  --test gpu -- --ignored --nocapture --test-threads 1
if [ "$gpus" -ge 2 ]; then
  step tensor-parallel-nccl 600 cargo test --release --locked --features engine/cuda -p engine \
    --test tensor_parallel gpu:: -- --ignored --nocapture --test-threads 1
else
  skip tensor-parallel-nccl "one GPU ($gpus)"
fi

bench="$CARGO_TARGET_DIR/release/ouro-bench"
target="$models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
draft="$models/qwen2.5-coder-0.5b-instruct.gguf"
if [ -f "$target" ] && [ -f "$draft" ] && [ -f "$models/humaneval.prompts" ]; then
  # The paper's lookahead shape for GPUs (W=15, N=7 is its figure; 8 and 5 keep the slice
  # short), every strategy against greedy, interleaved prompt by prompt.
  step bench 600 "$bench" --device cuda --target "$target" --draft "$draft" \
    --prompts "$models/humaneval.prompts" --limit "${PROMPTS:-8}" --max-new-tokens 128 \
    --window 8 --guess 8 --level 5 --gamma 8 \
    --measure-cost-model "$out/cost-model.json" --out "$out/bench"
  if [ "$gpus" -ge 2 ]; then
    step bench-tp2 600 "$bench" --device cuda --tp 2 --target "$target" --draft "$draft" \
      --prompts "$models/humaneval.prompts" --limit 4 --max-new-tokens 128 \
      --window 8 --guess 8 --level 5 --strategies ouroboros --out "$out/bench-tp2"
  else
    skip bench-tp2 "one GPU ($gpus)"
  fi
else
  skip bench "models or prompts not in $models (scripts/fetch-models.sh qwen qwen-draft humaneval)"
fi

{
  echo
  for f in "$out"/bench/bench.md "$out"/bench-tp2/bench.md; do
    [ -f "$f" ] && { echo "## ${f#"$out"/}"; echo; cat "$f"; echo; }
  done
  echo "## test lines"
  echo
  grep -h -E '^(prompt|models|MISMATCH|SKIPPED|qwen2|llama|test result)' "$out"/exactness.log \
    "$out"/tensor-parallel-nccl.log 2>/dev/null | sed 's/^/    /'
} >> "$out/summary.md"
log "results in $out (summary.md)"
exit "$failed"
