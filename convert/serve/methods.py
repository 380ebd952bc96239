"""The m3_gptq plugin's vLLM classes, at module level: the quantization config and the linear and MoE methods.

This module imports vLLM when it is imported, so only vLLM's side imports it: :func:`.routing.register` (the
``vllm.general_plugins`` entry point), the platforms that build methods (:class:`.routing.CudaPlatform`,
m3_verify's CPU platform) and the GPU checks. The pure decisions (:mod:`.decide`), version differences
(:mod:`.compat`), loaders and kernels (:mod:`.linear`, :mod:`.moe`) stay importable without vLLM.

Modelled on vLLM's own methods (``auto_gptq.py``, ``moe_wna16.py``): a method creates the parameters and wraps the
loader; a kernel object chosen by the platform (humming-kernels on a GPU, m3_verify's exact reference on a CPU)
prepares and runs them.

* :class:`M3GPTQConfig`: the per-module settings m3-convert writes; routes each vLLM layer to a method.
* :class:`M3GPTQLinearMethod`: GPTQ parameters at the stored width, as vLLM's GPTQ methods lay them out.
* :class:`M3PromotingGPTQLinearMethod`: vLLM's AutoGPTQLinearMethod (Machete/Marlin) at 4/8 bits, narrower codes
  promoted while loading (exact) where humming is unavailable.
* :class:`M3HummingMoEMethod`: every expert at its stored width, in one part per (sublayer, width).
* :class:`M3MarlinMoEMethod`: vLLM's AutoGPTQMoEMethod (Marlin WNA16) at the decision's width, narrower experts
  promoted while loading; :class:`PromotingMoEMixin` is the promotion, shared with m3_verify's CPU reference.
"""
from __future__ import annotations

from fractions import Fraction

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQLinearMethod, AutoGPTQMoEMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from ..quantcfg import QUANT_METHOD
from . import compat, decide
from .routing import CHOICES, choose, full_config_problem
from .linear import LinearShape, checking_loader
from .moe import create_expert_params, promoting_loader


class M3GPTQConfig(QuantizationConfig):
    """Per-module GPTQ settings written by m3-convert (docs/FORMAT.md#m3-gptq-contract)."""

    def __init__(self, full: dict):
        super().__init__()
        problem = full_config_problem(full)
        if problem:
            raise ValueError(problem)
        self.full = full
        self.modules = full["modules"]
        self.chosen: dict[str, str] = {}     # prefix -> method class name (tests and logs)
        self.decisions: dict = {}            # prefix -> LinearDecision / MoeDecision

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
        method, label = choose(self, layer, prefix)
        if method is not None:
            self.chosen[prefix] = CHOICES[prefix] = label or type(method).__name__
        return method


