"""The thin vLLM quantization shim for m3-convert output (``quant_method: m3_gptq``).

Registered through the ``vllm.general_plugins`` entry point of this package.
``register()`` runs in every vLLM process: it is idempotent, imports nothing
heavy at module import, and does nothing when vLLM is absent.

It reads the per-module map that m3-convert wrote (``quantization_config.modules``,
official module names) and hands each vLLM layer one of vLLM's own methods:

* Linear (qkv_proj incl. the index shards, o_proj, gate_up_proj, down_proj):
  every shard of a fused module must carry the same scheme (m3-convert guarantees
  it; a checkpoint that violates it is refused with the module named).
  bf16 -> ``UnquantizedLinearMethod``; 4/8-bit -> ``AutoGPTQLinearMethod``
  (Machete/Marlin kernels); 2/3-bit -> the same at 4 bits, codes promoted while
  loading (exact). On the project's GPU check (vLLM 0.26, gpu/README.md) this path
  was measured against the exact decode; vLLM's humming path was not measured, so
  it is not used.
* MoE (``block_sparse_moe.experts``): all experts bf16 -> ``UnquantizedFusedMoEMethod``;
  otherwise vLLM's ``AutoGPTQMoEMethod`` at the layer's widest bit width W
  (2/3-bit layers: W = 4).  Experts stored with fewer bits are promoted while
  loading: codes and zeros shift by 2^(W-1) - 2^(b-1), scales unchanged, so
  every weight decodes to exactly the same value (m3_convert.gptq.promote).
  The memory cost is logged per layer.
* On a platform without GPU kernels (the CPU check in ``m3-verify --vllm``) the
  quantized methods are replaced by reference methods: the same parameters,
  the same weight loaders, fp16 scales kept exact, and an exact de-quantization
  to bf16 after loading.
"""
from __future__ import annotations

import functools
import logging
from fractions import Fraction

log = logging.getLogger("m3_convert.vllm_plugin")

QUANT_METHOD = "m3_gptq"
_registered = False
CHOICES: dict[str, str] = {}   # layer prefix -> method class chosen in this process (logs, GPU check)

def fused_members(prefix: str, modules: dict) -> list[str]:
    """Official checkpoint modules behind one vLLM layer prefix (the shards vLLM fuses; m3_convert.names)."""
    from m3_convert import names
    head, _, last = prefix.rpartition(".")
    shards = names.fused_shards().get(last)
    if shards is None:
        return [prefix]
    return [f"{head}.{s}" for s, required in shards if required or f"{head}.{s}" in modules]


def resolve_linear(prefix: str, modules: dict):
    """(bits or None, group_size) for a linear layer; raises when the shards disagree or are missing."""
    members = fused_members(prefix, modules)
    missing = [m for m in members if m not in modules]
    if missing:
        raise ValueError(f"m3_gptq: quantization_config.modules has no entry for {missing} (layer {prefix}); "
                         "was this checkpoint written by m3-convert?")
    schemes = {m: (modules[m].get("bits"), modules[m].get("group_size")) for m in members}
    if len(set(schemes.values())) > 1:
        raise ValueError(f"m3_gptq: fused module {prefix} mixes quantization schemes {schemes}: vLLM builds one "
                         "method per fused module. Re-run m3-convert (it de-quantizes such q/k/v groups).")
    return next(iter(schemes.values()))


def resolve_moe(prefix: str, modules: dict, num_experts: int):
    """(target bits W or None, group_size, {expert module: bits}) for a MoE layer."""
    from m3_convert import names
    per = {}
    for e in range(num_experts):
        for s in names.EXPERT_SHARDS:
            name = f"{prefix}.{e}.{s}"
            if name not in modules:
                raise ValueError(f"m3_gptq: quantization_config.modules has no entry for {name}")
            per[name] = (modules[name].get("bits"), modules[name].get("group_size"))
    bits = {b for b, _ in per.values()}
    groups = {g for b, g in per.values() if b is not None}
    if None in bits and len(bits) > 1:
        raise ValueError(f"m3_gptq: MoE layer {prefix} mixes bf16 and GPTQ experts; vLLM needs one method per layer")
    if bits == {None}:
        return None, None, {}
    if len(groups) != 1:
        raise ValueError(f"m3_gptq: MoE layer {prefix} mixes group sizes {sorted(groups)}")
    width = max(4, max(bits))
    return width, groups.pop(), {k: b for k, (b, _) in per.items()}


