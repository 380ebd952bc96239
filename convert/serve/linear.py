"""Linear layers of the m3_gptq plugin, without vLLM: what a layer holds (:class:`LinearShape`), the loader wrapper
every GPTQ linear method uses (:func:`checking_loader`) and the GPU kernel (:class:`HummingLinearKernel`). The
methods themselves (``M3GPTQLinearMethod``, ``M3PromotingGPTQLinearMethod``) are in :mod:`.methods`.

Every qzeros tensor is checked to hold the symmetric zero (2^(b-1) - 1): the kernels ignore zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LinearShape:
    """What a GPTQ linear holds, as its method created it: ``bits`` and ``group`` of the codes, ``n`` outputs and
    ``k`` inputs on this rank, ``dtype`` of the activations."""
    bits: int
    group: int
    n: int
    k: int
    dtype: object


def checked_codes(loaded_weight, leaf: str, bits: int, width: int, where: str):
    """A checkpoint GPTQ tensor as a method holds it: qzeros checked to hold the symmetric zero, qweight and
    qzeros re-encoded from ``bits`` to ``width`` where the method holds them wider (exact); scales unchanged.
    Every loader of the plugin (linear, MoE parts, promoting Marlin) passes its tensors through here."""
    if leaf == "qzeros":
        check_symmetric_zeros(loaded_weight, bits, where)
    if leaf in ("qweight", "qzeros"):
        return promoted(loaded_weight, bits, width, leaf)
    return loaded_weight


def checking_loader(orig, layer, bits, width, prefix):
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
        shape = layer.m3_gptq
        bits, group, n, k, dtype = shape.bits, shape.group, shape.n, shape.k, shape.dtype
        dev = layer.qweight.device
        qweight, scales = layer.qweight.data, layer.scales.data.to(dtype)
        for name in ("qweight", "qzeros", "scales"):
            delattr(layer, name)
        compat.humming_layer(layer, bits, group, qweight, scales, n, k, dtype, dev)
        layer.register_buffer("locks", compat.humming_locks(dev), persistent=False)
        layer.m3_cc = compat.humming_compute_config("dense")
        layer.m3_tuning = compat.json.dumps(compat.humming_tuning(layer, "", "dense"))
        torch.cuda.synchronize(dev)

    def apply(self, layer, x, bias=None):
        from humming.layer import HummingMethod
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], layer.m3_gptq.n)
        y = HummingMethod.forward_layer(layer=layer, inputs=flat, compute_config=layer.m3_cc, tuning_config=layer.m3_tuning)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias


def promoted(loaded_weight, bits: int, width: int, leaf: str):
    """A checkpoint qweight/qzeros tensor re-encoded at ``width`` bits (exact; m3_convert.gptq.promote)."""
    import torch

    from .. import gptq
    if bits == width:
        return loaded_weight
    return torch.from_numpy(gptq.promote_packed(loaded_weight.cpu().numpy(), bits, width, leaf))
