#!/usr/bin/env python3
"""GPU memory projection for the real MiniMax-M3 checkpoint, from headers alone (issue 15).

    python bench/project_memory.py [--work bench/out/real-headers] [--gpu-memory 95] [--keep]

Writes an AutoRound-style MiniMax-M3 checkpoint with the REAL topology and widths (60 layers: 0-2 full attention
+ dense MLP 12288, 3-59 sparse attention + MoE; hidden 6144, 64 heads / 4 KV heads / head_dim 128, indexer 4 x 128,
128 experts of width 3072 + one shared expert, vocabulary 200064, model naming, GPTQ v1 packing) as *sparse*
files: every header is real, the data regions are holes (~176 GB apparent size, a few MB on disk). Then runs
``m3-convert --dry-run --json``, which reads headers only, and prints its ``gpu_weight_bytes``.

Bits (seeded): every routed-expert module drawn from 2/3/4/8 with weights 0.35/0.45/0.12/0.08 (gate, up and down
apart), every other Linear 4-bit: 3.2 bits per weight on average, the published figure for the checkpoint. The
real per-module histogram is not known here; `m3-convert IN OUT --dry-run` gives the exact figure for a real
checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

from bench import source_config  # noqa: E402
from m3_convert.gptq import packed_shapes  # noqa: E402
from m3_convert.st import DTYPES, build_header  # noqa: E402

P = "model.language_model"
L_, H, HEADS, KV, HD, I, ID, E, V, NIDX = 60, 6144, 64, 4, 128, 3072, 12288, 128, 200064, 4
MIX = {2: 0.35, 3: 0.45, 4: 0.12, 8: 0.08}
SHARD = 5 * 10**9


def gptq(prefix, n_in, n_out, bits):
    return [(f"{prefix}.{leaf}", "F16" if leaf == "scales" else "I32", shape)
            for leaf, shape in packed_shapes(n_in, n_out, 128, bits).items()]


def tensors(rng):
    widths, weights = zip(*MIX.items())
    out, extra = [("language_model.lm_head.weight", "BF16", (V, H)), (f"{P}.embed_tokens.weight", "BF16", (V, H)),
                  (f"{P}.norm.weight", "BF16", (H,))], {}

    def q(name, n_in, n_out, bits):
        out.extend(gptq(name, n_in, n_out, bits))
        extra[name] = {"bits": bits}
    for L in range(L_):
        p = f"{P}.layers.{L}"
        sparse = L >= 3
        out += [(f"{p}.input_layernorm.weight", "BF16", (H,)), (f"{p}.post_attention_layernorm.weight", "BF16", (H,)),
                (f"{p}.self_attn.q_norm.weight", "BF16", (HD,)), (f"{p}.self_attn.k_norm.weight", "BF16", (HD,))]
        for n, o in (("q_proj", HEADS * HD), ("k_proj", KV * HD), ("v_proj", KV * HD)):
            q(f"{p}.self_attn.{n}", H, o, 4)
        q(f"{p}.self_attn.o_proj", HEADS * HD, H, 4)
        if sparse:
            out += [(f"{p}.self_attn.indexer.q_proj.weight", "BF16", (NIDX * HD, H)), (f"{p}.self_attn.indexer.k_proj.weight", "BF16", (HD, H)),
                    (f"{p}.self_attn.indexer.q_norm.weight", "BF16", (HD,)), (f"{p}.self_attn.indexer.k_norm.weight", "BF16", (HD,)),
                    (f"{p}.mlp.gate.weight", "BF16", (E, H)), (f"{p}.mlp.gate.e_score_correction_bias", "BF16", (E,))]
            for e in range(E):
                for n, (i, o) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
                    q(f"{p}.mlp.experts.{e}.{n}", i, o, rng.choices(widths, weights)[0])
            q(f"{p}.mlp.shared_experts.gate_up_proj", H, 2 * I, 4)
            q(f"{p}.mlp.shared_experts.down_proj", I, H, 4)
        else:
            q(f"{p}.mlp.gate_up_proj", H, 2 * ID, 4)
            q(f"{p}.mlp.down_proj", ID, H, 4)
    return out, extra


def nbytes(dtype, shape):
    n = DTYPES[dtype][0]
    for d in shape:
        n *= d
    return n


def write(out_dir, seed=0):
    rng = random.Random(seed)
    ts, extra = tensors(rng)
    os.makedirs(out_dir)
    shards, cur, size = [], [], 0
    for t in ts:
        b = nbytes(t[1], t[2])
        if cur and size + b > SHARD:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += b
    shards.append(cur)
    wm, total = {}, 0
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        s = sorted(s)
        entries = [(n, dt, sh, nbytes(dt, sh)) for n, dt, sh in s]
        head = build_header(entries)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(head)
            f.truncate(len(head) + sum(e[3] for e in entries))     # a hole: no data written
        wm.update({n: fname for n, _, _ in s})
        total += sum(e[3] for e in entries)
    cfg, _ = source_config(extra, H, I, ID, HEADS, KV, V, layers=L_, experts=E, hd=HD)   # bench.py's: index heads = KV
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=1)
    json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(os.path.join(out_dir, "model.safetensors.index.json"), "w"))
    params = {n.rsplit(".", 1)[0]: sh for n, _, sh in ts if n.endswith(".scales")}    # [in/128, out]
    wsum = sum(extra[m]["bits"] * params[m][0] * 128 * params[m][1] for m in extra)
    weights = sum(params[m][0] * 128 * params[m][1] for m in extra)
    return total, len(shards), round(wsum / weights, 3), len(extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(HERE, "out", "real-headers"))
    ap.add_argument("--gpu-memory", default="95")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    total, n_shards, avg_bits, n_q = write(a.work)
    du = subprocess.run(["du", "-sk", a.work], capture_output=True, text=True).stdout.split()[0]
    print(f"real-topology checkpoint: {n_shards} shards, {total / 2**30:.1f} GiB apparent, {int(du) / 1024:.1f} MiB on disk; "
          f"{n_q} GPTQ modules, {avg_bits} bits per GPTQ weight")
    p = subprocess.run([sys.executable, "-m", "m3_convert.cli", a.work, a.work + "-out", "--dry-run", "--json",
                        "--gpu-memory", a.gpu_memory], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    g = json.loads(p.stdout)["gpu_weight_bytes"]
    print(f"GPU weight bytes: native {g['native'] / 2**30:.1f} GiB, promoted {g['promoted'] / 2**30:.1f} GiB "
          f"({g['promoted'] / g['native']:.2f}x)")
    for k, v in g["by_kind"].items():
        print(f"  {k:15s} native {v['native'] / 2**30:7.2f} GiB   promoted {v['promoted'] / 2**30:7.2f} GiB")
    for tp, r in g["tp"].items():
        print(f"  TP {tp}: {r['native_per_gpu'] / 2**30:6.1f} GiB per GPU native ({'fits' if r['fits'] else 'does not fit'} "
              f"{g['gpu_memory_gib']:g} GiB, {r['left_per_gpu'] / 2**30:.1f} GiB left), promoted {r['promoted_per_gpu'] / 2**30:.1f} GiB"
              + (f"; {r['problems'][0]}" if r["problems"] else ""))
    with open(os.path.join(HERE, "out", "memory-projection.json"), "w") as f:
        json.dump({"apparent_bytes": total, "bits_per_gptq_weight": avg_bits, "gpu_weight_bytes": g}, f, indent=1)
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