def decide(kind: str, prefix: str, modules: dict, *, gpu: bool, num_experts: int = 0):
    """Pure decision: which vLLM method class serves ``prefix``. kind: 'linear' or 'moe'.

    Returns (class name, bits, group_size).  The shim instantiates exactly this.
    """
    if kind == "linear":
        bits, group = resolve_linear(prefix, modules)
        if bits is None:
            return "UnquantizedLinearMethod", None, None
        if gpu and bits in (4, 8):
            return "AutoGPTQLinearMethod", bits, group
        if gpu:
            # 2/3-bit: promoted to 4 bits at load (exact) and served by Machete/Marlin, the path the GPU check
            # measured (gpu/README.md); vLLM's humming linear path was not measured there, so it is not used.
            return "AutoGPTQLinearMethod", 4, group
        return "M3ReferenceGPTQLinearMethod", bits, group
    width, group, _ = resolve_moe(prefix, modules, num_experts)
    if width is None:
        return "UnquantizedFusedMoEMethod", None, None
    return ("AutoGPTQMoEMethod" if gpu else "M3ReferenceGPTQMoEMethod"), width, group


def marlin_moe_shape_problem(hidden_size: int, intermediate_per_partition: int, group_size: int) -> str | None:
    """Why vLLM's Marlin MoE would serve wrong experts for this shape, or None.

    vLLM 0.26-0.33 (fused_moe/oracle/int_wna16.py, _process_weights_marlin) permutes the w13 scales
    with size_k = intermediate_size_per_partition instead of hidden_size; the grouped permutation is
    chosen only when group_size < size_k, so an intermediate size (per TP rank) of at most one group
    with a hidden size of several groups gets the channel-wise permutation: wrong scales, no error.
    The likely cause of the wrong MoE logits seen on an H200 with vLLM 0.26 (gpu/README.md).
    """
    if group_size > 0 and intermediate_per_partition <= group_size < hidden_size:
        return (f"vLLM's Marlin MoE permutes w13 scales as if they had one group when intermediate_size per "
                f"rank ({intermediate_per_partition}) <= group_size ({group_size}) < hidden_size ({hidden_size}); "
                "it would serve wrong experts. Use a smaller tensor-parallel size.")
    return None


def _has_gpu_kernels() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cuda_alike()


def register():
    """vLLM general plugin entry point (idempotent; a no-op without vLLM)."""
    global _registered
    if _registered:
        return
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
    except ImportError:
        return
    if QUANTIZATION_METHODS and QUANT_METHOD in QUANTIZATION_METHODS:
        _registered = True
        return
    register_quantization_config(QUANT_METHOD)(_build_config_class())
    _registered = True


