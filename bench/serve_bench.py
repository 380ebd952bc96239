#!/usr/bin/env python3
"""Serving speed and GPU memory at the real MiniMax-M3 layer widths, through vLLM, on one GPU (issue 15).

    python3 bench/serve_bench.py OUT_DIR [--layers 4[,8,...]] [--vocab 32768] [--arms native,promoted,bf16] [--eager]

A MiniMax-M3 with the real widths (hidden 6144, 64 heads / 4 KV heads / head_dim 128, 128 routed experts of
width 3072, top-4, one shared expert of 3072, dense MLP 12288, indexer 4 x 128) and ``--layers`` layers (L0 full
attention + dense MLP as the real L0-L2, the rest sparse attention + MoE as the real L3-L59), written as an
m3-convert output (config.json with the m3_gptq per-module map; no weight files: vLLM's ``load_format="dummy"``
fills every parameter, which is all a speed and memory measurement needs). Bits, seeded: attention o_proj,
dense-layer q/k/v and the dense MLP 4-bit (Machete), the shared expert 4-bit (Machete; ../shared/SPEC.md's table
gives the checkpoint's shared experts 4/8 bits; ``M3_BENCH_SHARED_BITS=3`` reproduces the runs up to 2026-12-07,
whose 3-bit shared expert ran on humming's dense GEMM at ~74 us a layer at batch 1 on an H100, promoted: 4),
sparse-layer q/k/v bf16 (as m3-convert writes them); every routed expert module drawn from 2/3/4/8 with weights
0.35/0.45/0.12/0.08 (3.2 bits on average; gate and up drawn apart, so every MoE layer has 8 width parts).
The vocabulary is reduced (default 32768 instead of 200064) so that the bf16 lm_head does not dominate the
per-token bytes of so few layers.

Arms, each in its own process (one CUDA context each), same GPU, one run:
* ``native``:   the plugin, every GPTQ layer at its stored width (humming-kernels for the mixed-width MoE parts
                and any 2/3-bit linear -- the shared expert with ``M3_BENCH_SHARED_BITS=3`` --, vLLM's
                Machete/Marlin for the 4/8-bit linears);
* ``promoted``: the plugin with ``M3_GPTQ_KERNELS=promote`` (every MoE layer at its widest width, any 2/3-bit
                linear at 4 bits: the plugin before issue 15);
* ``bf16``:     no quantization at all;
* ``native_wmix`` (not in the default arms): ``native`` with the mixed MoE layers on the wmix kernels
                (M3_MOE_KERNEL=wmix: one Triton launch per sublayer, every expert at its width: issue 25) instead
                of humming's per-width parts;
* ``native_hgemv`` (not in the default arms): ``native`` (humming's parts, the same weights) with decode batches, up
                to a row per expert, on m3_convert.serve.hgemv (M3_MOE_KERNEL=hgemv: one launch per sublayer over
                humming's tensors: issue 25);
* ``native_serial`` (not in the default arms): ``native`` with the width parts run one after another
                (M3_MOE_STREAMS=0), as before issue 25;
* ``native_streamk`` (not in the default arms): ``native`` with humming's default stream-K kernels
                (M3_HUMMING_EXACT=0: not batch-invariant; 2026-12-02 on an H200: 1.02x native's decode), for comparison.

Routing: the weights are vLLM's dummy ones (every float parameter uniform in +-1e-3; integer ones, GPTQ codes among
them, left as allocated), so the model's own router routes whatever hidden states those weights make, not the
load-balanced routing of the trained model; the arms that read an expert once for all its rows ran batch 32 about
twice as fast under it as under uniform routing (4 layers, H100s of 2026-12-07: promoted 11,649 against 5,944 tok/s,
humming 14,481 against 7,393; different machines), as if rows crowded onto few experts (not measured then). Every arm therefore routes
through vLLM's own routing simulation for performance tests (``VLLM_MOE_ROUTING_SIMULATION_STRATEGY=uniform_random``:
top-k of uniform random scores, distinct experts per token, weights 1) unless ``M3_BENCH_ROUTING=model`` (the runs up
to 2026-12-07's seventh session used the model's router); each arm records the routing it ran (``routing``) and,
from vLLM's routed-experts capture hook on a 2k prefill, how many experts each MoE layer's rows reached
(``routing_spread``; with ``M3_BENCH_ROUTING=model`` that measures the dummy model's crowding).

With ``M3_BENCH_PROFILE=1`` each arm also profiles one batch-1 and one batch-32 generation (:func:`profile_decode`:
wall vs GPU-busy time per step, kernels per step, top kernels, launches outside CUDA graphs; ``profile_bs1``,
``profile_bs32``: issue 25, where wmix loses at batch 32 and the kernel alone does not say why).

With several depths (``--layers 4,8``), every arm runs at each depth in the same call, and the summary adds each
arm's cost per added MoE layer (the growth of the step time over the layers added, or of the GPU-busy time where a
shallow depth's step is host-bound: :func:`project`) and the 60-layer projection of :func:`project` (issue 25 item
4), with its assumptions printed beside it.

Per arm: GPU bytes of the weights, decode tokens/s at batch 1 and 32 (CUDA graphs on unless ``--eager``),
prefill tokens/s of a 2048-token prompt, and for batch-1 decode the bytes of weights one token reads (every
dense weight, top-k of 128 routed experts at the layer's mean expert size, the lm_head) over the time per
token, against the HBM bandwidth (the datasheet figure of the card, DATASHEET_BPS, and a device-to-device copy measured
in the same process).
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

EXPERT_MIX = {2: 0.35, 3: 0.45, 4: 0.12, 8: 0.08}
#: HBM bandwidth on the datasheet, by the name torch reports (H100 SXM5 80 GB: 3.35 TB/s; H200: 4.8 TB/s)
DATASHEET_BPS = {"H100": 3.35e12, "H200": 4.8e12}


def datasheet_bps() -> float:
    import torch
    name = torch.cuda.get_device_name()
    return next((v for k, v in DATASHEET_BPS.items() if k in name), float("nan"))


def text_config(layers: int, vocab: int) -> dict:
    from vllm.transformers_utils.configs.minimax_m3 import MiniMaxM3TextConfig
    tc = MiniMaxM3TextConfig().to_dict()
    kinds = [0] + [1] * (layers - 1)
    sac = dict(tc["sparse_attention_config"])
    sac["sparse_attention_freq"] = kinds
    sac["sparse_disable_index_value"] = kinds
    tc.update(num_hidden_layers=layers, moe_layer_freq=kinds, sparse_attention_config=sac, vocab_size=vocab,
              max_position_embeddings=8192)
    for k in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        tc.pop(k, None)
    return tc


def shared_bits() -> int:
    """The shared expert's width: 4 (the checkpoint's 4/8, SPEC.md), or ``M3_BENCH_SHARED_BITS`` (3: the runs up to
    2026-12-07)."""
    return int(os.environ.get("M3_BENCH_SHARED_BITS", "4"))


def quant_modules(tc: dict, seed: int = 0) -> dict:
    from m3_convert import names
    rng = random.Random(seed)
    widths, weights = zip(*EXPERT_MIX.items())
    layout = names.Layout(tc["num_hidden_layers"], tuple(bool(x) for x in tc["sparse_attention_config"]["sparse_attention_freq"]),
                          tuple(bool(x) for x in tc["moe_layer_freq"]), tc["num_local_experts"], tc["n_shared_experts"])
    mods = {}
    for m, L, e in names.expected_modules(layout):
        if m.role not in (names.LINEAR, names.QKV, names.INDEX, names.GATE_UP, names.EXPERT):
            continue
        for dst in names.official_modules(m, L, e):
            if m.role == names.INDEX or (m.role == names.QKV and layout.sparse_attn[L]):
                bits = None                     # de-quantized by m3-convert (fused with the bf16 indexer)
            elif m.role == names.EXPERT:
                bits = rng.choices(widths, weights)[0]
            elif dst.split(".")[3] == "block_sparse_moe":
                bits = shared_bits()            # shared expert
            else:
                bits = 4                        # Machete
            mods[dst] = {"bits": bits, "group_size": 128} if bits else {"bits": None}
    return mods


#: M3_BENCH_ROUTING -> VLLM_MOE_ROUTING_SIMULATION_STRATEGY ("" : the model's own router)
ROUTINGS = {"uniform": "uniform_random", "model": ""}


def routing() -> str:
    """The bench's routing (``M3_BENCH_ROUTING``, default "uniform"; see the module docstring)."""
    r = os.environ.get("M3_BENCH_ROUTING", "uniform")
    if r not in ROUTINGS:
        raise SystemExit(f"M3_BENCH_ROUTING={r!r}: one of {sorted(ROUTINGS)}")
    return r


