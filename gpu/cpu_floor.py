#!/usr/bin/env python3
"""CPU pre-check of the GPU comparison's design (no GPU needed): transformers' model of the unconverted
checkpoint in bf16 vs the same in float32 (the bf16 noise floor that any bf16 engine must live with),
and the planted bug (gpu/plant_bug.py's module: layer 0 o_proj, scales made positive) in bf16 vs float32.
A good test model has a noise floor far below the bug's distance on both metrics.

    python gpu/cpu_floor.py [tests/fixtures/data/gpu_tiny]
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

import serve_check as sc  # noqa: E402
from m3_convert import gptq  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/data/gpu_tiny"
torch.set_num_threads(2)
mod = "model.language_model.layers.0.self_attn.o_proj"
t = {}
for f in os.listdir(src):
    if f.endswith(".safetensors"):
        t.update({k: v.numpy() for k, v in load_file(os.path.join(src, f)).items() if k.startswith(mod)})
w_bug = gptq.to_bf16(gptq.dequantize(t[mod + ".qweight"], t[mod + ".qzeros"], np.abs(t[mod + ".scales"])))
res = {}
for tag, dtype in (("hf32", "float32"), ("hf", "bfloat16"), ("bug", "bfloat16")):
    model, config = sc.load_hf(src, dtype, "cpu")
    if tag == "bug":
        with torch.no_grad():
            model.model.language_model.layers[0].self_attn.o_proj.weight.copy_(
                torch.from_numpy(w_bug.view("int16")).view(torch.bfloat16))
    res[tag] = {"rows": sc.hf_rows(model, config, "cpu")}
for tag in ("hf", "bug"):
    d = sc.distance(res[tag], res["hf32"])
    print(f"{tag} vs hf32:", json.dumps({k: v for k, v in d.items() if k != "per_prompt"}),
          "per prompt (prefix/max/median):", " ".join(f"{p['greedy_prefix']}/{p['max']:.3g}/{p['median']:.3g}"
                                                      for p in d["per_prompt"]))
