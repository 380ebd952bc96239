#!/usr/bin/env python3
"""GPU check (issue 8): serve converted checkpoints with vLLM's offline LLM and compare logits.

Runs ON the lent GPU machine (see gpu/README.md for the device calls):

    python3 gpu/serve_check.py vllm DIR TAG OUT      # greedy tokens + prompt logprobs from vLLM (+ shim)
    python3 gpu/serve_check.py hf   SRC TAG OUT [DTYPE [DEVICE [cache|nocache]]]
                                                     # the same from transformers' MiniMax-M3-VL on the
                                                     # unconverted AutoRound checkpoint, de-quantized
    python3 gpu/serve_check.py compare OUT [TIES]    # the table; TIES (gpu/indexer_ties.py's output, e.g.
                                                     # gpu/results/indexer_ties_gpu_mixed.json): each pair's maximum
                                                     # outside the sparse-attention near-ties too

Prompts are fixed token-id lists (no tokenizer), one longer than the sparse layers' top-k window.
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

N_NEW = 32


def random_prompts(vocab=512):
    import random
    rng = random.Random(7)
    lens = [24, 64, 200, 700]            # 700 > (topk 2 + local 1) blocks of 128: the indexer must select
    return [[rng.randrange(3, vocab - 16) for _ in range(n)] for n in lens]


def prompts(vocab=512):
    """gpu/prompts.json (made by gpu/make_prompts.py; $M3_PROMPTS names another, e.g. prompts_gpu_mixed.json): the
    first 8 tokens of each random prompt, continued by sampling (temperature 1) from the float32 model, so prompt
    logprobs measure tokens the model finds likely rather than the far tail of random tokens (where any bf16
    noise is amplified: a -30 nat logit)."""
    path = os.path.join(HERE, os.environ.get("M3_PROMPTS", "prompts.json"))
    return json.load(open(path)) if os.path.exists(path) else random_prompts(vocab)


def run_vllm(model_dir, tag, out):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine runs here: the shim is in-process
    if os.environ.get("M3_NO_PLUGIN"):    # --target stock-vllm: vLLM alone (device.sh leaves the package off the path)
        import importlib.util
        assert importlib.util.find_spec("m3_convert") is None, "M3_NO_PLUGIN: m3_convert is importable here"
        vllm_plugin = None
    else:
        from m3_convert import vllm_plugin
        vllm_plugin.register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.time()
    extra = {}
    if os.environ.get("M3_LM_ONLY"):      # VL checkpoint (--keep-vision) served text-only
        extra["language_model_only"] = True
    if os.environ.get("M3_MTP"):          # speculative decoding with the checkpoint's MTP block (--keep-mtp)
        extra["speculative_config"] = {"method": "mtp", "num_speculative_tokens": int(os.environ["M3_MTP"])}
    if os.environ.get("M3_MAX_SEQS"):     # one sequence at a time: decode steps of one token (M3_MOE_KERNEL=hgemv's path)
        extra["max_num_seqs"] = int(os.environ["M3_MAX_SEQS"])
    llm = LLM(model=model_dir, dtype="bfloat16", block_size=128, enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.3, skip_tokenizer_init=True, seed=0, **extra)
    t_load = time.time() - t0
    if vllm_plugin is None:   # the engine is built without the plugin; the checks below decode with m3_convert
        sys.path.append(os.environ.get("M3_SITE", "/tmp/m3site"))
    sp = SamplingParams(temperature=0.0, max_tokens=N_NEW, prompt_logprobs=0, logprobs=0, detokenize=False,
                        ignore_eos=True)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()], sp)
    rows = []
    for r, p in zip(res, prompts()):
        plp = []
        for pos, d in enumerate(r.prompt_logprobs or []):
            if d is None:
                continue
            plp.append(d[p[pos]].logprob)
        out_ = r.outputs[0]
        dlp = [d[t].logprob for t, d in zip(out_.token_ids, out_.logprobs or [])]     # each generated token's
        rows.append({"tokens": list(out_.token_ids), "prompt_logprobs": plp, "decode_logprobs": dlp})
    kernels = {}
    try:
        def probe(model):
            found = {}
            for name, mod in model.named_modules():
                qm = getattr(mod, "quant_method", None)
                if qm is None:
                    continue
                k = getattr(qm, "kernel", None)
                kind = type(qm).__name__ + (f"/{type(k).__name__}" if k is not None else "")
                if getattr(k, "decode", "parts") != "parts":                 # HummingMoEKernel(decode="hgemv")
                    made = getattr(mod, "m3_hgemv", None) is not None           # else it fell back to the parts
                    kind += f"[decode={k.decode}]" if made else f"[decode={k.decode}: fell back to parts]"
                ek = getattr(qm, "experts_cls", None) or getattr(qm, "fused_experts", None)
                if ek is not None:
                    kind += f"/{getattr(ek, '__name__', type(ek).__name__)}"
                found[name] = kind
            return found
        for part in llm.apply_model(probe):
            kernels.update(part)
    except Exception as e:   # older/newer API: record why
        kernels = {"error": f"{type(e).__name__}: {e}"}
    layer_err, moe_err, memory = {}, {}, {}
    # vLLM's own MoE experts (the stock target's HummingIndexedExperts, 0.33) read the forward context, which only
    # a forward sets: the MoE check holds one (no attention metadata) with the engine's config
    vllm_config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    for key, fn in (("linear", linear_errors), ("moe", lambda m, d: moe_errors(m, d, vllm_config)), ("memory", gpu_bytes)):
        try:
            got = {}
            for part in llm.apply_model(lambda model: fn(model, model_dir)):
                got.update(part)
        except Exception as e:
            import traceback
            got = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-1500:]}
        {"linear": layer_err, "moe": moe_err, "memory": memory}[key].update(got)
    print("per-layer max relative error vs exact decode:", json.dumps(layer_err, indent=0), flush=True)
    print("MoE layers vs exact decode (norm-relative error; bf16-path floor):", json.dumps(moe_err, indent=0), flush=True)
    print("GPU bytes:", json.dumps(memory), flush=True)
    json.dump({"tag": tag, "model": model_dir, "load_s": round(t_load, 1), "rows": rows, "kernels": kernels,
               "linear_rel_err": layer_err, "moe_rel_err": moe_err, "memory": memory,
               "vllm": _vllm_version(), "shim": dict(vllm_plugin.CHOICES) if vllm_plugin else {}}, open(os.path.join(out, f"{tag}.json"), "w"), indent=1)
    print(f"{tag}: loaded in {t_load:.0f} s; first tokens {[r['tokens'][:8] for r in rows]}", flush=True)


def _vllm_version():
    import torch
    import vllm
    return {"vllm": vllm.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}


def linear_errors(model, model_dir):
    """Each quantized linear layer, through vLLM's kernel, vs x @ W^T with W the exact decode of its shards."""
    import numpy as np
    import torch

    from m3_convert import gptq
    from m3_convert.names import fused_shards
    from m3_convert.serve.decide import fused_members
    tensor, modules = _reader(model_dir)
    out = {}
    torch.manual_seed(0)
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is None or type(qm).__name__ == "UnquantizedLinearMethod" or not hasattr(mod, "input_size"):
            continue
        name = name.removeprefix("language_model.")     # VL layout: the modules map keeps the text names
        members = fused_members(name, modules, fused_shards())
        if not all(m in modules and modules[m].get("bits") for m in members):
            continue
        w = np.concatenate([gptq.dequantize(tensor(m + ".qweight"), tensor(m + ".qzeros"), tensor(m + ".scales")) for m in members])
        x = torch.randn(4, w.shape[1], dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            y = mod(x)
            y = (y[0] if isinstance(y, tuple) else y).float()
        ref = x.float() @ torch.from_numpy(w).cuda().T
        out[name] = round(float((y - ref).abs().max() / ref.abs().max()), 5)
    return out


def _reader(model_dir):
    """(tensor(name) -> numpy array from the checkpoint, the per-module quant map)."""
    from safetensors import safe_open
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    wm = json.load(open(idx))["weight_map"] if os.path.exists(idx) else None
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    modules = cfg.get("quantization_config", {}).get("modules", {})
    pre = "language_model." if cfg.get("quantization_config", {}).get("layout") == "vl" else ""

    def tensor(name):
        name = pre + name
        f = wm[name] if wm else "model.safetensors"
        with safe_open(os.path.join(model_dir, f), "np") as h:
            return h.get_tensor(name)
    return tensor, modules


def forward_context(vllm_config):
    """A forward context without attention metadata (vLLM's experts classes ask it for data-parallel metadata,
    None here), or none where the engine's config is not known."""
    import contextlib
    if vllm_config is None:
        return contextlib.nullcontext()
    from vllm.forward_context import set_forward_context
    return set_forward_context(None, vllm_config)


def moe_errors(model, model_dir, vllm_config=None):
    """Each quantized MoE layer's routed experts through the served method (vLLM's module and its quant_method's
    apply) on random tokens routed at random, vs sum_k w_k * W2_e(swiglu_oai(W13_e x)) in float32 from the exact
    decode of the checkpoint's experts; beside it the same through bf16 weights and intermediates (the floor)."""
    import torch

    from m3_convert import gptq
    tensor, modules = _reader(model_dir)
    out = {}
    gen = torch.Generator(device="cuda")
    gen.manual_seed(5)
    gen1 = torch.Generator(device="cuda")
    gen1.manual_seed(6)
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is None or not hasattr(mod, "global_num_experts") or "Unquantized" in type(qm).__name__:
            continue
        prefix = getattr(mod, "layer_name", name).removeprefix("language_model.")
        if f"{prefix}.0.w1" not in modules:
            continue
        E, H = mod.global_num_experts, mod.hidden_size
        lim, al, be = (float(getattr(mod, a)) for a in ("swiglu_limit", "swiglu_alpha", "swiglu_beta"))
        dec = {}
        for e in range(E):
            for s in ("w1", "w3", "w2"):
                m = f"{prefix}.{e}.{s}"
                dec[e, s] = torch.from_numpy(gptq.dequantize(tensor(m + ".qweight"), tensor(m + ".qzeros"), tensor(m + ".scales"))).cuda()
        res = {}
        # 16 tokens (the draws of the runs before 2026-12-08), and one token from a generator of its own (k rows: at
        # most a row per expert, the decode path of M3_MOE_KERNEL=wmix / hgemv)
        for k, m in [(k, m) for k in sorted({min(2, E), mod.top_k}) for m in (16, 1)]:
            key, g = (f"top{k}", gen) if m == 16 else (f"top{k}_1token", gen1)
            x = torch.randn(m, H, device="cuda", generator=g).to(torch.bfloat16)
            ids = torch.rand(m, E, device="cuda", generator=g).topk(k, dim=-1).indices.to(torch.int32)
            w = torch.rand(m, k, device="cuda", generator=g)
            try:
                with torch.no_grad(), forward_context(vllm_config):
                    y = qm.apply(mod, x, w, ids, None, None).float()
            except Exception as e:    # e.g. a vLLM experts class that needs a forward context: this layer only
                res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            ref = torch.zeros(m, H, device="cuda")
            refb = torch.zeros(m, H, device="cuda")
            for e in ids.unique().tolist():
                tok, slot = (ids == e).nonzero(as_tuple=True)
                for path, acc, dt in (("f32", ref, torch.float32), ("bf16", refb, torch.bfloat16)):
                    xe = x[tok].to(dt)
                    g_ = (xe @ dec[e, "w1"].to(dt).T).float().clamp(max=lim)
                    u_ = (xe @ dec[e, "w3"].to(dt).T).float().clamp(-lim, lim)
                    a = (g_ * torch.sigmoid(al * g_) * (u_ + be)).to(dt)
                    acc.index_add_(0, tok, (a @ dec[e, "w2"].to(dt).T).float() * w[tok, slot, None])
            res[key] = {"norm_rel": round(float((y - ref).norm() / ref.norm()), 5),
                              "max_rel": round(float((y - ref).abs().max() / ref.abs().max()), 5),
                              "bf16_path_norm_rel": round(float((refb - ref).norm() / ref.norm()), 5),
                              "finite": bool(torch.isfinite(y).all())}
        out[prefix] = {"method": type(qm).__name__, **res}
    return out


def gpu_bytes(model, model_dir):
    """Bytes the loaded model holds on the GPU for its quantized layers (weights: every parameter and buffer but
    humming's lock and expert-map workspaces, counted apart) vs the GPTQ bytes (qweight + qzeros + scales) of
    the same modules in the checkpoint."""
    from safetensors import safe_open
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    modules = cfg.get("quantization_config", {}).get("modules", {})
    ckpt = 0
    for f in sorted(os.listdir(model_dir)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(model_dir, f), "pt") as h:
            for k in [k for k in h.keys() if k.endswith((".qweight", ".qzeros", ".scales"))]:
                sl = h.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                ckpt += n * (2 if k.endswith(".scales") else 4)
    weights = workspace = 0
    quant_mods = 0
    for name, mod in model.named_modules():
        qm = getattr(mod, "quant_method", None)
        if qm is None or "Unquantized" in type(qm).__name__:
            continue
        quant_mods += 1
        for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            b = t.numel() * t.element_size()
            if n == "locks" or n.endswith("_map") or n.endswith("workspace"):
                workspace += b
            else:
                weights += b
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"quantized_layers": quant_mods, "quantized_weight_bytes": weights, "workspace_bytes": workspace,
            "checkpoint_gptq_bytes": ckpt, "ratio": round(weights / ckpt, 4) if ckpt else None,
            "model_bytes_all": total, "modules_map_entries": len(modules)}


