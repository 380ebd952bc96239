#!/usr/bin/env python3
"""The wmix kernels compiled for Hopper (sm_90) on a machine without a GPU: what the GPU would run, read offline.

    python3 gpu/wmix_sass.py                  # every kernel at M3's shapes: registers, spills, instructions per weight
    python3 gpu/wmix_sass.py --sass OUT_DIR   # also write each kernel's SASS

Triton compiles a kernel for a target it is told (``GPUTarget("cuda", 90, 32)``) down to a cubin with the ptxas
its wheel ships; nothing runs. The arguments are specialised as Triton's JIT specialises a real launch (pointers
and integers divisible by 16 get ``tt.divisibility`` 16, an integer equal to 1 becomes the constant 1), so the code
is the code a GPU launch at these shapes compiles. The interpreter (TRITON_INTERPRET=1) accepts programs that this
compiler refuses (a plain Python global in a kernel, say): tests/test_wmix.py builds every kernel here so that such
a program fails on the CPU, not on the first GPU call. Read per kernel: registers, stack and local-memory
instructions (a spill is slow), and, for gemv's inner loops, SASS instructions per weight (the work one token of
decode does per weight: the issue slots it costs).
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
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from m3_convert.serve import decide, wmix

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}
HIDDEN, INTER, GROUP, TOPK = 6144, 3072, 128, 4          # M3's MoE: one expert is 6144 -> 2x3072 -> 6144
SMS = 132                                                # an H100 SXM's SMs (the K split decide picks there)


def build(fn, args: dict, const: dict, warps: int, stages: int):
    """``fn`` compiled for sm_90 as a launch with ``args`` (name -> tensor or int, in the kernel's order) and
    the constexprs ``const`` would compile it. Returns Triton's compiled kernel (``asm["cubin"]``, ``asm["ptx"]``)."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            consts[(i,)] = const[name]
            continue
        v = args[name]
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


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
    ops = collections.Counter(m2.group(1) for m2 in re.finditer(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]+)", sass))
    return {"regs": int(m[1]), "stack": int(m[2]), "local": ops["LDL"] + ops["STL"], "ops": ops, "sass": sass}


def launches(rows: int = 1):
    """The kernels one MoE layer launches, as (name, kernel, args, constexprs, config), with tensors shaped as the
    plugin's (no GPU needed: the tensors are on the CPU and never read): gemv at ``rows`` tokens with decide's K
    split, prefetch off and on; the reduce; the tiled kernel at both of decide's tiles, packed and gathered."""
    out = []
    for sub, (n, k, halves, in_div) in {"w13": (INTER, HIDDEN, 2, TOPK), "w2": (HIDDEN, INTER, 1, 1)}.items():
        x = torch.empty(rows * (1 if in_div > 1 else TOPK), k, dtype=torch.bfloat16)
        ids = torch.zeros(rows * TOPK, dtype=torch.int32)
        slots = torch.zeros(128 * halves, dtype=torch.int32)
        offs = torch.zeros(128 * halves, dtype=torch.int64)
        dst = torch.empty(rows * TOPK, halves * n, dtype=torch.bfloat16)
        part = torch.empty(1, dtype=torch.float32)
        split = decide.wmix_split(rows * TOPK, n, wmix.GemvConfig().block_n, halves, SMS)
        args = dict(x_ptr=x, x_stride=x.stride(0), ids_ptr=ids, in_div=in_div, qw_ptr=slots, sc_ptr=offs.half(),
                    bits_ptr=slots, qoff_ptr=offs, soff_ptr=offs, out_ptr=dst, out_stride=dst.stride(0),
                    part_ptr=part, N=n, K=k)
        for tag, gcfg in (("", wmix.GemvConfig(split=split)), (" prefetch", wmix.GemvConfig(split=split, prefetch=True))):
            out.append((f"{sub} gemv{tag}", wmix._gemv, args,
                        dict(HALVES=halves, SPLIT=gcfg.split, G=GROUP, R=gcfg.rows, BN=gcfg.block_n, ALIGN=16,
                             PREFETCH=gcfg.prefetch), gcfg))
        out.append((f"{sub} reduce", wmix._reduce, dict(part_ptr=part, out_ptr=dst, out_stride=dst.stride(0), N=n),
                    dict(HALVES=halves, SPLIT=split, BN=gcfg.block_n), gcfg))
        for rows_t in (TOPK * 256, TOPK * 8192):          # the small tile (decode batches) and the large (prefill)
            for tag, packed in (("", True), (" gather", False)):
                tcfg = dataclasses.replace(wmix.TiledConfig(*decide.wmix_tile(rows_t, 128)), packed=packed)
                targs = dict(x_ptr=x, x_stride=x.stride(0), sorted_ptr=ids, eids_ptr=ids, ntp_ptr=ids,
                             rows_valid=512, in_div=in_div, qw_ptr=slots, sc_ptr=offs.half(), bits_ptr=slots,
                             qoff_ptr=offs, soff_ptr=offs, out_ptr=dst, out_stride=dst.stride(0), N=n, K=k)
                out.append((f"{sub} tiled {tcfg.block_m}x{tcfg.block_n}{tag}", wmix._tiled, targs,
                            dict(HALVES=halves, G=GROUP, BM=tcfg.block_m, BN=tcfg.block_n, DOT_F32=False, ALIGN=16,
                                 PACKED=tcfg.packed), tcfg))
    return out


def table(sass_dir: str | None = None) -> list:
    rows = []
    for name, fn, args, const, cfg in launches():
        r = resources(build(fn, args, const, cfg.warps, cfg.stages))
        if sass_dir:
            with open(os.path.join(sass_dir, name.replace(" ", "_") + ".sass"), "w") as f:
                f.write(r["sass"])
        rows.append({"kernel": name, "regs": r["regs"], "stack": r["stack"], "local": r["local"],
                     "instructions": sum(r["ops"].values()), "top": dict(r["ops"].most_common(8))})
    return rows


if __name__ == "__main__":
    d = sys.argv[sys.argv.index("--sass") + 1] if "--sass" in sys.argv else None
    if d:
        os.makedirs(d, exist_ok=True)
    for row in table(d):
        print(json.dumps(row))
