#!/usr/bin/env python3
"""The wmix kernels compiled for Hopper (sm_90) on a machine without a GPU: what the GPU would run, read offline.

    python3 gpu/wmix_sass.py                  # every kernel at M3's shapes: registers, spills, instructions per weight
    python3 gpu/wmix_sass.py --sass OUT_DIR   # also write each kernel's SASS
    python3 gpu/wmix_sass.py --jit 8192       # what serving compiles for every batch up to 8192 tokens, timed cold
    python3 gpu/wmix_sass.py --per-width      # the tiled kernel's K loop per width and load: instructions per code

Triton compiles a kernel for a target it is told (``GPUTarget("cuda", 90, 32)``) down to a cubin with the ptxas
its wheel ships; nothing runs. The arguments are specialised as Triton's JIT specialises a real launch (pointers
and integers divisible by 16 get ``tt.divisibility`` 16, an integer equal to 1 becomes the constant 1), so the code
is the code a GPU launch at these shapes compiles. The interpreter (TRITON_INTERPRET=1) accepts programs that this
compiler refuses (a plain Python global in a kernel, say): tests/test_wmix.py builds every kernel here so that such
a program fails on the CPU, not on the first GPU call. Read per kernel: registers, stack and local-memory
instructions (a spill is slow), and, for gemv's inner loops, SASS instructions per weight (the work one token of
decode does per weight: the issue slots it costs), shared memory, and the blocks and warps an SM holds at once
(few warps cannot hide memory latency).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from m3_convert.serve import decide, hgemv, wmix

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}
HIDDEN, INTER, GROUP, TOPK = 6144, 3072, 128, 4          # M3's MoE: one expert is 6144 -> 2x3072 -> 6144
SMS = 132                                                # an H100 SXM's SMs (the K split decide picks there)


def specialise(fn, args: dict, const: dict):
    """(signature, constexprs, attributes) of a launch of ``fn`` with ``args`` (name -> tensor or int, in the
    kernel's order) and the constexprs ``const``, as Triton's JIT specialises it: what its compile cache is keyed
    by (with the warps and stages)."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            consts[(i,)] = const[name]
            continue
        v = args[name]
        if fn.params[i].do_not_specialize:                  # @triton.jit(do_not_specialize=...): a plain integer
            sig[name] = "i32"
            continue
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]          # torch's allocations are 256-byte aligned
        elif v == 1:
            sig[name] = "constexpr"
            consts[(i,)] = 1
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def build(fn, args: dict, const: dict, warps: int, stages: int):
    """``fn`` compiled for sm_90 as a launch with ``args`` and ``const`` would compile it (:func:`specialise`).
    Returns Triton's compiled kernel (``asm["cubin"]``, ``asm["ptx"]``, ``metadata.shared``)."""
    sig, consts, attrs = specialise(fn, args, const)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def opcodes(sass: str) -> collections.Counter:
    """SASS instructions of nvdisasm's text by opcode (a predicate guard skipped)."""
    return collections.Counter(m.group(1) for m in re.finditer(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]+)", sass))


def resources(kernel) -> dict:
    """Registers, stack bytes, and the SASS instruction counts (by opcode) of a compiled kernel."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    ops = opcodes(sass)
    return {"regs": int(m[1]), "stack": int(m[2]), "local": ops["LDL"] + ops["STL"],
            "local_in_loops": local_in_loops(sass), "ops": ops, "sass": sass}


SUBLAYERS = {"w13": (INTER, HIDDEN, 2, TOPK), "w2": (HIDDEN, INTER, 1, 1)}    # N, K, halves, in_div


def _args(sub: str, tokens: int) -> tuple:
    """(gemv's arguments, the tiled kernel's arguments) of sublayer ``sub`` at ``tokens`` tokens, shaped as the
    plugin's (moe.py ``_gemm``: ``tokens x TOPK`` rows; the tensors are on the CPU, tiny, never read: only their
    dtypes and the integers reach the specialisation)."""
    n, k, halves, in_div = SUBLAYERS[sub]
    rows = tokens * TOPK
    x = torch.empty(1, k, dtype=torch.bfloat16)
    ids = torch.zeros(1, dtype=torch.int32)
    slots = torch.zeros(1, dtype=torch.int32)
    offs = torch.zeros(1, dtype=torch.int64)
    dst = torch.empty(1, halves * n, dtype=torch.bfloat16)
    common = dict(x_ptr=x, x_stride=k, in_div=in_div, qw_ptr=slots, sc_ptr=offs.half(), bits_ptr=slots,
                  qoff_ptr=offs, soff_ptr=offs, out_ptr=dst, out_stride=halves * n, N=n, K=k)
    gemv = dict(common, ids_ptr=ids, part_ptr=torch.empty(1, dtype=torch.float32), E=128)
    tiled = dict(common, sorted_ptr=ids, eids_ptr=ids, ntp_ptr=ids, rows_valid=rows)
    return gemv, tiled


def _table(sub: str) -> "wmix.SlotTable":
    """A SlotTable of ``sub``'s shape (128 experts; the widths are data, not part of any specialisation)."""
    n, k, halves, _ = SUBLAYERS[sub]
    z = torch.zeros(128 * halves, dtype=torch.int64)
    return wmix.SlotTable(torch.full((128 * halves,), 4, dtype=torch.int32), z, z, n, k, GROUP, halves)


