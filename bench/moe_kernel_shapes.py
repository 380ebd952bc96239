#!/usr/bin/env python3
"""How many distinct humming MoE kernel shapes the plugin compiles at a given depth (issue 25, item 3: first start).

    python3 bench/moe_kernel_shapes.py [--layers 4,8,16,30,60]

humming compiles the weight type, N, K and the expert count into each MoE kernel (humming 0.1.19,
kernel/humming.py), and the plugin holds a mixed MoE layer as one part per (sublayer, width), each with as many
experts as have that width. So every distinct (sublayer, bits, experts in the part) is its own kernel family (each
compiled for the compact tuning list's sizes, compat.TUNING_ROWS) and the families grow with the depth: each layer
draws its own counts. Counted with the plugin's own decisions (serve.decide.select_moe) over the real widths and the
seeded expert-width mix of bench/serve_bench.py (128 experts, hidden 6144, intermediate 3072, TP 1). No vLLM, no GPU.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

from m3_convert.serve import decide
from serve_bench import quant_modules


def shapes(layers: int) -> Counter:
    """(sublayer, bits, experts in the part) -> number of parts with that shape, for a model of ``layers`` layers
    (L0 dense, the rest MoE, as serve_bench builds it)."""
    kinds = [0] + [1] * (layers - 1)
    tc = {"num_hidden_layers": layers, "sparse_attention_config": {"sparse_attention_freq": kinds},
          "moe_layer_freq": kinds, "num_local_experts": 128, "n_shared_experts": 1}
    mods = quant_modules(tc)
    out = Counter()
    for L in range(1, layers):
        d = decide.select_moe(f"model.layers.{L}.block_sparse_moe.experts", mods, 128, 6144, 3072)
        for p in d.parts:
            out[(p.sublayer, p.bits, len(p.slots))] += 1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="4,8,16,30,60")
    rows = []
    for n in (int(x) for x in ap.parse_args().layers.split(",")):
        s = shapes(n)
        rows.append({"layers": n, "moe_layers": n - 1, "parts": sum(s.values()), "distinct_part_shapes": len(s)})
        print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