def load_hf(src, dtype="bfloat16", device="cuda"):
    """transformers' MiniMaxM3SparseForConditionalGeneration with the source's GPTQ modules de-quantized
    exactly (then rounded to bf16, as m3-convert's bf16 output is)."""
    import torch
    from safetensors.torch import load_file
    from transformers import MiniMaxM3VLConfig, MiniMaxM3SparseForConditionalGeneration

    from m3_convert import gptq
    cfg_json = json.load(open(os.path.join(src, "config.json")))
    cfg_json.pop("quantization_config", None)
    config = MiniMaxM3VLConfig(**{k: v for k, v in cfg_json.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    model = MiniMaxM3SparseForConditionalGeneration(config).to(dt)
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(src, f)))
    sd = {}
    for k in list(tensors):
        if k.endswith(".qweight"):
            b = k[: -len(".qweight")]
            w = gptq.dequantize(tensors[b + ".qweight"].numpy(), tensors[b + ".qzeros"].numpy(), tensors[b + ".scales"].numpy())
            sd[b + ".weight"] = torch.from_numpy(gptq.to_bf16(w).view("int16")).view(torch.bfloat16)
        elif not k.endswith((".qzeros", ".scales", ".g_idx")) and not k.startswith("mtp.") and ".mtp." not in k:
            sd[k] = tensors[k]
    if "language_model.lm_head.weight" in sd:
        sd["lm_head.weight"] = sd.pop("language_model.lm_head.weight")
    # transformers keeps routed experts fused: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]
    msd = model.state_dict()
    for k in list(msd):
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            E = msd[k].shape[0]
            sd[k] = torch.stack([torch.cat([sd.pop(f"{p}{e}.gate_proj.weight"), sd.pop(f"{p}{e}.up_proj.weight")]) for e in range(E)])
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            sd[k] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(msd[k].shape[0])])
    sd = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "inv_freq" not in m]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return model.to(device).eval(), config


