#!/usr/bin/env python3
"""humming-kernels 0.1.19's MoE weight layout, read back (issue 25: the groundwork for a decode kernel that reads
the weights humming holds, so that decode need not keep a second copy).

    python3 gpu/humming_layout.py --cpu              # the decoder against a transcription of humming's repack
    python3 gpu/humming_layout.py --gpu OUT_JSON     # the decoder against humming's own repack, run as the plugin
                                                     # runs it, and m3_convert.serve.hgemv over what it made (GPU
                                                     # machine, after the vLLM staging and install)

What the plugin keeps per width part (convert/serve/moe.py ``HummingMoEKernel.prepare``, compat.humming_layer:
GPTQ symmetric, no zero point, scales cast to bf16): ``{part}_weight`` int32 [S, Kp/16, Np*b/2] and
``{part}_weight_scale`` bf16 [S, Kp/128, Np], N padded to Np (a multiple of 256, decide.HUMMING_PAD_N), K to Kp (a
multiple of 128). For bf16 activations and 2/3/4/8-bit weights on sm_90 humming's transform calls its CUDA repack
(``weight_repack_nk`` in humming/include/humming/kernel/process.cuh, ``interleave_mode=3``, humming/transform.py): the words of code (n, k) of slot e
lie in the block [e][k // 16][n // 64] of 32 lanes x b words (an MMA m16n8k16 B fragment), with, for nl = n % 64 and
kl = k % 16, lane = 4 (nl % 8) + (kl % 8) // 2 and the code's place in the lane's words given by i3 = nl // 16,
i4 = (nl // 8) % 2, i5 = kl // 8, i6 = kl % 2 (:func:`decode_codes`). With bf16 activations (the plugin's) 8-bit codes
are stored as t = c - 128 (c >= 128) or 255 - c (humming/transform.py folds them for bf16 only); 3-bit lanes merge
four 4-bit words into three. A scale (n, group g) is at [e, g, 64 (n // 64) + 8 (n % 8) + (n % 64) // 8]
(``transform_humming_weight_scale``), in bf16: rounded from the checkpoint's fp16 (compat casts them), so a kernel
reading humming's copy would not take the fp16 scales exactly as wmix does. humming's kernels take the value as
(code - 2^(b-1)) x scale, for bf16 activations rounded to bf16 before the tensor cores (its dequant headers and
include/humming/arith/mainloop_arith.cuh ``may_apply_bs_and_zp_on_b``; read, not checked here: the checks below are
of where each code and scale sits).

Read from humming 0.1.19's source (wheel of the staging); :func:`emulate_repack` transcribes its repack kernel line by
line for the CPU check. ``--gpu`` is the check against the real kernel: until it has run, the layout is inferred
from source, not confirmed on a GPU.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from m3_convert import gptq


def _p2(b: int) -> int:
    return 1 << (b - 1).bit_length()


def gptq_rows(codes, b: int):
    """codes [N, K] -> one bitstream along K per output, uint32 [N, K*b/32] (code k at bit k*b): GPTQ's qweight
    (m3_convert.gptq.pack_qweight) transposed, as humming's schema hands it to the repack."""
    return gptq.pack_qweight(np.asarray(codes).T, b).T.view(np.uint32)


def _extract(row, idx: int, b: int) -> int:
    w, o = divmod(idx * b, 32)
    v = int(row[w]) >> o
    if o + b > 32:
        v |= int(row[w + 1]) << (32 - o)
    return v & ((1 << b) - 1)


