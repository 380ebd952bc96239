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

from partial_dequant import main as partial  # noqa: E402


def main(src, dst):
    partial(src, dst, r".")
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    if os.path.exists(os.path.join(src, "generation_config.json")):
        shutil.copy(os.path.join(src, "generation_config.json"), dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
