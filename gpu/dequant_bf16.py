#!/usr/bin/env python3
"""Write a fully bf16 copy of an m3-convert output: every GPTQ module exactly de-quantized.

    python gpu/dequant_bf16.py CONVERTED_DIR OUT_DIR

Reference (a) of the GPU check: the same checkpoint with no quantized kernel and no shim, so the
difference to the quantized run isolates vLLM's GPTQ kernels and the shim. Decode = m3_convert.gptq
(exact float32, rounded to bf16 once). The quantization_config is dropped: plain bf16 vLLM.
"""
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from m3_convert import gptq, st  # noqa: E402


def main(src, dst):
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
    out = {}
    for name, (dtype, a) in arrays.items():
        if name.endswith((".qzeros", ".scales")):
            continue
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            w = gptq.dequantize(a, arrays[base + ".qzeros"][1], arrays[base + ".scales"][1])
            out[base + ".weight"] = ("BF16", gptq.to_bf16(w))
        else:
            out[name] = (dtype, a)
    names = sorted(out)
    with open(os.path.join(dst, "model.safetensors"), "wb") as f:
        f.write(st.build_header([(n, out[n][0], out[n][1].shape, out[n][1].nbytes) for n in names]))
        for n in names:
            f.write(np.ascontiguousarray(out[n][1]).tobytes())
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(src, extra)):
            shutil.copy(os.path.join(src, extra), dst)
    print(f"{len(out)} tensors written to {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
