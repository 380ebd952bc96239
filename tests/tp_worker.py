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
    from m3_convert import gptq
    from m3_convert.names import fused_shards
    from m3_convert.serve import decide
    from m3_convert.serve.moe import part_view
    from m3_verify.vllm_check import _build_model, _checkpoint

    model, _, _ = _build_model(out_dir, rank=rank, world=world, port=port)    # m3-verify --vllm's own build
    ckpt = {k: t for _, k, t in _checkpoint(out_dir)}
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
            inter = mod.m3_dims.inter
            for part in d.parts:
                views = [part_view(mod, part, leaf) for leaf in ("qweight", "qzeros", "scales")]
                for i, slot in enumerate(part.slots):
                    e, s = decide.expert_of(part.sublayer, slot)
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
