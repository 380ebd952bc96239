"""What the planner produces: one :class:`OutTensor` per output tensor, with the operation that makes it (the
writer, :mod:`.execute`, carries them out). Shared by the text planner (:mod:`.plan`) and the vision / MTP one
(:mod:`.vl_mtp`)."""
from __future__ import annotations

from dataclasses import dataclass

from . import names, st
from .errors import CheckpointError
from .source import _fname

COPY, SLICE, DEQUANT, PROMOTE, CAST = "copy", "slice", "dequant", "promote", "cast"


class _computed_once:
    """functools.cached_property without its per-access lock (3.11): ~70k reads in one plan."""

    def __init__(self, fn):
        self.fn, self.attr = fn, fn.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.attr] = self.fn(obj)
        return value


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple
    op: str                          # copy | slice | dequant | promote | cast
    srcs: tuple                      # TensorInfo(s): copy/slice/promote/cast: (t,), dequant: (qweight, qzeros, scales[, g_idx])
    cols: tuple | None = None        # slice/promote: (start, stop) along the last axis of a 2-D tensor
    rows: tuple | None = None        # slice/cast: (start, stop) along the first axis (contiguous bytes)
    order: tuple = ()
    promote: tuple | None = None     # promote: (bits, new_bits) of a qweight/qzeros (gptq.promote_*)

    @_computed_once
    def nbytes(self) -> int:   # read ~3x per tensor (layout, headers, stats); dtype and shape never change
        n = st.DTYPES[self.dtype][0]
        for d in self.shape:
            n *= d
        return n


def split_rows(t) -> int:
    """The row at which a plain fused [gate; up] weight (text or MTP) splits in two: the one home of the check."""
    if len(t.shape) != 2 or t.shape[0] % 2:
        raise CheckpointError(_fname(t), t.name, f"fused gate_up weight shape {list(t.shape)} cannot be split in two")
    return t.shape[0] // 2


def cast_plain(out):
    """--dtype bf16: every plain tensor stored F32/F16 that vLLM holds in bf16 becomes a CAST (a whole tensor or the
    rows of a split), rounded to bf16 as vLLM's load would; the router (held in float32) stays as stored."""
    n = 0
    for o in out:
        if (o.op in (COPY, SLICE) and o.cols is None and o.dtype in ("F32", "F16") and names.served_dtype(o.name) == "BF16"
                and o.name.rsplit(".", 1)[-1] not in names.LEAVES_QUANT):     # GPTQ scales stay fp16 (the exact decode)
            o.op, o.dtype = CAST, "BF16"
            o.__dict__.pop("nbytes", None)       # dtype changed: recompute the cached size
            n += 1
    return n
