"""hgemv: decode (up to a row per expert) of a mixed-width MoE sublayer over the weights humming holds, in one launch.

humming-kernels runs a mixed MoE layer as one launch per width part (:class:`.moe.HummingMoEKernel`): fast in
prefill, but at one token the parts' launches add up (issue 25). This kernel reads every expert slot at its own
width straight from the parts' repacked tensors (no second copy of the weights): per part ``{part}_weight`` int32
[S, Kp/16, Np*b/2] and ``{part}_weight_scale`` bfloat16 [S, Kp/G, Np] (N padded to Np, K to Kp), the layout
humming 0.1.19 makes for bf16 activations (gpu/humming_layout.py writes it down and reads it back; ``device.sh
hlayout`` checks it against humming's own repack on the GPU). Per slot a :class:`~.wmix.SlotTable` holds its width
and its element offsets from two base tensors (one part's words and scales; the other parts' slots lie at offsets,
negative ones too, from them: one flat GPU address space).

The layout, per block of 16 inputs (K) x 64 outputs (N) of a slot: 32 lanes x b words (an MMA m16n8k16 B
fragment), contiguous. Lane ``4q + r`` holds outputs ``n = 8c + q`` (c = 0..7) at inputs ``k = 2r + 8 i5 + i6``
(i5, i6 = 0, 1): output column c lies in (virtual) word ``c // O`` (O = 32 / (4 P) outputs a word, P = b rounded up
to a power of two), the code (c, i5, i6) at place ``s = 2 (c % O) + i5 + i6 P'/2`` (P' = 32 / P codes a word), bits
[s P, s P + b). 3-bit lanes keep four 4-bit-spaced words in three; 8-bit codes are stored folded (t = c - 128 for
c >= 128, else 255 - c; for bf16 activations only). A slot's scale for output n of group g lies at
``[g, 64 (n // 64) + 8 (n % 8) + (n % 64) // 8]``: for one block, ``8 q + c``.

Per program: one (token, expert) row, one half (gate / up in w13), one block of 64 outputs, one K split; per group
(G / 16 blocks) the codes become float32 exactly (:func:`.wmix._signed`), x's inputs are read two at a time (a
4-byte word holds the bf16 pair k, k + 1 a lane needs; bf16 to float32 is a shift), products and sums in float32,
the group's bf16 scale applied to each word's partial sum. A fixed K split summed in order (:func:`.wmix._reduce`):
deterministic. It takes humming's codes and bf16 scales (rounded from the checkpoint's fp16 when humming's layer was
made) and rounds no weight. humming's own kernels, for bf16 activations, round each weight (code - zero) x scale to
bf16 before the tensor cores (humming 0.1.19, include/humming/arith/mainloop_arith.cuh, may_apply_bs_and_zp_on_b):
so decode here and prefill there take the same weights exactly at 2 bits (every such product is a bf16) and within
half a bf16 unit a weight at 3, 4 and 8 bits. Runs on the CPU under ``TRITON_INTERPRET=1`` (tests/test_hgemv.py:
within 1e-6 of float64 sums of the codes and scales the layout was made from).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .wmix import MAGIC, SlotTable, _reduce, _signed, unknown_widths


@dataclass(frozen=True)
class HummingTable:
    """One sublayer's slots in humming's tensors: ``slots`` (widths, offsets in int32 words from ``words`` and in
    bf16 scales from ``scales``, n, k, group, halves), ``padded_n`` (Np, the layout's row length in outputs)."""
    slots: SlotTable
    padded_n: int
    words: torch.Tensor
    scales: torch.Tensor


BLOCK_N = 64        # outputs a program computes: one block column of the layout


@triton.jit
def _load_words(wq, kb, nb, NB, BITS: tl.constexpr):
    """The lane words of the blocks ``kb`` [R] of block column ``nb`` as [R, 8 q, 4 r, J] uint32 (lane 4q + r; J = b
    words a lane; 3 bits: the three stored words made the four 4-bit-spaced words they hold, word j = v_j)."""
    q = tl.arange(0, 8)
    r = tl.arange(0, 4)
    lane = (kb[:, None, None] * NB + nb) * 32 + (4 * q)[None, :, None] + r[None, None, :]       # [R, 8, 4]
    if BITS == 3:
        base = wq + lane * 3
        w0 = tl.load(base).to(tl.uint32, bitcast=True)
        w1 = tl.load(base + 1).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2).to(tl.uint32, bitcast=True)
        v0 = w0 & 0x77777777
        v1 = (w1 & 0x33333333) | ((w0 & 0x88888888) >> 1)
        v2 = ((w1 & 0xCCCCCCCC) >> 1) | (w2 & 0x11111111)
        v3 = (w2 >> 1) & 0x77777777
        w = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [kb.shape[0], 8, 4, 4])
    else:
        j = tl.arange(0, BITS)
        w = tl.load(wq + lane[:, :, :, None] * BITS + j[None, None, None, :]).to(tl.uint32, bitcast=True)
        if BITS == 8:       # humming's fold for bf16 activations undone, a byte at a time: c = t ^ (0x80 or 0xFF)
            w = w ^ (0x80808080 | (((w >> 7) & 0x01010101) * 0x7F))
    return w


