#!/bin/bash
cd /work/main
M=~/.cache/ouroboros/models
out=/tmp/exp/cpu16; mkdir -p $out
target/release/target-service --model $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --listen 127.0.0.1:50052 > $out/target.log 2>&1 &
tp=$!
target/release/draft-service --model $M/qwen2.5-coder-0.5b-instruct.gguf --listen 127.0.0.1:50053 > $out/draft.log 2>&1 &
dp=$!
sleep 3
target/release/ouro serve --listen 127.0.0.1:50051 --http-listen 127.0.0.1:8000 --target-endpoint http://127.0.0.1:50052 --draft-endpoint http://127.0.0.1:50053 --tokenizer $M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf > $out/serve.log 2>&1 &
pid=$!
for i in $(seq 1 600); do grep -q "ouroboros API ready" $out/serve.log && break; sleep 1; done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for s in auto greedy auto greedy; do
  a=$(cpu $pid); t=$(cpu $tp)
  target/release/ouro-load --max-new-tokens 96 --requests 16 --prompts /tmp/exp/bbh17-80.prompts --chat --concurrency 16 --strategy $s --out $out/$s > $out/$s.out 2>&1
  echo "$s orchestrator_ticks=$(( $(cpu $pid) - a )) target_ticks=$(( $(cpu $tp) - t )) $(grep "^| $s" $out/$s.out | head -1 | cut -d'|' -f6,7)"
done
kill $pid $tp $dp; wait 2>/dev/null