def hf_rows(model, config, device="cuda", cache=True):
    """prompt logprobs from one forward; greedy tokens from generate() (KV cache) or, with cache=False,
    from a full forward per step (transformers' cached decode of the sparse layers can differ from its
    own full forward: gpu/README.md)."""
    import torch
    rows = []
    with torch.no_grad():
        for p in prompts(config.text_config.vocab_size):
            ids = torch.tensor([p], device=device)
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            plp = [lp[i, p[i + 1]].item() for i in range(len(p) - 1)]
            if cache:
                gen = model.generate(input_ids=ids, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(p):].tolist()
            else:
                seq = list(p)
                for _ in range(N_NEW):
                    seq.append(int(model(input_ids=torch.tensor([seq], device=device), use_cache=False).logits[0, -1].argmax()))
                gen = seq[len(p):]
            rows.append({"tokens": gen, "prompt_logprobs": plp})
    return rows


def run_hf(src, tag, out, dtype="bfloat16", device="cuda", cache="cache"):
    """transformers on the unconverted checkpoint, de-quantized; dtype float32 gives the bf16 noise floor
    of this tiny model (hf vs hf32); cache "nocache" decodes greedily by a full forward per token."""
    import torch
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    model, config = load_hf(src, dtype, device)
    rows = hf_rows(model, config, device, cache == "cache")
    json.dump({"tag": tag, "model": src, "dtype": dtype, "device": device, "cache": cache, "rows": rows}, open(os.path.join(out, f"{tag}.json"), "w"), indent=1)
    print(f"{tag}: first tokens {[r['tokens'][:8] for r in rows]}", flush=True)


