#!/usr/bin/env bash
# Runs tests/e2e/three_processes.py with grpcio from a venv under .tools/ (created once).
# Needs the built binaries (cargo build --release) and the Qwen 0.5B model + tokenizer
# (scripts/fetch-models.sh qwen-draft tokenizer).
set -euo pipefail
cd "$(dirname "$0")/../.."
tools="${OURO_TOOLS_DIR:-$PWD/.tools}"
venv="$tools/venv-grpc"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import grpc_tools, grpc_health, grpc_reflection, grpc_status, openai" 2>/dev/null; then
  echo "[e2e] installing grpcio (tools, health, reflection, status) and openai into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 \
    grpcio-reflection==1.85.1 grpcio-status==1.85.1 openai==3.51.0
fi
"$venv/bin/python" tests/e2e/three_processes.py "${OURO_BIN_DIR:-target/release}" \
  "${OURO_MODELS_DIR:-$HOME/.cache/ouroboros/models}"
