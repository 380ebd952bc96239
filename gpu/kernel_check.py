#!/usr/bin/env python3
"""Per-width kernel check at the real MiniMax-M3 shapes, on the GPU (issue 15).

    python3 gpu/kernel_check.py OUT_JSON [--quick] [--phases=graph,dense,moe] [--moe-widths=2,3,4,8] [--moe-ms=1,32]
                                         [--no-wmix-sweep]

``--moe-widths=`` (empty) runs the mixed MoE layer only; ``--moe-ms`` replaces MOE_MS (the token counts);
``--no-wmix-sweep`` leaves out wmix's tile sweeps (each config a compile). Every MoE row also times
M3_MOE_KERNEL=hgemv on humming's layer (``hgemv_row``); hgemv's CUDA-graph captures run after the MoE phase.

The plugin's own classes (m3_convert.serve: HummingLinearKernel, M3HummingMoEMethod + HummingMoEKernel) on
stand-in layers holding random GPTQ tensors (random codes, the symmetric v1 zeros, signed fp16 scales):

* dense, widths 2/3/4/8, N x K = 6144 x 6144 and 6144 x 3072, M = 1, 32, 512: humming's output vs x @ W^T with
  W the exact float32 decode, beside torch's bf16 GEMM of the same W rounded to bf16 (the floor any bf16
  kernel lives with);
* MoE, 128 experts of width 3072, hidden 6144, top-4: one layer per uniform width 2/3/4/8 and one layer whose
  experts mix all four (gate and up of one expert differing), M = 1, 32, 512 tokens routed at random: the
  method's apply vs sum_k w_k * W2_e(swiglu_oai(W13_e x)) in float32 from the exact decode, beside the same
  computed with bf16 weights and bf16 intermediates (the floor);
* ``--phases=dense-tiles`` (issue 25): a 3-bit dense layer (humming serves 2/3-bit linears) at the shared expert's
  shapes at one GPU and at TP 2 (N x K = 6144 x 6144, 6144 x 3072, 3072 x 6144, 6144 x 1536), humming's
  batch-invariant default for up to 8 rows (block N 256 where K > 2048: 24 tiles of 132 SMs at N 6144; at K 1536
  it is already 128 wide, a control) against hand-made entries with more tiles (:data:`SMALL_M_TILES`), at 1 and
  8 rows: time, equal bit for bit to the default at the same rows, each row equal to that row inside a 512-row
  batch (batch invariance; served decode must not depend on the batch it shares), and the 512 rows unchanged;
* the time of each call (CUDA events, median of 20 after warm-up, L2 not flushed); for MoE also with the width parts
  run one after another (``us_serial``, M3_MOE_STREAMS=0) beside the default (parts at once on side streams, issue
  25), and whether both give the same bits (``serial_identical``).

Relative errors are max|y - ref| / max|ref| and ||y - ref|| / ||ref||; every output element is checked finite.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from m3_convert.serve import compat, decide  # noqa: E402

G = 128
DEV = torch.device("cuda")
MOE_MS = [1, 4, 8, 16, 32, 512]
LIMIT, ALPHA, BETA = 7.0, 1.702, 1.0


# ---------------------------------------------------------------- GPTQ on the GPU (the reference decode)
def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ words packed along dim -2 ([..., K*b/32, N] int32) -> codes [..., K, N] (int64)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    *lead, R, N = w.shape
    if bits in (2, 4, 8):
        per = 32 // bits
        sh = (torch.arange(per, device=w.device) * bits).view(*([1] * len(lead)), 1, per, 1)
        codes = (w.unsqueeze(-2) >> sh) & ((1 << bits) - 1)
        return codes.reshape(*lead, R * per, N)
    t = w.view(*lead, R // 3, 3, N)                          # words in [0, 2^32): no int64 overflow below
    out = []
    for j in range(32):
        word, off = divmod(3 * j, 32)
        v = t[..., word, :] >> off
        if off > 29:
            v = v | (t[..., word + 1, :] << (32 - off))
        out.append(v & 7)
    return torch.stack(out, dim=-2).reshape(*lead, R // 3 * 32, N)


def decode(qweight, scales, bits):
    """Exact W [..., N, K] float32 of a symmetric GPTQ tensor (zero 2^(b-1))."""
    q = unpack_rows(qweight, bits).float() - (1 << (bits - 1))          # [..., K, N]
    s = scales.float().repeat_interleave(G, dim=-2)                       # [..., K, N]
    return (q * s).transpose(-1, -2).contiguous()


def random_gptq(lead, n, k, bits, gen):
    """Random codes, symmetric zeros, signed fp16 scales ~ +-[0.5, 1.5] / (2^(b-1) * sqrt(k))."""
    from m3_convert import gptq
    qw = torch.randint(-2**31, 2**31, (*lead, k * bits // 32, n), dtype=torch.int64, device=DEV, generator=gen).to(torch.int32)
    pat = torch.from_numpy(gptq.symmetric_zero_words(bits).view("int32").copy()).to(DEV)
    qz = pat.repeat(n * bits // 32 // pat.numel()).expand(*lead, k // G, -1).contiguous()
    mag = (torch.rand((*lead, k // G, n), device=DEV, generator=gen) + 0.5) / ((1 << (bits - 1)) * k ** 0.5)
    sign = torch.where(torch.rand((*lead, k // G, n), device=DEV, generator=gen) < 0.5, -1.0, 1.0)
    return qw, qz, (mag * sign).half()


def errs(y, ref):
    d = (y.float() - ref).abs()
    return {"max_rel": float(d.max() / ref.abs().max()), "norm_rel": float(d.norm() / ref.norm()),
            "finite": bool(torch.isfinite(y).all())}


def capture(fn, pool=None):
    """``fn`` run once on a side stream (as torch asks before a capture) and captured in a CUDA graph (in ``pool``
    where given): (the graph, the output its replays write)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


