#!/usr/bin/env bash
# Parameter sweep for Ouroboros, speculative and trie drafting on HumanEval with the
# default pair (1.5B Q4_K_M target, 0.5B draft): one factor at a time around the
# benchmark's flags, every row interleaved with greedy in one run. Writes results/sweep/.
#   scripts/sweep.sh            (PROMPTS=3 TOKENS=48 by default; about 15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
prompts="${PROMPTS:-3}"
tokens="${TOKENS:-48}"
models=$(scripts/fetch-models.sh qwen humaneval | tail -n 1)
cargo build --release --locked --bins
target/release/ouro-bench --prompts "$models/humaneval.prompts" --limit "$prompts" \
  --max-new-tokens "$tokens" --window 2 --guess 2 --level 4 --gamma 4 --topk 3 \
  --strategies speculative,ouroboros,trie \
  --sweep gamma=2,4,6 --sweep window=1,2,4 --sweep level=3,4,5 --sweep topk=1,3 \
  --sweep trie_budget=2,4,8 \
  --out results/sweep