def set_routing_env(env=os.environ) -> str:
    """Put the bench's routing into vLLM's variable (read when an engine builds its routers: before ``LLM()``, in the
    arm's own process); returns the routing."""
    r = routing()
    if ROUTINGS[r]:
        env["VLLM_MOE_ROUTING_SIMULATION_STRATEGY"] = ROUTINGS[r]
    else:
        env.pop("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", None)
    return r


_ROUTED: dict = {}


def capture_routing(model, on: bool) -> int:
    """vLLM's routed-experts capture hook (each MoERunner's ``router.set_capture_fn``, as vLLM's own
    routed_experts_capturer binds it), on: every forward that runs in Python (not a CUDA graph's replay) records its
    expert ids into _ROUTED by layer; off: unbound. Returns the routers bound."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    n = 0
    for name, m in model.named_modules():
        r = getattr(m, "router", None)
        if not isinstance(r, BaseRouter):
            continue
        key = getattr(m, "layer_id", name)
        r.set_capture_fn((lambda ids, key=key: _ROUTED.setdefault(key, []).append(ids.detach().clone())) if on else None)
        n += 1
    return n


def routed_spread(experts: int = 128) -> dict:
    """Per MoE layer, from the last ids _ROUTED holds: the distinct experts its rows reached and the busiest
    expert's rows; summarised over the layers (min, max)."""
    import torch
    per = []
    for key, seen in _ROUTED.items():
        ids = seen[-1].reshape(-1).long()
        ids = ids[(ids >= 0) & (ids < experts)]
        rows = torch.bincount(ids.cpu(), minlength=experts)
        per.append((int((rows > 0).sum()), int(rows.max()), int(seen[-1].shape[0])))
    if not per:
        return {"layers": 0}
    d, b, t = zip(*per)
    return {"layers": len(per), "tokens": max(t), "distinct_experts": [min(d), max(d)], "busiest_rows": [min(b), max(b)]}


