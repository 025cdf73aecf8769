#!/bin/bash
M=~/.cache/ouroboros/models
P=$1; shift; TAG=$1; shift; N=$1; shift
for i in $(seq 1 $N); do
 for b in old new; do
  RUST_LOG=decoding=debug /tmp/$b-bench/ouro-bench --prompts $P "$@" --max-new-tokens 96 --strategies ${STRATS:-trie,auto} --gamma 8 --draft-stop 0.6 --draft-requantize q4k --out /tmp/exp2/$TAG-$b-$i > /tmp/exp2/$TAG-$b-$i.log 2>&1
 done
done
