#!/usr/bin/env bash
# Fault-injection load run: 32 clients stream for DURATION seconds (300) against
#   embedded   - `ouro serve` with the target and draft in process, paused (SIGSTOP, 5 s)
#                once a minute;
#   deployment - two target services, a draft service and `ouro serve` as processes; once
#                a minute a fault: SIGKILL target replica A (restarted), SIGKILL the draft
#                (restarted), SIGSTOP the draft for 20 s, SIGKILL target replica B
#                (restarted), in turn.
# Every completed response must equal the plain greedy output of its prompt (ouro-soak
# fails otherwise); one request in eight is abandoned by its client mid-stream. Peak RSS
# of each role is sampled every second (restarted processes included). Writes
# results/soak/<mode>/ (soak.md, soak.json, rss.md, faults.log).
#
#   scripts/soak.sh [embedded|deployment]...   (default: both)
# Not in CI (about 6 minutes a mode on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("${@:-embedded deployment}")
read -r -a modes <<< "${modes[*]}"
duration=${DURATION:-300}
clients=${CLIENTS:-32}
M="${OURO_MODELS_DIR:-$HOME/.cache/ouroboros/models}"
scripts/fetch-models.sh qwen qwen-draft humaneval >&2
cargo build --release --workspace >&2
bin=target/release
target_model="$M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
draft_model="$M/qwen2.5-coder-0.5b-instruct.gguf"
kv_mb=1024
log() { printf '[soak] %s\n' "$*" >&2; }

declare -A pid
pids=()
start() { # role, command...
  local role=$1; shift
  "$@" >> "$out/$role.log" 2>&1 &
  pid[$role]=$!
  pids+=($!)
  # The sampler reads the current process of each role from here.
  sed -i "/^$role /d" "$out/pids"
  echo "$role $!" >> "$out/pids"
  log "started $role (pid ${pid[$role]})"
}
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# SIGKILL a role's process and wait until it is gone (its port free again).
kill_role() {
  kill -9 "${pid[$1]}" 2>/dev/null || true
  wait "${pid[$1]}" 2>/dev/null || true
}

wait_port() { # port: until something accepts there (models take a while to load)
  for _ in $(seq 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.25
  done
  log "nothing listens on $1"; return 1
}

# Peak resident memory of each role, sampled every second into $out/rss.
sample_rss() {
  while :; do
    while read -r role p; do
      kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
      echo "$role ${kb:-0}"
    done < "$out/pids" >> "$out/rss"
    sleep 1
  done
}

run_clients() {
  "$bin/ouro-soak" --endpoint "http://127.0.0.1:$api" --prompts "$M/humaneval.prompts" \
    --limit 8 --clients "$clients" --duration-s "$duration" --max-new-tokens 32 --timeout-s 300 \
    --out "$out" \
    > "$out/client.log" 2>&1 &
  client=$!
}

fault() { echo "$(date +%T) $*" | tee -a "$out/faults.log" >&2; }

for mode in "${modes[@]}"; do
  out="results/soak/$mode"
  rm -rf "$out"; mkdir -p "$out"; : > "$out/pids"
  unset pid; declare -A pid; pids=()
  api=57051
  case "$mode" in
    embedded)
      start orchestrator "$bin/ouro" serve --target "$target_model" --draft "$draft_model" \
        --listen "127.0.0.1:$api" --http-listen off \
        --kv-budget-mb "$kv_mb" --skip-profile
      wait_port "$api"
      sample_rss & sampler=$!; pids+=("$sampler")
      run_clients
      for minute in $(seq 1 $(( duration / 60 - 1 ))); do
        sleep 60
        fault "minute $minute: SIGSTOP the server for 5 s"
        kill -STOP "${pid[orchestrator]}"; sleep 5; kill -CONT "${pid[orchestrator]}"
      done
      ;;
    deployment)
      ta=57052; tb=57054; d=57053
      target() { start "target-$1" "$bin/target-service" --model "$target_model" \
        --listen "127.0.0.1:$2" --kv-budget-mb "$kv_mb"; }
      draft() { start draft "$bin/draft-service" --model "$draft_model" --listen "127.0.0.1:$d"; }
      target a $ta; target b $tb; draft
      wait_port $ta; wait_port $tb; wait_port $d
      start orchestrator "$bin/ouro" serve --target-endpoint "http://127.0.0.1:$ta,http://127.0.0.1:$tb" \
        --draft-endpoint "http://127.0.0.1:$d" --tokenizer "$target_model" \
        --listen "127.0.0.1:$api" --http-listen off --skip-profile --draft-call-timeout-s 5 \
        --health-check-s 1
      wait_port "$api"
      sample_rss & sampler=$!; pids+=("$sampler")
      run_clients
      for minute in $(seq 1 $(( duration / 60 - 1 ))); do
        sleep 60
        case $(( (minute - 1) % 4 )) in
          0) fault "minute $minute: SIGKILL target A, restart"
             kill_role target-a; target a $ta ;;
          1) fault "minute $minute: SIGKILL the draft, restart"
             kill_role draft; draft ;;
          2) fault "minute $minute: SIGSTOP the draft for 20 s"
             kill -STOP "${pid[draft]}"; sleep 20; kill -CONT "${pid[draft]}" ;;
          3) fault "minute $minute: SIGKILL target B, restart"
             kill_role target-b; target b $tb ;;
        esac
      done
      ;;
    *) log "unknown mode $mode"; exit 2 ;;
  esac
  status=0
  wait "$client" || status=$?
  kill "$sampler" 2>/dev/null || true
  {
    echo "| role | peak RSS MiB |"
    echo "|---|---|"
    awk '{ if ($2 > max[$1]) max[$1] = $2 } END { for (r in max) printf "| %s | %.0f |\n", r, max[r] / 1024 }' \
      "$out/rss" | sort
    echo
    echo "KV budget per model runtime: $kv_mb MiB; model files: target $(( $(stat -c %s "$target_model") >> 20 )) MiB, draft $(( $(stat -c %s "$draft_model") >> 20 )) MiB."
  } > "$out/rss.md"
  rm -f "$out/rss" "$out/pids"
  cat "$out/rss.md" >&2
  cleanup; pids=()
  [ "$status" = 0 ] || { log "$mode: ouro-soak failed ($status); see $out/client.log"; exit 1; }
  log "$mode: done -> $out"
done