def _gemv_launch(sub, args, cfg):
    halves = SUBLAYERS[sub][2]
    return (wmix._gemv, args, dict(HALVES=halves, SPLIT=cfg.split, G=GROUP, R=cfg.rows, BN=cfg.block_n, ALIGN=16,
                                   PREFETCH=cfg.prefetch), cfg)


def _reduce_launch(sub, args, cfg):
    return (wmix._reduce, dict(part_ptr=args["part_ptr"], out_ptr=args["out_ptr"], out_stride=args["out_stride"],
                               N=args["N"]), dict(HALVES=SUBLAYERS[sub][2], SPLIT=cfg.split, BN=cfg.block_n), cfg)


def _tiled_launch(sub, args, cfg):
    return (wmix._tiled, args, dict(HALVES=SUBLAYERS[sub][2], G=GROUP, BM=cfg.block_m, BN=cfg.block_n, DOT_F32=False,
                                    ALIGN=16, LOAD=cfg.load), cfg)


def local_in_loops(sass: str) -> int:
    """Local-memory instructions (spills) inside a loop of ``sass`` (nvdisasm's text): a loop runs from a label to a
    branch back to it. A register saved once before the loops and restored after them costs nothing that
    matters; one inside a loop costs at every iteration."""
    lines, loops = _loops(sass)
    return sum(1 for addr, line in lines if re.search(r"\b(LDL|STL)\b", line)
               and any(lo <= addr <= hi for lo, hi in loops))


def _loops(sass: str) -> tuple:
    """(every instruction as (address, line), every loop as (first, last) address) of nvdisasm's text."""
    at, label, lines = {}, None, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        a = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if a:
            addr = int(a.group(1), 16)
            if label:
                at[label], label = addr, None
            lines.append((addr, line))
    loops = []
    for addr, line in lines:
        b = re.search(r"BRA\W+\(?(\.L_x_\d+)", line)
        if b and b.group(1) in at and at[b.group(1)] <= addr:
            loops.append((at[b.group(1)], addr))
    return lines, loops


@triton.jit(do_not_specialize=["rows_valid"])
def _one_width(x_ptr, x_stride, qw_ptr, sc_ptr, out_ptr, out_stride, rows_valid, N, K, BITS: tl.constexpr,
               G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LOAD: tl.constexpr):
    """The tiled kernel's K loop at one width, alone (wmix._group_loop over BM rows and one output tile): in
    wmix._tiled the width is data, so its four loops share one kernel; here each is its own (:func:`per_width`).
    As in _tiled, the rows' mask is known at run time only (``rows_valid``); the rows are contiguous here, gathered
    there (outside the K loop)."""
    rows = tl.arange(0, BM)
    xr = x_ptr + rows.to(tl.int64)[:, None] * x_stride
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    rz = tl.load(qw_ptr) >> 4            # as wmix._tiled's rz (a width >> 4): a value the compiler cannot fold
    acc = tl.zeros([BM, BN], tl.float32)
    acc = wmix._group_loop(acc, xr, rows < rows_valid, qw_ptr, sc_ptr, n, n < N, N, K, rz, BITS, G, False, LOAD)
    tl.store(out_ptr + rows[:, None] * out_stride + n[None, :], acc.to(out_ptr.dtype.element_ty))


