"""The routing of the ``m3_gptq`` quantization config (the class itself, ``M3GPTQConfig``, is in :mod:`.methods`):
prefix routing (text, VL, MTP drafter, vision tower) -> the pure decision (:mod:`.decide`) -> a method
(:mod:`.methods`) with the kernel the platform offers (:mod:`.linear`, :mod:`.moe`). Imports no vLLM at module
level; :func:`register` is the plugin's entry point.

Platforms: :class:`CudaPlatform` on a CUDA GPU (humming-kernels where it imports, else promotion to vLLM's
Marlin/Machete widths, logged). m3-verify's CPU check installs its own (exact reference kernels, the same
decisions and parameters) with :func:`use_platform`; without one, a platform with no GPU kernels is refused.
"""
from __future__ import annotations

import functools
import logging

from ..quantcfg import QUANT_METHOD
from . import compat, decide

log = logging.getLogger("m3_convert.serve")
CHOICES: dict[str, str] = {}    # layer prefix -> "method/kernel" chosen in this process (logs, GPU check, verify)
_platform = None


class CudaPlatform:
    """vLLM's own GPTQ methods for 4/8 bits, humming-kernels for the rest (or promotion without it)."""

    @property
    def kernels(self):
        return _cuda_kernels()

    def linear_method(self, d):
        from .linear import HummingLinearKernel
        from .methods import M3GPTQLinearMethod, M3PromotingGPTQLinearMethod
        if d.kernel == decide.HUMMING:
            return M3GPTQLinearMethod(d, HummingLinearKernel())
        return M3PromotingGPTQLinearMethod(d)

    def moe_method(self, d, moe):
        from .methods import M3HummingMoEMethod, M3MarlinMoEMethod
        from .moe import HummingMoEKernel, WmixMoEKernel
        if d.kernel == decide.HUMMING:
            kernel = compat.moe_kernel()
            if kernel == "wmix":
                _wmix_note()
                return M3HummingMoEMethod(d, moe, WmixMoEKernel())
            if kernel == "hgemv":
                _hgemv_note()
                return M3HummingMoEMethod(d, moe, HummingMoEKernel(decode="hgemv"))
            return M3HummingMoEMethod(d, moe, HummingMoEKernel())
        return M3MarlinMoEMethod(d, compat.marlin_moe_config(moe))


@functools.lru_cache(maxsize=1)
def _wmix_note():
    log.info("m3_gptq: M3_MOE_KERNEL=wmix: the mixed MoE layers on the wmix kernels, for batch-1 latency: on an "
             "H100 with vLLM 0.33 (2026-12-08, M3's widths, uniform routing, 8 layers) 1.40x humming's batch-1 "
             "tok/s and on a par at batch 32 (one call), but 0.62x its 2k prefill (gpu/README.md, issue 25)")


@functools.lru_cache(maxsize=1)
def _hgemv_note():
    log.info("m3_gptq: M3_MOE_KERNEL=hgemv: the mixed MoE layers on humming's weights, decode (up to a row per "
             "expert) by one hgemv launch per sublayer, larger batches by humming's width parts; within 1e-6 of float64 "
             "on the CPU (tests/test_hgemv.py), not yet run on a GPU (issue 25)")


@functools.lru_cache(maxsize=1)
def _cuda_kernels():
    problem = compat.humming_problem()
    if problem:
        log.warning("m3_gptq: humming-kernels not used (%s): GPTQ layers of other widths than 4/8 and MoE layers "
                    "of mixed widths are promoted (exact, more memory)", problem)
        return decide.PROMOTE_KERNELS
    return decide.GPU_KERNELS


def use_platform(platform) -> None:
    """Install the methods/kernels provider for this process (m3_verify's CPU check)."""
    global _platform
    _platform = platform


def current_platform():
    if _platform is not None:
        return _platform
    from vllm.platforms import current_platform as vp
    if not vp.is_cuda_alike():
        raise decide.ServeError("m3_gptq serves on CUDA GPUs (this platform has no GPTQ kernels; m3-verify --vllm "
                                "checks the weights on a CPU)")
    return CudaPlatform()


