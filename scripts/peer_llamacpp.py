#!/usr/bin/env python3
"""Side-by-side run of llama.cpp and ouro on the same GGUF files, prompts, token counts and
threads (issue #27). Called by scripts/peer-llamacpp.sh, which builds llama.cpp first.

For every prompt set the prompts are written once as ouro sends them (chat template applied
where the set uses it), then both engines get exactly that text. Each set's prompts are
split in two halves run in the order llama.cpp, ouro, ouro, llama.cpp, so a drift of the
machine's speed during the run weighs on both alike. llama.cpp's modes (greedy, draft-model
speculation, the two n-gram modes) run prompt by prompt, interleaved; ouro's strategies run
interleaved inside ouro-bench.

Writes results/peer/peer.md and peer.json: per set and mode the tokens, whole-request
tok/s (prefill included), decode-only tok/s, and the ratio to llama.cpp's greedy.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Greedy runs in llama-completion (llama-speculative-simple refuses --spec-type none).
LLAMA_MODES = {
    "llama.cpp greedy": ["-no-cnv", "--no-display-prompt"],
    "llama.cpp draft-simple": ["--spec-type", "draft-simple", "--spec-draft-n-max", "8"],
    "llama.cpp ngram-simple": ["--spec-type", "ngram-simple"],
    "llama.cpp ngram-mod": ["--spec-type", "ngram-mod"],
}
OURS = ["greedy", "speculative", "trie", "auto"]


def parse_set(spec):
    """name=file:skip:count[:chat]"""
    name, rest = spec.split("=", 1)
    parts = rest.split(":")
    return {
        "name": name,
        "file": parts[0],
        "skip": int(parts[1]),
        "count": int(parts[2]),
        "chat": len(parts) > 3 and parts[3] == "chat",
    }


def run_llama(a, mode, prompt):
    greedy = mode == "llama.cpp greedy"
    cmd = [
        str(a.llama_bin / ("llama-completion" if greedy else "llama-speculative-simple")),
        "-m", str(a.models / a.target),
        "-p", prompt,
        "-n", str(a.tokens),
        "-t", str(a.threads), "-tb", str(a.threads),
        "-c", "4096", "--temp", "0", "--top-k", "1", "--seed", "0",
    ] + LLAMA_MODES[mode]
    if "draft-simple" in mode:
        cmd += ["-md", str(a.models / a.draft), "-td", str(a.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       stdin=subprocess.DEVNULL)
    log = p.stdout + p.stderr
    if greedy:
        # llama-completion prints its timings: the prompt's eval (its last row samples the
        # first new token), then one eval per further token.
        pe = re.search(r"prompt eval time =\s+([\d.]+) ms", log)
        ev = re.search(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs", log)
        if p.returncode != 0 or not pe or not ev:
            sys.exit(f"{mode} failed (exit {p.returncode}):\n{log[-3000:]}")
        prefill, runs = float(pe.group(1)) / 1e3, int(ev.group(2))
        return {"tokens": runs + 1, "prefill_s": prefill,
                "seconds": prefill + float(ev.group(1)) / 1e3, "drafted": 0, "accepted": 0}
    enc = re.search(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    dec = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    if p.returncode != 0 or not enc or not dec:
        sys.exit(f"{mode} failed (exit {p.returncode}):\n{log[-3000:]}")
    drafted = re.search(r"n_drafted\s*=\s*(\d+)", log)
    accepted = re.search(r"n_accept\s*=\s*(\d+)", log)
    return {
        "tokens": int(dec.group(1)),
        "prefill_s": float(enc.group(2)),
        "seconds": float(enc.group(2)) + float(dec.group(2)),
        "drafted": int(drafted.group(1)) if drafted else 0,
        "accepted": int(accepted.group(1)) if accepted else 0,
    }


def run_ours(a, prompts_file, out):
    cmd = [
        str(ROOT / "target/release/ouro-bench"),
        "--prompts", str(prompts_file),
        "--max-new-tokens", str(a.tokens),
        "--strategies", ",".join(OURS[1:]),
        "--gamma", "8", "--draft-stop", "0.6", "--draft-requantize", "q4k",
        "--out", str(out),
    ]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    rows = json.loads((out / "bench.json").read_text())["rows"]
    return {
        r["name"]: {
            "tokens": r["tokens"],
            "prefill_s": r["prefill_s"],
            "seconds": r["seconds"],
            "drafted": r["drafted"],
            "accepted": r["accepted"],
            "mismatched_prompts": r["mismatched_prompts"],
        }
        for r in rows
    }


def add(total, part):
    for k, v in part.items():
        total[k] = total.get(k, 0) + v


def run_set(a, s, work):
    sent = work / f"{s['name']}.prompts"
    dump = [
        str(ROOT / "target/release/ouro-bench"),
        "--prompts", str(a.models / s["file"]),
        "--skip", str(s["skip"]), "--limit", str(s["count"]),
        "--dump-prompts", str(sent),
    ] + (["--chat"] if s["chat"] else [])
    subprocess.run(dump, check=True, timeout=600)
    lines = [l for l in sent.read_text().splitlines() if l.strip()]
    half = (len(lines) + 1) // 2
    halves = [lines[:half], lines[half:]]
    totals = {}

    def llama_half(lines):
        for i, line in enumerate(lines):
            prompt = json.loads(line)
            for mode in LLAMA_MODES:
                r = run_llama(a, mode, prompt)
                print(f"  {s['name']} prompt {i + 1}/{len(lines)} {mode:<24} {r['tokens']:>4} tok "
                      f"{r['tokens'] / r['seconds']:.2f} tok/s", flush=True)
                add(totals.setdefault(mode, {}), r)

    def ours_half(lines, k):
        f = work / f"{s['name']}-{k}.prompts"
        f.write_text("\n".join(lines) + "\n")
        for name, r in run_ours(a, f, work / f"{s['name']}-{k}").items():
            add(totals.setdefault(f"ouro {name}", {}), r)

    started = time.time()
    llama_half(halves[0])
    ours_half(halves[0], "a")
    if halves[1]:
        ours_half(halves[1], "b")
        llama_half(halves[1])
    for r in totals.values():
        r["tok_s"] = r["tokens"] / r["seconds"]
        r["decode_tok_s"] = r["tokens"] / max(r["seconds"] - r["prefill_s"], 1e-9)
    return {"set": s, "prompts": len(lines), "wall_s": time.time() - started, "modes": totals}


def best(modes, prefix, exact_only=True):
    names = [n for n in modes if n.startswith(prefix)]
    if exact_only:
        names = [n for n in names if modes[n].get("mismatched_prompts", 0) == 0]
    return max(names, key=lambda n: modes[n]["tok_s"])


def table(result):
    m = result["modes"]
    base = m["llama.cpp greedy"]
    out = [
        f"### {result['set']['name']} ({result['prompts']} prompts, "
        f"{result['set']['file']} from {result['set']['skip'] + 1}"
        f"{', chat template' if result['set']['chat'] else ''})\n",
        "| mode | tokens | whole-request tok/s | decode-only tok/s | ms/token (decode) "
        "| vs llama.cpp greedy (whole) | accepted/drafted |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in m.items():
        acc = f"{r['accepted']}/{r['drafted']}" if r["drafted"] else "-"
        out.append(
            f"| {name} | {r['tokens']} | {r['tok_s']:.2f} | {r['decode_tok_s']:.2f} | "
            f"{1000 / r['decode_tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x | {acc} |"
        )
    ours, theirs = best(m, "ouro "), best(m, "llama.cpp ", exact_only=False)
    step = m["ouro greedy"]["decode_tok_s"] / base["decode_tok_s"]
    out.append("")
    out.append(
        f"Engine step (greedy decode, same contexts): ouro {1000 / m['ouro greedy']['decode_tok_s']:.1f} ms, "
        f"llama.cpp {1000 / base['decode_tok_s']:.1f} ms per token: ouro at {step:.2f}x llama.cpp's speed. "
        f"Best exact mode: {ours} {m[ours]['tok_s']:.2f} tok/s against llama.cpp's best, {theirs} "
        f"{m[theirs]['tok_s']:.2f} tok/s: **{m[ours]['tok_s'] / m[theirs]['tok_s']:.2f}x** (whole request). "
        f"auto against ouro's best fixed strategy: "
        f"{m['ouro auto']['tok_s'] / max(m[n]['tok_s'] for n in m if n.startswith('ouro ') and n != 'ouro auto'):.2f}x.\n"
    )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--llama-bin", type=Path, default=ROOT / ".tools/llamacpp/build/bin")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct.gguf")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", type=parse_set,
                    help="name=prompt-file:skip:count[:chat]; repeatable")
    ap.add_argument("--out", type=Path, default=ROOT / "results/peer")
    a = ap.parse_args()
    sets = a.set or [
        parse_set("humaneval-1-8=humaneval.prompts:0:8"),
        parse_set("humaneval-41-48=humaneval.prompts:40:8"),
        parse_set("bbh-1-8=bbh.prompts:0:8:chat"),
    ]
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in sets:
            print(f"== {s['name']}", flush=True)
            results.append(run_set(a, s, Path(tmp)))
            # Write as we go: a long run keeps what it has measured.
            (a.out / "peer.json").write_text(json.dumps({
                "command": " ".join(sys.argv),
                "machine": cpu_name(),
                "threads": a.threads, "tokens": a.tokens,
                "target": a.target, "draft": a.draft,
                "results": results,
            }, indent=1))
    md = [
        "# ouro against llama.cpp, same files, prompts and threads\n",
        f"`{' '.join(sys.argv)}` on {cpu_name()}, {a.threads} threads, up to {a.tokens} new tokens; "
        f"target {a.target}, draft {a.draft} (ouro re-encodes the draft as Q4_K at load, "
        "llama.cpp uses the file as it is). Whole-request tok/s counts the prompt's prefill; "
        "decode-only leaves out the target's prefill.\n",
    ] + [table(r) for r in results]
    (a.out / "peer.md").write_text("\n".join(md))
    print("\n".join(md))


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return "unknown CPU"


if __name__ == "__main__":
    main()