def _store_bytes(lines) -> int:
    """Bytes a thread stores to shared memory in these SASS lines (STS.U8/.U16/.64/.128: 1/2/8/16; plain STS: 4)."""
    sizes = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
    total = 0
    for line in lines:
        m = re.search(r"\bSTS((?:\.\w+)*)", line)
        if m:
            total += next((sizes[x] for x in m.group(1).split(".")[1:] if x in sizes), 4)
    return total


def per_width(tile: tuple, load: str, bits: int) -> dict:
    """The tiled kernel's K loop for one (block_m, block_n, warps, stages) tile, load and width, compiled for sm_90
    at w13's shapes (:func:`_one_width`): its SASS instructions per iteration (one group of GROUP codes by block_n
    outputs) and per code per thread (the issue slots dequantizing a code costs; the tensor cores' share is the
    HGMMA count), by opcode, its memory barriers, shared-memory stores and ldmatrix loads; registers and shared
    memory."""
    bm, bn, warps, stages = tile
    n, k = INTER, HIDDEN
    x, qw = torch.empty(1, k, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int32)
    args = dict(x_ptr=x, x_stride=k, qw_ptr=qw, sc_ptr=torch.zeros(1, dtype=torch.float16), out_ptr=x, out_stride=k,
                rows_valid=bm, N=n, K=k)
    kernel = build(_one_width, args, dict(BITS=bits, G=GROUP, BM=bm, BN=bn, LOAD=load), warps, stages)
    r = resources(kernel)
    lines, loops = _loops(r["sass"])
    lo, hi = max(loops, key=lambda ab: ab[1] - ab[0])          # the K loop: the longest (the only one but prologue's)
    ops = opcodes("\n".join(line for a, line in lines if lo <= a <= hi))
    body = sum(1 for a, _ in lines if lo <= a <= hi)
    return {"tile": "x".join(map(str, tile)), "load": load, "bits": bits, "regs": r["regs"],
            "shared": kernel.metadata.shared, "loop_instructions": body,
            "per_code": round(body / (GROUP * bn / (32 * warps)), 2), "mma": ops["HGMMA"] + ops["HMMA"],
            "membar": ops["MEMBAR"],          # memory barriers per iteration (a fence before the tensor cores' read)
            "sts": ops["STS"], "sts_bytes": _store_bytes(line for a, line in lines if lo <= a <= hi),
            "ldsm": ops["LDSM"],                        # shared-memory stores (and bytes a thread) and ldmatrix loads
            "top": dict(ops.most_common(6))}


@triton.jit
def _hgemv_one_width(x_ptr, w_ptr, s_ptr, out_ptr, NP, K, BITS: tl.constexpr, G: tl.constexpr):
    """hgemv's K loop at one width, alone (hgemv._width over one block column): in hgemv._hgemv the width is data,
    so its four loops share one kernel; here each is its own (:func:`hgemv_per_width`)."""
    nb = tl.program_id(1)
    rz = tl.load(w_ptr) >> 4             # as hgemv's rz (a width >> 4): a value the compiler cannot fold
    groups = K // G
    y = hgemv._width(x_ptr, w_ptr, s_ptr, tl.program_id(0) * groups, groups, nb, NP // 64, NP, rz, BITS, G)
    n = 64 * nb + 8 * tl.arange(0, 8)[None, :] + tl.arange(0, 8)[:, None]
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty))


