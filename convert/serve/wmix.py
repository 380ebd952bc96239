"""wmix: the GEMMs of a MoE sublayer whose experts have different GPTQ widths (2, 3, 4, 8 bits), in one launch.

Each expert slot (a virtual expert of :mod:`.moe`'s layout: the gate or up half of an expert in ``w13``, the expert
in ``w2``) is read at its own width straight from the sublayer's flat GPTQ tensors (``<sublayer>_qweight`` [words]
int32 and ``<sublayer>_scales`` float16, each slot ``[K*b/32, N]`` and ``[K/G, N]`` at its offset; packed as
docs/FORMAT.md section 2.5 says, 3-bit codes 32 to a triplet of words; symmetric codes, zero ``2^(b-1)``, checked
when loaded): a :class:`SlotTable` says where. Nothing is repacked, so the GPU
holds the checkpoint's codes and scales byte for byte (the zeros, a constant, are dropped).

Two kernels, the one used chosen by the (token, expert) rows per expert (:func:`m3_convert.serve.decide.wmix_path`):

* ``gemv`` (decode, small batches): one program per (row, output tile, K split), each reading only the slot its
  row is routed to; codes become float32 exactly by :func:`_signed` (a code masked in place into 2^23's mantissa:
  one AND-OR per code), products and sums in float32, the group scale applied per chunk. Deterministic: a fixed
  K split summed in a fixed order by ``_reduce`` (no atomics).
* ``tiled`` (prefill, larger batches): vLLM's MoE alignment (rows sorted by expert, padded to the row tile), one
  program per (row tile, output tile), per group ``tl.dot`` of the bf16 inputs with the codes minus their zero
  (small integers: exact in bf16), float32 accumulation, the group scale applied to the float32 sum. How a group's
  codes are read is :data:`TILED_LOADS`' choice (default "fields": 16 bit fields of G/16 codes, G/16 dots).

Neither rounds a weight: the codes and the float16 scales enter the float32 sums exactly, so the result is closer
to ``x @ W^T`` of the exact decode than a bf16 GEMM of the de-quantized weight (gpu/kernel_check.py measures
both). The kernels run on the CPU too under ``TRITON_INTERPRET=1`` (tests/test_wmix.py, against the exact decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)        # float32 2^23: OR-ing a code (< 2^23) into its mantissa gives 2^23 + code, exactly


@dataclass(frozen=True)
class SlotTable:
    """Where every slot of one sublayer sits in its flat tensors: ``bits`` [slots] int32, ``qoff`` / ``soff``
    [slots] int64 element offsets into ``<sublayer>_qweight`` / ``<sublayer>_scales``; the slot's GEMM is
    ``[K] -> [N]`` with scale groups of ``group``; ``halves`` slots per expert (2 for w13: gate, up; 1 for w2)."""
    bits: torch.Tensor
    qoff: torch.Tensor
    soff: torch.Tensor
    n: int
    k: int
    group: int
    halves: int
    #: 16 where every offset is a multiple of 16 elements (M3's shapes: the kernels may then load 16 bytes at
    #: once, as Triton does for a launch's own aligned pointers), else 1; computed from the offsets
    align: int = field(init=False)

    def __post_init__(self):
        whole = all(int(t.remainder(16).count_nonzero()) == 0 for t in (self.qoff, self.soff))
        object.__setattr__(self, "align", 16 if whole else 1)


@dataclass(frozen=True)
class GemvConfig:
    """``rows``: word rows (pow2 widths) or word triplets (3 bits) per chunk; ``block_n`` outputs per program;
    ``split`` K splits (summed in order by ``_reduce``); ``warps``/``stages``: Triton's."""
    rows: int = 16
    block_n: int = 64           # on an H100 at one token 16 x 64 at split 4 was best for w13 (44.9 us; 8 x 128 at
    #                             split 8 45.7, 32 x 64 48.2) and within 10% of the best for w2 (29.2 against 26.7)
    split: int = 1
    warps: int = 4
    stages: int = 2
    prefetch: bool = False      # load the next chunk before computing this one (H100, one token: w13 +1.7 us, w2 -2.1)