@triton.jit
def _term(xi, w, h, magic, S: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, LOW: tl.constexpr):
    """``x * (code - zero)`` for the code at place ``S`` of the words: below ``LOW`` read from ``w`` in place, else
    from ``h`` (``w`` shifted right by LOW*P); x scaled by the power of two that undoes the code's place first
    (:func:`.wmix._term`: exact while |x| >= 2^(place - 126), the place at most 20 bits)."""
    if S < LOW:
        t = (xi * (2.0 ** (-S * P))) * _signed(w, magic, S * P, BITS)
    else:
        t = (xi * (2.0 ** (-(S - LOW) * P))) * _signed(h, magic, (S - LOW) * P, BITS)
    return t


@triton.jit
def _column(acc, w, h, xa, xb, xc, xd, srow, magic, o: tl.constexpr, PER: tl.constexpr, P: tl.constexpr,
            BITS: tl.constexpr, LOW: tl.constexpr, O: tl.constexpr, J: tl.constexpr):
    """acc += (sum over the block's inputs (i5, i6) of x * (code - zero)) * scale, for output column c = j*O + o of
    every word j: the code at place s = 2o + i5 + i6*PER/2 (:func:`_term`; ``xa``..``xd`` x at (i5, i6) = (0, 0),
    (0, 1), (1, 0), (1, 1)); ``srow`` the group's scale row of this block column (position 8q + c)."""
    HALF: tl.constexpr = PER // 2
    part = _term(xa, w, h, magic, 2 * o, P, BITS, LOW)                   # (i5, i6) = (0, 0)
    part += _term(xb, w, h, magic, 2 * o + HALF, P, BITS, LOW)          # (0, 1)
    part += _term(xc, w, h, magic, 2 * o + 1, P, BITS, LOW)             # (1, 0)
    part += _term(xd, w, h, magic, 2 * o + 1 + HALF, P, BITS, LOW)      # (1, 1)
    q = tl.arange(0, 8)
    c = tl.arange(0, J) * O + o
    scale = tl.load(srow + (8 * q)[:, None] + c[None, :]).to(tl.float32)                         # [8 q, J]
    return acc + part * scale[None, :, None, :]