def _hgemv_args(sub: str) -> dict:
    n, k, halves, in_div = SUBLAYERS[sub]
    x, ids, offs = torch.empty(1, k, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    return dict(x_ptr=x, x_stride=k, ids_ptr=ids, in_div=in_div, w_ptr=ids, s_ptr=torch.zeros(1, dtype=torch.bfloat16),
                bits_ptr=ids, qoff_ptr=offs, soff_ptr=offs, out_ptr=torch.empty(1, dtype=torch.bfloat16),
                out_stride=halves * n, part_ptr=torch.empty(1, dtype=torch.float32), N=n, NP=n, K=k, E=128)


def hgemv_launches(tokens: int = 1, sms: int = SMS):
    """hgemv (m3_convert.serve.hgemv) of both sublayers at ``tokens`` tokens with the K split the plugin takes
    (moe.hgemv_gemm: decide.wmix_split), as (name, kernel, args, constexprs, warps): what M3_MOE_KERNEL=hgemv
    compiles for decode."""
    out = []
    for sub, (n, _, halves, _) in SUBLAYERS.items():
        split = decide.wmix_split(tokens * TOPK, n, hgemv.BLOCK_N, halves, sms)
        out.append((f"{sub} hgemv split {split}", hgemv._hgemv, _hgemv_args(sub),
                    dict(HALVES=halves, SPLIT=split, G=GROUP, ALIGN=16), 4))
    return out


def hgemv_per_width(sub: str, bits: int) -> dict:
    """hgemv's K loop at one width for ``sub``'s shapes (:func:`_hgemv_one_width`), compiled for sm_90: SASS
    instructions per iteration (one group: G/16 blocks of 16 inputs x 64 outputs) and per code per thread, by
    opcode, the bytes each global load reads (LDG.E.128: 16), registers."""
    n, k, _, _ = SUBLAYERS[sub]
    args = dict(x_ptr=torch.empty(1, k, dtype=torch.bfloat16), w_ptr=torch.zeros(1, dtype=torch.int32),
                s_ptr=torch.zeros(1, dtype=torch.bfloat16), out_ptr=torch.empty(1, dtype=torch.bfloat16), NP=n, K=k)
    kernel = build(_hgemv_one_width, args, dict(BITS=bits, G=GROUP), 4, 2)
    r = resources(kernel)
    lines, loops = _loops(r["sass"])
    lo, hi = max(loops, key=lambda ab: ab[1] - ab[0])
    body = [line for a, line in lines if lo <= a <= hi]
    ops = opcodes("\n".join(body))
    loads = collections.Counter(m.group(0) for line in body for m in re.finditer(r"\bLDG[.\w]*", line))
    return {"sublayer": sub, "bits": bits, "regs": r["regs"], "local": r["local"], "loop_instructions": len(body),
            "per_code": round(len(body) / (GROUP * 64 / 128), 2), "loads": dict(loads), "top": dict(ops.most_common(8))}


def launches(tokens: int = 1):
    """Every kernel and option of one MoE layer, as (name, kernel, args, constexprs, config): gemv at ``tokens``
    tokens with decide's K split, prefetch off and on; the reduce; the tiled kernel at decide's small tile, with
    each of wmix.TILED_LOADS, and at its prefill tile with its load (for tests/test_wmix.py: each must compile; not
    what one batch launches: :func:`serving`)."""
    out = []
    for sub in SUBLAYERS:
        gargs, targs = _args(sub, tokens)
        gcfg = wmix.gemv_config(tokens * TOPK, _table(sub), SMS)
        out.append((f"{sub} gemv", *_gemv_launch(sub, gargs, gcfg)))
        out.append((f"{sub} gemv prefetch", *_gemv_launch(sub, gargs, dataclasses.replace(gcfg, prefetch=True))))
        out.append((f"{sub} reduce", *_reduce_launch(sub, gargs, dataclasses.replace(gcfg, split=max(gcfg.split, 2)))))
        small, large = (wmix.TiledConfig(*decide.wmix_tile(TOPK * t, 128)) for t in (64, 8192))
        for tcfg in [dataclasses.replace(small, load=load) for load in wmix.TILED_LOADS] + [large]:
            tag = "" if tcfg.load == wmix.TiledConfig.load else f" {tcfg.load}"    # decide's two tiles
            out.append((f"{sub} tiled {tcfg.block_m}x{tcfg.block_n}{tag}", *_tiled_launch(sub, targs, tcfg)))
    return out


def serving(tokens: int, sms: int = SMS):
    """The kernels one MoE layer launches for a batch of ``tokens`` tokens, chosen as moe.py's ``_gemm`` chooses
    (decide.wmix_path, wmix.gemv_config / tiled_config), as (name, kernel, args, constexprs, config)."""
    out = []
    for sub in SUBLAYERS:
        rows, table = tokens * TOPK, _table(sub)
        gargs, targs = _args(sub, tokens)
        if decide.wmix_path(rows, 128) == "gemv":
            cfg = wmix.gemv_config(rows, table, sms)
            out.append((f"{sub} gemv split {cfg.split}", *_gemv_launch(sub, gargs, cfg)))
            if cfg.split > 1:
                out.append((f"{sub} reduce split {cfg.split}", *_reduce_launch(sub, gargs, cfg)))
        else:
            cfg = wmix.tiled_config(rows, table)
            out.append((f"{sub} tiled {cfg.block_m}x{cfg.block_n}", *_tiled_launch(sub, targs, cfg)))
    return out


def variants(max_tokens: int, sms: int = SMS) -> dict:
    """The distinct compilations serving needs over every batch of 1..``max_tokens`` tokens: Triton compiles one per
    specialisation (:func:`specialise`) and launch options, whatever the number of layers or the widths (a slot's
    width is data the kernel reads). Returns {key: (name, kernel, args, constexprs, config, first token count)}."""
    seen = {}
    for tokens in range(1, max_tokens + 1):
        for name, fn, args, const, cfg in serving(tokens, sms):
            sig, consts, attrs = specialise(fn, args, const)
            key = (fn.fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())),
                   repr(sorted(attrs.items())), cfg.warps, cfg.stages)
            if key not in seen:
                seen[key] = (name, fn, args, const, cfg, tokens)
    return seen