PAIRS = [  # (run, reference, what it measures)
    ("native", "bf16", "issue 15: gpu_tiny at its stored widths vs the same checkpoint exactly de-quantized, same vLLM"),
    ("native", "quant", "issue 15: gpu_tiny at its stored widths vs promoted (both exact on the same weights)"),
    ("mixed", "mixed_bf16", "issue 15: gpu_mixed at its stored widths vs exactly de-quantized, same vLLM"),
    ("mixed_promoted", "mixed_bf16", "issue 15: gpu_mixed promoted (the old plugin) vs exactly de-quantized"),
    ("mixed", "mixed_promoted", "issue 15: gpu_mixed at its stored widths vs promoted"),
    ("mixed_bug", "mixed_bf16", "control: gpu_mixed with one 3-bit expert's scales made positive vs de-quantized"),
    ("mixed_wmix", "mixed_bf16", "issue 25: gpu_mixed on the wmix MoE kernels (M3_MOE_KERNEL=wmix) vs exactly de-quantized"),
    ("mixed_wmix", "mixed", "issue 25: the wmix MoE kernels vs humming's width parts"),
    ("mixed_hgemv", "mixed_bf16", "issue 25: gpu_mixed, decode by hgemv over humming's weights (M3_MOE_KERNEL=hgemv; "
     "one sequence at a time, M3_MAX_SEQS=1, so that decode takes hgemv's path) vs exactly de-quantized"),
    ("mixed_hgemv", "mixed", "issue 25: hgemv decode (one sequence at a time) vs humming's width parts (batch 4); "
     "prompt logprobs are prefill on humming's parts in both, but of one prompt at a time against four together"),
    ("stock4", "bf16", "issue 24: --target stock-vllm served by vLLM alone vs gpu_tiny exactly de-quantized"),
    ("quant", "bf16", "(a) quantized kernels + shim vs the same checkpoint exactly de-quantized, same vLLM"),
    ("quant", "hf", "(b) the whole path: vLLM + shim vs transformers on the unconverted checkpoint"),
    ("bf16", "hf", "vLLM bf16 vs transformers bf16 (implementation differences alone)"),
    ("hf", "hf32", "bf16 noise floor: transformers bf16 vs transformers float32"),
    ("quant", "hf32nc", "(b) vs transformers float32, greedy by full forward per token (CPU)"),
    ("hf32", "hf32nc", "transformers' cached generate() vs its own full forward per token (both float32)"),
    ("vl", "quant", "issue 7: VL checkpoint (--keep-vision --keep-mtp) served text-only vs the text-only checkpoint"),
    ("vlmtp", "vl", "issue 7: the same with MTP speculative decoding vs without"),
    ("bug", "bf16", "control: planted bug vs (a)'s reference"),
    ("bug", "hf", "control: planted bug vs (b)'s reference"),
]