@register_weight_loader_v2_supported_method
class M3GPTQLinearMethod(LinearMethodBase):
    """GPTQ parameters at the stored width (``qweight`` [in*b/32, out], ``qzeros`` [in/g, out*b/32], ``scales``
    [in/g, out] float16, vLLM's own parameter classes, so tensor-parallel slicing and fused shards are vLLM's);
    ``kernel`` prepares and runs them (HummingLinearKernel on a GPU)."""

    def __init__(self, decision, kernel):
        self.decision, self.kernel = decision, kernel

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra):
        bits, group = self.decision.bits, self.decision.group
        out = sum(output_partition_sizes)
        if input_size_per_partition % group:
            raise ValueError(f"m3_gptq: {self.decision.prefix}: {input_size_per_partition} inputs per rank are not "
                             f"whole {group}-wide groups (lower the tensor-parallel size)")
        pf = Fraction(32, bits)
        loader = checking_loader(extra.get("weight_loader"), layer, bits, bits, self.decision.prefix)
        qweight = PackedvLLMParameter(data=torch.empty(int(input_size_per_partition / pf), out, dtype=torch.int32),
                                      input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf, weight_loader=loader)
        qzeros = PackedvLLMParameter(data=torch.empty(input_size_per_partition // group, int(out / pf), dtype=torch.int32),
                                     input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf, weight_loader=loader)
        scales = GroupQuantScaleParameter(data=torch.empty(input_size_per_partition // group, out, dtype=torch.float16),
                                          input_dim=0, output_dim=1, weight_loader=loader)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", qzeros)
        layer.register_parameter("scales", scales)
        layer.m3_gptq = LinearShape(bits, group, out, input_size_per_partition, params_dtype)

    def process_weights_after_loading(self, layer):
        self.kernel.prepare(layer)

    def apply(self, layer, x, bias=None):
        return self.kernel.apply(layer, x, bias)


@register_weight_loader_v2_supported_method
class M3PromotingGPTQLinearMethod(AutoGPTQLinearMethod):
    """vLLM's AutoGPTQLinearMethod (Machete/Marlin) at the decision's width, with checkpoint codes of fewer bits
    promoted while loading (m3_convert.gptq.promote: exact) and every qzeros checked symmetric."""

    def __init__(self, decision):
        super().__init__(compat.gptq_config(decision.width, decision.group))
        self.decision = decision

    def create_weights(self, layer, *args, **kwargs):
        d = self.decision
        if kwargs.get("weight_loader") is not None:
            kwargs["weight_loader"] = checking_loader(kwargs["weight_loader"], layer, d.bits, d.width, d.prefix)
        super().create_weights(layer, *args, **kwargs)


class M3HummingMoEMethod(FusedMoEMethodBase):
    """Every expert at its stored width: the decision's parts (one per sublayer and width) held one after another
    in one flat tensor per leaf (``w13_qweight`` ... ``w2_scales``, the names vLLM's MiniMax-M3 loader asks for),
    each checkpoint expert tensor loaded into its slot (:func:`.moe.load_expert`); ``kernel`` turns each part into
    a humming MoE layer and runs them (GPU), or leaves them as loaded (m3_verify's CPU reference)."""

    def __init__(self, decision, moe, kernel):
        super().__init__(moe)
        self.decision, self.kernel = decision, kernel

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        problem = compat.moe_contract_problem(layer)
        if problem is None and num_experts != layer.global_num_experts:
            problem = f"{num_experts} local of {layer.global_num_experts} experts (expert parallelism): use tensor parallelism"
        if problem:
            raise decide.ServeError(f"m3_gptq: {self.decision.prefix}: vLLM asks the MoE method for {problem}")
        create_expert_params(layer, self.decision, hidden_size, intermediate_size_per_partition, num_experts,
                             params_dtype)

    def get_fused_moe_quant_config(self, layer):
        return compat.unquantized_moe_quant_config()

    def process_weights_after_loading(self, layer):
        if getattr(layer, "m3_prepared", False):
            return
        layer.m3_prepared = True
        self.kernel.prepare(layer)

    def apply(self, layer, x, topk_weights, topk_ids, *args, **kwargs):
        return self.kernel.apply(layer, x, topk_weights, topk_ids)


class PromotingMoEMixin:
    """Put before a GPTQ MoE method class taking ``(quant_config, moe)``: built from a decision instead, at the
    decision's width; narrower experts promoted while loading (exact), every qzeros checked symmetric, SwiGLU
    parameters supplied to vLLM 0.26's Marlin experts (compat.fill_swiglu)."""

    def __init__(self, decision, moe):
        super().__init__(compat.gptq_config(decision.width, decision.group), moe)
        self.decision = decision

    def get_fused_moe_quant_config(self, layer):
        qc = super().get_fused_moe_quant_config(layer)
        compat.fill_swiglu(qc, self.moe)
        return qc

    def create_weights(self, layer, *args, **kwargs):
        super().create_weights(layer, *args, **kwargs)
        for pname in ("w13_qweight", "w13_qzeros", "w2_qweight", "w2_qzeros"):
            p = getattr(layer, pname)
            p.weight_loader = promoting_loader(p.weight_loader, self.decision, pname.rsplit("_", 1)[1])


class M3MarlinMoEMethod(PromotingMoEMixin, AutoGPTQMoEMethod):
    """vLLM's AutoGPTQMoEMethod (Marlin WNA16, asked for by the platform: compat.marlin_moe_config) at the
    decision's width."""
