#!/bin/bash
M=~/.cache/ouroboros/models
F="--max-new-tokens 128 --strategies speculative,trie,auto --gamma 8 --draft-stop 0.6 --draft-requantize q4k"
for b in new2 new; do
  RUST_LOG=decoding=debug /tmp/$b-bench/ouro-bench --prompts $M/bbh.prompts --chat --skip 40 --limit 16 $F --out /tmp/exp2/ho3-bbh-$b > /tmp/exp2/ho3-bbh-$b.log 2>&1
done
RUST_LOG=decoding=debug /tmp/new2-bench/ouro-bench --prompts $M/humaneval.prompts --skip 8 --limit 16 $F --out /tmp/exp2/ho3-he-new2 > /tmp/exp2/ho3-he-new2.log 2>&1