def serve_code_hash() -> str:
    """sha256 (16 hex digits) of the plugin's serving sources as run (m3_convert/serve/*.py, sorted by name): which
    kernel code a result came from, on a machine without the repository's history."""
    import hashlib
    from m3_convert import serve
    h = hashlib.sha256()
    root = os.path.dirname(serve.__file__)
    for name in sorted(f for f in os.listdir(root) if f.endswith(".py")):
        with open(os.path.join(root, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def measure_spread(llm, prefill) -> dict:
    """:func:`routed_spread` of one ``prefill()`` (2048 tokens) with the capture hook bound around it; warns when it
    saw no such forward (the hook runs in this process only, VLLM_ENABLE_V1_MULTIPROCESSING=0, and not in a CUDA
    graph's replay)."""
    _ROUTED.clear()
    bound, = llm.apply_model(lambda m: capture_routing(m, True))
    prefill()
    llm.apply_model(lambda m: capture_routing(m, False))
    spread = dict(routed_spread(), routers=bound)
    _ROUTED.clear()
    if spread["layers"] == 0 or spread.get("tokens") != 2048:
        print(f"WARNING: routing_spread saw no 2048-token forward ({spread})", flush=True)
    return spread


def write_model(d: str, arm: str, layers: int, vocab: int) -> dict:
    os.makedirs(d, exist_ok=True)
    tc = text_config(layers, vocab)
    cfg = {"architectures": ["MiniMaxM3SparseForCausalLM"], "model_type": "minimax_m3_vl", "torch_dtype": "bfloat16",
           "tie_word_embeddings": False, "text_config": dict(tc, torch_dtype="bfloat16")}
    mods = quant_modules(tc)
    if arm != "bf16":
        from m3_convert.quantcfg import output_config
        cfg["quantization_config"] = output_config(mods, 128, True, {})     # what m3-convert writes
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    bits = [v["bits"] for k, v in mods.items() if ".experts." in k]
    return {"expert_mean_bits": round(sum(bits) / len(bits), 3), "modules": len(mods), "shared_expert_bits": shared_bits()}


def copy_bandwidth():
    import torch
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bps = 10 * 2 * a.numel() / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bps


def weight_bytes(model):
    """(all weight bytes, bytes one decode token reads): every parameter/buffer but humming workspaces; routed
    experts counted at top_k / num_experts of their layer; the embedding table not at all (one row)."""
    total = active = 0
    for name, mod in model.named_modules():
        own = [(n, t) for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
               if not (n == "locks" or n.endswith("_map") or "workspace" in n or n.endswith("cos_sin_cache") or "inv_freq" in n)]
        b = sum(t.numel() * t.element_size() for _, t in own)
        total += b
        if "embed_tokens" in name:
            continue
        if hasattr(mod, "global_num_experts") and hasattr(mod, "top_k"):
            active += b * mod.top_k / mod.global_num_experts
        else:
            active += b
    return total, int(active)


def profile_decode(run, steps: int) -> dict:
    """torch.profiler over one generation of ``steps`` decode steps (issue 25): wall time per step, GPU-busy
    time per step (the union of kernel intervals), kernels per step and the top kernels by GPU time, and the CPU-side
    launches: ``cudaLaunchKernel``-like calls outside CUDA graphs (the decode steps should have none) against
    ``cudaGraphLaunch`` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        run()
        wall = time.perf_counter() - t
    kern, launches, graphs = [], 0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kern.append((e.time_range.start, e.time_range.end, e.name))
        elif e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")):
            launches += 1
        elif e.name.startswith("cudaGraphLaunch"):
            graphs += 1
    kern.sort()
    busy, end = 0.0, float("-inf")
    for a, b, _ in kern:                     # union of [start, end) intervals, us
        if b > end:
            busy += b - max(a, end)
            end = b
    by = {}
    for a, b, n in kern:
        by.setdefault(n, [0, 0.0])
        by[n][0] += 1
        by[n][1] += b - a
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:25]
    return {"steps": steps, "wall_ms_per_step": round(wall * 1e3 / steps, 3),
            "gpu_busy_ms_per_step": round(busy / 1e3 / steps, 3), "kernels_per_step": round(len(kern) / steps, 1),
            "kernel_launches_outside_graphs": launches, "graph_launches": graphs,
            "top_kernels": [{"name": n[:120], "calls": c, "us_per_step": round(us / steps, 2)} for n, (c, us) in top]}


def run_arm(arm: str, out: str, layers: int, vocab: int, eager: bool):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if arm == "promoted":
        os.environ["M3_GPTQ_KERNELS"] = "promote"
    if arm == "native_streamk":
        os.environ.update(M3_MOE_KERNEL="humming", M3_HUMMING_EXACT="0")
    if arm == "native_serial":        # the width parts of a MoE layer one after another (before issue 25)
        os.environ.update(M3_MOE_KERNEL="humming", M3_MOE_STREAMS="0")
    if arm == "native_wmix":          # the wmix kernels: one launch per MoE sublayer (issue 25)
        os.environ["M3_MOE_KERNEL"] = "wmix"
    if arm == "native_hgemv":         # humming's parts, decode by hgemv over their tensors (issue 25)
        os.environ["M3_MOE_KERNEL"] = "hgemv"
    set_routing_env()
    d = f"/tmp/m3bench/{arm}"
    info = write_model(d, "bf16" if arm == "bf16" else "native", layers, vocab)
    from m3_convert import vllm_plugin
    vllm_plugin.register()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.time()
    llm = LLM(model=d, load_format="dummy", dtype="bfloat16", block_size=128, enforce_eager=eager, max_model_len=4096,
              max_num_seqs=32, gpu_memory_utilization=0.85, skip_tokenizer_init=True, seed=0)
    load_s = time.time() - t0
    (total, active), = llm.apply_model(weight_bytes)
    rng = random.Random(1)

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab - 1) for _ in range(length)]) for _ in range(n)]

    def gen(n, length, new):
        sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        ps = prompts(n, length)
        t = time.perf_counter()
        res = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(r.outputs[0].token_ids) == new for r in res)
        return dt
    gen(1, 8, 16)          # warm-up (and any remaining JIT)
    res = {"arm": arm, "layers": layers, "vocab": vocab, "load_s": round(load_s, 1), "eager": eager, **info,
           "routing": routing(),
           "weight_bytes": total,
           "active_bytes_per_token": active}
    # decode: (new - 1) tokens after the first, so the (tiny) prefill is taken out by differencing two lengths
    for bs in (1, 32):
        short, long_ = [gen(bs, 8, 17) for _ in range(2)], [gen(bs, 8, 145) for _ in range(2)]
        per_step = (min(long_) - min(short)) / 128
        res[f"decode_bs{bs}_tok_s"] = round(bs / per_step, 1)
        res[f"decode_bs{bs}_ms_per_step"] = round(per_step * 1e3, 3)
    if os.environ.get("M3_BENCH_PROFILE"):
        res["profile_bs1"] = profile_decode(lambda: gen(1, 8, 33), steps=32)
        res["profile_bs32"] = profile_decode(lambda: gen(32, 8, 33), steps=32)
    res["routing_spread"] = measure_spread(llm, lambda: gen(1, 2048, 1))
    pf = [gen(1, 2048, 1) for _ in range(3)]
    res["prefill_2k_tok_s"] = round(2048 / statistics.median(pf), 0)
    bw = copy_bandwidth()
    step = res["decode_bs1_ms_per_step"] / 1e3
    res["copy_bandwidth_Bps"] = round(bw / 1e9, 1) * 1e9
    res["decode_bs1_bytes_per_s"] = round(active / step / 1e9, 1) * 1e9
    res["gpu"] = __import__("torch").cuda.get_device_name()
    res["vllm"] = __import__("vllm").__version__
    res["serve_code"] = serve_code_hash()
    res["datasheet_Bps"] = datasheet_bps()
    res["decode_bs1_fraction_of_datasheet_hbm"] = round(active / step / res["datasheet_Bps"], 3)
    res["decode_bs1_fraction_of_measured_copy"] = round(active / step / bw, 3)
    res["methods"] = dict(vllm_plugin.CHOICES) if arm != "bf16" else {}
    if arm.startswith("native"):            # what the mixed MoE layers ran on (promoted: Marlin; bf16: none)
        res["moe_kernel"] = os.environ.get("M3_MOE_KERNEL", "humming")
    with open(os.path.join(out, f"speed_{arm}_L{layers}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "methods"}), flush=True)


#: the real model (vLLM's MiniMaxM3TextConfig, bench/project_memory.py): 60 layers, L0-L2 dense, 57 MoE, 200064 tokens
REAL_LAYERS, REAL_DENSE, REAL_VOCAB, HIDDEN = 60, 3, 200064, 6144


#: a batch-1 step whose GPU is busy less than this share of it is host-bound (vLLM's CPU work per step sets it: on an
#: H100 with vLLM 0.33, 2026-12-07, every arm at 4 layers ran 1.66-1.77 ms steps with the GPU busy 1.0-1.5 ms), so
#: the step time's growth with depth understates a layer there
HOST_BOUND = 0.9


def _slope(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def project(rows: list[dict], allreduce_us: float) -> list[dict]:
    """Per arm with runs at two or more depths: the cost per added MoE layer (least squares over the
    depths; the bench model is L0 dense + MoE layers) -- of the step time, or, where a depth's step is host-bound
    (its profile's GPU-busy time under HOST_BOUND of the step) and every depth was profiled, of the GPU-busy time
    (``slope_from`` says which; a host-bound arm without profiles keeps the step time's, flagged in
    ``host_bound_depths``) -- and batch-1 decode of the real 60-layer model:
    deepest run (its step time; its GPU-busy time where the slope is the GPU-busy one: the 60-layer model is
    GPU-bound) + the missing MoE layers at that cost + the two more dense layers counted as MoE layers (their
    active bytes are alike: a 4-bit dense MLP 12288 wide against top-4 experts at ~3.2 bits and the shared expert)
    + the larger lm_head's extra bf16 bytes at the copy bandwidth measured in the run. TP 2: each layer's and the
    head's time halves (bandwidth-bound: each GPU reads half the weights), plus two all-reduces a layer of
    ``allreduce_us`` each (vLLM's custom all-reduce of one token's hidden state; an assumption, not measured here);
    the fixed part (sampling, embedding, the step's CPU work) is taken as is."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = sorted((r["layers"], r["decode_bs1_ms_per_step"], r) for r in rows if r["arm"] == arm)
        if len({p[0] for p in pts}) < 2:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        busy = [(p[2].get("profile_bs1") or {}).get("gpu_busy_ms_per_step") for p in pts]
        host_bound = [x for x, y, b in zip(xs, ys, busy) if b is not None and b < HOST_BOUND * y]
        slope = step_slope = _slope(xs, ys)
        slope_from = "step_time"
        if host_bound and None not in busy:
            slope, slope_from = _slope(xs, busy), "gpu_busy"
        deep_layers, deep_ms, deep = pts[-1]
        if slope_from == "gpu_busy":
            deep_ms = busy[-1]
        head_ms = (REAL_VOCAB - deep["vocab"]) * HIDDEN * 2 / deep["copy_bandwidth_Bps"] * 1e3
        tp1 = deep_ms + (REAL_LAYERS - deep_layers) * slope + head_ms
        fixed = deep_ms - deep_layers * slope            # what does not grow with depth: the bench's head, sampling, ...
        small_head_ms = deep["vocab"] * HIDDEN * 2 / deep["copy_bandwidth_Bps"] * 1e3
        tp2 = fixed - small_head_ms + (REAL_LAYERS * slope + small_head_ms + head_ms) / 2 \
            + REAL_LAYERS * 2 * allreduce_us / 1e3
        out.append({"arm": arm, "depths": xs, "ms_per_moe_layer": round(slope, 4), "slope_from": slope_from,
                    "step_ms_per_moe_layer": round(step_slope, 4), "host_bound_depths": host_bound,
                    "fixed_ms": round(fixed, 3),
                    "head_extra_ms": round(head_ms, 3), "tp1_ms": round(tp1, 3), "tp1_tok_s": round(1e3 / tp1, 1),
                    "tp2_ms": round(tp2, 3), "tp2_tok_s": round(1e3 / tp2, 1), "allreduce_us": allreduce_us})
    return out


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", default="4", help="depth, or depths (4,8): each arm runs at each")
    ap.add_argument("--allreduce-us", type=float, default=10.0, help="the projection's TP-2 all-reduce, us")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--arms", default="native,promoted,bf16")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    depths = [int(v) for v in a.layers.split(",")]
    if a.arm:
        run_arm(a.arm, a.out, depths[0], a.vocab, a.eager)
        os._exit(0)
    rows = []
    for layers, arm in ((n, arm) for n in depths for arm in a.arms.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), a.out, "--arm", arm, "--layers", str(layers), "--vocab", str(a.vocab)]
        if a.eager:
            cmd.append("--eager")
        t = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{arm}: failed (exit {p.returncode}) after {time.time() - t:.0f} s:\n{(p.stderr or p.stdout)[-3000:]}", flush=True)
            continue
        rows.append(json.loads(line[-1][7:]))
        print(f"{arm} at {layers} layers: {time.time() - t:.0f} s", flush=True)
    proj = project(rows, a.allreduce_us)
    with open(os.path.join(a.out, "speed_summary.json"), "w") as f:
        json.dump({"rows": rows, "projection": proj}, f, indent=1)
    print("| arm | layers | weights GiB | decode bs1 tok/s | decode bs32 tok/s | prefill 2k tok/s | bs1 bytes/token | bs1 % of HBM (datasheet; copy) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['layers']} | {r['weight_bytes'] / 2**30:.2f} | {r['decode_bs1_tok_s']} | {r['decode_bs32_tok_s']} | "
              f"{r['prefill_2k_tok_s']:.0f} | {r['active_bytes_per_token'] / 1e6:.0f} MB | "
              f"{100 * r['decode_bs1_fraction_of_datasheet_hbm']:.0f}%; {100 * r['decode_bs1_fraction_of_measured_copy']:.0f}% |")

    for p in proj:
        print(f"{p['arm']}: {1e3 * p['ms_per_moe_layer']:.1f} us per added MoE layer at batch 1 (depths {p['depths']}, "
              f"from the {p['slope_from'].replace('_', ' ')}; host-bound at {p['host_bound_depths'] or 'none'}); "
              f"60 layers: TP 1 {p['tp1_ms']} ms = {p['tp1_tok_s']} tok/s, TP 2 {p['tp2_ms']} ms = {p['tp2_tok_s']} "
              f"tok/s (all-reduce {p['allreduce_us']} us, assumed; head +{p['head_extra_ms']} ms at the copy bandwidth)")


if __name__ == "__main__":
    main()
