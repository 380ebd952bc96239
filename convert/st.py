"""Safetensors headers and raw byte ranges, validated; no whole-file reads.

The format: 8-byte little-endian header length N, N bytes of UTF-8 JSON
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``),
then the data; offsets are relative to the end of the header.
Checkpoints are untrusted input: every field is checked before any use.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import CheckpointError

#: safetensors dtype -> (itemsize, numpy dtype used to view the bytes)
DTYPES = {
    "BOOL": (1, np.bool_), "U8": (1, np.uint8), "I8": (1, np.int8),
    "F8_E4M3": (1, np.uint8), "F8_E5M2": (1, np.uint8),
    "U16": (2, np.uint16), "I16": (2, np.int16), "F16": (2, np.float16), "BF16": (2, np.uint16),
    "U32": (4, np.uint32), "I32": (4, np.int32), "F32": (4, np.float32),
    "U64": (8, np.uint64), "I64": (8, np.int64), "F64": (8, np.float64),
}
_ITEMSIZE = {k: v[0] for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK = 16 * 1024 * 1024       # the unit every streamed read and hash works in


class TensorInfo(NamedTuple):
    file: str          # path of the shard
    name: str          # name as stored
    dtype: str
    shape: tuple
    begin: int         # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: str
    size: int
    data_start: int
    tensors: dict      # name -> TensorInfo, in offset order
    metadata: dict


def read_header(path: str) -> Header:
    """Parse and validate one safetensors header (never reads tensor data)."""
    fname = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(fname, None, f"truncated: {size} bytes, no header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(fname, None, f"header length {n} exceeds the {MAX_HEADER}-byte limit")
            if 8 + n > size:
                raise CheckpointError(fname, None, f"header length {n} is larger than the file ({size} bytes): truncated or corrupt")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(fname, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(fname, None, "header is not valid UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(fname, None, f"header is not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(fname, None, "header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    meta = obj.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(fname, None, "__metadata__ must map strings to strings")
    infos = []
    append = infos.append
    for name, d in obj.items():   # hot: one pass per tensor (~90k), every check inline
        if type(d) is not dict or len(d) != 3:
            raise CheckpointError(fname, name, "entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = d.get("dtype"), d.get("shape"), d.get("data_offsets")
        if shape is None or offs is None:
            raise CheckpointError(fname, name, "entry must have exactly dtype, shape, data_offsets")
        item = _ITEMSIZE.get(dtype) if type(dtype) is str else None
        if item is None:
            raise CheckpointError(fname, name, f"unknown dtype {dtype!r}")
        if type(shape) is not list:
            raise CheckpointError(fname, name, f"bad shape {shape!r}")
        want = item
        for x in shape:
            if type(x) is not int or x < 0:
                raise CheckpointError(fname, name, f"bad shape {shape!r}")
            want *= x
        if type(offs) is not list or len(offs) != 2:
            raise CheckpointError(fname, name, f"bad data_offsets {offs!r}")
        b, e = offs
        if type(b) is not int or type(e) is not int or b < 0 or e < b:
            raise CheckpointError(fname, name, f"bad data_offsets {offs!r}")
        if e > data_len:
            raise CheckpointError(fname, name, f"data_offsets {offs} beyond the end of the data ({data_len} bytes): truncated shard")
        if e - b != want:
            raise CheckpointError(fname, name, f"{dtype} x {shape} needs {want} bytes but data_offsets span {e - b}")
        append(TensorInfo(path, name, dtype, tuple(shape), data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.begin, t.end))
    for a, b in zip(infos, infos[1:]):
        if b.begin < a.end:
            raise CheckpointError(fname, b.name, f"byte range overlaps {a.name}")
    return Header(path, size, data_start, {t.name: t for t in infos}, meta)


def read_array(fd: int, info: TensorInfo) -> np.ndarray:
    """Read one tensor into a numpy array of its storage dtype (BF16 as uint16)."""
    buf = read_range(fd, info.begin, info.nbytes, info)
    return np.frombuffer(buf, dtype=DTYPES[info.dtype][1]).reshape(info.shape)


def read_range(fd: int, offset: int, length: int, info: TensorInfo | None = None) -> bytearray:
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            who = (os.path.basename(info.file), info.name) if info else ("?", None)
            raise CheckpointError(who[0], who[1], f"short read at offset {offset + got}: file changed or truncated")
        got += n
    return buf


def build_header(entries) -> bytes:
    """Header bytes for ``entries`` = [(name, dtype, shape, nbytes)] laid out in order.

    Deterministic: fixed key order, compact JSON (byte-identical to ``json.dumps(obj,
    separators=(",", ":"), ensure_ascii=False)``), padded with spaces to 8 bytes.
    """
    enc = json.encoder.encode_basestring
    parts = ['{"__metadata__":{"format":"pt"}']
    off = 0
    for name, dtype, shape, nbytes in entries:
        parts.append(f'{enc(name)}:{{"dtype":"{dtype}","shape":[{",".join(str(int(d)) for d in shape)}],'
                     f'"data_offsets":[{off},{off + nbytes}]}}')
        off += nbytes
    js = (",".join(parts) + "}").encode("utf-8")
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def sha256_file(path, progress=None):
    """sha256 of a whole file, streamed (used by --resume and by m3-verify's integrity pass)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            if progress:
                progress(n)
    return h.hexdigest()