#: how the tiled kernel reads a group's codes (TiledConfig.load):
#: "fields" (default): each of 16 dot rows holds G/16 consecutive codes, one bit field of the group's words (read
#:   once; two words for a field of 64 bits), and the group is G/16 dots of K = 16 whose j-th takes code j of every
#:   field: every step elementwise on the loaded words, so the decoded codes need no pass through shared memory
#:   (sm_90, 16 x 64: 72 registers and 28 warps an SM; 2.5 KiB at one stage, decide's, 20 KiB at two;
#:   gpu/wmix_sass.py); groups of 32, 64 or 128 (FIELD_GROUPS);
#: "words": each word read once and unpacked in registers (3 bits: a triplet's words as two 64-bit halves of 16
#:   codes, :func:`_triplets`; until 2026-12-07 3 bits took "gather" here);
#: "gather": each code's word read per code (4 bytes a code through shared memory; the first H100 run's path).
#: On an H100 (gpu/results/issue25-2026-12-07b, mixed layer, 64 tokens, 16 x 64 tiles) "fields" took w13 1702.8 us
#: at one stage against 2099.8 ("words") and 2202.8 ("gather"), and 1887.0 / 2642.4 / 2892.3 at two stages; every
#: "words" figure to 2026-12-07's seventh session had 3 bits gathered (before :func:`_triplets`).
TILED_LOADS = ("fields", "words", "gather")
FIELD_GROUPS = (32, 64, 128)      # 16 fields of G/16 codes: at most 32 bits each, or 64 (8 bits at 128)


@dataclass(frozen=True)
class TiledConfig:
    block_m: int = 16
    block_n: int = 64
    warps: int = 4
    stages: int = 2
    load: str = "fields"        # TILED_LOADS

    def __post_init__(self):
        if self.load not in TILED_LOADS:
            raise ValueError(f"TiledConfig.load {self.load!r}: one of {TILED_LOADS}")


def unknown_widths(bits) -> list:
    """The widths in ``bits`` that the kernels here (and hgemv's, which shares their code-to-float step) have no
    branch for: each reads a width it does not know as 3 bits, so a table must hold none."""
    from .decide import QUANT_BITS
    return sorted({int(b) for b in bits} - set(QUANT_BITS))


def gemv_config(rows: int, table: "SlotTable", sms: int) -> GemvConfig:
    """The gemv tile for ``rows`` rows of this sublayer: default chunking, the K split from decide.wmix_split."""
    from .decide import wmix_split
    base = GemvConfig()
    return replace(base, split=wmix_split(rows, table.n, base.block_n, table.halves, sms))


