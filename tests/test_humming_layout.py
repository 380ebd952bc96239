"""gpu/humming_layout.py (issue 25): the reader of the MoE weight layout humming-kernels 0.1.19 keeps, checked on the
CPU against its line-by-line transcription of humming's repack kernel and scale permutation. The check against the
real CUDA kernel is ``python3 gpu/humming_layout.py --gpu`` (``gpu/device.sh hlayout``) on the GPU machine."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "gpu"))
import humming_layout as hl  # noqa: E402


def test_decoder_inverts_the_transcribed_repack():
    """Every width: codes and scales read back equal what went in, and the repack moved them (not the plain
    bitstream)."""
    assert hl.cpu_check() == {b: {"codes": True, "scales": True, "repacked": True} for b in (2, 3, 4, 8)}


def test_decoder_sees_two_lanes_swapped():
    """A control: the same words with two lanes' words exchanged no longer read back as the codes."""
    codes = np.random.default_rng(1).integers(0, 8, size=(1, 64, 64))
    words = hl.emulate_repack(codes, 3)
    swapped = words.reshape(1, 4, 1, 32, 3).copy()
    swapped[:, :, :, [0, 1]] = swapped[:, :, :, [1, 0]]
    assert np.array_equal(hl.decode_codes(words, 3, 64, 64), codes)
    assert not np.array_equal(hl.decode_codes(swapped.reshape(words.shape), 3, 64, 64), codes)


def test_padded_outputs_are_cut():
    """N padded to humming's multiple (384 -> 512 at TP 8): the decoder returns the first N outputs."""
    codes = np.random.default_rng(2).integers(0, 16, size=(1, 128, 64))
    padded = np.concatenate([codes, np.zeros((1, 128, 64), np.int64)], axis=1)
    words = hl.emulate_repack(padded, 4)
    assert np.array_equal(hl.decode_codes(words, 4, 128, 64), codes)


def test_vectorised_repack_equals_the_transcription():
    """repack_codes (for real shapes) makes the transcription's words, every width."""
    rng = np.random.default_rng(4)
    for b in (2, 3, 4, 8):
        codes = rng.integers(0, 1 << b, size=(2, 128, 128))
        assert np.array_equal(hl.repack_codes(codes, b), hl.emulate_repack(codes, b)), b
