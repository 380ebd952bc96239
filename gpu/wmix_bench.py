#!/usr/bin/env python3
"""The wmix kernels alone at M3's MoE shapes, on the GPU, with no vLLM (issue 25: "kernel work needs no vLLM").

    python3 gpu/wmix_bench.py OUT_JSON
    TRITON_INTERPRET=1 python3 gpu/wmix_bench.py OUT_JSON --cpu-smoke     # the script itself, on a CPU

Options: ``--ms=1,8,32`` (token counts), ``--depth=N`` (also time N distinct layers in turn: no L2 reuse; default
4), ``--sweep`` with ``--sweep-ms=1,32`` (other tile configs of each GEMM at those sizes, each checked against
decide's), ``--tiles=64x64x4x2,128x128x8x2`` (the tiled sweep's bm x bn x warps x stages instead of TILED_SWEEP),
``--loads=words,fields`` (the tiled sweep's loads instead of every wmix.TILED_LOADS), ``--prefetch`` (decide's gemv
configs with GemvConfig.prefetch on).

Needs torch and triton only (the GPU image's). 128 experts, hidden 6144, expert width 3072, top-4, group 128; one
layer of uniform 4-bit experts and one mixing 2/3/4/8 bits per expert and per gate/up/down (kernel_check's mix),
random codes and signed fp16 scales in the flat layout of m3_convert.serve.moe. Per size M (tokens):

* each sublayer's GEMM (gemv up to decide.WMIX_GEMV_ROWS_PER_EXPERT rows per expert, else tiled) against ``x @ W^T`` of the exact
  float32 decode of the routed experts, beside torch's bf16 GEMM of W rounded to bf16 (the floor);
* the time of the whole routed layer as the plugin runs it (w13, SwiGLU-OAI, w2, weighted sum; the activation and
  the sum in torch here, vLLM's fused ops in serving), captured in a CUDA graph, median of 20 replays; the bytes
  the routed experts' codes and scales hold, and that over the time as a fraction of the card's HBM bandwidth;
* repeat bit-identical; CUDA-graph replay equal to eager.
The tiled kernel's row alignment is computed once outside the timed region (vLLM's op does it in serving).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_check import G, decode, errs, timed  # noqa: E402

from m3_convert.serve import decide, wmix  # noqa: E402

SMOKE = "--cpu-smoke" in sys.argv     # the script itself checked on a CPU (TRITON_INTERPRET=1, small shapes, no timing)
DEV = "cpu" if SMOKE else "cuda"
E, H, I, K = (8, 256, 128, 4) if SMOKE else (128, 6144, 3072, 4)
LIMIT, ALPHA, BETA = 7.0, 1.702, 1.0
HBM = {"H200": 4.8e12, "H100": 3.35e12}


def layer(per_bits, gen):
    """Flat qweight/scales + SlotTable per sublayer; per_bits[e] = (w1, w3, w2)."""
    out = {}
    for sub, halves, n, k in (("w13", 2, I, H), ("w2", 1, H, I)):
        bits = [b for e in range(E) for b in (per_bits[e][:2] if sub == "w13" else per_bits[e][2:])]
        qoff, soff, oq, os_ = [], [], 0, 0
        for b in bits:
            qoff.append(oq)
            soff.append(os_)
            oq += k * b // 32 * n
            os_ += k // G * n
        qw = torch.randint(-2**31, 2**31, (oq,), dtype=torch.int64, device=DEV, generator=gen).to(torch.int32)
        mag = (torch.rand(os_, device=DEV, generator=gen) + 0.5) / (4 * k ** 0.5)
        sc = (mag * torch.where(torch.rand(os_, device=DEV, generator=gen) < 0.5, -1.0, 1.0)).half()
        t = wmix.SlotTable(torch.tensor(bits, dtype=torch.int32, device=DEV), torch.tensor(qoff, device=DEV),
                           torch.tensor(soff, device=DEV), n, k, G, halves)
        out[sub] = (t, qw, sc, bits, qoff, soff)
    return out


def slot_w(sub_data, slot):
    t, qw, sc, bits, qoff, soff = sub_data
    b = bits[slot]
    q = qw[qoff[slot]:qoff[slot] + t.k * b // 32 * t.n].view(t.k * b // 32, t.n)
    s = sc[soff[slot]:soff[slot] + t.k // G * t.n].view(t.k // G, t.n)
    return decode(q, s, b), t.k * b // 8 * t.n + s.numel() * 2


def gemm(sub_data, x, ids, in_div, out):
    t, qw, sc = sub_data[:3]
    rows = ids.numel()
    if decide.wmix_path(rows, E) == "gemv":
        sms = 132 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count
        cfg = wmix.gemv_config(rows, t, sms)
        if PREFETCH:
            cfg = dataclasses.replace(cfg, prefetch=True)
        return wmix.gemv(t, qw, sc, x, ids, in_div, out, cfg)
    key = (id(t), rows)
    if key not in gemm.align:          # filled by the first (eager) call, before any capture
        gemm.align[key] = tuple(a.to(DEV) for a in wmix.align_reference(ids.cpu().view(-1, 1), wmix.tiled_config(rows, t).block_m, E))
    al = gemm.align[key]
    return wmix.tiled(t, qw, sc, x, ids, in_div, out, wmix.tiled_config(rows, t), lambda *a: al)


gemm.align = {}


def run_layer(L, x, ids, w):
    M = x.shape[0]
    gu = torch.empty(M * K, 2 * I, dtype=x.dtype, device=DEV)
    gemm(L["w13"], x, ids, K, gu)
    g, u = gu[:, :I].float().clamp(max=LIMIT), gu[:, I:].float().clamp(-LIMIT, LIMIT)
    act = (g * torch.sigmoid(ALPHA * g) * (u + BETA)).to(x.dtype)
    down = torch.empty(M * K, H, dtype=x.dtype, device=DEV)
    gemm(L["w2"], act, ids, 1, down)
    return (down.view(M, K, H).float() * w.unsqueeze(-1)).sum(1).to(x.dtype), gu, act, down


def case(tag, per_bits, ms, gen):
    L = layer(per_bits, gen)
    deep = [L] + [layer(per_bits, gen) for _ in range(DEPTH - 1)]     # distinct layers: no L2 reuse between them
    rows = []
    for m in ms:
        gemm.align.clear()
        x = torch.randn(m, H, device=DEV, generator=gen).to(torch.bfloat16)
        ids = torch.rand(m, E, device=DEV, generator=gen).topk(K, dim=-1).indices.to(torch.int32).reshape(-1)
        w = torch.rand(m, K, device=DEV, generator=gen)
        y, gu, act, down = run_layer(L, x, ids, w)
        e13 = e2 = f13 = f2 = None
        active, nbytes = sorted(set(ids.tolist())), 0
        ref13, refb13 = torch.zeros(m * K, 2 * I, device=DEV), torch.zeros(m * K, 2 * I, device=DEV)
        ref2, refb2 = torch.zeros(m * K, H, device=DEV), torch.zeros(m * K, H, device=DEV)
        for e in active:
            r = (ids == e).nonzero().reshape(-1)
            for h in range(2):
                W, nb = slot_w(L["w13"], 2 * e + h)
                nbytes += nb
                ref13[r, h * I:(h + 1) * I] = x[r // K].float() @ W.T
                refb13[r, h * I:(h + 1) * I] = (x[r // K] @ W.to(torch.bfloat16).T).float()
            W, nb = slot_w(L["w2"], e)
            nbytes += nb
            ref2[r] = act[r].float() @ W.T
            refb2[r] = (act[r] @ W.to(torch.bfloat16).T).float()
        e13, f13, e2, f2 = errs(gu, ref13), errs(refb13, ref13), errs(down, ref2), errs(refb2, ref2)
        fn = lambda: run_layer(L, x, ids, w)  # noqa: E731
        if SMOKE:
            us, yg, gpu = float("nan"), y, "cpu"
        else:
            us = timed(fn)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                yg = run_layer(L, x, ids, w)[0]
            g.replay()
            torch.cuda.synchronize()
            gpu = torch.cuda.get_device_name()
        bw = next((v for k_, v in HBM.items() if k_ in gpu), None)
        row = {"case": tag, "m": m, "path": decide.wmix_path(m * K, E), "w13": e13, "w13_bf16_floor": f13, "w2": e2,
               "w2_bf16_floor": f2, "repeat_identical": bool(torch.equal(y, run_layer(L, x, ids, w)[0])),
               "graph_equals_eager": bool(torch.equal(yg, y)), "us_layer": round(us, 1),
               "us_w13": None if SMOKE else round(timed(lambda: gemm(L["w13"], x, ids, K, gu)), 1),
               "us_w2": None if SMOKE else round(timed(lambda: gemm(L["w2"], act, ids, 1, down)), 1),
               "active_bytes": nbytes, "hbm_fraction": round(nbytes / (us * 1e-6) / bw, 3) if bw else None}
        if not SMOKE and DEPTH > 1:      # the layer as decode meets it: the weights not in L2 from the last replay
            row["us_layer_at_depth"] = round(timed(lambda: [run_layer(D, x, ids, w) for D in deep]) / DEPTH, 1)
            row["hbm_fraction_at_depth"] = round(nbytes / (row["us_layer_at_depth"] * 1e-6) / bw, 3) if bw else None
        if SWEEP and m in SWEEP_MS and tag == "mixed":
            row["sweep"] = sweep(L, x, ids, act, gu, down, m)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


DEPTH = int(next((a[8:] for a in sys.argv if a.startswith("--depth=")), "1" if SMOKE else "4"))
SWEEP = "--sweep" in sys.argv
PREFETCH = "--prefetch" in sys.argv          # decide's gemv configs with GemvConfig.prefetch
SWEEP_MS = tuple(int(v) for v in next((a[11:] for a in sys.argv if a.startswith("--sweep-ms=")),
                                        "1,2,8,32,512").split(","))
GEMV_SWEEP = [(16, 64, 4, False), (16, 64, 4, True), (32, 64, 4, False), (32, 64, 4, True), (8, 128, 4, False),
              (8, 128, 4, True)]                                    # rows, block_n, warps, prefetch
#: bm, bn, warps, stages, each with every wmix.TILED_LOADS. With the "gather" load (and "words" before 2026-12-07's
#: eighth session, which gathered 3 bits too) one stage (no pipelined loads) leaves an SM 16-24 warps where 2 stages
#: leave 8 (wmix_sass.py: 86-115 KiB of shared memory against 12-33 KiB); "fields" leaves 28 at 2 stages (20 KiB);
#: "words" with wmix._triplets at 64 x 64, 2 stages: 56 KiB, 16 warps: which hides HBM latency best is what this measures
TILED_SWEEP = [(16, 64, 4, 2), (16, 64, 4, 1), (16, 32, 4, 1), (16, 32, 4, 3), (32, 64, 4, 1), (32, 64, 4, 2),
               (64, 64, 4, 1), (64, 64, 4, 2), (64, 32, 4, 1)]
_TILES = next((a[8:] for a in sys.argv if a.startswith("--tiles=")), "")
if _TILES:
    TILED_SWEEP = [tuple(int(v) for v in t.split("x")) for t in _TILES.split(",")]
SWEEP_LOADS = tuple(next((a[8:] for a in sys.argv if a.startswith("--loads=")), ",".join(wmix.TILED_LOADS)).split(","))


def sweep(L, x, ids, act, gu, down, m):
    """Each sublayer's GEMM alone under other tile configs (decide's choice is the row's us_w13 / us_w2): the
    measurements that set decide.wmix_split / wmix_tile. Every config is also checked equal to decide's output
    up to float32 summation order (a tile must not change what is computed)."""
    out = []
    rows = ids.numel()
    for sub, xin, in_div, dst in (("w13", x, K, gu), ("w2", act, 1, down)):
        t, qw, sc = L[sub][:3]
        ref = dst.clone()
        if decide.wmix_path(rows, E) == "gemv":
            cfgs = [wmix.GemvConfig(r, bn, sp, wa, 2, pf) for r, bn, wa, pf in GEMV_SWEEP for sp in (1, 2, 4, 8)]
            call = lambda c, o: wmix.gemv(t, qw, sc, xin, ids, in_div, o, c)  # noqa: E731
        else:
            cfgs = [wmix.TiledConfig(bm, bn, wa, st, ld) for bm, bn, wa, st in TILED_SWEEP for ld in SWEEP_LOADS]

            aligned = {c.block_m: tuple(a.to(DEV) for a in wmix.align_reference(ids.cpu().view(-1, 1), c.block_m, E))
                       for c in cfgs}          # before any capture (a copy from the CPU cannot be captured)

            def call(c, o):
                return wmix.tiled(t, qw, sc, xin, ids, in_div, o, c, lambda *a: aligned[c.block_m])
        for c in cfgs:
            o = torch.empty_like(dst)
            try:
                call(c, o)
                same = float((o.float() - ref.float()).abs().max() / ref.float().abs().max())
                us = None if SMOKE else round(timed(lambda: call(c, o)), 1)
            except Exception as e:          # a config the compiler refuses (shared memory): reported, not fatal
                us, same = None, repr(e)[:120]
            out.append({"sub": sub, "cfg": list(c.__dict__.values()), "us": us, "vs_default": same})
            print(json.dumps({"m": m, **out[-1]}), flush=True)
    return out


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEV)
    gen.manual_seed(20261207)
    t0 = time.time()
    import triton
    res = {"gpu": "cpu" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    ms = [1, 16] if SMOKE else [1, 2, 4, 8, 16, 32, 128, 512]
    ms = [int(v) for v in next((a[5:] for a in sys.argv if a.startswith("--ms=")), ",".join(map(str, ms))).split(",")]
    res["uniform4"] = case("uniform4", [(4, 4, 4)] * E, ms, gen)
    if not SMOKE:
        torch.cuda.empty_cache()
    bits = decide.QUANT_BITS
    mixed = [(bits[e % 4], bits[(e // 4) % 4], bits[(e // 16) % 4]) for e in range(E)]
    res["mixed"] = case("mixed", mixed, ms, gen)
    res["seconds"] = round(time.time() - t0, 1)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
    for r in res["uniform4"] + res["mixed"]:
        print(f"{r['case']:9s} m{r['m']:<4d} {r['path']:5s} layer {r['us_layer']:7.1f} us (w13 {r['us_w13']}, w2 {r['us_w2']}) "
              f"hbm {r['hbm_fraction']} err w13 {r['w13']['norm_rel']:.2e}/floor {r['w13_bf16_floor']['norm_rel']:.2e} "
              f"w2 {r['w2']['norm_rel']:.2e}/floor {r['w2_bf16_floor']['norm_rel']:.2e} rep {r['repeat_identical']} "
              f"graph {r['graph_equals_eager']}")


if __name__ == "__main__":
    main()
