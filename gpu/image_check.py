#!/usr/bin/env python3
"""Issue 24 item 4: the --keep-vision checkpoint served by vLLM WITH AN IMAGE, against transformers' MiniMax-M3-VL
on the unconverted checkpoint with the same image (gpu/image_ref.json, made on the CPU by gpu/image_ref.py), and a
planted vision-weight bug as the control.

Runs ON the GPU machine with vLLM 0.33 on PYTHONPATH (device.sh's); needs nothing of transformers' MiniMax-M3-VL
classes (the image's transformers is whatever vLLM 0.33 accepts): vLLM's own processor path builds the prompt.

    python3 gpu/image_check.py all OUT [WORK]     # prepare, serve both variants (one process each), compare
    python3 gpu/image_check.py prepare WORK       # gpu_tiny copy + processor files -> m3-convert --keep-vision
                                                  #   --keep-mtp -> WORK/vlimg; WORK/vlimg-bug with the bug planted
    python3 gpu/image_check.py vllm DIR TAG OUT   # one served run -> OUT/TAG.json
    python3 gpu/image_check.py compare OUT        # OUT/image_compare.json

The prompt is text (tokenized by the fixture's tokenizer) with one image placeholder, as a user sends it; vLLM's
MiniMax-M3 processor expands it to start + 224 image tokens + end. Compared: the expanded prompt ids (must equal
transformers' processor output), the prompt logprobs of the 48 text tokens after the image (they see the image),
and 16 greedy tokens. Engine settings as serve_check.run_vllm (bf16, eager, block_size 128, in-process engine so
the m3_gptq plugin is active).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REF = os.path.join(HERE, "image_ref.json")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "data", "gpu_tiny")
N_NEW = 16
IMAGE_HW = (56, 64)      # area 3584 in [56*56, 64*64], sides multiples of patch*merge = 4: no resize on either side
IMAGE_SEED, OTHER_SEED = 24, 25
#: the planted control: the patch merger's 2x2 input order reversed (patch_merge_mlp.linear_1 takes the merge_size**2
#: projected patches of a merged token side by side, [32, 4 x 256]; a layout bug a converter or an engine could make).
#: Picked on the CPU among 5 vision-weight bugs (image_ref.json "bug_candidates"): the h/w kernel-axis swap of the
#: patch embedding moved the text logprobs 1.4x the bf16 floor at max, q_proj = k_proj hardly (one head, one layer).
BUG_TENSOR = "patch_merge_mlp.linear_1.weight"                      # BF16 [32, 1024] in the converted output
BUG_TENSOR_HF = "model.multi_modal_projector.merge_linear_1.weight"  # the same tensor in the source
MERGE_BLOCKS = 4


def image(seed=IMAGE_SEED):
    """(PIL RGB image, sha256 of its bytes): a smooth gradient plus seeded noise, so patches differ in content."""
    import numpy as np
    from PIL import Image
    h, w = IMAGE_HW
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / h, 255 * xx / w, 255 * (1 - yy / h) * xx / w], -1)
    a = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB"), hashlib.sha256(a.tobytes()).hexdigest()


def plant(a):
    """The bug on the [out, 4 x in] weight (a numpy array of any dtype, or a torch tensor): its 4 column blocks
    in reverse order."""
    if hasattr(a, "flip"):     # torch
        return a.reshape(a.shape[0], MERGE_BLOCKS, -1).flip(1).reshape(a.shape).contiguous()
    return a.reshape(a.shape[0], MERGE_BLOCKS, -1)[:, ::-1].reshape(a.shape).copy()


def plant_in_checkpoint(d, name=BUG_TENSOR):
    """Rewrite one BF16 tensor of a converted output in place (bytes as uint16; exact)."""
    import numpy as np
    sys.path.insert(0, HERE)
    from plant_bug import locate
    path, info = locate(d, name, "BF16")
    with open(path, "r+b") as f:
        f.seek(info.begin)
        a = np.frombuffer(f.read(info.nbytes), dtype=np.uint16).reshape(info.shape)
        b = plant(a)
        f.seek(info.begin)
        f.write(b.tobytes())
    os.unlink(os.path.join(d, "SHA256SUMS"))   # no longer the converter's output
    return int((a != b).sum())


def prepare(work):
    """WORK/vlimg-src (gpu_tiny + processor files), WORK/vlimg (converted), WORK/vlimg-bug (the control)."""
    sys.path.insert(0, HERE)
    import vl_processor
    src, out, bug = (os.path.join(work, n) for n in ("vlimg-src", "vlimg", "vlimg-bug"))
    if not os.path.isdir(out):
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(FIXTURE, src)
        vl_processor.write(src)
        subprocess.run([sys.executable, "-m", "m3_convert.cli", src, out, "--keep-vision", "--keep-mtp", "--quiet"],
                       check=True)
    if not os.path.isdir(bug):
        shutil.copytree(out, bug)
        print(f"bug: {plant_in_checkpoint(bug)} values of {BUG_TENSOR} moved", flush=True)
    return out, bug


def run_vllm(model_dir, tag, out):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine runs here: the plugin is in-process
    from m3_convert import vllm_plugin
    vllm_plugin.register()
    from vllm import LLM, SamplingParams
    ref = json.load(open(REF))
    img, sha = image(ref["image"]["seed"])
    assert sha == ref["image"]["sha256"], "the image differs from the one the reference was computed with"
    llm = LLM(model=model_dir, dtype="bfloat16", block_size=128, enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.3, seed=0, enable_prefix_caching=False,
              limit_mm_per_prompt={"image": 1, "video": 0})
    sp = SamplingParams(temperature=0.0, max_tokens=N_NEW, prompt_logprobs=0, detokenize=False, ignore_eos=True)
    prompts = [{"prompt": ref["text"], "multi_modal_data": {"image": img}},
               {"prompt": ref["text_no_image"]}]
    rows = []
    for r in llm.generate(prompts, sp):
        ids = list(r.prompt_token_ids)
        plp = [None if d is None else d[ids[i]].logprob for i, d in enumerate(r.prompt_logprobs or [])]
        rows.append({"input_ids": ids, "tokens": list(r.outputs[0].token_ids), "prompt_logprobs_all": plp})
    res = {"tag": tag, "model": model_dir, "image": rows[0], "no_image": rows[1], "vllm": _versions()}
    json.dump(res, open(os.path.join(out, f"{tag}.json"), "w"), indent=1)
    print(f"{tag}: prompt {len(rows[0]['input_ids'])} ids, greedy {rows[0]['tokens']}", flush=True)


def _versions():
    import torch
    import transformers
    import vllm
    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def after_image(row, start):
    """A served row cut to the reference's form: prompt logprobs of the tokens from ``start`` on, greedy tokens.
    prompt_logprobs_all[i] is the logprob of input_ids[i] (None for the first token, as vLLM gives it)."""
    plp = row["prompt_logprobs_all"][start:]
    assert None not in plp, "vLLM gave no logprob for a compared position"
    return {"tokens": row["tokens"], "prompt_logprobs": plp}


def distance(a, b):
    """greedy: shared prefix of the generated tokens; prompt logprobs: |difference| per position (same positions)."""
    n = min(len(a["tokens"]), len(b["tokens"]))
    same = next((i for i in range(n) if a["tokens"][i] != b["tokens"][i]), n)
    assert len(a["prompt_logprobs"]) == len(b["prompt_logprobs"]), (len(a["prompt_logprobs"]), len(b["prompt_logprobs"]))
    d = sorted(abs(p - q) for p, q in zip(a["prompt_logprobs"], b["prompt_logprobs"]))
    return {"greedy_prefix": f"{same}/{n}", "max_abs_logprob_diff": round(d[-1], 4),
            "median_abs_logprob_diff": round(d[len(d) // 2], 4), "positions": len(d)}


def compare(out):
    ref = json.load(open(REF))
    runs = {t: json.load(open(os.path.join(out, f"{t}.json"))) for t in ("vlimg", "vlimg_bug")
            if os.path.exists(os.path.join(out, f"{t}.json"))}
    start, refs = ref["after_image"], ref["runs"]
    res = {"reference": os.path.relpath(REF, ROOT), "cpu_distances": ref["cpu_distances"], "served": {}}
    for tag, r in runs.items():
        row = after_image(r["image"], start)
        res["served"][tag] = {
            "vllm": r["vllm"], "input_ids_equal_transformers": r["image"]["input_ids"] == ref["input_ids"],
            "prompt_len": len(r["image"]["input_ids"]),
            "vs_hf32": distance(row, refs["hf32"]), "vs_hf_bf16": distance(row, refs["hf_bf16"]),
            "no_image_vs_hf32_no_image": distance(after_image(r["no_image"], ref["after_image_no_image"]),
                                                  refs["hf32_no_image"])}
    if len(runs) == 2:
        res["served"]["vlimg_bug"]["vs_vlimg"] = distance(after_image(runs["vlimg_bug"]["image"], start),
                                                          after_image(runs["vlimg"]["image"], start))
    json.dump(res, open(os.path.join(out, "image_compare.json"), "w"), indent=1)
    for tag, v in res["served"].items():
        print(tag, "ids equal:", v["input_ids_equal_transformers"], "| vs hf32:", v["vs_hf32"], "| vs hf bf16:",
              v["vs_hf_bf16"], "| text-only vs hf32:", v["no_image_vs_hf32_no_image"], flush=True)
    return res


def main(argv):
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "prepare":
        prepare(argv[2])
    elif mode == "vllm":
        run_vllm(*argv[2:5])
    elif mode == "compare":
        compare(argv[2])
    elif mode == "all":
        out = argv[2]
        work = argv[3] if len(argv) > 3 else "/tmp/m3work"
        os.makedirs(out, exist_ok=True)
        good, bug = prepare(work)
        for d, tag in ((good, "vlimg"), (bug, "vlimg_bug")):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "vllm", d, tag, out])
            print(f"== {tag}: exit {p.returncode}", flush=True)
        compare(out)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
