#!/usr/bin/env python3
"""Writes h100-yi34b-yi6b.json: an H100-like cost table for a target/draft pair of the
Ouroboros paper's kind (Yi-34B target, Yi-6B draft, bf16), for `ouro-bench --cost-model`.

Not a measurement: a roofline built from published figures, with the assumptions below.
- NVIDIA H100 SXM5 datasheet: HBM3 bandwidth 3.35 TB/s, dense BF16 989.4 TFLOPS.
- Model sizes from the models' published configs (hidden, layers, heads, KV heads,
  intermediate, vocabulary; untied embeddings): params and KV bytes per token computed below.
- Assumed: 80 % of peak bandwidth and 60 % of peak FLOPs achieved; 0.5 ms fixed per forward
  (launches, sampling); weight streaming and compute do not overlap (their times add: a
  pessimistic choice for wide trees; the max() of the two would make them cheaper still);
  a draft call costs 0.5 ms beyond its forwards (one RPC inside the node).
"""
import json, pathlib

BW = 3.35e12 * 0.80
FLOPS = 989.4e12 * 0.60
OVERHEAD = 0.5e-3


def params(hidden, layers, heads, kv_heads, inter, vocab, head_dim=128):
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * inter
    return layers * (attn + mlp) + 2 * vocab * hidden


def kv_bytes(layers, kv_heads, head_dim=128):
    return layers * 2 * kv_heads * head_dim * 2  # K and V, bf16


YI34B = dict(p=params(7168, 60, 56, 8, 20480, 64000), kv=kv_bytes(60, 8))
YI6B = dict(p=params(4096, 32, 32, 4, 11008, 64000), kv=kv_bytes(32, 4))


def forward(m, rows, context):
    memory = (2 * m["p"] + context * m["kv"]) / BW
    compute = 2 * m["p"] * rows / FLOPS
    return OVERHEAD + memory + compute


ROWS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512]
CONTEXTS = [64, 512, 2048]
table = {
    "source": (
        "H100-like roofline for Yi-34B (target, %.2fB params) and Yi-6B (draft, %.2fB), bf16: "
        "HBM3 3.35 TB/s at 80 %%, BF16 989.4 TFLOPS at 60 %%, 0.5 ms per forward, memory and "
        "compute times added; built by results/cost-models/h100_table.py, not measured"
        % (YI34B["p"] / 1e9, YI6B["p"] / 1e9)
    ),
    "contexts": [
        {
            "context": c,
            "target": [[r, forward(YI34B, r, c)] for r in ROWS],
            # A prefill streams the weights once for many rows: compute per row.
            "prefill_row": 2 * YI34B["p"] / FLOPS,
            "draft": {
                "per_call": 0.5e-3,
                "per_token": forward(YI6B, 1, c),
                "catch_up": 2 * YI6B["p"] / FLOPS,
            },
        }
        for c in CONTEXTS
    ],
}
out = pathlib.Path(__file__).with_name("h100-yi34b-yi6b.json")
out.write_text(json.dumps(table, indent=2) + "\n")
for c in table["contexts"]:
    t = dict((r, s) for r, s in c["target"])
    print(c["context"], "target ms 1/8/64/256:", *("%.1f" % (t[r] * 1e3) for r in (1, 8, 64, 256)),
          "draft ms/token %.2f" % (c["draft"]["per_token"] * 1e3))
