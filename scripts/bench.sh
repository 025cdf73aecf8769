#!/usr/bin/env bash
# The recorded benchmark runs (issue #5): every strategy against greedy in one run,
# interleaved prompt by prompt, on HumanEval (code) and BIG-Bench Hard (natural-language
# reasoning), with the default pair (Qwen2.5-Coder 1.5B Q4_K_M target, 0.5B draft, the
# draft re-encoded as Q4_K at load: half the bytes per draft token of its Q8_0 file).
# Writes results/humaneval/ and results/bbh/ (bench.md, bench.json, speedup.png).
# 16-30 minutes on a 2-core CPU; PROMPTS and TOKENS change the subset.
#
#   scripts/bench.sh [--quick]      # --quick: two prompts each, a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
prompts="${PROMPTS:-8}"
tokens="${TOKENS:-96}"
extra=(--limit "$prompts" --draft-requantize q4k)
[ "${1:-}" = "--quick" ] && extra=(--quick --draft-requantize q4k)
models=$(scripts/fetch-models.sh all | tail -n 1)
cargo build --release --locked --bins
# Lookahead and Ouroboros get the window that suits a CPU (the paper's W=15, N=7 were
# chosen for GPUs, where a wide forward costs little more than one token). Speculative
# drafts up to 8 tokens and stops once the drafted run's probability falls below 0.6
# (results/sweep: better than any fixed gamma here); auto sets its own floor.
target/release/ouro-bench --prompts "$models/humaneval.prompts" \
  --max-new-tokens "$tokens" --window 2 --guess 2 --level 4 --gamma 8 --draft-stop 0.6 \
  --cold --distributed --out results/humaneval "${extra[@]}"
target/release/ouro-bench --prompts "$models/bbh.prompts" --chat \
  --max-new-tokens "$tokens" --strategies speculative,trie,auto --gamma 8 --draft-stop 0.6 \
  --out results/bbh "${extra[@]}"
