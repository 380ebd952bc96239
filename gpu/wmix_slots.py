"""Random GPTQ slots of given widths in wmix's flat layout, with their exact weights: the one builder of
tests/test_wmix.py (the kernels on the CPU) and gpu/wmix_diag.py (every row on the GPU).

``make_slots(wmix, bits, n, k, group, halves, seed)`` -> (SlotTable, flat qweight, flat scales, [W float64 [n, k]
per slot]): random codes, the symmetric v1 zeros, signed fp16 scales ~ +-[0.5, 1.5] / (2^(b-1) sqrt(k)), packed
and decoded by m3_convert.gptq (the project's one GPTQ module); tensors on the CPU.
"""
import numpy as np
import torch

from m3_convert import gptq


def make_slots(wmix, bits, n, k, group, halves, seed):
    """Flat qweight / scales of ``bits`` slots (one per entry) and their exact float64 weights [n, k]."""
    rng = np.random.default_rng(seed)
    qws, scs, ws, qoff, soff = [], [], [], [], []
    oq = os_ = 0
    for b in bits:
        codes = rng.integers(0, 1 << b, size=(k, n))
        qw = gptq.pack_qweight(codes, b)
        qz = gptq.pack_qzeros(np.full((k // group, n), (1 << (b - 1)) - 1), b)
        mag = (rng.random((k // group, n)) + 0.5) / ((1 << (b - 1)) * np.sqrt(k))
        sc = (mag * rng.choice([-1.0, 1.0], size=mag.shape)).astype(np.float16)
        ws.append(torch.from_numpy(gptq.dequantize(qw, qz, sc)).double())
        qoff.append(oq)
        soff.append(os_)
        qws.append(torch.from_numpy(qw.reshape(-1).copy()))
        scs.append(torch.from_numpy(sc.reshape(-1).copy()))
        oq, os_ = oq + qw.size, os_ + sc.size
    table = wmix.SlotTable(torch.tensor(bits, dtype=torch.int32), torch.tensor(qoff), torch.tensor(soff), n, k, group,
                           halves)
    return table, torch.cat(qws), torch.cat(scs), ws
