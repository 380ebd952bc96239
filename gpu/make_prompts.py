#!/usr/bin/env python3
"""Write gpu/prompts.json: four prompts (24, 64, 200, 700 tokens) for the GPU check, run here on the CPU.

Each starts with the first 8 tokens of serve_check.random_prompts() and is continued by sampling
(temperature 1, torch seed 11) from transformers' float32 model of the unconverted checkpoint, so the
prompt logprobs compared later are those of tokens the model finds likely, not the far tail of random
tokens, where bf16 noise is amplified into large but meaningless differences.

    python gpu/make_prompts.py [tests/fixtures/data/gpu_tiny [prompts.json]]
    python gpu/make_prompts.py tests/fixtures/data/gpu_mixed prompts_gpu_mixed.json
"""
import json
import os
import sys

import torch

import serve_check as sc  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/data/gpu_tiny"
torch.set_num_threads(2)
model, config = sc.load_hf(src, "float32", "cpu")
out = []
torch.manual_seed(11)
for p in sc.random_prompts(config.text_config.vocab_size):
    with torch.no_grad():
        r = model.generate(input_ids=torch.tensor([p[:8]]), max_new_tokens=len(p) - 8, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    out.append(r[0].tolist())
with open(os.path.join(sc.HERE, sys.argv[2] if len(sys.argv) > 2 else "prompts.json"), "w") as f:
    json.dump(out, f)
print("prompts:", [len(x) for x in out])
