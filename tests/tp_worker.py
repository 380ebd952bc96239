"""One tensor-parallel rank of vLLM's MiniMax-M3 model built on a CPU (gloo), the m3_gptq plugin's CUDA decisions
with m3_verify's CPU platform: load_weights over the whole checkpoint, then every quantized or bf16 linear
parameter and every MoE part of this rank decoded and compared with its slice of the exact decode of the
checkpoint (tests/test_tp.py runs rank 0 and rank 1 of TP 2).

    python tests/tp_worker.py RANK WORLD PORT OUT_DIR  -> prints "TPRESULT <json>"
"""
import json
import os
import sys

import numpy as np


def main(rank, world, port, out_dir):
    import torch
    from safetensors import safe_open
    from vllm.config import LoadConfig, ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.plugins import load_general_plugins
    from vllm.utils.torch_utils import set_default_torch_dtype

    from m3_convert import gptq, vllm_plugin
    from m3_convert.names import fused_shards
    from m3_convert.serve import decide
    from m3_convert.serve.config import use_platform
    from m3_convert.serve.moe import part_view
    from m3_verify.reference import CpuPlatform

    load_general_plugins()
    vllm_plugin.register()
    use_platform(CpuPlatform())
    mc = ModelConfig(model=out_dir, dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True)
    vc = VllmConfig(model_config=mc, load_config=LoadConfig(load_format="safetensors"),
                    parallel_config=ParallelConfig(tensor_parallel_size=world))
    ctx = set_current_vllm_config(vc)      # kept referenced: the context resets the config when collected
    ctx.__enter__()
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    ensure_model_parallel_initialized(world, 1)
    import vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method as ufm
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    ufm.select_unquantized_moe_backend = lambda moe_config: (UnquantizedMoeBackend.TRITON, None)   # CPU build blocker
    with set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
        model = initialize_model(vllm_config=vc)

    ckpt = {}
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, f), "pt") as h:
                ckpt.update({k: h.get_tensor(k) for k in h.keys()})
    model.load_weights(iter(ckpt.items()))
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    tc, modules = cfg["text_config"], cfg["quantization_config"]["modules"]
    nKV = tc["num_key_value_heads"]

    def full(mod):
        """Exact decode [out, in] (float32) of an official module, or its bf16 weight as float32."""
        if mod + ".qweight" in ckpt:
            return gptq.dequantize(*(ckpt[f"{mod}.{x}"].numpy() for x in ("qweight", "qzeros", "scales")))
        return ckpt[mod + ".weight"].float().numpy()

    def rows(w, r, n):
        k = w.shape[0] // n
        return w[r * k:(r + 1) * k]

    def expected_linear(prefix, rank):
        last = prefix.rsplit(".", 1)[1]
        members = decide.fused_members(prefix, modules, fused_shards())
        if last in ("o_proj", "down_proj"):
            w = full(members[0])
            k = w.shape[1] // world
            return w[:, rank * k:(rank + 1) * k]
        parts = []
        for m in members:
            w, s = full(m), m.rsplit(".", 1)[1]
            heads = {"k_proj": nKV, "v_proj": nKV, "index_q_proj": nKV, "index_k_proj": 1}.get(s)
            if heads is not None and heads < world:
                parts.append(rows(w, rank * heads // world, heads))   # fewer heads than ranks: replicated
            else:
                parts.append(rows(w, rank, world))                    # q, gate, up (and heads >= ranks): split
        return np.concatenate(parts)

    checked = {"linear": 0, "moe_slots": 0}
    bad = []
    other = (rank + 1) % world          # the same comparison against the other rank's slice must fail
    for name, mod in model.named_modules():
        qm = type(getattr(mod, "quant_method", None)).__name__
        if qm in ("M3GPTQLinearMethod", "UnquantizedLinearMethod") and name.startswith("model.layers.") and \
                name.rsplit(".", 1)[1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            got = (gptq.dequantize(mod.qweight.data.numpy(), mod.qzeros.data.numpy(), mod.scales.data.numpy())
                   if qm == "M3GPTQLinearMethod" else mod.weight.data.float().numpy())
            want = expected_linear(name, rank)
            if got.shape != want.shape or not np.array_equal(got, want):
                bad.append(f"{name}: rank {rank} holds {list(got.shape)}, differs from its slice {list(want.shape)} of the exact decode")
            checked["linear"] += 1
            checked["linear_other_rank_differs"] = checked.get("linear_other_rank_differs", 0) + \
                int(not np.array_equal(got, expected_linear(name, other)))
        elif qm == "M3HummingMoEMethod":
            d = mod.m3_moe
            inter = mod.m3_dims[1]
            for part in d.parts:
                views = [part_view(mod, part, leaf) for leaf in ("qweight", "qzeros", "scales")]
                for i, slot in enumerate(part.slots):
                    e, s = (slot // 2, decide.W13_HALVES[slot % 2]) if part.sublayer == "w13" else (slot, "w2")
                    got = gptq.dequantize(*(v[i].numpy() for v in views))
                    w = full(f"{d.prefix}.{e}.{s}")
                    cut = (lambda r: w[r * inter:(r + 1) * inter]) if part.sublayer == "w13" else (lambda r: w[:, r * inter:(r + 1) * inter])
                    if not np.array_equal(got, cut(rank)):
                        bad.append(f"{d.prefix}.{e}.{s}: rank {rank} part {part.name} slot {i} differs from its slice")
                    checked["moe_slots"] += 1
                    checked["moe_other_rank_differs"] = checked.get("moe_other_rank_differs", 0) + int(not np.array_equal(got, cut(other)))
    print("TPRESULT " + json.dumps({"rank": rank, "checked": checked, "bad": bad[:20]}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    os._exit(0)