def tiled_config(rows: int, table: "SlotTable") -> TiledConfig:
    """The tiled kernel's tile for ``rows`` rows of this sublayer (decide.wmix_tile)."""
    from .decide import wmix_tile
    bm, bn, warps, stages, load = wmix_tile(rows, table.bits.numel() // table.halves)
    load = load if load != "fields" or table.group in FIELD_GROUPS else "words"
    return TiledConfig(block_m=bm, block_n=bn, warps=warps, stages=stages, load=load)


# ---------------------------------------------------------------- gemv (decode)
@triton.jit
def _chunks(units, R: tl.constexpr, SPLIT: tl.constexpr, s):
    """[first, end) of the chunks of ``R`` units (word rows, or 3-bit word triplets) that K split ``s`` sums."""
    chunks = tl.cdiv(units, R)
    per = tl.cdiv(chunks, SPLIT)
    return s * per, tl.minimum(s * per + per, chunks)


@triton.jit
def _signed(w, magic, P: tl.constexpr, BITS: tl.constexpr):
    """``(code - zero) * 2^P`` as float32, exactly, for the code at bits ``[P, P+BITS)`` of ``w`` (``P + BITS <=
    23``; zero ``2^(BITS-1)``): the code masked in place and OR-ed into ``magic`` (2^23's bits) is the float32
    ``2^23 + code * 2^P`` (one AND-OR, a LOP3: no shift per code); minus ``2^23 + zero * 2^P`` it is the value."""
    MASK: tl.constexpr = ((1 << BITS) - 1) << P
    OFF: tl.constexpr = float(2 ** 23 + (1 << (BITS - 1)) * 2 ** P)
    return ((w & MASK) | magic).to(tl.float32, bitcast=True) - OFF


@triton.jit
def _term(xj, w, magic, P: tl.constexpr, BITS: tl.constexpr):
    """``x_j * (code - zero)`` for the code at bits ``[P, P+BITS)`` of the words ``w``: :func:`_signed` times x
    scaled by ``2^-P`` (a power of two: exact while ``|x| >= 2^(P-126)``, P <= 20: every bf16 input above 1e-32; a
    smaller one would become subnormal and could lose bits), so the product is ``x_j * (code - zero)``."""
    return (xj * (2.0 ** -P))[:, None] * _signed(w, magic, P, BITS)


@triton.jit
def _words(qw, sc, row, lim, n, nmask, N, WORDS: tl.constexpr, CODES: tl.constexpr, G: tl.constexpr):
    """One chunk: the words of the word rows ``row`` (``WORDS`` = 1), or of the 3-bit word triplets ``row``
    (``WORDS`` = 3: three words each, returned one by one), that lie below ``lim``, with each row's group scales as
    float32; ``CODES`` codes per row. Rows at or past ``lim`` read nothing and give 0."""
    rm = row < lim
    m2 = rm[:, None] & nmask[None, :]
    base = qw + (WORDS * row)[:, None] * N + n[None, :]
    w0 = tl.load(base, mask=m2, other=0).to(tl.uint32, bitcast=True)
    w1 = w0
    w2 = w0
    if WORDS == 3:
        w1 = tl.load(base + N, mask=m2, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2 * N, mask=m2, other=0).to(tl.uint32, bitcast=True)
    scale = tl.load(sc + ((row * CODES) // G)[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    return w0, w1, w2, scale


@triton.jit
def _gemv_pow2(acc, x, qw, sc, n, nmask, N, K, s, rz, SPLIT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
               R: tl.constexpr, BN: tl.constexpr, PREFETCH: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    LOW: tl.constexpr = (23 - BITS) // BITS + 1        # codes 0..LOW-1 lie in the low 23 bits: read in place
    SHIFT: tl.constexpr = LOW * BITS                   # the others, from the word shifted right by SHIFT
    rows = K // PACK
    first, end = _chunks(rows, R, SPLIT, s)
    lim = tl.minimum(end * R, rows)
    row = first * R + tl.arange(0, R)
    w, _a, _b, scale = _words(qw, sc, row, lim, n, nmask, N, 1, PACK, G)
    for c in range(first, end):
        if PREFETCH:         # the next chunk's loads in flight while this one is computed
            wn, _c, _d, sn = _words(qw, sc, row + R, lim, n, nmask, N, 1, PACK, G)
        rm = row < lim
        # rz is 0 at run time, unknown to the compiler: the shift is by a register (one shift per word; by a
        # constant it became a bit-field extract per code), the magic one register (a constant operand was
        # re-materialised at each use)
        hi = w >> (rz + SHIFT).to(tl.uint32)
        magic = (rz + MAGIC).to(tl.uint32)
        part = tl.zeros([R, BN], tl.float32)
        for j in tl.static_range(PACK):
            xj = tl.load(x + row * PACK + j, mask=rm, other=0.0).to(tl.float32)
            if j < LOW:
                part += _term(xj, w, magic, j * BITS, BITS)
            else:
                part += _term(xj, hi, magic, j * BITS - SHIFT, BITS)
        acc += part * scale
        row = row + R
        if PREFETCH:
            w, scale = wn, sn
        else:
            w, _e, _f, scale = _words(qw, sc, row, lim, n, nmask, N, 1, PACK, G)
    return acc


@triton.jit
def _term3(xj, w0, w1, w2, h0, h1, h2, magic, J: tl.constexpr):
    """``x_j * (code_J - 4)`` of a 3-bit GPTQ word triplet (32 codes in 96 bits, little end first; ``hK`` is word
    K shifted right by 21 + K): codes wholly in a word's low 23 bits in place, the rest of each word from its
    shifted copy (both by :func:`_term`), the two codes that straddle two words (10 and 21) assembled."""
    BIT: tl.constexpr = 3 * J
    WORD: tl.constexpr = BIT // 32
    POS: tl.constexpr = BIT % 32
    if WORD == 0:
        lo, nxt, hs = w0, w1, h0
    elif WORD == 1:
        lo, nxt, hs = w1, w2, h1
    else:
        lo, nxt, hs = w2, w2, h2
    if POS > 29:
        v = ((lo >> POS) | (nxt << (32 - POS))) & 7
        return _term(xj, v, magic, 0, 3)
    elif POS <= 20:
        return _term(xj, lo, magic, POS, 3)
    else:
        return _term(xj, hs, magic, POS - 21 - WORD, 3)


@triton.jit
def _gemv_3(acc, x, qw, sc, n, nmask, N, K, s, rz, SPLIT: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
            BN: tl.constexpr, PREFETCH: tl.constexpr):
    trips = K // 32
    first, end = _chunks(trips, R, SPLIT, s)
    lim = tl.minimum(end * R, trips)
    t = first * R + tl.arange(0, R)
    w0, w1, w2, scale = _words(qw, sc, t, lim, n, nmask, N, 3, 32, G)
    for c in range(first, end):
        if PREFETCH:
            n0, n1, n2, sn = _words(qw, sc, t + R, lim, n, nmask, N, 3, 32, G)
        tm = t < lim
        h0 = w0 >> (rz + 21).to(tl.uint32)          # rz: as in _gemv_pow2
        h1 = w1 >> (rz + 22).to(tl.uint32)
        h2 = w2 >> (rz + 23).to(tl.uint32)
        magic = (rz + MAGIC).to(tl.uint32)
        part = tl.zeros([R, BN], tl.float32)
        for j in tl.static_range(32):
            xj = tl.load(x + t * 32 + j, mask=tm, other=0.0).to(tl.float32)
            part += _term3(xj, w0, w1, w2, h0, h1, h2, magic, j)
        acc += part * scale
        t = t + R
        if PREFETCH:
            w0, w1, w2, scale = n0, n1, n2, sn
        else:
            w0, w1, w2, scale = _words(qw, sc, t, lim, n, nmask, N, 3, 32, G)
    return acc


@triton.jit
def _gemv(x_ptr, x_stride, ids_ptr, in_div, qw_ptr, sc_ptr, bits_ptr, qoff_ptr, soff_ptr, out_ptr, out_stride,
          part_ptr, N, K, E, HALVES: tl.constexpr, SPLIT: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
          BN: tl.constexpr, ALIGN: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    p = pid // HALVES
    e = tl.load(ids_ptr + p).to(tl.int32)
    valid = (e >= 0) & (e < E)          # a row routed to no expert of this layer reads slot 0 and gives 0 (as the
    slot = tl.where(valid, e, 0) * HALVES + pid % HALVES    # tiled path, whose align leaves such rows out)
    b = tl.load(bits_ptr + slot)
    qw = qw_ptr + tl.multiple_of(tl.load(qoff_ptr + slot), ALIGN)        # SlotTable.align
    sc = sc_ptr + tl.multiple_of(tl.load(soff_ptr + slot), ALIGN)
    x = x_ptr + (p // in_div).to(tl.int64) * x_stride
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N
    s = tl.program_id(2)
    acc = tl.zeros([R, BN], tl.float32)
    rz = b >> 4                         # 0 (b <= 8), a value the compiler cannot fold (see _gemv_pow2)
    if b == 4:
        acc = _gemv_pow2(acc, x, qw, sc, n, nmask, N, K, s, rz, SPLIT, 4, G, R, BN, PREFETCH)
    elif b == 8:
        acc = _gemv_pow2(acc, x, qw, sc, n, nmask, N, K, s, rz, SPLIT, 8, G, R, BN, PREFETCH)
    elif b == 2:
        acc = _gemv_pow2(acc, x, qw, sc, n, nmask, N, K, s, rz, SPLIT, 2, G, R, BN, PREFETCH)
    else:
        acc = _gemv_3(acc, x, qw, sc, n, nmask, N, K, s, rz, SPLIT, G, R, BN, PREFETCH)
    y = tl.where(valid, tl.sum(acc, 0), 0.0)
    if SPLIT == 1:
        col = (pid % HALVES) * N + n
        tl.store(out_ptr + p.to(tl.int64) * out_stride + col, y.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + (s * tl.num_programs(0) + pid).to(tl.int64) * N + n, y, mask=nmask)


@triton.jit
def _reduce(part_ptr, out_ptr, out_stride, N, HALVES: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr):
    """out[row, half*N + n] = sum over the K splits in order (deterministic)."""
    pid = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N
    y = tl.zeros([BN], tl.float32)
    for s in tl.static_range(SPLIT):
        y += tl.load(part_ptr + (s * tl.num_programs(0) + pid).to(tl.int64) * N + n, mask=nmask, other=0.0)
    col = (pid % HALVES) * N + n
    tl.store(out_ptr + (pid // HALVES).to(tl.int64) * out_stride + col, y.to(out_ptr.dtype.element_ty), mask=nmask)


def gemv(table: SlotTable, qweight, scales, x, ids, in_div: int, out, cfg: GemvConfig = GemvConfig()):
    """``out[p, h*N:(h+1)*N] = x[p // in_div] @ W_slot^T`` for every row ``p`` of ``ids`` (flattened) and half ``h``,
    ``slot = ids[p] * halves + h``. ``out`` [rows, halves*N] in the activations' dtype. A row whose id names no
    expert (outside [0, experts)) reads no slot of its own and gives zeros (:func:`tiled` too). vLLM 0.33 gives
    such rows: its routers write id -1 for the tokens it marks as padding (``VLLM_MOE_SKIP_PADDING``, on by
    default), every token of a CUDA-graph capture and the tokens a batch is padded with to a captured size."""
    rows = ids.numel()
    grid = (rows * table.halves, triton.cdiv(table.n, cfg.block_n), cfg.split)
    part = out
    if cfg.split > 1:
        part = torch.empty(cfg.split, rows * table.halves, table.n, dtype=torch.float32, device=out.device)
    _gemv[grid](x, x.stride(0), ids, in_div, qweight, scales, table.bits, table.qoff, table.soff, out, out.stride(0),
                part, table.n, table.k, table.bits.numel() // table.halves, HALVES=table.halves, SPLIT=cfg.split,
                G=table.group, R=cfg.rows, BN=cfg.block_n, ALIGN=table.align, PREFETCH=cfg.prefetch, num_warps=cfg.warps,
                num_stages=cfg.stages)
    if cfg.split > 1:
        _reduce[grid[:2]](part, out, out.stride(0), table.n, HALVES=table.halves, SPLIT=cfg.split,
                          BN=cfg.block_n, num_warps=cfg.warps)
    return out


# ---------------------------------------------------------------- tiled (prefill)
@triton.jit
def _tiled_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, BITS: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr,
                PACKED: tl.constexpr):
    """acc += x rows @ (codes - zero) * scale over K, one group of G codes at a time, the width a constant: code k of
    a group starts at bit k*BITS of the group's words. ``PACKED`` ("words"): each word read once (3 bits by
    :func:`_triplets`); else ("gather") each code's word read per code, and a code that straddles two words (3 bits:
    10 and 21 of each triplet) also reads the next word. Codes become floats as in gemv (:func:`_signed`), then bf16:
    small integers, exact."""
    k = tl.arange(0, G)
    bit = k * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32) + rz.to(tl.uint32)      # rz: 0, keeps one shift per code (see _gemv_pow2)
    CROSS: tl.constexpr = (32 % BITS) != 0
    cross = (bit & 31) + BITS > 32
    shl = tl.where(cross, 32 - (bit & 31), 0).to(tl.uint32)
    GWORDS: tl.constexpr = (G * BITS) // 32
    magic = (rz + MAGIC).to(tl.uint32)
    PACK: tl.constexpr = 32 // BITS
    for g in range(K // G):
        xt = tl.load(xr + g * G + k[None, :], mask=rm[:, None], other=0.0)
        if not PACKED:      # each code's word gathered (4 bytes a code through shared memory)
            wp = qw + (g * GWORDS + word)[:, None] * N + n[None, :]
            v = tl.load(wp, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True) >> shift[:, None]
            if CROSS:
                hi = tl.load(wp + N, mask=cross[:, None] & nmask[None, :], other=0).to(tl.uint32, bitcast=True)
                v = v | (hi << shl[:, None])
        elif CROSS:         # 3 bits, each word read once: :func:`_triplets`
            v = _triplets(qw + g * GWORDS * N, n, nmask, N, G)
        else:               # each word read once: [words, BN] -> [words, PACK, BN] codes -> [G, BN] (k = word*PACK + j)
            wr = tl.arange(0, GWORDS)
            jsh = (tl.arange(0, PACK) * BITS).to(tl.uint32)
            w = tl.load(qw + (g * GWORDS + wr)[:, None] * N + n[None, :], mask=nmask[None, :], other=0)
            v = tl.reshape(w.to(tl.uint32, bitcast=True)[:, None, :] >> jsh[None, :, None], [G, w.shape[1]])
        wq = _signed(v, magic, 0, BITS)
        if DOT_F32:
            d = tl.dot(xt.to(tl.float32), wq, input_precision="ieee")
        else:
            d = tl.dot(xt, wq.to(xt.dtype))
        scale = tl.load(sc + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        acc += d * scale[None, :]
    return acc


@triton.jit
def _triplets(qw, n, nmask, N, G: tl.constexpr):
    """A 3-bit group's G codes as [G, BN] uint32 (code k at bit 0; higher bits not cleared: :func:`_signed` masks),
    each of its words read once: triplet t's words w0, w1, w2 (rows 3t..3t+2, 32 codes in 96 bits, little end first)
    as two 64-bit halves, ``w0 | w1 << 32`` (codes 0-15 at bits 3j: bits 0-47) and ``w1 >> 16 | w2 << 16`` (codes
    16-31 at bits 3(j-16): triplet bits 48-95), so that every code is one 64-bit shift of its half (no code straddles
    a half), kept to its low 32 bits."""
    GT: tl.constexpr = G // 32
    t = tl.arange(0, GT)
    wp = qw + (3 * t)[:, None] * N + n[None, :]
    w0 = tl.load(wp, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    w1 = tl.load(wp + N, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    w2 = tl.load(wp + 2 * N, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
    halves = tl.permute(tl.join(w0 | (w1 << 32), (w1 >> 16) | (w2 << 16)), (0, 2, 1))      # [GT, 2, BN]
    sh = (tl.arange(0, 16) * 3).to(tl.uint64)
    codes = (halves[:, :, None, :] >> sh[None, None, :, None]).to(tl.uint32)           # [GT, 2, 16, BN]
    return tl.reshape(codes, [G, codes.shape[3]])                                    # k = 32t + 16h + j


@triton.jit
def _field_code(lo, hi, rz, J: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr, F: tl.constexpr):
    """Code ``J`` of each field at bit 0 (higher bits not cleared: :func:`_signed` masks): from ``lo`` (the field,
    or its first word where F is 64) or ``hi`` (the second word), shifted by a register (rz: see _gemv_pow2)."""
    HALF: tl.constexpr = C // 2 if F == 64 else C
    P: tl.constexpr = (J % HALF) * BITS
    if F == 64 and J >= HALF:
        v = hi
    else:
        v = lo
    if P > 0:
        v = v >> (rz + P).to(tl.uint32)
    return v


@triton.jit
def _fields_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, BITS: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += x rows @ (codes - zero) * scale over K, a group of G codes at a time (TILED_LOADS "fields"): dot row r
    holds codes [r*C, r*C + C) of the group (C = G/16), the F = C*BITS bits at bit r*F of the group's words, read
    once into a register (two words where F is 64; a funnel of two where a field crosses a word: 3 bits); dot j of
    the group's C takes code j of every row, and x's columns r*C + j. Codes become floats as in gemv
    (:func:`_signed`), then bf16: small integers, exact; the products exact, the sums float32."""
    C: tl.constexpr = G // 16
    F: tl.constexpr = C * BITS
    GW: tl.constexpr = G * BITS // 32                  # words per group
    r = tl.arange(0, 16)
    off = r * F                                        # a field's first bit in its group
    wi = off >> 5
    sh = (off & 31).to(tl.uint32)
    CROSS: tl.constexpr = F < 32 and (32 % F) != 0     # 3 bits: some fields cross into the next word
    cross = (off & 31) + F > 32
    shl = tl.where(cross, 32 - (off & 31), 0).to(tl.uint32)
    magic = (rz + MAGIC).to(tl.uint32)
    for g in range(K // G):
        wp = qw + (g * GW + wi)[:, None] * N + n[None, :]           # F = 64: word 2r, and 2r + 1 below
        lo = tl.load(wp, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True)
        hi = lo
        if F == 64:
            hi = tl.load(wp + N, mask=nmask[None, :], other=0).to(tl.uint32, bitcast=True)
        else:
            if F < 32:
                lo = lo >> sh[:, None]
            if CROSS:
                nx = tl.load(wp + N, mask=cross[:, None] & nmask[None, :], other=0).to(tl.uint32, bitcast=True)
                lo = lo | (nx << shl[:, None])
        d = tl.zeros(acc.shape, tl.float32)
        for j in tl.static_range(C):
            xt = tl.load(xr + g * G + r[None, :] * C + j, mask=rm[:, None], other=0.0)
            wq = _signed(_field_code(lo, hi, rz, j, C, BITS, F), magic, 0, BITS)
            if DOT_F32:
                d = tl.dot(xt.to(tl.float32), wq, d, input_precision="ieee")
            else:
                d = tl.dot(xt, wq.to(xt.dtype), d)
        scale = tl.load(sc + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        acc += d * scale[None, :]
    return acc


@triton.jit
def _group_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, BITS: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr,
                LOAD: tl.constexpr):
    """The tiled kernel's loop over K at one width, with the codes read as TILED_LOADS ``LOAD`` says."""
    if LOAD == "fields":
        acc = _fields_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, BITS, G, DOT_F32)
    else:
        acc = _tiled_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, BITS, G, DOT_F32, LOAD == "words")
    return acc


@triton.jit(do_not_specialize=["rows_valid"])     # the batch's row count: one compilation, divisible by 16 or not
def _tiled(x_ptr, x_stride, sorted_ptr, eids_ptr, ntp_ptr, rows_valid, in_div, qw_ptr, sc_ptr, bits_ptr, qoff_ptr,
           soff_ptr, out_ptr, out_stride, N, K, HALVES: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr, DOT_F32: tl.constexpr, ALIGN: tl.constexpr, LOAD: tl.constexpr):
    pid_m = tl.program_id(0)
    if pid_m * BM >= tl.load(ntp_ptr):
        return
    e = tl.load(eids_ptr + pid_m).to(tl.int32)
    if e < 0:
        return
    nt = tl.cdiv(N, BN)
    h = tl.program_id(1) // nt
    slot = e * HALVES + h
    b = tl.load(bits_ptr + slot)
    qw = qw_ptr + tl.multiple_of(tl.load(qoff_ptr + slot), ALIGN)        # SlotTable.align
    sc = sc_ptr + tl.multiple_of(tl.load(soff_ptr + slot), ALIGN)
    rows = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    rm = rows < rows_valid
    xr = x_ptr + (rows // in_div).to(tl.int64)[:, None] * x_stride      # a 32-bit division: inline, no call
    n = (tl.program_id(1) % nt) * BN + tl.arange(0, BN)
    nmask = n < N
    rz = b >> 4                                   # 0 (b <= 8), unknown to the compiler
    acc = tl.zeros([BM, BN], tl.float32)
    if b == 4:
        acc = _group_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, 4, G, DOT_F32, LOAD)
    elif b == 8:
        acc = _group_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, 8, G, DOT_F32, LOAD)
    elif b == 2:
        acc = _group_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, 2, G, DOT_F32, LOAD)
    else:
        acc = _group_loop(acc, xr, rm, qw, sc, n, nmask, N, K, rz, 3, G, DOT_F32, LOAD)
    optr = out_ptr + rows.to(tl.int64)[:, None] * out_stride + h * N + n[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] & nmask[None, :])


def tiled(table: SlotTable, qweight, scales, x, ids, in_div: int, out, cfg: TiledConfig, align):
    """As :func:`gemv`, with rows grouped by expert: ``align(rows, block_m, experts)`` -> (sorted row ids padded
    with ``ids.numel()``, the expert of each block, [number of padded rows]) (vLLM's moe_align_block_size, which
    takes [tokens, top_k]: the flat rows go in as [rows, 1])."""
    if cfg.load == "fields" and table.group not in FIELD_GROUPS:
        raise ValueError(f"TiledConfig.load 'fields' reads groups of {FIELD_GROUPS}, not {table.group} (tiled_config "
                         "takes 'words' there)")
    experts = table.bits.numel() // table.halves
    # vLLM's align leaves out ids >= experts but indexes its counts with a negative one: those become ``experts``
    ids = ids.masked_fill(ids < 0, experts)
    sorted_ids, eids, ntp = align(ids.view(-1, 1), cfg.block_m, experts)
    out.zero_()         # the rows the align leaves out (ids outside [0, experts)) are zeros, as in gemv
    grid = (eids.numel(), triton.cdiv(table.n, cfg.block_n) * table.halves)
    _tiled[grid](x, x.stride(0), sorted_ids, eids, ntp, ids.numel(), in_div, qweight, scales, table.bits,
                 table.qoff, table.soff, out, out.stride(0), table.n, table.k, HALVES=table.halves, G=table.group,
                 BM=cfg.block_m, BN=cfg.block_n, DOT_F32=interpreting(), ALIGN=table.align, LOAD=cfg.load,
                 num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def interpreter_dot_problem() -> str:
    return ("Triton's CPU interpreter (TRITON_INTERPRET=1, triton 3.9) computes tl.dot of bfloat16 operands wrong "
            "(off by ~1e10 on 16x16 integers), so interpreted runs take the float32 dot: the same products (the codes "
            "and bf16 inputs are exact in both), the same float32 sums; the bf16 dot runs on the GPU (kernel_check). "
            "The interpreter also rounds float32 to bf16 toward zero (the GPU: to nearest even), so interpreted bf16 "
            "outputs carry up to twice the rounding error of the GPU's")


def interpreting() -> bool:
    """Whether Triton runs interpreted (:func:`interpreter_dot_problem` says what changes then)."""
    knobs = getattr(triton, "knobs", None)          # triton >= 3.4; older ones read the variable itself
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def align_reference(ids, block_m: int, experts: int):
    """vLLM's moe_align_block_size in torch, for the CPU (host-synchronising: tests only): rows sorted by expert
    (stable), each expert's padded to a multiple of ``block_m`` with ``ids.numel()``, at the same maximal sizes.
    ``ids`` as vLLM's op takes them, [tokens, top_k] (flat rows as [rows, 1]; compat.check_topk_ids), none negative:
    vLLM's op leaves out ids past the experts but indexes its counts with a negative one, so this version refuses
    one (the CPU tests then catch a negative id reaching the align)."""
    from .compat import check_topk_ids
    check_topk_ids(ids)
    flat = ids.reshape(-1).to(torch.int64)
    if bool((flat < 0).any()):
        raise ValueError("align: a negative expert id; vLLM's moe_align_block_size would index its counts with it")
    total = flat.numel()
    cap = total + experts * (block_m - 1)
    cap = -(-cap // block_m) * block_m
    sorted_ids = torch.full((cap,), total, dtype=torch.int32)
    eids = torch.full((cap // block_m,), -1, dtype=torch.int32)
    pos = 0
    for e in range(experts):
        rows = (flat == e).nonzero().reshape(-1)
        if rows.numel() == 0:
            continue
        sorted_ids[pos:pos + rows.numel()] = rows.to(torch.int32)
        nb = -(-rows.numel() // block_m)
        eids[pos // block_m:pos // block_m + nb] = e
        pos += nb * block_m
    return sorted_ids, eids, torch.tensor([pos], dtype=torch.int32)