def distance(a, b, ties=None):
    """greedy: shared prefix of the 32 generated tokens per prompt; prompt logprobs: |diff| per position. ``ties``
    (gpu/indexer_ties.py's output for these prompts): the maximum outside the positions whose sparse-attention
    block choice is a near-tie is reported beside the maximum (``max_untied``) for a prompt both runs served as the
    ties file's float32 model did (:func:`same_prompt`): ties of another model or prompt are never applied."""
    import statistics
    agree, total, per_prompt = 0, 0, []
    for j, (x, y) in enumerate(zip(a["rows"], b["rows"])):
        n = min(len(x["tokens"]), len(y["tokens"]))
        same = next((i for i in range(n) if x["tokens"][i] != y["tokens"][i]), n)
        agree += same
        total += n
        m = min(len(x["prompt_logprobs"]), len(y["prompt_logprobs"]))
        d = [abs(p - q) for p, q in zip(x["prompt_logprobs"][-m:], y["prompt_logprobs"][-m:])]
        row = {"prompt_len": m + 1, "greedy_prefix": same, "max": round(max(d), 4),
               "median": round(statistics.median(d), 4), "positions_over_1": sum(v > 1 for v in d)}
        if x.get("decode_logprobs") and y.get("decode_logprobs"):     # over the tokens both generated alike
            dd = [abs(p - q) for p, q in zip(x["decode_logprobs"][:same], y["decode_logprobs"][:same])]
            row["decode_max"] = round(max(dd, default=0.0), 4)
        tp = ties["prompts"][j] if ties and j < len(ties["prompts"]) else None
        if tp is not None and same_prompt(x, tp) and same_prompt(y, tp):   # index i: token i + 1's logprob = query i
            tied = set(tp["near_tie_queries"])
            row["max_untied"] = round(max((v for i, v in enumerate(d) if i not in tied), default=0.0), 4)
            row["worst_position"] = max(range(m), key=d.__getitem__)
            row["worst_is_near_tie"] = row["worst_position"] in tied
        per_prompt.append(row)
    out = {"greedy_prefix_agreement": f"{agree}/{total}",
           "max_abs_prompt_logprob_diff": max(p["max"] for p in per_prompt),
           "median_abs_prompt_logprob_diff": round(statistics.median(p["median"] for p in per_prompt), 4),
           "per_prompt": per_prompt}
    if all("decode_max" in p for p in per_prompt):
        out["max_abs_decode_logprob_diff"] = max(p["decode_max"] for p in per_prompt)
    untied = [p.get("max_untied", p["max"]) for p in per_prompt]
    if any("max_untied" in p for p in per_prompt):
        out["max_abs_prompt_logprob_diff_untied"] = max(untied)
    return out


