#!/usr/bin/env python3
"""Planted-bug control for the GPU check: replace one tensor's values by their absolute value, in place.

    python gpu/plant_bug.py CONVERTED_DIR TENSOR_NAME
"""
import json
import os
import sys

import numpy as np

from m3_convert import st  # noqa: E402


def locate(d, name, dtype):
    """(file path, header entry) of tensor ``name`` in the converted output ``d``, checked to be ``dtype``."""
    idx = os.path.join(d, "model.safetensors.index.json")
    fname = json.load(open(idx))["weight_map"][name] if os.path.exists(idx) else "model.safetensors"
    info = st.read_header(os.path.join(d, fname)).tensors[name]
    assert info.dtype == dtype, info.dtype
    return os.path.join(d, fname), info


def main(d, name):
    path, info = locate(d, name, "F16")
    with open(path, "r+b") as f:
        f.seek(info.begin)
        a = np.frombuffer(f.read(info.nbytes), dtype=np.float16)
        neg = int((a < 0).sum())
        f.seek(info.begin)
        f.write(np.abs(a).tobytes())
    os.unlink(os.path.join(d, "SHA256SUMS"))   # no longer the converter's output
    print(f"{name}: {neg} of {a.size} scales made positive")


if __name__ == "__main__":
    main(*sys.argv[1:3])
