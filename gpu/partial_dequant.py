#!/usr/bin/env python3
"""Diagnostic variant for the GPU check: de-quantize only the modules whose name matches REGEX.

    python gpu/partial_dequant.py CONVERTED_DIR OUT_DIR REGEX

Serving the result isolates one kernel path (e.g. REGEX='block_sparse_moe\\.experts\\.' keeps every
linear layer on Machete/Marlin but serves the routed experts in bf16).
"""
import json
import os
import re
import sys

import numpy as np

from m3_convert import gptq, st  # noqa: E402


def main(src, dst, regex):
    rx = re.compile(regex)
    os.makedirs(dst, exist_ok=True)
    idx = os.path.join(src, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    arrays = {}
    for f in files:
        h = st.read_header(os.path.join(src, f))
        fd = os.open(h.path, os.O_RDONLY)
        for t in h.tensors.values():
            arrays[t.name] = (t.dtype, st.read_array(fd, t))
        os.close(fd)
    cfg = json.load(open(os.path.join(src, "config.json")))
    mods = cfg["quantization_config"]["modules"]
    out, n = {}, 0
    for name, (dtype, a) in arrays.items():
        base = name.rsplit(".", 1)[0]
        if rx.search(name) and name.endswith((".qzeros", ".scales")):
            continue
        if rx.search(name) and name.endswith(".qweight"):
            w = gptq.dequantize(a, arrays[base + ".qzeros"][1], arrays[base + ".scales"][1])
            out[base + ".weight"] = ("BF16", gptq.to_bf16(w))
            mods[base] = {"bits": None}
            n += 1
        else:
            out[name] = (dtype, a)
    names = sorted(out)
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(st.build_header([(k, out[k][0], out[k][1].shape, out[k][1].nbytes) for k in names]))
        for k in names:
            f.write(np.ascontiguousarray(out[k][1]).tobytes())
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    print(f"{n} modules de-quantized into {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