def same_prompt(row, tp, tol=0.1) -> bool:
    """Whether a run's prompt logprobs are those of gpu/indexer_ties.py's prompt ``tp`` (its float32 model's): same
    length and a median |difference| under ``tol`` (gpu_mixed served on an H100: 0.005-0.013 per prompt; its
    planted bug 0.06-0.37; gpu_tiny on gpu_mixed's ties, the same prompt lengths: 0.46-1.8)."""
    import statistics
    a, b = row["prompt_logprobs"], tp["logprobs"]
    return len(a) == len(b) and statistics.median(abs(p - q) for p, q in zip(a, b)) < tol


def compare(out, ties_file=None):
    """Every pair of PAIRS whose runs are in ``out``; with ``ties_file`` (gpu/indexer_ties.py's output, e.g.
    gpu/results/indexer_ties_gpu_mixed.json) also each pair's maximum outside the near-tie positions of its prompts."""
    ties = json.load(open(ties_file)) if ties_file else None
    runs = {f[:-5]: json.load(open(os.path.join(out, f))) for f in os.listdir(out)
            if f.endswith(".json") and f != "summary.json"}
    summary = {}
    for a, b, what in PAIRS:
        if a in runs and b in runs:
            summary[f"{a} vs {b}"] = {"what": what, **distance(runs[a], runs[b], ties)}
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
    for k, v in summary.items():
        untied = v.get("max_abs_prompt_logprob_diff_untied")
        print(f"{k:14s} greedy {v['greedy_prefix_agreement']:>8s}  max {v['max_abs_prompt_logprob_diff']:8.4f}  "
              + (f"max outside near-ties {untied:8.4f}  " if untied is not None else "")
              + f"median {v['median_abs_prompt_logprob_diff']:7.4f}  per prompt (prefix/max/median): "
              + " ".join(f"{p['greedy_prefix']}/{p['max']:.3g}/{p['median']:.3g}" for p in v["per_prompt"]))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "vllm":
        run_vllm(*sys.argv[2:5])
    elif mode == "hf":
        run_hf(*sys.argv[2:8])
    elif mode == "compare":
        compare(*sys.argv[2:4])
    else:
        raise SystemExit(__doc__)