@triton.jit
def _width(x, wq, sc, first, end, nb, NB, NP, rz, BITS: tl.constexpr, G: tl.constexpr):
    """This program's outputs [8 q, 8 c] (n = 64 nb + 8c + q) summed over the groups [first, end), at one width (K
    a whole number of groups: :func:`humming_table` checks; x is read unmasked)."""
    P: tl.constexpr = 4 if BITS == 3 else BITS          # bits a code takes in its word
    PER: tl.constexpr = 32 // P                         # codes a word
    O: tl.constexpr = PER // 4                          # output columns a word
    J: tl.constexpr = 8 // O                            # words a lane (3 bits: four, made from three)
    LOW: tl.constexpr = (23 - BITS) // P + 1            # places wholly in the low 23 bits (read in place)
    R: tl.constexpr = G // 16
    kr = tl.arange(0, R)
    r = tl.arange(0, 4)
    x2w = x.to(tl.pointer_type(tl.int32), bitcast=True)     # x's bf16 pairs (k even) as words: bf16 -> float32 is a shift
    a0 = tl.zeros([R, 8, 4, J], tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    for g in range(first, end):
        kb = g * R + kr
        w = _load_words(wq, kb, nb, NB, BITS)
        h = w >> (rz + LOW * P).to(tl.uint32)           # rz: 0, a register (one shift per word; see wmix)
        magic = (rz + MAGIC).to(tl.uint32)
        k = (kb[:, None] * 16 + 2 * r[None, :])[:, None, :, None]                          # [R, 1, 4, 1]
        lo = tl.load(x2w + k // 2)                                                          # x[k], x[k + 1]
        hi = tl.load(x2w + k // 2 + 4)                                                      # x[k + 8], x[k + 9]
        x0 = (lo << 16).to(tl.float32, bitcast=True)                                        # i5 = 0, i6 = 0
        x1 = (lo & -65536).to(tl.float32, bitcast=True)                                     # i5 = 0, i6 = 1
        x2 = (hi << 16).to(tl.float32, bitcast=True)                                        # i5 = 1, i6 = 0
        x3 = (hi & -65536).to(tl.float32, bitcast=True)                                     # i5 = 1, i6 = 1
        srow = sc + g * NP + 64 * nb
        a0 = _column(a0, w, h, x0, x1, x2, x3, srow, magic, 0, PER, P, BITS, LOW, O, J)
        if O > 1:
            a1 = _column(a1, w, h, x0, x1, x2, x3, srow, magic, 1, PER, P, BITS, LOW, O, J)
        if O > 2:
            a2 = _column(a2, w, h, x0, x1, x2, x3, srow, magic, 2, PER, P, BITS, LOW, O, J)
            a3 = _column(a3, w, h, x0, x1, x2, x3, srow, magic, 3, PER, P, BITS, LOW, O, J)
    if O == 1:
        full = a0
    elif O == 2:
        full = tl.reshape(tl.join(a0, a1), [R, 8, 4, 8])                                    # c = 2j + o
    else:
        full = tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [R, 8, 4, 8])          # c = 4j + o
    return tl.sum(tl.sum(full, 0), 1)                                                       # [8 q, 8 c]


@triton.jit
def _hgemv(x_ptr, x_stride, ids_ptr, in_div, w_ptr, s_ptr, bits_ptr, qoff_ptr, soff_ptr, out_ptr, out_stride,
           part_ptr, N, NP, K, E, HALVES: tl.constexpr, SPLIT: tl.constexpr, G: tl.constexpr, ALIGN: tl.constexpr):
    pid = tl.program_id(0)
    p = pid // HALVES
    e = tl.load(ids_ptr + p).to(tl.int32)
    valid = (e >= 0) & (e < E)          # a row routed to no expert reads slot 0 and gives 0 (as wmix)
    slot = tl.where(valid, e, 0) * HALVES + pid % HALVES
    b = tl.load(bits_ptr + slot)
    wq = w_ptr + tl.multiple_of(tl.load(qoff_ptr + slot), ALIGN)
    sc = s_ptr + tl.multiple_of(tl.load(soff_ptr + slot), ALIGN)
    x = x_ptr + (p // in_div).to(tl.int64) * x_stride
    nb = tl.program_id(1)
    s = tl.program_id(2)
    groups = K // G
    per = tl.cdiv(groups, SPLIT)
    first = s * per
    end = tl.minimum(first + per, groups)
    NB = NP // 64
    rz = b >> 4                         # 0 (b <= 8), a value the compiler cannot fold
    if b == 4:
        y = _width(x, wq, sc, first, end, nb, NB, NP, rz, 4, G)
    elif b == 8:
        y = _width(x, wq, sc, first, end, nb, NB, NP, rz, 8, G)
    elif b == 2:
        y = _width(x, wq, sc, first, end, nb, NB, NP, rz, 2, G)
    else:
        y = _width(x, wq, sc, first, end, nb, NB, NP, rz, 3, G)
    y = tl.where(valid, y, 0.0)
    n = 64 * nb + 8 * tl.arange(0, 8)[None, :] + tl.arange(0, 8)[:, None]                    # [8 q, 8 c]
    nmask = n < N
    if SPLIT == 1:
        col = (pid % HALVES) * N + n
        tl.store(out_ptr + p.to(tl.int64) * out_stride + col, y.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + (s * tl.num_programs(0) + pid).to(tl.int64) * N + n, y, mask=nmask)


def gemv(table: HummingTable, x, ids, in_div: int, out, split: int = 1):
    """``out[p, h*N:(h+1)*N] = x[p // in_div] @ W_slot^T`` for every row ``p`` of ``ids`` and half ``h`` (slot
    ``ids[p] * halves + h``), W as humming holds it; ``out`` [rows, halves*N] in the activations' dtype; rows whose
    id names no expert give zeros; ``split`` K splits summed in order (decide.wmix_split)."""
    t = table.slots
    rows = ids.numel()
    if x.dtype != torch.bfloat16:
        raise ValueError(f"hgemv reads bf16 activations (humming's layout for them), not {x.dtype}")
    if x.stride(-1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:    # the kernel reads x's bf16 pairs as words
        x = x.clone(memory_format=torch.contiguous_format)
    grid = (rows * t.halves, triton.cdiv(t.n, BLOCK_N), split)
    part = out
    if split > 1:
        part = torch.empty(split, rows * t.halves, t.n, dtype=torch.float32, device=out.device)
    _hgemv[grid](x, x.stride(0), ids, in_div, table.words, table.scales, t.bits, t.qoff, t.soff, out, out.stride(0),
                 part, t.n, table.padded_n, t.k, t.bits.numel() // t.halves, HALVES=t.halves, SPLIT=split,
                 G=t.group, ALIGN=t.align, num_warps=4)
    if split > 1:
        _reduce[grid[:2]](part, out, out.stride(0), t.n, HALVES=t.halves, SPLIT=split, BN=BLOCK_N, num_warps=4)
    return out


def humming_table(parts, n: int, k: int, group: int, halves: int, experts: int) -> HummingTable:
    """The :class:`HummingTable` of one sublayer (``halves`` x ``experts`` slots) from its width parts as humming
    holds them: ``parts`` a list of
    (bits, the sublayer's slots the part holds in order, ``{part}_weight`` int32 [S, Kp/16, Np*b/2],
    ``{part}_weight_scale`` bf16 [S, Kp/G, Np]). Every slot must be held once and every tensor be the shape its
    width makes; the offsets are taken from the first part's tensors (the tensors must outlive the table: the
    layer holds them)."""
    from .decide import QUANT_BITS, ServeError
    odd = unknown_widths(b for b, _, _, _ in parts)
    if odd:
        raise ServeError(f"hgemv: {odd}-bit parts; it reads {QUANT_BITS}")
    if group % 16 or group & (group - 1) or k % group:
        raise ServeError(f"hgemv: reads groups of 16 x 2^i inputs, a whole number of them: not {k} inputs in groups "
                         f"of {group}")
    base_w, base_s = parts[0][2], parts[0][3]
    padded_n = base_s.shape[-1]
    total = halves * experts
    bits, qoff, soff = [0] * total, [0] * total, [0] * total
    for b, slots, w, s in parts:
        kp = w.shape[1] * 16
        want_w = (len(slots), kp // 16, padded_n * b // 2)
        want_s = (len(slots), kp // group, padded_n)
        if (w.dtype, tuple(w.shape), s.dtype, tuple(s.shape)) != (torch.int32, want_w, torch.bfloat16, want_s) \
                or not (w.is_contiguous() and s.is_contiguous()) or kp < k or padded_n < n:
            raise ServeError(f"hgemv: a {b}-bit part of {len(slots)} slots holds {w.dtype} {list(w.shape)} / {s.dtype} "
                             f"{list(s.shape)}; humming's layout for [{n}, {k}], group {group}, is int32 {list(want_w)} / "
                             f"bfloat16 {list(want_s)}, contiguous")
        dw, ds = w.data_ptr() - base_w.data_ptr(), s.data_ptr() - base_s.data_ptr()
        for i, slot in enumerate(slots):
            if not 0 <= slot < total:
                raise ServeError(f"hgemv: a {b}-bit part holds slot {slot}; the sublayer has {total}")
            if bits[slot]:
                raise ServeError(f"hgemv: slot {slot} is held by two parts")
            bits[slot] = b
            qoff[slot] = dw // 4 + i * w.stride(0)
            soff[slot] = ds // 2 + i * s.stride(0)
    missing = [i for i, b in enumerate(bits) if not b]
    if missing:
        raise ServeError(f"hgemv: slots {missing[:8]} are held by no part")
    dev = base_w.device
    table = SlotTable(torch.tensor(bits, dtype=torch.int32, device=dev), torch.tensor(qoff, device=dev),
                      torch.tensor(soff, device=dev), n, k, group, halves)
    return HummingTable(table, padded_n, base_w, base_s)
