#!/usr/bin/env bash
# Compiles the GPU path without a GPU: fetches the CUDA 13.4 compiler from PyPI wheels
# (nvcc, cicc/NVVM, the CRT and runtime headers, CCCL; about 130 MB, once, into
# .tools/cuda-13.4), type-checks the whole workspace with every crate's `cuda` feature
# (candle's CUDA backend and its kernels, built to sm_90 PTX by nvcc, our NCCL tensor
# parallelism, the GPU tests), then builds and links the three binaries of the CUDA image
# against link stubs (libraries with the real sonames whose functions only return an
# error), as no wheel ships libcuda. It runs in CI beside the CPU tests; nothing here needs
# a GPU or a driver. 13.4 is the newest CUDA that candle 0.11's cudarc accepts; the -cu12
# nvcc wheels hold only ptxas.
#
#   scripts/cuda-check.sh            (CUDA_COMPUTE_CAP defaults to 90, the H100)
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${OURO_TOOLS_DIR:-$PWD/.tools}"
cuda="$tools/cuda-13.4"
log() { printf '[cuda-check] %s\n' "$*" >&2; }

if [ ! -x "$cuda/bin/nvcc" ] || [ ! -x "$cuda/nvvm/bin/cicc" ]; then
  log "fetching the CUDA 13.4 compiler wheels from PyPI into $cuda"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_12_x86_64 --python-version 3.11 -d "$wheels" \
    nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-crt==13.4.92 \
    nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl==13.3.5.0.6
  rm -rf "$cuda.tmp" && mkdir -p "$cuda.tmp"
  for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$cuda.tmp/"; done
  # Wheels do not keep the executable bits.
  chmod +x "$cuda.tmp"/nvidia/cu13/bin/* "$cuda.tmp"/nvidia/cu13/nvvm/bin/*
  rm -rf "$cuda" && mv "$cuda.tmp/nvidia/cu13" "$cuda" && rm -rf "$cuda.tmp"
fi
# Link stubs: libraries with the real sonames (libcuda.so.1, libcublas.so.13, ...) whose
# every function, named from cudarc's bindings, returns an error. They let the binaries
# link here; at run time a GPU machine's driver and CUDA libraries are loaded instead
# (the stubs are never installed). cudarc searches $CUDA_HOME/lib64/stubs, as for the
# toolkit's own libcuda stub.
stubs="$cuda/lib64/stubs"
if [ ! -f "$stubs/.complete" ]; then
  log "writing link stubs into $stubs"
  cudarc=$(cargo metadata --format-version 1 --locked --features engine/cuda 2>/dev/null |
    python3 -c 'import json, sys, os; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
  mkdir -p "$stubs"
  for spec in cuda:driver:libcuda.so.1 nccl:nccl:libnccl.so.2 nvrtc:nvrtc:libnvrtc.so.13 \
      curand:curand:libcurand.so.10 cublas:cublas:libcublas.so.13 cublasLt:cublaslt:libcublasLt.so.13; do
    IFS=: read -r lib module soname <<< "$spec"
    # Every function declared in the bindings' extern blocks, as `int NAME(void)`.
    grep -ohE '^\s+fn [A-Za-z_][A-Za-z0-9_]*\(' "$cudarc/src/$module/sys/"*.rs | sed -E 's/^\s+fn //; s/\($//' |
      sort -u | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$stubs/$lib.c"
    cc -shared -fPIC -o "$stubs/lib$lib.so" -Wl,-soname,"$soname" "$stubs/$lib.c"
    rm "$stubs/$lib.c"
  done
  # candle's MoE kernels link the CUDA runtime, which the runtime wheel ships versioned only.
  ln -sf ../../lib/libcudart.so.13 "$stubs/libcudart.so"
  touch "$stubs/.complete"
fi
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# Every crate's cuda feature (scripts/gpu-check.sh builds with the same list).
CUDA_FEATURES=engine/cuda,decoding/cuda,orchestrator/cuda,bench/cuda,target-service/cuda,draft-service/cuda
log "$(nvcc --version | tail -2 | head -1), compute capability $CUDA_COMPUTE_CAP"
# Its own target folder: the CPU build's artifacts stay as they are.
# The whole workspace, tests included: the NCCL tensor parallelism (engine/src/tp.rs), the
# GPU tests that scripts/gpu-check.sh runs (decoding/tests/gpu.rs, the `gpu` module of
# engine/tests/tensor_parallel.rs) and the binaries' --device cuda paths.
CARGO_TARGET_DIR="${OURO_CUDA_TARGET_DIR:-$PWD/target/cuda-check}" \
  cargo check --release --locked --workspace --all-targets --features "$CUDA_FEATURES"
log "the cuda build type-checks"
# And the three binaries of the CUDA image build and link (against the stubs above), as
# docker/Dockerfile.cuda builds them.
CARGO_TARGET_DIR="${OURO_CUDA_TARGET_DIR:-$PWD/target/cuda-check}" \
  cargo build --release --locked -p orchestrator -p target-service -p draft-service --bins \
  --features orchestrator/cuda,target-service/cuda,draft-service/cuda
log "the cuda binaries build and link (ouro, target-service, draft-service)"
