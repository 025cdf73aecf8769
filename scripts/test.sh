#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches the small real models the tests
# use (SmolLM2-135M, the Qwen2.5-Coder 0.5B draft and its tokenizer.json; about 600 MB,
# once, into $OURO_MODELS_DIR), then builds and tests in one optimized profile.
# The 1.5B target test runs only where that file was fetched (scripts/fetch-models.sh all).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh smollm tokenizer qwen-draft
cargo build --release --locked --workspace --all-targets
cargo test --release --locked --workspace