def _pack_lane(tmp: list, b: int) -> list:
    """humming_pack_weight (interleave mode 3, 16-bit activations): a lane's 128 codes into 4 x P words (P = b
    rounded up to a power of two), 3 bits then merged four words into three."""
    p = _p2(b)
    out = [0] * (4 * p)
    per = 32 // p
    g = per // 2
    hi, lo = 1 << (b - 1), (1 << (b - 1)) - 1
    for i in range(4):
        for j in range(p):
            val = 0
            for k in range(per):
                c = tmp[i * 32 + j * per + (k % g) * 2 + k // g]
                val |= ((c & lo) | (c & hi)) << (k * p)
            out[i * p + j] = val & 0xffffffff
    if b == 3:
        o = out
        for i in range(4):
            o[3 * i + 0] = (o[4 * i + 0] & 0x77777777) | ((o[4 * i + 1] & 0x44444444) << 1) & 0xffffffff
            o[3 * i + 1] = (o[4 * i + 1] & 0x33333333) | ((o[4 * i + 2] & 0x66666666) << 1) & 0xffffffff
            o[3 * i + 2] = (o[4 * i + 2] & 0x11111111) | ((o[4 * i + 3] & 0x77777777) << 1) & 0xffffffff
    return out


def _lane_codes(sm, lane: int, b: int) -> list:
    """The 128 codes a lane of one 64 x 64 block packs, in the kernel's order (8-bit codes shifted by 128 and
    folded, as humming prepares them for its integer-to-float conversion)."""
    tmp = [0] * 128
    for i in range(8):
        row = sm[i * 8 + lane // 4]
        for j in range(8):
            for k in range(2):
                v = _extract(row, j * 8 + (lane % 4) * 2 + k, b)
                if b == 8:
                    v = v - 128 if v >= 128 else 255 - v
                tmp[(j // 2) * 32 + (i % 8 // 2) * 8 + (i % 2) * 4 + (j % 2) * 2 + k] = v
    return tmp


def emulate_repack(codes, b: int):
    """codes [S, N, K] (N a multiple of 64, K of 64) -> humming's repacked words [S, K/16, N*b/2], by transcribing
    ``weight_repack_nk`` (grid N/64 x K/64 x S, 32 lanes). Slow (Python loops): small shapes only."""
    s_, n, k = codes.shape
    out = np.zeros((s_, k // 16, n * b // 2), np.uint32)
    for z in range(s_):
        rows = gptq_rows(codes[z], b)
        flat = out[z].reshape(-1)
        for bx in range(n // 64):
            for by in range(k // 64):
                sm = rows[bx * 64:(bx + 1) * 64, by * 2 * b:(by + 1) * 2 * b]
                for lane in range(32):
                    packed = _pack_lane(_lane_codes(sm, lane, b), b)
                    for i in range(4):
                        base = (by * 4 + i) * (16 * n * b // 32) + 16 * 64 * bx * b // 32 + lane * b
                        flat[base:base + b] = packed[i * b:(i + 1) * b]
    return out


def _places(b: int):
    """Each code a lane holds, as (word j before the 3-bit merge, place s in it, nl - q, kl - 2r): the code at bits
    [s*P, s*P + b) of word j is output 64 (n // 64) + nl and input 16 (k // 16) + kl of lane 4q + r (P = b rounded up
    to a power of two; the order of humming_pack_weight's interleave mode 3)."""
    per = 32 // _p2(b)
    for j in range(4 if b == 3 else b):
        for s in range(per):
            e = j * per + (s % (per // 2)) * 2 + s // (per // 2)
            i3, i4, i5, i6 = e >> 3, (e >> 2) & 1, (e >> 1) & 1, e & 1
            yield j, s, 16 * i3 + 8 * i4, 8 * i5 + i6


def _virtual_words(words, b: int) -> list:
    """A lane's stored words as its P words before the 3-bit merge (as stored for 2/4/8 bits)."""
    if b != 3:
        return [words[..., j] for j in range(b)]
    w0, w1, w2 = words[..., 0], words[..., 1], words[..., 2]
    return [w0 & 0x77777777, (w1 & 0x33333333) | ((w0 & 0x88888888) >> 1),
            ((w1 & 0xCCCCCCCC) >> 1) | (w2 & 0x11111111), (w2 >> 1) & 0x77777777]


def decode_codes(words, b: int, n: int, k: int, act: str = "bf16"):
    """humming's repacked words [S, Kp/16, Np*b/2] -> codes [S, n, k] (the GPTQ codes, 0 .. 2^b - 1), for the
    activation dtype the plugin serves (bf16: humming folds 8-bit codes for it only; another is refused)."""
    if act != "bf16":
        raise ValueError(f"decode_codes reads humming's layout for bf16 activations, not {act}")
    words = np.asarray(words).astype(np.int64) & 0xffffffff
    s_, k16, np_ = words.shape[0], words.shape[1], words.shape[2] * 2 // b
    w = words.reshape(s_, k16, np_ // 64, 32, b)
    codes = np.zeros((s_, np_, k16 * 16), np.int64)
    p = _p2(b)
    for lane in range(32):
        q, r = lane >> 2, lane & 3
        virt = _virtual_words(w[:, :, :, lane, :], b)
        for j, s, n0, k0 in _places(b):
            v = (virt[j] >> (s * p)) & ((1 << b) - 1)
            if b == 8:
                v = np.where(v < 128, v + 128, 255 - v)
            codes[:, n0 + q::64, k0 + 2 * r::16] = v.transpose(0, 2, 1)          # [S, N/64, K/16]
    return codes[:, :n, :k]


def repack_codes(codes, b: int):
    """codes [S, N, K] (N a multiple of 64, K of 16) -> humming's repacked words [S, K/16, N*b/2] uint32, vectorised
    (the inverse of :func:`decode_codes`; equal to :func:`emulate_repack`, tests/test_humming_layout.py): for real
    shapes, where the transcription is too slow."""
    codes = np.asarray(codes).astype(np.uint64)
    s_, n, k = codes.shape
    if b == 8:                                    # humming's fold for bf16 activations
        codes = np.where(codes >= 128, codes - 128, 255 - codes)
    blocks = codes.reshape(s_, n // 64, 64, k // 16, 16)
    p = _p2(b)
    q, r = np.arange(8), np.arange(4)
    virt = [np.zeros((s_, k // 16, n // 64, 32), np.uint64) for _ in range(4 if b == 3 else b)]
    for j, s, n0, k0 in _places(b):
        v = blocks[:, :, n0 + q][:, :, :, :, k0 + 2 * r]                             # [S, N/64, 8 q, K/16, 4 r]
        virt[j] |= v.transpose(0, 3, 1, 2, 4).reshape(s_, k // 16, n // 64, 32) << np.uint64(s * p)
    if b == 3:          # four 4-bit words into three (humming_pack_weight)
        v0, v1, v2, v3 = virt
        virt = [(v0 & 0x77777777) | ((v1 & 0x44444444) << np.uint64(1)),
                (v1 & 0x33333333) | ((v2 & 0x66666666) << np.uint64(1)),
                (v2 & 0x11111111) | ((v3 & 0x77777777) << np.uint64(1))]
    words = np.stack(virt, axis=-1) & np.uint64(0xffffffff)                         # [S, K/16, N/64, 32, b]
    return words.astype(np.uint32).reshape(s_, k // 16, n * b // 2)


def scale_position(n):
    """Where humming keeps output n's scale within its group row: 64 (n // 64) + 8 (n % 8) + (n % 64) // 8."""
    n = np.asarray(n)
    return 64 * (n // 64) + 8 * (n % 8) + (n % 64) // 8


def decode_scales(stored, n: int):
    """humming's scales [S, Kp/128, Np] -> [S, Kp/128, n] in output order (GPTQ's scales layout)."""
    stored = np.asarray(stored)
    return stored[:, :, scale_position(np.arange(n))]


def emulate_scales(scales):
    """GPTQ's scales [S, G, N] (N a multiple of 64) as humming keeps them: ``transform_humming_weight_scale``'s
    permutation of each 64 outputs (position p holds output 8 (p % 8) + p // 8)."""
    perm = [8 * (p % 8) + p // 8 for p in range(64)]
    s = np.asarray(scales)
    return s.reshape(-1, 64)[:, perm].reshape(s.shape)


def cpu_check(slots: int = 2, n: int = 128, k: int = 256, seed: int = 0) -> dict:
    """Per width: the decoder inverts the transcribed repack (codes) and the scale permutation, and the repack
    is not the plain bitstream (the check has something to undo)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in (2, 3, 4, 8):
        codes = rng.integers(0, 1 << b, size=(slots, n, k))
        words = emulate_repack(codes, b)
        plain = np.stack([gptq_rows(codes[s], b).reshape(-1) for s in range(slots)])
        scales = rng.standard_normal((slots, k // 128, n)).astype(np.float32)          # two groups: the group axis
        out[b] = {"codes": bool(np.array_equal(decode_codes(words, b, n, k), codes)),
                  "scales": bool(np.array_equal(decode_scales(emulate_scales(scales), n), scales)),
                  "repacked": not np.array_equal(words.reshape(slots, -1), plain)}
    return out


def emulate_part(codes, scales, b: int):
    """What humming holds for one width part, made here (:func:`repack_codes`, :func:`emulate_scales`; the layout
    checked against humming's own repack by ``--gpu``): codes [S, Np, Kp] (padded), the checkpoint's float16 scales
    [S, Kp/G, Np] -> (``{part}_weight`` int32 [S, Kp/16, Np*b/2], ``{part}_weight_scale`` bf16 [S, Kp/G, Np]),
    torch tensors on the CPU."""
    import torch
    words = torch.from_numpy(repack_codes(codes, b).view(np.int32).copy())
    bf16 = torch.from_numpy(np.asarray(scales, np.float16)).to(torch.bfloat16)
    return words, torch.from_numpy(emulate_scales(bf16.float().numpy())).to(torch.bfloat16).contiguous()


def random_parts(widths: dict, n: int, k: int, group: int, seed: int, pad_n: int | None = None, pad_k: int = 128,
                 guard: bool = False):
    """Random GPTQ slots held as humming's width parts: ``widths`` {bits: [slots]} -> ([(bits, slots, weight,
    weight_scale)], {slot: float64 [n, k]}): per slot the weights (code - zero) x the bf16 scale (rounded from random
    signed float16 ones, ~ +-[0.5, 1.5] / (2^(b-1) sqrt(k)), as gpu/wmix_slots.py makes them); N padded to ``pad_n``,
    K to ``pad_k`` (humming's), the padding zero codes. ``guard``: each part's tensors are views of one more random
    slot's, so that a planted error reading up to a slot's size past a part's end reads defined bytes."""
    import torch

    from m3_convert.serve.decide import HUMMING_PAD_N
    pad_n = pad_n or HUMMING_PAD_N
    rng = np.random.default_rng(seed)
    np_, kp = -(-n // pad_n) * pad_n, -(-k // pad_k) * pad_k
    parts, weights = [], {}
    for b, slots in sorted(widths.items()):
        held = len(slots) + guard
        codes = np.zeros((held, np_, kp), np.int64)
        codes[:, :n, :k] = rng.integers(0, 1 << b, size=(held, n, k))
        mag = (rng.random((held, kp // group, np_)) + 0.5) / ((1 << (b - 1)) * np.sqrt(k))
        scales = (mag * rng.choice([-1.0, 1.0], size=mag.shape)).astype(np.float16)
        words, stored = emulate_part(codes, scales, b)
        parts.append((b, list(slots), words[:len(slots)], stored[:len(slots)]))
        bf16 = torch.from_numpy(scales).to(torch.bfloat16).double()
        for i, slot in enumerate(slots):
            s = bf16[i].repeat_interleave(group, 0).T                                           # [Np, Kp]
            weights[slot] = ((torch.from_numpy(codes[i]).double() - (1 << (b - 1))) * s)[:n, :k]
    return parts, weights


def _humming_part(codes, scales, b: int, name: str):
    """humming's tensors for one width part, made by the plugin's own function (compat.humming_layer, which
    moe.py's width parts and linear.py's dense layers call), on the GPU."""
    import torch

    from m3_convert.serve import compat
    slots, n, k = codes.shape
    qw = np.stack([gptq_rows(codes[s], b).T for s in range(slots)]).view(np.int32)          # [S, K*b/32, N]
    layer = torch.nn.Module()
    qweight = torch.from_numpy(np.ascontiguousarray(qw)).cuda()
    sc = torch.from_numpy(scales).to(torch.float16).cuda()                                   # [S, K/128, N]
    compat.humming_layer(layer, b, 128, qweight, sc, n, k, torch.bfloat16, qweight.device, name, slots)
    torch.cuda.synchronize()
    return getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_weight_scale")


def hgemv_on(parts, halves: int, split: int, seed: int = 0) -> float:
    """m3_convert.serve.hgemv over width parts as humming made them, ``parts`` [(bits, slots, weight, weight_scale,
    codes [S, n, k], the bf16 scales as float32 [S, k/128, n])], one row per expert (``halves`` slots each), K split
    ``split``, against x @ W^T in float64, W = (code - zero) x the bf16 scale: the largest error relative to the
    largest output."""
    import torch

    from m3_convert.serve import hgemv
    total = sum(len(p[1]) for p in parts)
    n, k = parts[0][4].shape[1:]
    table = hgemv.humming_table([p[:4] for p in parts], n, k, 128, halves, total // halves)
    dev = parts[0][2].device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(total // halves, k, generator=gen).to(torch.bfloat16)
    ids = torch.arange(total // halves, dtype=torch.int32)
    y = hgemv.gemv(table, x.to(dev), ids.to(dev), 1, torch.empty(total // halves, halves * n, device=dev), split)
    weights = {}
    for b, slots, _, _, codes, bf16 in parts:
        w = (torch.from_numpy(codes).double() - (1 << (b - 1))) * \
            torch.from_numpy(bf16).double().repeat_interleave(128, 1).transpose(1, 2)
        weights.update(zip(slots, w))
    ref = torch.cat([torch.stack([x[e].double() @ weights[e * halves + h].T for e in range(total // halves)])
                     for h in range(halves)], dim=1)
    return float((y.double().cpu() - ref).abs().max() / ref.abs().max())


#: the (slots, N, K) of ``--gpu``'s check (N = 384 is padded to 512, as w13 at TP 8), and the bound of hgemv's error
#: there (float32 sums against float64, relative to the largest output)
GPU_SHAPES = ((3, 256, 256), (2, 384, 256))
HGEMV_BOUND = 1e-6


def hgemv_checks(shapes=GPU_SHAPES) -> int:
    """How many hgemv rows :func:`gpu_check` writes: one per width and shape, and the mixed table at two splits."""
    return 4 * len(shapes) + 2


def gpu_check(out: str, shapes=GPU_SHAPES, seed: int = 0) -> list:
    """Per width and shape (slots, N, K; N = 384 is padded to 512, as w13 at TP 8): humming's real repack read
    back by :func:`decode_codes` / :func:`decode_scales` equals the codes and the bf16 scales, and equals the
    transcription where nothing is padded (written to ``out`` first); then hgemv over each part alone, and over the
    four widths' parts of the first shape as one w13-like table (two halves an expert, slots in four allocations:
    offsets across them) at K splits 1 and 8 (:func:`hgemv_on`)."""
    import torch
    rng = np.random.default_rng(seed)
    rows, made = [], {}
    for slots, n, k in shapes:
        for b in (2, 3, 4, 8):
            codes = rng.integers(0, 1 << b, size=(slots, n, k))
            scales = (rng.standard_normal((slots, k // 128, n)) * 1e-2).astype(np.float16).astype(np.float32)
            row = {"bits": b, "slots": slots, "n": n, "k": k}
            try:
                words_t, sc_t = _humming_part(codes, scales, b, f"t{b}_{n}")
                words, sc = words_t.cpu().numpy(), sc_t.float().cpu().numpy()
                bf16 = torch.from_numpy(scales).to(torch.bfloat16).float().numpy()
                row.update(shape=list(words.shape), scale_shape=list(sc.shape),
                           codes=bool(np.array_equal(decode_codes(words, b, n, k), codes)),
                           scales=bool(np.array_equal(decode_scales(sc, n), bf16)))
                if n % 256 == 0:
                    row["transcription"] = bool(np.array_equal(words.view(np.uint32), emulate_repack(codes, b)))
                made[slots, n, b] = (words_t, sc_t, codes, bf16)
            except Exception as e:          # reported, not fatal: the other widths still run
                row["error"] = repr(e)[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
    json.dump(rows, open(out, "w"), indent=1)         # the layout's rows kept should hgemv fault below
    checks = [([(b, list(range(sl)), *t)], 1, 2, f"{b}-bit part, N {n}") for (sl, n, b), t in made.items()]
    first = [(b, list(range(3 * i, 3 * i + 3)), *made[(3, 256, b)]) for i, b in enumerate((2, 3, 4, 8))
             if (3, 256, b) in made]
    checks += [(first, 2, split, f"mixed table, 2 halves, split {split}") for split in (1, 8) if len(first) == 4]
    for parts, halves, split, what in checks:
        row = {"hgemv": what}
        try:
            row["error_rel"] = hgemv_on(parts, halves, split)
        except Exception as e:
            row["error"] = repr(e)[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    if "--gpu" in sys.argv:
        out = sys.argv[sys.argv.index("--gpu") + 1]
        rows = gpu_check(out)
        json.dump(rows, open(out, "w"), indent=1)
        ok = all(r.get("error_rel", 1) <= HGEMV_BOUND if "hgemv" in r else
                 r.get("codes") and r.get("scales") and r.get("transcription", True) for r in rows)
        ok = ok and sum("hgemv" in r for r in rows) == hgemv_checks()
    else:
        res = cpu_check()
        print(json.dumps(res))
        ok = all(all(v.values()) for v in res.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
