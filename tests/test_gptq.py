"""The GPTQ math module against an independent, literal bit-by-bit reference."""
import numpy as np
import pytest
import torch

from m3_convert import gptq


def ref_unpack_rows(qweight, bits):
    """Literal reading of docs/FORMAT.md#gptq-packing with Python ints: one bit stream per column."""
    rows, cols = qweight.shape
    n_in = rows * 32 // bits
    out = np.zeros((n_in, cols), dtype=np.int64)
    for c in range(cols):
        stream = 0
        for r in range(rows):
            stream |= (int(qweight[r, c]) & 0xFFFFFFFF) << (32 * r)
        for i in range(n_in):
            out[i, c] = (stream >> (bits * i)) & ((1 << bits) - 1)
    return out


def ref_unpack_cols(qzeros, bits):
    return ref_unpack_rows(np.ascontiguousarray(qzeros.T), bits).T


def random_triple(rng, bits, n_in=256, n_out=64, g=128):
    codes = rng.integers(0, 1 << bits, size=(n_in, n_out))
    zeros = rng.integers(0, 1 << bits, size=(n_in // g, n_out))
    scales = (rng.standard_normal((n_in // g, n_out)) * 0.01).astype(np.float16)
    return gptq.pack_qweight(codes, bits), gptq.pack_qzeros(zeros, bits), scales, codes, zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_matches_literal_bitstream(bits):
    rng = np.random.default_rng(bits)
    qw, qz, sc, codes, zeros = random_triple(rng, bits, n_in=128, n_out=32)
    assert qw.dtype == np.int32 and qw.shape == (128 * bits // 32, 32)
    assert np.array_equal(ref_unpack_rows(qw, bits), codes)
    assert np.array_equal(ref_unpack_cols(qz, bits), zeros)
    assert np.array_equal(gptq.unpack_qweight(qw, bits), codes)
    assert np.array_equal(gptq.unpack_qzeros(qz, bits), zeros)
    # the sign bit is used: some words must be negative as int32 for b >= 2 random data
    assert (qw < 0).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_infer_shape(bits):
    rng = np.random.default_rng(0)
    qw, qz, sc, _, _ = random_triple(rng, bits, n_in=384, n_out=96)
    s = gptq.infer_shape(qw.shape, qz.shape, sc.shape)
    assert (s.bits, s.in_features, s.out_features, s.group_size) == (bits, 384, 96, 128)


def test_infer_shape_rejects_inconsistent():
    with pytest.raises(gptq.GPTQError, match="inferred bits"):
        gptq.infer_shape((32, 64), (2, 10), (2, 64))  # 10*32/64 = 5 bits
    with pytest.raises(gptq.GPTQError, match="outputs"):
        gptq.infer_shape((32, 64), (2, 8), (2, 32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_is_exact_and_signed(bits):
    rng = np.random.default_rng(10 + bits)
    qw, qz, sc, codes, zeros = random_triple(rng, bits)
    w = gptq.dequantize(qw, qz, sc)
    gi = np.arange(codes.shape[0]) // 128
    ref = (sc.astype(np.float64)[gi] * (codes - (zeros[gi] + 1))).T  # float64: the exact value
    assert w.dtype == np.float32 and w.shape == (64, 256)
    assert np.array_equal(w.astype(np.float64), ref)
    assert (sc < 0).any() and (w[sc.T.repeat(128, axis=1) < 0] != 0).any()


def test_dequantize_literal_z_plus_one_no_wrap():
    # stored zero 2^b - 1 means z + 1 = 2^b: must not wrap to 0
    bits = 2
    codes = np.zeros((128, 32), dtype=np.int64)
    zeros = np.full((1, 32), 3)
    sc = np.ones((1, 32), dtype=np.float16)
    w = gptq.dequantize(gptq.pack_qweight(codes, bits), gptq.pack_qzeros(zeros, bits), sc)
    assert np.all(w == -4.0)


def test_g_idx_matches_default_grouping():
    rng = np.random.default_rng(3)
    qw, qz, sc, _, _ = random_triple(rng, 4)
    g_idx = (np.arange(256) // 128).astype(np.int32)
    assert np.array_equal(gptq.dequantize(qw, qz, sc, g_idx), gptq.dequantize(qw, qz, sc))
    assert gptq.is_trivial_g_idx(g_idx, gptq.infer_shape(qw.shape, qz.shape, sc.shape))
    assert not gptq.is_trivial_g_idx(g_idx[::-1].copy(), gptq.infer_shape(qw.shape, qz.shape, sc.shape))


def test_to_bf16_matches_torch_rounding():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(100000).astype(np.float32) * 1e-3,
                        np.array([0.0, -0.0, 1.0, 65504.0, 1e-40, np.inf, -np.inf], dtype=np.float32)])
    # include exact ties: bf16 value + half an ulp
    ties = (gptq.bf16_to_f32(rng.integers(0, 0x7F00, 1000).astype(np.uint16)).view(np.uint32) | np.uint32(0x8000)).view(np.float32)
    x = np.concatenate([x, ties])
    ours = gptq.to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(gptq.bf16_to_f32(gptq.to_bf16(np.array([np.nan], dtype=np.float32))))[0]


@pytest.mark.parametrize("bits,at", [(2, 64), (3, 32), (4, 64), (8, 32)])
def test_split_outputs_is_lossless(bits, at):
    rng = np.random.default_rng(20 + bits)
    qw, qz, sc, _, _ = random_triple(rng, bits, n_out=128)
    full = gptq.dequantize(qw, qz, sc)
    a, b = gptq.split_outputs(qw, qz, sc, at)
    assert np.array_equal(gptq.dequantize(*a), full[:at])
    assert np.array_equal(gptq.dequantize(*b), full[at:])


def test_split_off_word_boundary_refused():
    rng = np.random.default_rng(1)
    qw, qz, sc, _, _ = random_triple(rng, 3, n_out=128)
    with pytest.raises(gptq.GPTQError, match="packing-word boundary"):
        gptq.split_outputs(qw, qz, sc, 48)  # 48*3/32 = 4.5 words
    assert not gptq.split_point_ok(48, 3) and gptq.split_point_ok(64, 3)


@pytest.mark.parametrize("bits,new", [(2, 4), (3, 4), (2, 8), (3, 8), (4, 8), (4, 4)])
def test_promote_is_lossless(bits, new):
    rng = np.random.default_rng(30 + bits)
    qw, qz, sc, _, _ = random_triple(rng, bits)
    # promotion needs the symmetric zero (what AutoRound writes): z+1 = 2^(b-1)
    qz = gptq.pack_qzeros(np.full((2, 64), (1 << (bits - 1)) - 1), bits)
    pw, pz = gptq.promote(qw, qz, bits, new)
    assert gptq.infer_shape(pw.shape, pz.shape, sc.shape).bits == new
    assert np.array_equal(gptq.dequantize(pw, pz, sc), gptq.dequantize(qw, qz, sc))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_shapes_is_the_inverse_of_infer_shape(bits):
    ps = gptq.packed_shapes(384, 64, 128, bits)
    assert gptq.infer_shape(ps["qweight"], ps["qzeros"], ps["scales"]) == gptq.GPTQShape(bits, 384, 64, 128)
    q, z, s = (np.zeros(ps[k], dtype=dt) for k, dt in (("qweight", np.int32), ("qzeros", np.int32), ("scales", np.float16)))
    assert gptq.dequantize(q, z, s).shape == (64, 384)
