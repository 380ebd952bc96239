"""Linear layers of the m3_gptq plugin: the methods create the parameters and wrap the loader; a kernel
object (humming on the GPU, m3_verify's exact reference on a CPU) turns them into what it runs.

* :func:`gptq_linear_class` ``M3GPTQLinearMethod``: GPTQ parameters at the stored width, exactly as vLLM's
  GPTQ methods lay them out (``qweight`` [in*b/32, out], ``qzeros`` [in/g, out*b/32], ``scales`` [in/g, out]
  float16, vLLM's own parameter classes, so tensor-parallel slicing and fused shards are vLLM's);
  served by ``HummingLinearKernel`` (2/3-bit, and any width where humming is chosen).
* :func:`promoting_gptq_class` vLLM's ``AutoGPTQLinearMethod`` (Machete/Marlin) for 4/8 bits, with codes
  of fewer bits promoted while loading when humming is unavailable (exact; logged).

Every qzeros tensor is checked to hold the symmetric zero (2^(b-1) - 1): the kernels ignore zeros.
"""
from __future__ import annotations

import functools
from fractions import Fraction

from . import compat


def check_symmetric_zeros(qzeros, bits: int, where: str) -> None:
    """Every stored zero of a symmetric GPTQ tensor is 2^(b-1) - 1 (GPTQ v1): the kernels (humming, Marlin,
    Machete) ignore zeros, so anything else would be served wrong without an error."""
    import numpy as np

    from .. import gptq
    words = qzeros.detach().cpu().numpy() if hasattr(qzeros, "detach") else np.asarray(qzeros)
    pattern = gptq.symmetric_zero_words(bits)
    w = words.view(np.uint32).reshape(-1)
    if w.size % pattern.size or not np.array_equal(w.reshape(-1, pattern.size), np.broadcast_to(pattern, (w.size // pattern.size, pattern.size))):
        raise ValueError(f"m3_gptq: {where}.qzeros: not the symmetric {bits}-bit zero point {2 ** (bits - 1)} everywhere "
                         "(the kernels assume symmetric quantization); this checkpoint cannot be served")


@functools.lru_cache(maxsize=None)
def gptq_linear_class():
    import torch
    from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    @register_weight_loader_v2_supported_method
    class M3GPTQLinearMethod(LinearMethodBase):
        """GPTQ parameters at the stored width; ``kernel`` prepares and runs them."""

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
            loader = _checking_loader(extra.get("weight_loader"), layer, bits, bits, self.decision.prefix)
            qweight = PackedvLLMParameter(data=torch.empty(int(input_size_per_partition / pf), out, dtype=torch.int32),
                                          input_dim=0, output_dim=1, packed_dim=0, packed_factor=pf, weight_loader=loader)
            qzeros = PackedvLLMParameter(data=torch.empty(input_size_per_partition // group, int(out / pf), dtype=torch.int32),
                                         input_dim=0, output_dim=1, packed_dim=1, packed_factor=pf, weight_loader=loader)
            scales = GroupQuantScaleParameter(data=torch.empty(input_size_per_partition // group, out, dtype=torch.float16),
                                              input_dim=0, output_dim=1, weight_loader=loader)
            layer.register_parameter("qweight", qweight)
            layer.register_parameter("qzeros", qzeros)
            layer.register_parameter("scales", scales)
            layer.m3_gptq = (bits, group, out, input_size_per_partition, params_dtype)

        def process_weights_after_loading(self, layer):
            self.kernel.prepare(layer)

        def apply(self, layer, x, bias=None):
            return self.kernel.apply(layer, x, bias)

    return M3GPTQLinearMethod


def checked_codes(loaded_weight, leaf: str, bits: int, width: int, where: str):
    """A checkpoint GPTQ tensor as a method holds it: qzeros checked to hold the symmetric zero, qweight and
    qzeros re-encoded from ``bits`` to ``width`` where the method holds them wider (exact); scales unchanged.
    Every loader of the plugin (linear, MoE parts, promoting Marlin) passes its tensors through here."""
    if leaf == "qzeros":
        check_symmetric_zeros(loaded_weight, bits, where)
    if leaf in ("qweight", "qzeros"):
        return promoted(loaded_weight, bits, width, leaf)
    return loaded_weight


def _checking_loader(orig, layer, bits, width, prefix):
    """``orig`` (vLLM's loader of a Linear's GPTQ parameters) behind :func:`checked_codes`."""
    def loader(param, loaded_weight, *a, **k):
        leaf = next((n for n in ("qweight", "qzeros") if param is getattr(layer, n, None)), None)
        if leaf is not None:
            shard = a[0] if a else k.get("loaded_shard_id")
            loaded_weight = checked_codes(loaded_weight, leaf, bits, width,
                                          prefix + (f"[shard {shard}]" if shard is not None else ""))
        return orig(param, loaded_weight, *a, **k)
    return loader


class HummingLinearKernel:
    """humming-kernels' dense GEMM on the GPTQ codes at their stored width (batch-invariant mode)."""
    name = "humming"

    def prepare(self, layer):
        import torch
        from humming.layer import HummingMethod
        bits, group, n, k, dtype = layer.m3_gptq
        dev = layer.qweight.device
        schema, tensors = compat.humming_schema_tensors(bits, group, layer.qweight.data, layer.scales.data.to(dtype), dtype)
        for name in ("qweight", "qzeros", "scales"):
            delattr(layer, name)
        for name, t in tensors.items():
            HummingMethod.may_set_param(layer, name, t.to(dev))
        HummingMethod.prepare_layer_meta(layer=layer, shape_n=n, shape_k=k, weight_schema=schema, pad_n_to_multiple=256,
                                         pad_k_to_multiple=128, torch_dtype=dtype)
        HummingMethod.transform_humming_layer(layer)
        layer.register_buffer("locks", compat.humming_locks(dev), persistent=False)
        layer.m3_cc = compat.humming_compute_config("dense")
        layer.m3_tuning = compat.json.dumps(compat.humming_tuning(layer, "", "dense"))
        torch.cuda.synchronize(dev)

    def apply(self, layer, x, bias=None):
        from humming.layer import HummingMethod
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], layer.m3_gptq[2])
        y = HummingMethod.forward_layer(layer=layer, inputs=flat, compute_config=layer.m3_cc, tuning_config=layer.m3_tuning)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias


@functools.lru_cache(maxsize=None)
def promoting_gptq_class():
    """vLLM's AutoGPTQLinearMethod (Machete/Marlin), with checkpoint codes of fewer bits promoted while
    loading (m3_convert.gptq.promote: exact) and every qzeros checked symmetric."""
    from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQLinearMethod

    @register_weight_loader_v2_supported_method
    class M3PromotingGPTQLinearMethod(AutoGPTQLinearMethod):
        def __init__(self, decision):
            super().__init__(compat.gptq_config(decision.width, decision.group))
            self.decision = decision

        def create_weights(self, layer, *args, **kwargs):
            d = self.decision
            if kwargs.get("weight_loader") is not None:
                kwargs["weight_loader"] = _checking_loader(kwargs["weight_loader"], layer, d.bits, d.width, d.prefix)
            super().create_weights(layer, *args, **kwargs)

    return M3PromotingGPTQLinearMethod


def promoted(loaded_weight, bits: int, width: int, leaf: str):
    """A checkpoint qweight/qzeros tensor re-encoded at ``width`` bits (exact; m3_convert.gptq.promote)."""
    import torch

    from .. import gptq
    if bits == width:
        return loaded_weight
    return torch.from_numpy(gptq.promote_packed(loaded_weight.cpu().numpy(), bits, width, leaf))
