"""GPTQ v1 packing math (``packing_format: auto_round:auto_gptq``), pure numpy.

Everything here is a pure function of arrays; no I/O, no torch.  The layout
(docs/FORMAT.md#gptq-packing), for a Linear with ``in`` inputs, ``out`` outputs, ``b`` bits and
group size ``g``:

* ``qweight`` int32 ``[in*b/32, out]``: codes packed along *in*, lowest bits first;
* ``qzeros``  int32 ``[in/g, out*b/32]``: packed along *out*, storing ``zero - 1``;
* ``scales``  float16 ``[in/g, out]`` (signed: never take abs);
* b = 3: every 3 consecutive words form one little-endian 96-bit stream of 32
  values, value j at stream bits ``[3j, 3j+3)``.

``W[o, i] = scales[G(i), o] * (q[i, o] - (z[G(i), o] + 1))`` with ``G(i) = i // g``
(or ``g_idx[i]``).  The product of a float16 scale and an integer of at most
9 bits is exact in float32 (11 + 9 < 24 mantissa bits), so :func:`dequantize`
is exact and :func:`to_bf16` rounds it once (round to nearest, ties to even).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VALID_BITS = (2, 3, 4, 8)


class GPTQError(ValueError):
    """A GPTQ triple that is inconsistent (shapes, bits, split boundary)."""


@dataclass(frozen=True)
class GPTQShape:
    bits: int
    in_features: int
    out_features: int
    group_size: int

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size


def packed_shapes(in_features: int, out_features: int, group_size: int, bits: int) -> dict:
    """The GPTQ v1 tensors of a module: {"qweight": [in*b/32, out], "qzeros": [in/g, out*b/32], "scales": [in/g, out]}
    (the inverse of :func:`infer_shape`)."""
    g = in_features // group_size
    return {"qweight": (in_features * bits // 32, out_features), "qzeros": (g, out_features * bits // 32),
            "scales": (g, out_features)}


def infer_shape(qweight_shape, qzeros_shape, scales_shape) -> GPTQShape:
    """Bits, in/out features and group size from the three tensor shapes alone.

    ``b = qzeros.shape[1]*32 / scales.shape[1]``, ``in = qweight.shape[0]*32 / b``,
    ``g = in / scales.shape[0]``; every division must be exact.
    """
    try:
        return _infer_shape_cached(tuple(qweight_shape), tuple(qzeros_shape), tuple(scales_shape))
    except TypeError:   # unhashable dims (numpy arrays): no cache
        return _infer_shape(qweight_shape, qzeros_shape, scales_shape)


@lru_cache(maxsize=1024)   # a checkpoint has a few dozen distinct GPTQ shapes and ~20k modules
def _infer_shape_cached(qweight_shape, qzeros_shape, scales_shape) -> GPTQShape:
    return _infer_shape(qweight_shape, qzeros_shape, scales_shape)


def _infer_shape(qweight_shape, qzeros_shape, scales_shape) -> GPTQShape:
    qweight_shape, qzeros_shape, scales_shape = (tuple(int(d) for d in s) for s in (qweight_shape, qzeros_shape, scales_shape))
    if len(qweight_shape) != 2 or len(qzeros_shape) != 2 or len(scales_shape) != 2:
        raise GPTQError(f"GPTQ tensors must be 2-D: qweight {list(qweight_shape)}, qzeros {list(qzeros_shape)}, scales {list(scales_shape)}")
    groups, out = scales_shape
    if out <= 0 or groups <= 0:
        raise GPTQError(f"empty scales {list(scales_shape)}")
    if qweight_shape[1] != out:
        raise GPTQError(f"qweight has {qweight_shape[1]} outputs, scales {out}")
    if qzeros_shape[0] != groups:
        raise GPTQError(f"qzeros has {qzeros_shape[0]} groups, scales {groups}")
    num = qzeros_shape[1] * 32
    if num % out:
        raise GPTQError(f"qzeros width {qzeros_shape[1]} x 32 is not a multiple of {out} outputs")
    bits = num // out
    if bits not in VALID_BITS:
        raise GPTQError(f"inferred bits {bits} not in {VALID_BITS} (qzeros {list(qzeros_shape)}, scales {list(scales_shape)})")
    if (qweight_shape[0] * 32) % bits:
        raise GPTQError(f"qweight rows {qweight_shape[0]} x 32 not divisible by {bits} bits")
    in_features = qweight_shape[0] * 32 // bits
    if in_features % groups:
        raise GPTQError(f"{in_features} inputs not divisible into {groups} groups")
    if bits == 3 and (qweight_shape[0] % 3 or qzeros_shape[1] % 3):
        raise GPTQError(f"3-bit tensors must hold whole 3-word packs: qweight has {qweight_shape[0]} rows, qzeros "
                        f"{qzeros_shape[1]} columns (each a multiple of 3)")
    return GPTQShape(bits, in_features, out, in_features // groups)


_F16_MAGNITUDE = np.uint16(0x7FFF)
_F16_INF = np.uint16(0x7C00)          # |x| with every exponent bit set: inf (mantissa 0) or NaN


def scales_problem(scales) -> str | None:
    """None when every fp16 scale is finite, else what is wrong, e.g. ``"2 NaN and 1 inf scales (the first at
    [group 3, output 17])"``: a non-finite scale decodes its whole group to NaN/inf, and vLLM serves it as it is.
    ``scales``: a float16 array (or its raw bytes), any shape; the position is given for a 2-D ``[groups, out]``.
    (A scale of exactly 0 is not refused: auto-round writes 0 where a group's scale underflows fp16 (its
    weights are all that small; the scale is cast to float16, ``auto_round/data_type/int.py``), and the group then
    decodes to zeros, as those weights round; see zero_scales.)"""
    u = _f16_bits(scales)
    bad = (u & _F16_MAGNITUDE) >= _F16_INF
    if not bad.any():
        return None
    nan = int(np.count_nonzero(bad & ((u & np.uint16(0x3FF)) != 0)))
    inf = int(np.count_nonzero(bad)) - nan
    what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), u.shape)]
    where = f"[group {first[0]}, output {first[1]}]" if u.ndim == 2 else f"element {first}"
    return f"{what} scale{'s' if nan + inf > 1 else ''} (the first at {where})"


def batch_scales_problems(batch, view):
    """(tensor, scales_problem) for each scales tensor of one batch of st.map_batches (``view``: their bytes back to
    back) that holds a NaN or inf; the whole batch is checked at once first."""
    if scales_problem(view) is None:
        return
    off = 0
    for t in batch:
        problem = scales_problem(np.frombuffer(view[off:off + t.nbytes], np.float16).reshape(t.shape))
        if problem:
            yield t, problem
        off += t.nbytes


def zero_scales(scales) -> int:
    """How many fp16 scales are exactly 0 (or -0): their groups decode to zeros (see scales_problem)."""
    return int(np.count_nonzero((_f16_bits(scales) & _F16_MAGNITUDE) == 0))


def _f16_bits(scales) -> np.ndarray:
    """The uint16 bit patterns of float16 scales given as an array or as raw bytes."""
    if isinstance(scales, (bytes, bytearray, memoryview)):
        return np.frombuffer(scales, np.uint16)
    arr = np.ascontiguousarray(scales)
    if arr.dtype != np.float16:
        raise GPTQError(f"scales must be float16, got {arr.dtype}")
    return arr.view(np.uint16)


def _as_u32(words: np.ndarray) -> np.ndarray:
    if words.dtype == np.int32:
        return words.view(np.uint32)
    if words.dtype == np.uint32:
        return words
    raise GPTQError(f"packed words must be int32/uint32, got {words.dtype}")


def _unpack_last(words: np.ndarray, bits: int) -> np.ndarray:
    """Unpack along the LAST axis: ``[..., n]`` words -> ``[..., n*32/bits]`` codes (uint16)."""
    w = _as_u32(words)
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits)
        codes = (w[..., :, None] >> shifts) & np.uint32(mask)
        return codes.reshape(*w.shape[:-1], w.shape[-1] * per).astype(np.uint16)
    if bits == 3:
        n = w.shape[-1]
        if n % 3:
            raise GPTQError(f"3-bit packing needs a multiple of 3 words, got {n}")
        trip = w.reshape(*w.shape[:-1], n // 3, 3).astype(np.uint64)
        out = np.empty((*w.shape[:-1], n // 3, 32), dtype=np.uint16)
        for j in range(32):
            p = 3 * j
            word, off = divmod(p, 32)
            v = trip[..., word] >> np.uint64(off)
            if off > 29:
                v = v | (trip[..., word + 1] << np.uint64(32 - off))
            out[..., j] = (v & np.uint64(mask)).astype(np.uint16)
        return out.reshape(*w.shape[:-1], (n // 3) * 32)
    raise GPTQError(f"unsupported bits {bits} (valid: {VALID_BITS})")


def _pack_last(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_unpack_last`: ``[..., m]`` codes -> ``[..., m*bits/32]`` int32 words."""
    c = codes.astype(np.uint64)
    if c.size and int(c.max()) >= (1 << bits):
        raise GPTQError(f"code {int(c.max())} out of range for {bits} bits (largest {(1 << bits) - 1})")
    m = c.shape[-1]
    if m % 32:
        raise GPTQError(f"{bits}-bit packing needs a multiple of 32 values, got {m}")
    if bits in (2, 4, 8):
        per = 32 // bits
        c = c.reshape(*c.shape[:-1], m // per, per)
        shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
        words = np.bitwise_or.reduce(c << shifts, axis=-1)
        return (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
    if bits == 3:
        c = c.reshape(*c.shape[:-1], m // 32, 32)
        trip = np.zeros((*c.shape[:-1], 3), dtype=np.uint64)
        for j in range(32):
            p = 3 * j
            word, off = divmod(p, 32)
            trip[..., word] |= c[..., j] << np.uint64(off)
            if off > 29:
                trip[..., word + 1] |= c[..., j] >> np.uint64(32 - off)
        trip &= np.uint64(0xFFFFFFFF)
        return trip.reshape(*c.shape[:-2], (m // 32) * 3).astype(np.uint32).view(np.int32)
    raise GPTQError(f"unsupported bits {bits} (valid: {VALID_BITS})")


def unpack_qweight(qweight: np.ndarray, bits: int) -> np.ndarray:
    """``[in*b/32, out]`` words -> ``[in, out]`` codes (packed along rows)."""
    return np.ascontiguousarray(_unpack_last(np.ascontiguousarray(qweight.T), bits).T)


def pack_qweight(codes: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(_pack_last(np.ascontiguousarray(codes.T), bits).T)


def unpack_qzeros(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """``[G, out*b/32]`` words -> ``[G, out]`` stored zeros (zero - 1, packed along columns)."""
    return _unpack_last(qzeros, bits)


def pack_qzeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    return _pack_last(zeros, bits)


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None = None) -> np.ndarray:
    """Exact GPTQ v1 decode to float32 ``[out, in]`` (no rounding happens here)."""
    shape = infer_shape(qweight.shape, qzeros.shape, scales.shape)
    if scales.dtype != np.float16:
        raise GPTQError(f"scales must be float16, got {scales.dtype}")
    q = unpack_qweight(qweight, shape.bits).astype(np.int32)            # [in, out]
    z = unpack_qzeros(qzeros, shape.bits).astype(np.int32) + 1          # [G, out], literal z + 1
    if g_idx is None:
        gi = np.arange(shape.in_features) // shape.group_size
    else:
        gi = np.asarray(g_idx).astype(np.int64)
        if gi.shape != (shape.in_features,) or gi.min() < 0 or gi.max() >= shape.groups:
            raise GPTQError(f"g_idx shape {list(gi.shape)} / range does not fit {shape.in_features} inputs, {shape.groups} groups")
    diff = (q - z[gi]).astype(np.float32)                               # |diff| <= 256: exact
    w = scales.astype(np.float32)[gi] * diff                            # exact float32 product
    return np.ascontiguousarray(w.T)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def bf16_to_f32(bits16: np.ndarray) -> np.ndarray:
    return (bits16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def symmetric_zero_words(bits: int) -> np.ndarray:
    """The ``bits`` uint32 words that hold 32 stored symmetric zeros (``2^(b-1) - 1``, GPTQ v1): every row of
    a symmetric qzeros tensor is this pattern repeated (for 3 bits a 3-word period, for 2/4/8 one word)."""
    return pack_qzeros(np.full((1, 32), (1 << (bits - 1)) - 1), bits).view(np.uint32).reshape(-1)


def is_trivial_g_idx(g_idx: np.ndarray, shape: GPTQShape) -> bool:
    """True when ``g_idx == arange(in) // g`` (plain auto_gptq export, no act-order)."""
    g = np.asarray(g_idx)
    return g.shape == (shape.in_features,) and bool(np.array_equal(g.astype(np.int64), np.arange(shape.in_features) // shape.group_size))


def split_point_ok(split_out: int, bits: int) -> bool:
    """``split_out`` values fill whole packing words (3-bit: 32 values in 3 words): a fused module split at output
    ``split_out``, or a tensor-parallel slice of ``split_out`` features, cuts no word (serve.decide.split_problem)."""
    return (split_out * bits) % 32 == 0 and (bits != 3 or split_out % 32 == 0)


def split_outputs(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, at: int):
    """Split a GPTQ triple by outputs at ``at``: returns ((qw, qz, sc), (qw, qz, sc)), bytes untouched."""
    shape = infer_shape(qweight.shape, qzeros.shape, scales.shape)
    if not 0 < at < shape.out_features:
        raise GPTQError(f"split point {at} outside 1..{shape.out_features - 1}")
    if not split_point_ok(at, shape.bits):
        raise GPTQError(f"split at output {at} is not on a {shape.bits}-bit packing-word boundary of qzeros")
    zcol = at * shape.bits // 32
    a = (qweight[:, :at], qzeros[:, :zcol], scales[:, :at])
    b = (qweight[:, at:], qzeros[:, zcol:], scales[:, at:])
    return tuple(np.ascontiguousarray(t) for t in a), tuple(np.ascontiguousarray(t) for t in b)


def promote(qweight: np.ndarray, qzeros: np.ndarray, bits: int, new_bits: int):
    """Lossless re-encoding of codes at a wider bit width (scales unchanged).

    ``q' = q + 2^(b'-1) - 2^(b-1)`` and ``(z'+1) = (z+1) + 2^(b'-1) - 2^(b-1)``, so
    ``q' - (z'+1) == q - (z+1)`` for every element: the decode is identical.
    """
    return promote_qweight(qweight, bits, new_bits), promote_qzeros(qzeros, bits, new_bits)


def _shift(codes: np.ndarray, bits: int, new_bits: int) -> np.ndarray:
    if new_bits < bits:
        raise GPTQError(f"cannot promote {bits} -> {new_bits} bits")
    out = codes.astype(np.int64) + ((1 << (new_bits - 1)) - (1 << (bits - 1)))
    if out.size and (out.min() < 0 or out.max() >= (1 << new_bits)):
        raise GPTQError(f"promotion {bits} -> {new_bits} bits out of range: codes would span {int(out.min())}..{int(out.max())}, "
                        f"outside 0..{(1 << new_bits) - 1}")
    return out


def promote_qweight(qweight: np.ndarray, bits: int, new_bits: int) -> np.ndarray:
    """qweight re-packed at ``new_bits`` with codes shifted by 2^(b'-1) - 2^(b-1) (see :func:`promote`)."""
    if new_bits == bits:
        return qweight
    return pack_qweight(_shift(unpack_qweight(qweight, bits), bits, new_bits), new_bits)


def promote_packed(words: np.ndarray, bits: int, new_bits: int, leaf: str) -> np.ndarray:
    """A checkpoint's ``qweight`` or ``qzeros`` (``leaf``, or a tensor name ending in it) promoted."""
    if leaf.endswith("qweight"):
        return promote_qweight(words, bits, new_bits)
    if leaf.endswith("qzeros"):
        return promote_qzeros(words, bits, new_bits)
    raise GPTQError(f"only qweight and qzeros are promoted, not {leaf}")


def promote_qzeros(qzeros: np.ndarray, bits: int, new_bits: int) -> np.ndarray:
    """qzeros re-packed at ``new_bits``, shifted like the codes (see :func:`promote`)."""
    if new_bits == bits:
        return qzeros
    return pack_qzeros(_shift(unpack_qzeros(qzeros, bits), bits, new_bits), new_bits)