def _build_config_class():
    import torch
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    class M3GPTQConfig(QuantizationConfig):
        """Per-module GPTQ settings written by m3-convert (see README, 'The quantization_config schema')."""

        def __init__(self, full: dict):
            super().__init__()
            if full.get("quant_method") != QUANT_METHOD or not isinstance(full.get("modules"), dict):
                raise ValueError("m3_gptq: quantization_config lacks the m3-convert per-module map")
            if full.get("zero_point") != "gptq_v1":
                raise ValueError(f"m3_gptq: unsupported zero_point convention {full.get('zero_point')!r}")
            self.full = full
            self.modules = full["modules"]
            self.chosen: dict[str, str] = {}     # prefix -> method class name (for tests and logs)

        def __repr__(self):
            return f"M3GPTQConfig({len(self.modules)} modules)"

        @classmethod
        def get_name(cls):
            return QUANT_METHOD

        @classmethod
        def get_supported_act_dtypes(cls):
            return [torch.bfloat16, torch.float16]

        @classmethod
        def get_min_capability(cls):
            return 75

        @staticmethod
        def get_config_filenames():
            return []

        @classmethod
        def from_config(cls, config):
            return cls(config)

        @classmethod
        def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
            return QUANT_METHOD if (hf_quant_cfg or {}).get("quant_method") == QUANT_METHOD else None

        def get_quant_method(self, layer, prefix):
            method = self._choose(layer, prefix)
            if method is not None:
                self.chosen[prefix] = CHOICES[prefix] = type(method).__name__
            return method

        def _choose(self, layer, prefix):
            from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
            if self.full.get("layout") == "vl":
                # VL class (m3-convert --keep-vision): the text model is nested under language_model.; the
                # modules map keeps the official text names. Never strip blindly: MTP layers (bare
                # model.layers.K) would collide with the main model's layer K.
                from m3_convert.names import VL_TEXT_PREFIX, VLLM_VISION_PREFIX, out_layer
                if prefix.startswith(VLLM_VISION_PREFIX):
                    return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
                k = out_layer(prefix)
                if prefix == "lm_head" or (k is not None and k < int(self.full.get("mtp_blocks") or 0)):
                    # vLLM's MTP drafter (prefix ""): its block K is model.layers.K.*; m3-convert --keep-mtp writes it bf16
                    if isinstance(layer, LinearBase):
                        return UnquantizedLinearMethod()
                    if hasattr(layer, "moe_config") and hasattr(layer, "global_num_experts"):
                        from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
                        return UnquantizedFusedMoEMethod(layer.moe_config)
                    return None
                if not prefix.startswith(VL_TEXT_PREFIX):
                    raise ValueError(f"m3_gptq: layer {prefix} is under neither {VL_TEXT_PREFIX} nor {VLLM_VISION_PREFIX} "
                                     "(VL checkpoint written by m3-convert --keep-vision)")
                prefix = prefix[len(VL_TEXT_PREFIX):]
            gpu = _has_gpu_kernels()
            if isinstance(layer, LinearBase):
                name, bits, group = decide("linear", prefix, self.modules, gpu=gpu)
                if name == "UnquantizedLinearMethod":
                    return UnquantizedLinearMethod()
                if name == "AutoGPTQLinearMethod":
                    src_bits, _ = resolve_linear(prefix, self.modules)
                    if src_bits != bits:
                        log.warning("m3_gptq: %s: %d-bit codes promoted to %d bits at load (exact; %.2fx the memory)",
                                    prefix, src_bits, bits, bits / src_bits)
                    return _promoting_linear_class()(_gptq_config(bits, group), src_bits)
                return _reference_linear_class()(bits, group)   # no GPU kernels here: exact CPU reference
            if hasattr(layer, "moe_config") and hasattr(layer, "global_num_experts"):   # FusedMoE (<0.30) / RoutedExperts
                name, width, group = decide("moe", prefix, self.modules, gpu=gpu, num_experts=layer.global_num_experts)
                if name == "UnquantizedFusedMoEMethod":
                    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
                    return UnquantizedFusedMoEMethod(layer.moe_config)
                _, _, per = resolve_moe(prefix, self.modules, layer.global_num_experts)
                return _moe_method(width, group, per, prefix, layer.moe_config)
            return None   # embeddings, lm_head, attention: vLLM's defaults (bf16)

    return M3GPTQConfig


def _gptq_config(bits, group):
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    return AutoGPTQConfig(weight_bits=bits, group_size=group, desc_act=False, is_sym=True,
                          lm_head_quantized=False, dynamic={}, full_config={})