def timed(fn, n=20):
    """Median time (us) of ``fn`` captured in a CUDA graph and replayed, as vLLM serves decode: the device time
    without Python's launch overhead (eager calls of these kernels are host-bound: ~100 us)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g, _ = capture(fn)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


# ---------------------------------------------------------------- dense
class DenseLayer(torch.nn.Module):
    pass


def dense_case(bits, n, k, ms, gen):
    from m3_convert.serve.linear import HummingLinearKernel, LinearShape
    qw, qz, sc = random_gptq((), n, k, bits, gen)
    W = decode(qw, sc, bits)                               # [n, k] float32
    layer = DenseLayer()
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    layer.m3_gptq = LinearShape(bits, G, n, k, torch.bfloat16)
    kern = HummingLinearKernel()
    t0 = time.time()
    kern.prepare(layer)
    prep = time.time() - t0
    wb = W.to(torch.bfloat16)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
        y = kern.apply(layer, x)
        ref = x.float() @ W.T
        rows.append({"bits": bits, "n": n, "k": k, "m": m, "humming": errs(y, ref),
                     "torch_bf16": errs(torch.nn.functional.linear(x, wb), ref),
                     "repeat_identical": bool(torch.equal(y, kern.apply(layer, x))),
                     "us_humming": round(timed(lambda: kern.apply(layer, x)), 1),
                     "us_torch_bf16": round(timed(lambda: torch.nn.functional.linear(x, wb)), 1),
                     "weight_bytes_humming": sum(p.numel() * p.element_size() for n_, p in layer.named_parameters()),
                     "prepare_s": round(prep, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


#: hand-made humming entries for up to 8 rows of a dense layer (issue 25: the batch-invariant default's block N
#: 256 leaves N/256 tiles, 24 of 132 SMs at N 6144, 12 at TP 2's 3072): the fields each changes in the default's
#: entry. WGMMA 128-wide keeps the MMA type and K tile of the larger-M entries (humming's batch-invariance test
#: compares such lists bit for bit); the MMA ones reach more SMs but are another MMA path (equality measured here)
SMALL_M_TILES = {
    "wgmma 8x128 s4": {"block_shape": [8, 128, 64], "warp_shape": [8, 32, 64]},
    "wgmma 8x128 s8": {"block_shape": [8, 128, 64], "warp_shape": [8, 32, 64], "num_stages": 8},
    "wgmma 8x128 s12": {"block_shape": [8, 128, 64], "warp_shape": [8, 32, 64], "num_stages": 12},
    "wgmma 8x128 s4 2cta": {"block_shape": [8, 128, 64], "warp_shape": [8, 32, 64], "num_ctas_per_sm": 2},
    "mma 8x64 s4": {"block_shape": [8, 64, 64], "warp_shape": [8, 32, 64], "mma_type": "mma", "use_warp_spec": False,
                    "use_tma": False},
    "mma 8x64 s8": {"block_shape": [8, 64, 64], "warp_shape": [8, 32, 64], "mma_type": "mma", "use_warp_spec": False,
                    "use_tma": False, "num_stages": 8},
    "mma 8x32 s8": {"block_shape": [8, 32, 64], "warp_shape": [8, 32, 64], "mma_type": "mma", "use_warp_spec": False,
                    "use_tma": False, "num_stages": 8},
}


def small_m_tuning(default: list, patch: dict, rows: int = 8) -> list:
    """humming's tuning list ``[[lo, hi, cfg], ...]`` with the sizes up to ``rows`` served by the default's entry for
    them changed by ``patch`` (every larger size as before)."""
    first = next(c for lo, hi, c in default if lo < 1 <= hi)
    if any(c != first for lo, hi, c in default if lo < rows):
        raise ValueError(f"small_m_tuning: the default serves sizes up to {rows} with more than one entry; patching "
                         "the first would give the others its tile")
    out = [[0, rows, {**first, **patch}]]
    for lo, hi, c in default:
        if hi > rows:
            out.append([max(lo, rows), hi, c])
    return out


def dense_tiles_case(bits, n, k, gen):
    """Each SMALL_M_TILES entry against humming's default on one layer (see the module docstring)."""
    from m3_convert.serve.linear import HummingLinearKernel, LinearShape
    qw, qz, sc = random_gptq((), n, k, bits, gen)
    layer = DenseLayer()
    for name, t in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    layer.m3_gptq = LinearShape(bits, G, n, k, torch.bfloat16)
    kern = HummingLinearKernel()
    kern.prepare(layer)
    default = json.loads(layer.m3_tuning)
    big = torch.randn(512, k, device=DEV, generator=gen).to(torch.bfloat16)
    y_big = kern.apply(layer, big)
    base = {m: kern.apply(layer, big[:m]) for m in (1, 8)}
    rows = []
    for name, patch in [("default", {})] + list(SMALL_M_TILES.items()):
        layer.m3_tuning = json.dumps(small_m_tuning(default, patch) if patch else default)
        row = {"bits": bits, "n": n, "k": k, "tile": name, "entry": small_m_tuning(default, patch)[0][2]}
        try:
            for m in (1, 8):
                y = kern.apply(layer, big[:m])
                row[f"m{m}"] = {"us": round(timed(lambda: kern.apply(layer, big[:m])), 1),
                                "equal_default": bool(torch.equal(y, base[m])),
                                "equal_in_512_batch": bool(torch.equal(y, y_big[:m])),
                                "repeat_identical": bool(torch.equal(y, kern.apply(layer, big[:m])))}
            row["512_rows_unchanged"] = bool(torch.equal(kern.apply(layer, big), y_big))   # the list's larger sizes
        except Exception as e:          # a tile humming refuses or cannot compile: reported, not fatal
            row["error"] = repr(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    layer.m3_tuning = json.dumps(default)
    return rows


# ---------------------------------------------------------------- MoE
class MoeConfig:
    def __init__(self, hidden, inter, E, k):
        self.tp_rank, self.tp_size = 0, 1
        self.hidden_dim, self.intermediate_size_per_partition = hidden, inter
        self.swiglu_limit, self.swiglu_alpha, self.swiglu_beta = LIMIT, ALPHA, BETA
        self.num_experts, self.experts_per_token = E, k


class MoeLayer(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.moe_config = cfg
        self.global_num_experts = cfg.num_experts
        self.expert_map = None
        self.swiglu_limit, self.swiglu_alpha, self.swiglu_beta = LIMIT, ALPHA, BETA


def moe_reference(x, ids, w, W13, W2, inter, dtype=torch.float32):
    """sum_k w_k * W2_e(swiglu_oai(W13_e x)) per token [tokens, hidden], float32: from the exact decode in float32
    (``dtype`` float32), or as a bf16 engine computes it (bfloat16: bf16 weights, GEMM outputs and activation, the
    activation's formula in float32; the floor any bf16 kernel lives with). ``W13[e]`` [2I, H] (gate then up),
    ``W2[e]`` [H, I], float32; a row whose id names no expert adds nothing. The one reference of moe_case and
    gpu/wmix_diag.py."""
    out = torch.zeros(x.shape[0], W2[0].shape[0], device=x.device)
    for e in ids.unique().tolist():
        if not 0 <= e < len(W13):
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = (x[tok].to(dtype) @ W13[e].to(dtype).T).float()
        g_, u_ = h[:, :inter].clamp(max=LIMIT), h[:, inter:].clamp(-LIMIT, LIMIT)
        a = (g_ * torch.sigmoid(ALPHA * g_) * (u_ + BETA)).to(dtype)
        out.index_add_(0, tok, (a @ W2[e].to(dtype).T).float() * w[tok, slot, None])
    return out


def moe_case(tag, per_bits, hidden, inter, E, k, ms, gen):
    """per_bits[e] = (w1, w3, w2) bits."""
    from m3_convert.serve.methods import M3HummingMoEMethod
    from m3_convert.serve.moe import HummingMoEKernel, WmixMoEKernel, load_expert
    prefix = "model.layers.9.block_sparse_moe.experts"
    modules = {f"{prefix}.{e}.{s}": {"bits": b, "group_size": G} for e in range(E) for s, b in zip(("w1", "w3", "w2"), per_bits[e])}
    d = decide.select_moe(prefix, modules, E, hidden, inter, frozenset({decide.HUMMING}))   # humming at every width
    cfg = MoeConfig(hidden, inter, E, k)
    layer, wlayer = MoeLayer(cfg), MoeLayer(cfg)
    method = M3HummingMoEMethod(d, cfg, HummingMoEKernel())     # hgemv's tables added after prepare (hgemv_prepare)
    wmethod = M3HummingMoEMethod(d, cfg, WmixMoEKernel())
    with torch.device(DEV):
        method.create_weights(layer, E, hidden, inter, torch.bfloat16)
        wmethod.create_weights(wlayer, E, hidden, inter, torch.bfloat16)
    W13, W2 = [], []
    ckpt_bytes = 0
    for e in range(E):
        ws = {}
        for s, b in zip(("w1", "w3", "w2"), per_bits[e]):
            n, kk = (inter, hidden) if s != "w2" else (hidden, inter)
            qw, qz, sc = random_gptq((), n, kk, b, gen)
            ckpt_bytes += sum(t.numel() * t.element_size() for t in (qw, qz, sc))
            for leaf, t in (("qweight", qw), ("qzeros", qz), ("scales", sc)):
                sub = "w2" if s == "w2" else "w13"
                load_expert(layer, getattr(layer, f"{sub}_{leaf}"), t, sub, leaf, s, e)
            ws[s] = decode(qw, sc, b)                      # exact float32 (29 GB for 128 real-size experts)
        W13.append(torch.cat([ws["w1"], ws["w3"]]))
        W2.append(ws["w2"])
    for s_ in ("w13", "w2"):
        for leaf in ("qweight", "qzeros", "scales"):
            getattr(wlayer, f"{s_}_{leaf}").data.copy_(getattr(layer, f"{s_}_{leaf}").data)
    t0 = time.time()
    method.process_weights_after_loading(layer)
    prep = time.time() - t0
    try:           # what HummingMoEKernel(decode="hgemv") adds to prepare, apart: a failure leaves humming's rows
        hgemv_problem = method.kernel.add_hgemv(layer)
    except Exception as e:
        hgemv_problem = f"{type(e).__name__}: {e}"[:400]
    t0 = time.time()
    wmethod.process_weights_after_loading(wlayer)
    wprep = time.time() - t0
    held = sum(p.numel() * p.element_size() for n_, p in layer.named_parameters())
    wheld = sum(p.numel() * p.element_size() for n_, p in wlayer.named_parameters())
    rows = []
    for m in ms:
        x = torch.randn(m, hidden, device=DEV, generator=gen).to(torch.bfloat16)
        ids = torch.rand(m, E, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
        w = torch.rand(m, k, device=DEV, generator=gen)
        w = (w / w.sum(-1, keepdim=True) * 2.0).float()
        y = method.apply(layer, x, w, ids, None, None)
        ref = moe_reference(x, ids, w, W13, W2, inter)                      # float32 from the exact decode
        refb = moe_reference(x, ids, w, W13, W2, inter, torch.bfloat16)     # the bf16 path
        streams, layer.m3_streams = layer.m3_streams, []      # the parts one after another (M3_MOE_STREAMS=0)
        y_serial = method.apply(layer, x, w, ids, None, None)
        us_serial = round(timed(lambda: method.apply(layer, x, w, ids, None, None)), 1)
        layer.m3_streams = streams
        rows.append({"case": tag, "m": m, "experts": E, "top_k": k, "parts": [f"{p.name}x{len(p.slots)}" for p in d.parts],
                     "humming": errs(y, ref), "bf16_path": errs(refb, ref),
                     "repeat_identical": bool(torch.equal(y, method.apply(layer, x, w, ids, None, None))),
                     "side_streams": len(streams), "serial_identical": bool(torch.equal(y, y_serial)),
                     "us_serial": us_serial,
                     "us_humming": round(timed(lambda: method.apply(layer, x, w, ids, None, None)), 1),
                     "gpu_bytes": held, "gptq_bytes": ckpt_bytes, "prepare_s": round(prep, 1)})
        rows[-1].update(wmix_row(wmethod, wlayer, x, w, ids, ref, wheld, wprep))
        print(json.dumps(rows[-1]), flush=True)           # humming's and wmix's figures out before hgemv runs
        rows[-1].update(hgemv_row(method, layer, x, w, ids, ref, y, hgemv_problem))
        print(json.dumps({k: v for k, v in rows[-1].items() if k in ("case", "m") or "hgemv" in k}), flush=True)
    W13 = W2 = layer = wlayer = None      # freed before the next case
    torch.cuda.empty_cache()
    return rows


GEMV_SWEEP = [(16, 64, None, 4, 2), (8, 128, None, 4, 3), (32, 128, None, 8, 2), (16, 128, 1, 4, 2)]
TILED_SWEEP = [(16, 64, 4, 3), (32, 64, 4, 2), (64, 64, 4, 2)]      # tiles that fit sm_90's shared memory
GEMV_SWEEP_MS, TILED_SWEEP_MS = (1, 8, 32), (8, 32, 512)      # each config is a Triton compile (seconds): few sizes


def hgemv_row(method, layer, x, w, ids, ref, y_parts, problem):
    """M3_MOE_KERNEL=hgemv on the same layer (humming's tensors): errors against the checkpoint's exact decode (fp16
    scales; hgemv computes with humming's bf16 scales, products and sums in float32, while humming rounds each
    weight times its scale to bf16 before its tensor cores: mainloop_arith.cuh), its difference from humming's parts
    (0 where HummingMoEKernel.decode_path takes the parts), repeat, time. A failure is recorded, not raised."""
    if problem:
        return {"hgemv_error": problem}
    kern = method.kernel
    kern.decode = "hgemv"
    try:
        run = lambda: method.apply(layer, x, w, ids, None, None)  # noqa: E731
        y = run()
        return {"hgemv": errs(y, ref), "hgemv_path": kern.decode_path(layer, ids.numel()),
                "hgemv_repeat_identical": bool(torch.equal(y, run())),
                "hgemv_vs_parts": errs(y, y_parts), "us_hgemv": round(timed(run), 1)}
    except Exception as e:
        return {"hgemv_error": f"{type(e).__name__}: {e}"[:400]}
    finally:
        kern.decode = "parts"


def wmix_row(method, layer, x, w, ids, ref, held, prep):
    """m3_convert.serve.wmix on the same layer: errors, repeat, time at its chosen kernel; then each kernel forced
    (gemv and tiled at the sizes both can take) and the tile sweeps (GEMV_SWEEP / TILED_SWEEP, kernel configs of
    both sublayers), as the choice in decide.wmix_path / wmix_split / wmix_tile is to be made from them."""
    from m3_convert.serve import decide as D, wmix
    run = lambda: method.apply(layer, x, w, ids, None, None)  # noqa: E731
    y = run()
    rows = ids.numel()
    row = {"wmix": errs(y, ref), "wmix_repeat_identical": bool(torch.equal(y, run())),
           "wmix_path": D.wmix_path(rows, layer.m3_dims.num_experts), "us_wmix": round(timed(run), 1), "wmix_gpu_bytes": held,
           "wmix_prepare_s": round(prep, 1)}
    path0, gcfg0, tcfg0 = D.wmix_path, wmix.gemv_config, wmix.tiled_config
    sweep = {}
    try:
        m = ids.shape[0]
        if m in GEMV_SWEEP_MS:
            D.wmix_path = lambda r, e: "gemv"                                   # noqa: E731
            for rr, bn, sp, wa, st in GEMV_SWEEP:
                def cfg(r, t, sms, rr=rr, bn=bn, sp=sp, wa=wa, st=st):
                    split = sp if sp is not None else D.wmix_split(r, t.n, bn, t.halves, sms)
                    return wmix.GemvConfig(rr, bn, split, wa, st)
                wmix.gemv_config = cfg
                yy = run()
                sweep[f"gemv r{rr} n{bn} s{sp or 'auto'} w{wa} st{st}"] = [round(timed(run), 1), errs(yy, ref)["norm_rel"]]
            wmix.gemv_config = gcfg0
        D.wmix_path = lambda r, e: "tiled"                                      # noqa: E731
        for bm, bn, wa, st in (TILED_SWEEP if m in TILED_SWEEP_MS else ()):
            wmix.tiled_config = lambda r, t, bm=bm, bn=bn, wa=wa, st=st: wmix.TiledConfig(bm, bn, wa, st)  # noqa: E731
            yy = run()
            sweep[f"tiled m{bm} n{bn} w{wa} st{st}"] = [round(timed(run), 1), errs(yy, ref)["norm_rel"]]
    finally:
        D.wmix_path, wmix.gemv_config, wmix.tiled_config = path0, gcfg0, tcfg0
    row["wmix_sweep"] = sweep
    return row


def mixed_moe(E, hidden, inter, k, per, gen, kernel, exact=False):
    """The plugin's M3HummingMoEMethod with ``kernel`` (a HummingMoEKernel or WmixMoEKernel) on a stand-in layer of
    random GPTQ experts (``per[e]`` = bits of w1, w3, w2; decide's default choice of parts), loaded through the
    plugin's loader and prepared: (method, layer, W13, W2), with ``exact`` every expert's exact float32 decode
    (W13 [2I, H], W2 [H, I]; else empty lists)."""
    from m3_convert.serve.methods import M3HummingMoEMethod
    from m3_convert.serve.moe import load_expert
    prefix = "p"
    modules = {f"{prefix}.{e}.{s}": {"bits": b, "group_size": G} for e in range(E) for s, b in zip(("w1", "w3", "w2"), per[e])}
    d = decide.select_moe(prefix, modules, E, hidden, inter)
    cfg = MoeConfig(hidden, inter, E, k)
    layer = MoeLayer(cfg)
    method = M3HummingMoEMethod(d, cfg, kernel)
    with torch.device(DEV):
        method.create_weights(layer, E, hidden, inter, torch.bfloat16)
    W13, W2 = [], []
    for e in range(E):
        ws = {}
        for s, b in zip(("w1", "w3", "w2"), per[e]):
            n, kk = (inter, hidden) if s != "w2" else (hidden, inter)
            sub = "w2" if s == "w2" else "w13"
            qw, qz, sc = random_gptq((), n, kk, b, gen)
            for leaf, t in zip(("qweight", "qzeros", "scales"), (qw, qz, sc)):
                load_expert(layer, getattr(layer, f"{sub}_{leaf}"), t, sub, leaf, s, e)
            if exact:
                ws[s] = decode(qw, sc, b)
        if exact:
            W13.append(torch.cat([ws["w1"], ws["w3"]]))
            W2.append(ws["w2"])
    method.process_weights_after_loading(layer)
    return method, layer, W13, W2


def graph_case(gen, kernel="humming", m=8):
    """The mixed MoE apply captured in a CUDA graph and replayed on new inputs: same output as eager."""
    from m3_convert.serve.moe import HummingMoEKernel, WmixMoEKernel
    E, hidden, inter, k = 16, 1024, 512, 4
    per = [(decide.QUANT_BITS[e % 4], decide.QUANT_BITS[(e + 1) % 4], decide.QUANT_BITS[(e + 2) % 4]) for e in range(E)]
    kern = {"wmix": WmixMoEKernel, "hgemv": lambda: HummingMoEKernel(decode="hgemv")}.get(kernel, HummingMoEKernel)()
    method, layer, _, _ = mixed_moe(E, hidden, inter, k, per, gen, kern)
    x = torch.randn(m, hidden, device=DEV, generator=gen).to(torch.bfloat16)
    ids = torch.rand(m, E, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32)
    w = torch.rand(m, k, device=DEV, generator=gen)
    method.apply(layer, x, w, ids, None, None)            # warm-up (JIT) before capture
    g, out = capture(lambda: method.apply(layer, x, w, ids, None, None))
    res = []
    for _ in range(3):
        x.copy_(torch.randn(m, hidden, device=DEV, generator=gen).to(torch.bfloat16))
        ids.copy_(torch.rand(m, E, device=DEV, generator=gen).topk(k, dim=-1).indices.to(torch.int32))
        w.copy_(torch.rand(m, k, device=DEV, generator=gen))
        g.replay()
        eager = method.apply(layer, x, w, ids, None, None)
        res.append(bool(torch.equal(out, eager)))
    row = {"case": "cuda_graph_replay_equals_eager", "kernel": kernel, "m": m, "replays": res}
    if kernel == "hgemv":                 # the path the capture took (a layer hgemv cannot read keeps the parts)
        row["path"] = method.kernel.decode_path(layer, ids.numel())
    print(json.dumps(row), flush=True)
    return [row]


def main():
    out = sys.argv[1]
    quick = "--quick" in sys.argv
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=DEV)
    gen.manual_seed(20261202)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "humming": compat.humming_version(),
           "humming_problem": compat.humming_problem(), "dense": [], "moe": [], "graph": [], "dense_tiles": []}
    t0 = time.time()
    phases = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--phases=")), "graph,dense,moe").split(",")
    widths = [int(b) for b in next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--moe-widths=")), "2,3,4,8").split(",") if b]
    moe_ms = [int(m) for m in next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--moe-ms=")), "").split(",") if m] or MOE_MS
    if "--no-wmix-sweep" in sys.argv:          # wmix's tile sweeps off (each config a compile): for a short call
        global GEMV_SWEEP_MS, TILED_SWEEP_MS
        GEMV_SWEEP_MS, TILED_SWEEP_MS = (), ()
    if "graph" in phases:
        res["graph"] = graph_case(gen) + [r for m in (1, 8, 64) for r in graph_case(gen, "wmix", m)]
        json.dump(res, open(out, "w"), indent=1)
    shapes = [(6144, 6144), (6144, 3072)] if not quick else [(6144, 3072)]
    for bits in decide.QUANT_BITS if "dense" in phases else ():
        for n, k in shapes:
            res["dense"] += dense_case(bits, n, k, [1, 32, 512], gen)
    for n, k in ((6144, 6144), (6144, 3072), (3072, 6144), (6144, 1536)) if "dense-tiles" in phases else ():
        res["dense_tiles"] += dense_tiles_case(3, n, k, gen)
        json.dump(res, open(out, "w"), indent=1)       # each shape's rows kept should a hand-made tile fault
    E, H, I, K = 128, 6144, 3072, 4
    for bits in widths if "moe" in phases else ():
        res["moe"] += moe_case(f"uniform{bits}", [(bits, bits, bits)] * E, H, I, E, K, moe_ms, gen)
        json.dump(res, open(out, "w"), indent=1)
    mixed = [(decide.QUANT_BITS[e % 4], decide.QUANT_BITS[(e // 4) % 4], decide.QUANT_BITS[(e // 16) % 4]) for e in range(E)]
    if "moe" in phases:
        res["moe"] += moe_case("mixed", mixed, H, I, E, K, moe_ms, gen)
        json.dump(res, open(out, "w"), indent=1)
    for m in (1, 4) if "graph" in phases else ():      # hgemv's captures last: a fault there leaves the rows above
        try:
            res["graph"] += graph_case(gen, "hgemv", m)
        except Exception as e:
            res["graph"].append({"case": "cuda_graph_replay_equals_eager", "kernel": "hgemv", "m": m,
                                 "error": f"{type(e).__name__}: {e}"[:400]})
            print(json.dumps(res["graph"][-1]), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    json.dump(res, open(out, "w"), indent=1)
    worst_d = max((r["humming"]["max_rel"] / max(r["torch_bf16"]["max_rel"], 1e-9) for r in res["dense"]), default=None)
    worst_m = max((r["humming"]["norm_rel"] / max(r["bf16_path"]["norm_rel"], 1e-9) for r in res["moe"]), default=None)
    worst_w = max((r["wmix"]["norm_rel"] / max(r["bf16_path"]["norm_rel"], 1e-9) for r in res["moe"]), default=None)
    on_h = [r for r in res["moe"] if r.get("hgemv_path") == "hgemv"]
    worst_h = max((r["hgemv"]["norm_rel"] / max(r["bf16_path"]["norm_rel"], 1e-9) for r in on_h), default=None)
    print(f"hgemv: worst hgemv/bf16 error ratio {worst_h} (rows on its path); " + "; ".join(
        f"{r['case']} m{r['m']}: " + (f"hgemv {r['us_hgemv']} us ({r['hgemv_path']})" if "us_hgemv" in r else
                                      f"hgemv error {r.get('hgemv_error')}") for r in res["moe"]))
    print(f"wmix: worst wmix/bf16 error ratio {worst_w}; " + "; ".join(
        f"{r['case']} m{r['m']}: humming {r['us_humming']} us, wmix {r['us_wmix']} us ({r['wmix_path']})" for r in res["moe"]))
    print(f"kernel check: {len(res['dense'])} dense, {len(res['moe'])} MoE cases in {res['seconds']} s; worst humming/bf16 "
          f"error ratio dense {worst_d} (max), MoE {worst_m} (norm); graph: {res['graph']}")


if __name__ == "__main__":
    main()