def jit(max_tokens: int) -> list:
    """Each distinct compilation serving needs up to ``max_tokens`` tokens, compiled cold (an empty Triton cache)
    and timed on this machine: what wmix adds to a first start, bounded whatever the depth of the model."""
    import tempfile
    import time
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            knobs.cache.dir = cache
        for name, fn, args, const, cfg, tokens in variants(max_tokens).values():
            t = time.perf_counter()
            build(fn, args, const, cfg.warps, cfg.stages)
            rows.append({"kernel": name, "first_tokens": tokens, "compile_s": round(time.perf_counter() - t, 2)})
    return rows


def occupancy(regs: int, shared: int, warps: int) -> int:
    """Blocks an sm_90 SM holds at once (CUDA's occupancy rules): 64K registers allocated per warp in units of 256,
    228 KiB of shared memory with 1 KiB reserved per block, at most 64 warps and 32 blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_smem = 233472 // (shared + 1024)
    return min(by_regs, by_smem, 64 // warps, 32)


def table(sass_dir: str | None = None) -> list:
    rows = []
    for name, fn, args, const, cfg in launches():
        kernel = build(fn, args, const, cfg.warps, cfg.stages)
        r = resources(kernel)
        if sass_dir:
            with open(os.path.join(sass_dir, name.replace(" ", "_") + ".sass"), "w") as f:
                f.write(r["sass"])
        blocks = occupancy(r["regs"], kernel.metadata.shared, cfg.warps)
        rows.append({"kernel": name, "regs": r["regs"], "stack": r["stack"], "local": r["local"],
                     "local_in_loops": r["local_in_loops"],
                     "shared": kernel.metadata.shared, "blocks_per_sm": blocks, "warps_per_sm": blocks * cfg.warps,
                     "instructions": sum(r["ops"].values()), "top": dict(r["ops"].most_common(8))})
    return rows


if __name__ == "__main__":
    if "--jit" in sys.argv:
        most = int(sys.argv[sys.argv.index("--jit") + 1])
        out = jit(most)
        for row in out:
            print(json.dumps(row))
        print(json.dumps({"max_tokens": most, "compilations": len(out),
                          "compile_s": round(sum(r["compile_s"] for r in out), 1), "cpus": os.cpu_count()}))
        sys.exit(0)
    if "--hgemv" in sys.argv:              # hgemv (M3_MOE_KERNEL=hgemv's decode): the launches, then each width's loop
        for name, fn, args, const, warps in hgemv_launches():
            kernel = build(fn, args, const, warps, 2)
            r = resources(kernel)
            print(json.dumps({"kernel": name, "regs": r["regs"], "local": r["local"], "local_in_loops": r["local_in_loops"],
                              "shared": kernel.metadata.shared, "blocks_per_sm": occupancy(r["regs"], kernel.metadata.shared, warps),
                              "instructions": sum(r["ops"].values())}), flush=True)
        for sub in SUBLAYERS:
            for bits in decide.QUANT_BITS:
                print(json.dumps(hgemv_per_width(sub, bits)), flush=True)
        sys.exit(0)
    if "--per-width" in sys.argv:          # the tiled kernel's K loop per width and load, at decide's two tiles
        for tile in (decide.wmix_tile(TOPK * t, 128)[:4] for t in (64, 8192)):
            for load in wmix.TILED_LOADS:
                for bits in decide.QUANT_BITS:
                    print(json.dumps(per_width(tile, load, bits)), flush=True)
        sys.exit(0)
    d = sys.argv[sys.argv.index("--sass") + 1] if "--sass" in sys.argv else None
    if d:
        os.makedirs(d, exist_ok=True)
    for row in table(d):
        print(json.dumps(row))