@functools.lru_cache(maxsize=None)
def _promoting_linear_class():
    """vLLM's AutoGPTQLinearMethod, with checkpoint codes of fewer bits promoted while loading."""
    from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQLinearMethod

    @register_weight_loader_v2_supported_method
    class M3PromotingGPTQLinearMethod(AutoGPTQLinearMethod):
        def __init__(self, quant_config, src_bits):
            super().__init__(quant_config)
            self.src_bits = src_bits

        def create_weights(self, layer, *args, **kwargs):
            width, bits = self.quant_config.weight_bits, self.src_bits
            orig = kwargs.get("weight_loader")
            if bits != width and orig is not None:
                def loader(param, loaded_weight, *a, **k):
                    if param is getattr(layer, "qweight", None):
                        loaded_weight = _promoted(loaded_weight, bits, width, zeros=False)
                    elif param is getattr(layer, "qzeros", None):
                        loaded_weight = _promoted(loaded_weight, bits, width, zeros=True)
                    return orig(param, loaded_weight, *a, **k)
                kwargs["weight_loader"] = loader
            super().create_weights(layer, *args, **kwargs)

    return M3PromotingGPTQLinearMethod


@functools.lru_cache(maxsize=None)
def _reference_linear_class():
    """Exact, portable GPTQ linear: vLLM's own parameter classes and loaders, decode after loading."""
    import torch
    from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    @register_weight_loader_v2_supported_method
    class M3ReferenceGPTQLinearMethod(LinearMethodBase):
        def __init__(self, bits, group):
            self.bits, self.group = bits, group

        def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                           params_dtype, **extra):
            out = sum(output_partition_sizes)
            pf = Fraction(32, self.bits)
            loader = extra.get("weight_loader")
            qweight = PackedvLLMParameter(data=torch.empty(int(input_size_per_partition / pf), out, dtype=torch.int32),
                                          input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf, weight_loader=loader)
            qzeros = PackedvLLMParameter(data=torch.empty(input_size_per_partition // self.group, int(out / pf), dtype=torch.int32),
                                         input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf, weight_loader=loader)
            scales = GroupQuantScaleParameter(data=torch.empty(input_size_per_partition // self.group, out, dtype=torch.float16),
                                              input_dim=0, output_dim=1, weight_loader=loader)
            layer.register_parameter("qweight", qweight)
            layer.register_parameter("qzeros", qzeros)
            layer.register_parameter("scales", scales)
            layer.m3_params_dtype = params_dtype

        def process_weights_after_loading(self, layer):
            from m3_convert import gptq
            w = gptq.dequantize(layer.qweight.data.numpy(), layer.qzeros.data.numpy(), layer.scales.data.numpy())
            weight = torch.from_numpy(w).to(layer.m3_params_dtype)
            for n in ("qweight", "qzeros", "scales"):
                delattr(layer, n)
            layer.register_parameter("weight", torch.nn.Parameter(weight.to(layer.m3_params_dtype), requires_grad=False))

        def apply(self, layer, x, bias=None):
            return torch.nn.functional.linear(x, layer.weight, bias)

    return M3ReferenceGPTQLinearMethod


def _moe_method(width, group, per_expert_bits, prefix, moe_config):
    """vLLM's GPTQ MoE method at ``width`` bits, with lossless promotion of narrower experts at load time."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQMoEMethod

    promoted = sum(1 for b in per_expert_bits.values() if b != width)
    if promoted:
        log.warning("m3_gptq: %s: %d of %d expert matrices promoted to %d bits at load (bits %s); "
                    "the layer's experts take %.2fx the memory of their stored codes", prefix, promoted,
                    len(per_expert_bits), width, sorted(set(per_expert_bits.values())),
                    width * len(per_expert_bits) / sum(per_expert_bits.values()))

    cls = _promoting_moe_class(AutoGPTQMoEMethod if _has_gpu_kernels() else _reference_moe_class())
    return cls(_gptq_config(width, group), moe_config, prefix, per_expert_bits)


@functools.lru_cache(maxsize=None)
def _promoting_moe_class(base):
    """``base`` (vLLM's AutoGPTQMoEMethod, or the CPU reference) + load-time promotion + SwiGLU parameters."""
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQMoEMethod

    class _Promoting(base):
        def __init__(self, quant_config, moe, prefix, per_expert_bits):
            super().__init__(quant_config, moe)
            self.m3_prefix, self.m3_bits = prefix, per_expert_bits

        def get_fused_moe_quant_config(self, layer):
            # vLLM 0.26's GPTQ MoE method hands no SwiGLU parameters to the Marlin experts, which then
            # stop on "SWIGLUOAI_UNINTERLEAVE requires clamp_limit" (and would use alpha 1, beta 0);
            # 0.32+ fall back to the MoE config themselves. Supply M3's swiglu_limit/alpha/beta here.
            qc = super().get_fused_moe_quant_config(layer)
            if qc is not None:
                for attr, src in (("gemm1_clamp_limit", "swiglu_limit"), ("gemm1_alpha", "swiglu_alpha"),
                                  ("gemm1_beta", "swiglu_beta")):
                    if getattr(qc, attr, None) is None and getattr(self.moe, src, None) is not None:
                        setattr(qc, attr, getattr(self.moe, src))
            return qc

        def create_weights(self, layer, *args, **kwargs):
            width, group = self.quant_config.weight_bits, self.quant_config.group_size
            if base is AutoGPTQMoEMethod:
                hidden = kwargs.get("hidden_size", args[1] if len(args) > 1 else None)
                inter = kwargs.get("intermediate_size_per_partition", args[2] if len(args) > 2 else None)
                problem = marlin_moe_shape_problem(hidden, inter, group) if hidden and inter else None
                if problem:
                    raise ValueError(f"m3_gptq: {self.m3_prefix}: {problem}")
            super().create_weights(layer, *args, **kwargs)
            for pname in ("w13_qweight", "w13_qzeros", "w2_qweight", "w2_qzeros"):
                p = getattr(layer, pname)
                p.weight_loader = _promoting_loader(p.weight_loader, self.m3_prefix, self.m3_bits, width,
                                                    pname.endswith("qzeros"))

    _Promoting.__name__ = base.__name__   # what the logs and tests report
    return _Promoting


def _promoted(loaded_weight, bits, width, zeros):
    """A checkpoint qweight/qzeros tensor re-encoded at ``width`` bits (exact; m3_convert.gptq.promote)."""
    import torch

    from m3_convert import gptq
    if bits == width:
        return loaded_weight
    return torch.from_numpy(gptq.promote_packed(loaded_weight.numpy(), bits, width, "qzeros" if zeros else "qweight"))


def _promoting_loader(orig, prefix, per_expert_bits, width, is_zeros):
    def loader(param, loaded_weight, weight_name, shard_id, expert_id, **kw):
        bits = per_expert_bits.get(f"{prefix}.{expert_id}.{shard_id}", width)
        loaded_weight = _promoted(loaded_weight, bits, width, zeros=is_zeros)
        return orig(param, loaded_weight, weight_name, shard_id=shard_id, expert_id=expert_id, **kw)
    return loader


@functools.lru_cache(maxsize=None)
def _reference_moe_class():
    """GPTQ MoE parameters exactly as vLLM's AutoGPTQMoEMethod makes them, with no GPU kernel selection."""
    import torch
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQMoEMethod

    class M3ReferenceGPTQMoEMethod(AutoGPTQMoEMethod):
        def __init__(self, quant_config, moe):
            FusedMoEMethodBase.__init__(self, moe)      # skips select_wna16_moe_backend (GPU kernels only)
            self.quant_config = quant_config
            self.input_dtype = None
            self.use_marlin = False

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
            super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra)
            for n in ("w13_scales", "w2_scales"):     # keep the checkpoint's fp16 scales exact
                p = getattr(layer, n)
                p.data = torch.empty_like(p.data, dtype=torch.float16)

        def process_weights_after_loading(self, layer):
            pass   # the CPU check inspects the loaded parameters; there is no CPU MoE kernel to feed

        def get_fused_moe_quant_config(self, layer):
            return None

        def apply(self, *a, **k):
            raise NotImplementedError("m3_gptq reference MoE method: no CPU forward (weights-only check)")

    return M3ReferenceGPTQMoEMethod