def route(prefix: str, full: dict):
    """vLLM layer prefix -> (official text prefix, None), or (None, "bf16") for layers m3-convert writes bf16
    outside the text model (the vision tower; the MTP drafter's block, bare ``model.layers.K`` below
    ``mtp_blocks``), under the VL layout (--keep-vision) where the text model sits under ``language_model.``."""
    if full.get("layout") != "vl":
        return prefix, None
    from ..names import VL_TEXT_PREFIX, VLLM_VISION_PREFIX, out_layer
    if prefix.startswith(VLLM_VISION_PREFIX):
        return None, "bf16"
    k = out_layer(prefix)
    if prefix == "lm_head" or (k is not None and k < int(full.get("mtp_blocks") or 0)):
        return None, "bf16"     # vLLM's MTP drafter (prefix ""): its block K is model.layers.K.*, written bf16
    if not prefix.startswith(VL_TEXT_PREFIX):
        raise decide.ServeError(f"m3_gptq: layer {prefix} is under neither {VL_TEXT_PREFIX} nor {VLLM_VISION_PREFIX} "
                                "(VL checkpoint written by m3-convert --keep-vision)")
    return prefix[len(VL_TEXT_PREFIX):], None


def full_config_problem(full: dict) -> str | None:
    """Why the plugin refuses this ``quantization_config`` (None: it serves it)."""
    if full.get("quant_method") != QUANT_METHOD or not isinstance(full.get("modules"), dict):
        return "m3_gptq: quantization_config lacks the m3-convert per-module map"
    problem = compat.vllm_version_problem()
    if problem:
        return problem
    if full.get("desc_act") is not False:     # vLLM drops every g_idx tensor (base_config.py, 0.32/0.33)
        return ("m3_gptq: quantization_config.desc_act must be false: vLLM drops g_idx, so an act-order checkpoint "
                "would be served wrong (m3-convert refuses one)")
    if full.get("zero_point") != "gptq_v1":
        return f"m3_gptq: unsupported zero_point convention {full.get('zero_point')!r}"
    return None


def choose(cfg, layer, prefix):
    """(method, label) for one vLLM layer of a checkpoint under ``cfg`` (M3GPTQConfig); (None, None): vLLM's
    default (embeddings, lm_head, attention). The decision is recorded in ``cfg.decisions``."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    from ..names import fused_shards
    text, bf16 = route(prefix, cfg.full)
    is_moe = compat.is_moe_layer(layer)
    if bf16:
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod(), None
        return (_unquantized_moe(layer), None) if is_moe else (None, None)
    if isinstance(layer, LinearBase):
        platform = current_platform()
        d = decide.select_linear(text, cfg.modules, fused_shards(), platform.kernels)
        cfg.decisions[prefix] = d
        if d.kernel == decide.BF16:
            return UnquantizedLinearMethod(), None
        if d.note:
            log.warning("m3_gptq: %s: %s (%.2fx the memory of the stored codes)", prefix, d.note, d.width / d.bits)
        m = platform.linear_method(d)
        return m, f"{type(m).__name__}/{d.kernel}{d.width}"
    if is_moe:
        platform = current_platform()
        mc = layer.moe_config
        d = decide.select_moe(text, cfg.modules, layer.global_num_experts, mc.hidden_dim,
                              mc.intermediate_size_per_partition, platform.kernels)
        cfg.decisions[prefix] = d
        if d.kernel == decide.BF16:
            return _unquantized_moe(layer), None
        if d.note:
            log.warning("m3_gptq: %s: %s", prefix, d.note)
        m = platform.moe_method(d, layer.moe_config)
        widths = "+".join(f"{p.name}x{len(p.slots)}" for p in d.parts) if d.parts else f"{d.kernel}{d.width}"
        return m, f"{type(m).__name__}/{widths}"
    return None, None


def _unquantized_moe(layer):
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    return UnquantizedFusedMoEMethod(layer.moe_config)


_registered = False


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
    from .methods import M3GPTQConfig
    register_quantization_config(QUANT_METHOD)(M3GPTQConfig)
    _registered = True
