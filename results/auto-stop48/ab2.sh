#!/bin/bash
M=~/.cache/ouroboros/models
F="--max-new-tokens 128 --strategies speculative,trie,auto --gamma 8 --draft-stop 0.6 --draft-requantize q4k"
for b in old new; do
  RUST_LOG=decoding=debug /tmp/$b-bench/ouro-bench --prompts $M/humaneval.prompts --skip 8 --limit 16 $F --out /tmp/exp2/ho-he-$b > /tmp/exp2/ho-he-$b.log 2>&1
  RUST_LOG=decoding=debug /tmp/$b-bench/ouro-bench --prompts $M/bbh.prompts --chat --skip 40 --limit 16 $F --out /tmp/exp2/ho-bbh-$b > /tmp/exp2/ho-bbh-$b.log 2>&1
done
