#!/usr/bin/env python3
"""Benchmark m3-convert and m3-verify against cp / sha256sum, at the real model's topology.

    python bench/bench.py [--sizes 1,5] [--work bench/out] [--workers 2,4] [--repeat 3] [--warm] [--no-sha-ext] [--keep]

Generates (seeded) AutoRound-style checkpoints with the real MiniMax-M3 topology: 60 layers
(0-2 dense attention + dense MLP, 3-59 sparse attention + MoE), 128 experts with mixed 2/3/4/8-bit
GPTQ per module, fused gate_up, the real checkpoint's "model naming" and GPTQ v1 packing, ~67k
tensors, at reduced width so that the checkpoint is about 1 GiB or about 5 GiB, in about as many shards as the
real checkpoint has (35: its shards are 5 GB, these 36 / 160 MiB).  Then, in one run and on the same disk, it
measures:

* ``cp -r IN OUT && sync`` vs ``m3-convert IN OUT`` (which fsyncs every file), each after
  ``echo 3 > /proc/sys/vm/drop_caches`` (cold cache for both; if dropping caches is not permitted,
  both run warm after one full read of the input, and the table says so), in interleaved rounds
  (every command below once per round, in the same order): each ratio is the median of the per-round
  ratios, because this kind of virtual disk drifts in speed from one minute to the next;
* peak RSS of m3-convert (``/usr/bin/time -v``) for each ``--workers`` value;
* planning time of the full topology (``m3-convert --dry-run --json``'s plan_seconds);
* ``m3-verify --integrity-only`` vs ``sha256sum -c SHA256SUMS`` over the same files (cold cache both) and vs its own
  floor, SHA-256 of those files spread over all cores;
* the floor of any converter that writes every byte and hashes it: ``max(cp -r, SHA-256 of every byte with the
  files spread over all cores)`` (OpenSSL's SHA-256 through hashlib, the one m3-convert uses), and what a user does
  by hand without m3-convert: ``cp -r`` then ``sha256sum *``; m3-convert's time over each, per round;
* m3-convert's fixed part, ``--dry-run --quiet`` with the conversion's shard size and workers (interpreter,
  headers, plan, space check: what a conversion does before its first byte, less its prefetch hint), per round, and the streaming part's ratios (conversion minus fixed part, over each
  floor): the fixed part is 1.2-1.6 s for these ~67k tensors at any size, the streaming part grows with the bytes;
* the CPU seconds (user + system) of every command.

``--no-sha-ext`` runs every command with ``OPENSSL_ia32cap=:~0x20000000``, which hides the SHA extensions
(SHA-NI) from OpenSSL, whose SHA-256 hashlib uses (in m3-convert, m3-verify and the floor's hashing alike): the
regime of a machine without them, reproducibly on one that has them (``sha256sum`` is coreutils' own code and
never uses them). The SHA-256 rate per core the commands actually got is measured and printed either way.

Prints a markdown table and writes bench/out/results-{cold,warm}[-nosha].json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time


def hash_all(path, cores):
    """SHA-256 of every file under ``path``, ``cores`` files at a time (one process each): the hashing floor."""
    from concurrent.futures import ProcessPoolExecutor
    files = sorted((os.path.join(path, f) for f in os.listdir(path)), key=os.path.getsize, reverse=True)
    with ProcessPoolExecutor(cores) as ex:
        list(ex.map(_hash_file, files))


def _hash_file(p):
    import hashlib
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--hash-all":
    # the floor's hashing, dispatched before the imports below: its time is interpreter start and SHA-256 only
    hash_all(sys.argv[2], int(sys.argv[3]))
    sys.exit(0)

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

from m3_convert import gptq  # noqa: E402
from m3_convert.st import build_header  # noqa: E402

P = "model.language_model"
SIZES = {  # name -> (hidden, expert/shared intermediate, dense intermediate, shard bytes)
    0: (128, 128, 256, 32 << 20),      # ~0.2 GiB: the full topology for tests (tests/test_topology.py)
    1: (384, 256, 1024, 36 << 20),     # 1.18 GiB in 34 shards
    5: (896, 512, 2048, 160 << 20),    # 5.35 GiB in 35 shards, as many as the real 176 GiB checkpoint's 5 GB ones
}
LAYERS, E, HEADS, KV, HD, VOCAB = 60, 128, 4, 1, 128, 8192


def module_bits(layer, name, e=None):
    if e is not None:
        return (2, 3, 4, 8)[(layer * 7 + e * 3 + {"gate_proj": 0, "up_proj": 1, "down_proj": 2}[name]) % 4]
    return 8 if name in ("o_proj", "down_proj") else 4


def gptq_tensors(rng, prefix, n_in, n_out, bits):
    g = n_in // 128
    qw = rng.integers(-2**31, 2**31, size=(n_in * bits // 32, n_out), dtype=np.int64).astype(np.int32)
    qz = gptq.pack_qzeros(np.full((g, n_out), (1 << (bits - 1)) - 1), bits)
    sc = (rng.standard_normal((g, n_out)) * 0.01).astype(np.float16)
    return {f"{prefix}.qweight": ("I32", qw), f"{prefix}.qzeros": ("I32", qz), f"{prefix}.scales": ("F16", sc)}


def bf16(rng, shape):
    return ("BF16", rng.integers(0, 1 << 16, size=shape, dtype=np.uint16))


def layer_tensors(rng, L, H, I, Id):
    p = f"{P}.layers.{L}"
    sparse = moe = L >= 3
    t, extra = {}, {}
    t[f"{p}.input_layernorm.weight"] = bf16(rng, (H,))
    t[f"{p}.post_attention_layernorm.weight"] = bf16(rng, (H,))
    for n, o in (("q_proj", HEADS * HD), ("k_proj", KV * HD), ("v_proj", KV * HD)):
        t.update(gptq_tensors(rng, f"{p}.self_attn.{n}", H, o, 4))
        extra[f"{p}.self_attn.{n}"] = {"bits": 4}
    t.update(gptq_tensors(rng, f"{p}.self_attn.o_proj", HEADS * HD, H, 8))
    extra[f"{p}.self_attn.o_proj"] = {"bits": 8}
    t[f"{p}.self_attn.q_norm.weight"] = bf16(rng, (HD,))
    t[f"{p}.self_attn.k_norm.weight"] = bf16(rng, (HD,))
    if sparse:
        t[f"{p}.self_attn.indexer.q_proj.weight"] = bf16(rng, (KV * HD, H))
        t[f"{p}.self_attn.indexer.k_proj.weight"] = bf16(rng, (HD, H))
        t[f"{p}.self_attn.indexer.q_norm.weight"] = bf16(rng, (HD,))
        t[f"{p}.self_attn.indexer.k_norm.weight"] = bf16(rng, (HD,))
    if moe:
        t[f"{p}.mlp.gate.weight"] = bf16(rng, (E, H))
        t[f"{p}.mlp.gate.e_score_correction_bias"] = bf16(rng, (E,))
        for e in range(E):
            for n, (i, o) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
                b = module_bits(L, n, e)
                t.update(gptq_tensors(rng, f"{p}.mlp.experts.{e}.{n}", i, o, b))
                extra[f"{p}.mlp.experts.{e}.{n}"] = {"bits": b}
        t.update(gptq_tensors(rng, f"{p}.mlp.shared_experts.gate_up_proj", H, 2 * I, 4))
        t.update(gptq_tensors(rng, f"{p}.mlp.shared_experts.down_proj", I, H, 8))
        extra[f"{p}.mlp.shared_experts.gate_up_proj"] = {"bits": 4}
        extra[f"{p}.mlp.shared_experts.down_proj"] = {"bits": 8}
        extra[f".*{re.escape(p)}\\.mlp\\.gate.*"] = {"data_type": "float"}
    else:
        t.update(gptq_tensors(rng, f"{p}.mlp.gate_up_proj", H, 2 * Id, 4))
        t.update(gptq_tensors(rng, f"{p}.mlp.down_proj", Id, H, 8))
        extra[f"{p}.mlp.gate_up_proj"] = {"bits": 4}
        extra[f"{p}.mlp.down_proj"] = {"bits": 8}
    return t, extra


def write_shard(path, tensors):
    names = sorted(tensors)   # safetensors' writer orders by name within a shard
    entries = [(n, tensors[n][0], tensors[n][1].shape, tensors[n][1].nbytes) for n in names]
    with open(path, "wb") as f:
        f.write(build_header(entries))
        for n in names:
            f.write(np.ascontiguousarray(tensors[n][1]).tobytes())


def generate(size, out, seed=0):
    H, I, Id, shard_bytes = SIZES[size]
    rng = np.random.default_rng(seed)
    os.makedirs(out)
    extra, wm, shards, cur, cur_bytes = {}, {}, [], {}, 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            shards.append(cur)
            cur, cur_bytes = {}, 0
    glob = {f"{P}.embed_tokens.weight": bf16(rng, (VOCAB, H)), f"{P}.norm.weight": bf16(rng, (H,)),
            "language_model.lm_head.weight": bf16(rng, (VOCAB, H))}
    cur.update(glob)
    cur_bytes = sum(v[1].nbytes for v in glob.values())
    for L in range(LAYERS):
        t, x = layer_tensors(rng, L, H, I, Id)
        extra.update(x)
        for k, v in t.items():
            if cur_bytes + v[1].nbytes > shard_bytes:
                flush()
            cur[k] = v
            cur_bytes += v[1].nbytes
    flush()
    n = len(shards)
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_shard(os.path.join(out, fname), s)
        wm.update({k: fname for k in s})
    # mtp, as auto-round copies it
    write_shard(os.path.join(out, "model_extra_tensors.safetensors"), {"mtp.0.enorm.weight": bf16(rng, (H,)), "mtp.0.eh_proj.weight": bf16(rng, (H, 2 * H))})
    cfg, qc = source_config(extra, H, I, Id, HEADS, KV, VOCAB)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    json.dump(qc, open(os.path.join(out, "quantization_config.json"), "w"), indent=1)
    total = sum(v[1].nbytes for s in shards for v in s.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    open(os.path.join(out, "LICENSE"), "w").write("bench\n")
    return len(wm)


def source_config(extra, H, I, Id, heads, kv, vocab, layers=LAYERS, experts=E, hd=HD):
    """(config.json, quantization_config) as the AutoRound export of a MiniMax-M3-VL writes them: transformers'
    text_config (layer_types, index_* fields, rope_parameters; hidden_act "silu"), global bits 16 + extra_config."""
    qc = {"bits": 16, "group_size": 128, "sym": True, "data_type": "int", "quant_method": "auto-round",
          "packing_format": "auto_round:auto_gptq", "autoround_version": "0.16.1", "extra_config": extra}
    tc = {"model_type": "minimax_m3_vl_text", "hidden_size": H, "intermediate_size": I, "dense_intermediate_size": Id,
          "shared_intermediate_size": I, "n_shared_experts": 1, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "num_local_experts": experts, "num_experts_per_tok": 4,
          "layer_types": ["full_attention"] * 3 + ["minimax_m3_sparse"] * (layers - 3),
          "mlp_layer_types": ["dense"] * 3 + ["sparse"] * (layers - 3), "index_n_heads": kv, "index_head_dim": hd,
          "index_block_size": 128, "index_topk_blocks": 16, "index_local_blocks": 1, "hidden_act": "silu",
          "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "routed_scaling_factor": 2.0, "rotary_dim": 64,
          "rope_parameters": {"rope_theta": 5000000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
          "rms_norm_eps": 1e-6, "max_position_embeddings": 524288}
    cfg = {"architectures": ["MiniMaxM3SparseForConditionalGeneration"], "model_type": "minimax_m3_vl", "text_config": tc,
           "quantization_config": qc}
    return cfg, qc


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(path):
    subprocess.run(f"cat {path}/* > /dev/null", shell=True, check=True)


def rounds(cmds, cold, warm_dir, repeat):
    """Run ``cmds`` ({label: (shell command, cleanup or None)}) in interleaved rounds (each command once per
    round, in order), so that every command meets the same disk: this virtual disk's throughput drifts between
    runs, and back-to-back repeats of one command would compare different disks. Returns {label: [(wall s,
    peak RSS MiB, stdout, CPU s)] per round}."""
    out = {k: [] for k in cmds}
    for _ in range(repeat):
        for label, (cmd, cleanup) in cmds.items():
            if cleanup:
                cleanup()
            out[label].append(_timed_once(cmd, cold, warm_dir))
    for label, (cmd, cleanup) in cmds.items():
        if cleanup:
            cleanup()
    return out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _timed_once(cmd, cold, warm_dir):
    """Run a shell command under /usr/bin/time -v: (wall s, peak RSS MiB, stdout, CPU s = user + system)."""
    if not (cold and drop_caches()):
        warm(warm_dir)
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", cmd], capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"failed: {cmd}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("User", "System"))
    return wall, rss, p.stdout, cpu


def sha_rate():
    """MB/s of hashlib's SHA-256 on one core, in a fresh interpreter (the environment's OPENSSL_ia32cap applies)."""
    code = ("import hashlib, os, time; b = os.urandom(64 << 20); best = 0\n"
            "for _ in range(5):\n t = time.perf_counter(); hashlib.sha256(b).digest(); best = max(best, len(b) / (time.perf_counter() - t))\n"
            "print(round(best / 1e6))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def du(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def measure(size, args, conv, ver, cold):
    """One input size: generate it, time every command in interleaved rounds, return the row of results."""
    src = os.path.join(args.work, f"in{size}")
    t0 = time.time()
    n_tensors = generate(size, src)
    subprocess.run(["sync"], check=True)   # the generator's dirty pages: not charged to the first command
    gen_s = time.time() - t0
    nbytes = du(src)
    shard = SIZES[size][3]
    row = {"size_gib": round(nbytes / 2**30, 2), "tensors": n_tensors, "generate_s": round(gen_s, 1)}
    R = args.repeat
    ws = [int(x) for x in args.workers.split(",")]
    js = json.loads(_timed_once(f"{conv} {src} {args.work}/dry --dry-run --json", False, src)[2])
    row["plan_s"] = js["plan_seconds"]
    row["output_over_input_bytes"] = round(js["output_bytes"] / nbytes, 4)

    def rm(path):
        return lambda: shutil.rmtree(path, ignore_errors=True)
    cp_out = os.path.join(args.work, "cp")
    cores = os.cpu_count() or 1
    cmds = {"cp": (f"cp -r {src} {cp_out} && sync", rm(cp_out)),
            # by hand: copy, then checksum the copy (what m3-convert replaces)
            "cp_sha": (f"cp -r {src} {cp_out}h && sync && cd {cp_out}h && sha256sum * > /dev/null", rm(cp_out + "h")),
            # the floor's other term: SHA-256 (OpenSSL, through hashlib: what m3-convert uses) of every input byte,
            # the files spread over all cores (the output has output_over_input_bytes as many: q/k/v de-quantized)
            "sha_all": (f"{sys.executable} {os.path.abspath(__file__)} --hash-all {src} {cores}", None),
            # m3-convert's fixed part: interpreter, headers, plan, space check (what a --quiet conversion does
            # before its first byte; --dry-run --quiet computes nothing else)
            "plan": (f"{conv} {src} {args.work}/dry --dry-run --quiet --max-shard-size {shard} --workers {ws[-1]}", None)}
    for w in ws:
        out = os.path.join(args.work, f"conv{w}")
        cmds[f"w{w}"] = (f"{conv} {src} {out} --quiet --workers {w} --max-shard-size {shard} && sync", rm(out))
    res = rounds(cmds, cold, src, R)
    cp = [r[0] for r in res["cp"]]
    row["cp_s"] = round(median(cp), 2)
    row["cp_runs_s"] = [round(x, 2) for x in cp]
    row["cp_sha256sum_s"] = round(median([r[0] for r in res["cp_sha"]]), 2)
    row["sha256_all_cores_s"] = round(median([r[0] for r in res["sha_all"]]), 2)
    for k in ("cp", "cp_sha", "sha_all"):
        row[f"{k}_cpu_s"] = round(median([r[3] for r in res[k]]), 2)
    floor = [max(a, b[0]) for a, b in zip(cp, res["sha_all"])]          # per round: max(cp, hashing on all cores)
    row["floor_s"] = round(median(floor), 2)
    plan = [r[0] for r in res["plan"]]
    row["fixed_s"] = round(median(plan), 2)
    for w in ws:
        walls = [r[0] for r in res[f"w{w}"]]
        row[f"convert_w{w}_s"] = round(median(walls), 2)
        row[f"convert_w{w}_runs_s"] = [round(x, 2) for x in walls]
        row[f"convert_w{w}_cpu_s"] = round(median([r[3] for r in res[f"w{w}"]]), 2)
        row[f"convert_w{w}_rss_mib"] = round(max(r[1] for r in res[f"w{w}"]))
        row[f"ratio_w{w}"] = round(median([a / b for a, b in zip(walls, cp)]), 2)   # median of per-round ratios
        row[f"vs_floor_w{w}"] = round(median([a / b for a, b in zip(walls, floor)]), 2)
        row[f"vs_by_hand_w{w}"] = round(median([a / b[0] for a, b in zip(walls, res["cp_sha"])]), 2)
        # the streaming part alone (the same round's fixed part taken off): what grows with the checkpoint
        row[f"stream_vs_floor_w{w}"] = round(median([(a - p) / b for a, p, b in zip(walls, plan, floor)]), 2)
    out = os.path.join(args.work, f"conv{ws[-1]}")   # one converted output to check, written once more
    subprocess.run(cmds[f"w{ws[-1]}"][0], shell=True, check=True)
    res = rounds({"sha256sum": (f"cd {out} && sha256sum -c --quiet SHA256SUMS", None),
                  "verify": (f"{ver} {out} --integrity-only --quiet", None),
                  "sha_all": (f"{sys.executable} {os.path.abspath(__file__)} --hash-all {out} {cores}", None)}, cold, out, R)
    sha = [r[0] for r in res["sha256sum"]]
    ver_ = [r[0] for r in res["verify"]]
    vfloor = [r[0] for r in res["sha_all"]]
    row["sha256sum_s"] = round(median(sha), 2)
    row["verify_integrity_s"] = round(median(ver_), 2)
    row["verify_floor_s"] = round(median(vfloor), 2)
    row["verify_rss_mib"] = round(max(r[1] for r in res["verify"]))
    row["verify_ratio"] = round(median([a / b for a, b in zip(ver_, sha)]), 2)
    row["verify_vs_floor"] = round(median([a / b for a, b in zip(ver_, vfloor)]), 2)
    if not args.keep:
        shutil.rmtree(src)
        shutil.rmtree(out)
    return row


def print_table(results, args):
    """The markdown table of ``results`` (what the README quotes)."""
    ws = args.workers.split(",")
    print(f"\ncache: {results['cache']}; medians of {args.repeat} interleaved rounds; {results['cpus']} CPUs, "
          f"SHA extensions (sha_ni): {results['sha_extensions']}"
          + (" (hidden from OpenSSL: --no-sha-ext)" if args.no_sha_ext else "")
          + f"; hashlib SHA-256 {results['sha256_mb_s_per_core']} MB/s per core\n")
    print("| input | cp -r | cp -r + sha256sum | floor: max(cp, SHA-256 / cores) | "
          + " | ".join(f"m3-convert --workers {w} (vs floor, vs by hand; CPU; peak RSS) | streaming part "
                       f"(vs floor)" for w in ws)
          + " | fixed part | m3-verify --integrity-only (vs sha256sum -c, vs its floor) |")
    print("|---" * (6 + 2 * len(ws)) + "|")
    for r in results["runs"]:
        print(f"| {r['size_gib']} GiB | {r['cp_s']} s | {r['cp_sha256sum_s']} s | {r['floor_s']} s | "
              + " | ".join(f"{r[f'convert_w{w}_s']} s ({r[f'vs_floor_w{w}']}x, {r[f'vs_by_hand_w{w}']}x; "
                           f"{r[f'convert_w{w}_cpu_s']} s; {r[f'convert_w{w}_rss_mib']} MiB) | "
                           f"{r[f'stream_vs_floor_w{w}']}x" for w in ws)
              + f" | {r['fixed_s']} s | {r['verify_integrity_s']} s ({r['verify_ratio']}x, {r['verify_vs_floor']}x) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,5")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--work", default=os.path.join(HERE, "out"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--warm", action="store_true", help="read the input into the page cache before each command instead of "
                    "dropping caches: takes the disk out and measures the CPU cost (the fixed per-tensor part included)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the timed commands; medians are reported")
    ap.add_argument("--no-sha-ext", action="store_true", help="hide the SHA extensions from OpenSSL (OPENSSL_ia32cap) in "
                    "every command: the regime of a machine without SHA-NI")
    args = ap.parse_args()
    if args.no_sha_ext:
        os.environ["OPENSSL_ia32cap"] = ":~0x20000000"   # CPUID leaf 7 EBX bit 29 (SHA), OpenSSL's second word
    bindir = os.path.dirname(sys.executable)
    conv, ver = os.path.join(bindir, "m3-convert"), os.path.join(bindir, "m3-verify")
    cold = False if args.warm else drop_caches()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    results = {"cache": "cold (drop_caches before each command)" if cold else "warm (input read into the page cache before each command)",
               "repeat": args.repeat, "cpus": os.cpu_count(),
               "sha_extensions": "sha_ni" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else None,
               "sha_extensions_hidden": args.no_sha_ext, "sha256_mb_s_per_core": sha_rate(), "runs": []}
    for size in (int(s) for s in args.sizes.split(",")):
        row = measure(size, args, conv, ver, cold)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    tag = ("cold" if cold else "warm") + ("-nosha" if args.no_sha_ext else "")
    json.dump(results, open(os.path.join(args.work, f"results-{tag}.json"), "w"), indent=1)
    print_table(results, args)

if __name__ == "__main__":
    main()
