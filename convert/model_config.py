"""config.json: transformers' MiniMaxM3VLConfig -> the form vLLM serves with no overrides.

vLLM 0.32's ``MiniMaxM3Config`` (``vllm/transformers_utils/configs/minimax_m3.py``)
builds ``MiniMaxM3TextConfig`` from ``text_config`` and fills every missing field
with the *real M3's* default (moe_layer_freq [0]*3+[1]*57, 128 experts, ...), so
a field we forget is silently wrong for any other model.  Therefore every
field the text model reads is written explicitly, each derived from the source:

* ``hidden_act`` "swigluoai" (transformers forces "silu" but computes SwiGLU-OAI
  inline from swiglu_alpha/limit); ``swiglu_beta`` 1.0 when absent (the (up + 1)
  term of the reference activation);
* ``rope_theta`` and ``partial_rotary_factor`` from ``rope_parameters``
  (transformers rotates ``head_dim * partial_rotary_factor`` channels);
* ``moe_layer_freq`` from ``mlp_layer_types`` ("sparse" -> 1);
* ``sparse_attention_config`` from ``layer_types`` ("minimax_m3_sparse" -> 1) and
  the ``index_*`` fields;
* ``n_shared_experts`` from the source, else ``shared_intermediate_size /
  intermediate_size`` (vLLM sizes the shared expert as intermediate_size * n);
* fixed properties of the transformers architecture: Gemma-style norms
  (x*(1+w)), per-head q/k norm, no attention output gate, sigmoid routing
  with a correction bias.
Values the source does not carry and the architecture does not fix
(``sparse_init_block`` 0, ``sparse_score_type`` "max") get the released M3 values.
"""
from __future__ import annotations

import copy

from . import names, rules
from .errors import CheckpointError

F = "config.json"
#: the source's flat index_* fields -> sparse_attention_config's names (what vLLM reads)
INDEX_FIELDS = (("index_n_heads", "sparse_num_index_heads"), ("index_head_dim", "sparse_index_dim"),
                ("index_block_size", "sparse_block_size"), ("index_topk_blocks", "sparse_topk_blocks"),
                ("index_local_blocks", "sparse_local_block"))


def _need(tc, key, where="text_config"):
    if key not in tc:
        raise CheckpointError(F, f"{where}.{key}", "missing")
    return tc[key]


def _field(tc, key, default=rules.MISSING):
    """``tc[key]`` checked by its rule (rules.TEXT_RULES) before anything computes with it."""
    value = tc.get(key, default)
    problem = rules.value_problem(rules.TEXT_RULES[key]._replace(required=True), value)
    if problem:
        raise CheckpointError(F, f"text_config.{key}", problem)
    return value


def _layer_flags(value, n, path):
    """A per-layer 0/1 list (moe_layer_freq, sparse_attention_freq) of exactly ``n`` entries (rules.layer_flags_problem)."""
    problem = rules.layer_flags_problem(value, n)
    if problem:
        raise CheckpointError(F, f"text_config.{path}", problem)
    return value


def layout_from_text_config(tc: dict) -> names.Layout:
    """Layer kinds from an *official* text_config (moe_layer_freq, sparse_attention_config)."""
    n = _field(tc, "num_hidden_layers")
    moe = _layer_flags(tc.get("moe_layer_freq"), n, "moe_layer_freq")
    sac = tc.get("sparse_attention_config")
    sparse = _layer_flags(sac.get("sparse_attention_freq") if isinstance(sac, dict) else None, n,
                          "sparse_attention_config.sparse_attention_freq")
    return names.Layout(n, tuple(bool(v) for v in sparse), tuple(bool(v) for v in moe), _field(tc, "num_local_experts"),
                        _field(tc, "n_shared_experts"))


def convert_config(src: dict):
    """Source config.json (dict) -> (output config.json dict without quantization_config, Layout): the text config
    vLLM reads, every field it would otherwise fill with the real M3's defaults written explicitly, in steps."""
    if src.get("model_type") == "minimax_m3_vl" and isinstance(src.get("text_config"), dict):
        tc_src = src["text_config"]
    elif src.get("model_type") in ("minimax_m3_vl_text", "minimax_m3_text", "minimax_m3"):
        tc_src = src
    else:
        raise CheckpointError(F, "model_type", f"expected 'minimax_m3_vl' with a text_config, got {src.get('model_type')!r}")
    tc = {k: copy.deepcopy(v) for k, v in tc_src.items() if k not in ("quantization_config", "model_type", "architectures",
                                                                     "layer_types", "mlp_layer_types")}
    n = _field(tc_src, "num_hidden_layers")
    _layer_layout(tc, tc_src, n)
    _activation_and_rope(tc, tc_src)
    _moe_fields(tc, tc_src)
    _check_text_config(tc, tc_src)
    tc["model_type"] = "minimax_m3_text"
    tc["architectures"] = ["MiniMaxM3SparseForCausalLM"]
    tc["torch_dtype"] = "bfloat16"
    tc.pop("dtype", None)
    out = {
        "architectures": ["MiniMaxM3SparseForCausalLM"],
        "model_type": "minimax_m3_vl",
        "torch_dtype": "bfloat16",
        "text_config": tc,
    }
    for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"):
        if k in src:
            out[k] = src[k]
    return out, layout_from_text_config(tc)


def _check_text_config(tc, tc_src):
    """Every field vLLM reads, by the rules m3-verify checks an output with (rules.text_config_problems); the first
    problem stops the run, named as the source spells the field."""
    problems = rules.text_config_problems(tc)
    if problems:
        path, msg = problems[0]
        if path == "rope_theta" and "rope_theta" not in tc_src:
            path = "rope_parameters.rope_theta"
        raise CheckpointError(F, source_spelling(f"text_config.{path}", tc_src), msg)


def source_spelling(text: str, tc_src: dict) -> str:
    """``text`` with the converted index field names (sparse_attention_config.sparse_*) written as the source spells
    them (transformers' flat index_* fields, unless the source nests the converted name itself), for messages about
    the source config."""
    nested = tc_src.get("sparse_attention_config")
    nested = nested if isinstance(nested, dict) else {}
    for flat, legacy in INDEX_FIELDS:
        if flat in tc_src or legacy not in nested:
            text = text.replace(f"text_config.{rules.SAC}{legacy}", f"text_config.{flat}")
    return text


def text_config_of(src: dict) -> dict:
    """The source's text config: ``text_config`` of the VL config, or the config itself (a text-only one)."""
    return src["text_config"] if isinstance(src.get("text_config"), dict) else src


def _layer_layout(tc, tc_src, n):
    """moe_layer_freq from mlp_layer_types, sparse_attention_config from layer_types and the index_* fields."""
    tc["moe_layer_freq"] = _layer_kinds(tc_src, "mlp_layer_types", ("dense", "sparse"), n, tc.get("moe_layer_freq"),
                                        "moe_layer_freq", "cannot tell MoE layers from dense ones")
    sac = tc_src.get("sparse_attention_config")
    sac = {} if sac is None else sac
    if not isinstance(sac, dict):
        raise CheckpointError(F, "text_config.sparse_attention_config", f"must be a JSON object, got {sac!r}")
    sac = dict(sac)
    sac["sparse_attention_freq"] = _layer_kinds(tc_src, "layer_types", ("full_attention", "minimax_m3_sparse"), n,
                                                sac.get("sparse_attention_freq"), "sparse_attention_config",
                                                "cannot tell sparse layers", "sparse_attention_config.sparse_attention_freq")
    for flat, legacy in INDEX_FIELDS:      # (each required: rules.TEXT_RULES)
        if flat in tc_src:
            sac[legacy] = tc_src[flat]
    sac.setdefault("use_sparse_attention", bool(any(sac["sparse_attention_freq"])))
    sac.setdefault("sparse_disable_index_value", list(sac["sparse_attention_freq"]))
    sac.setdefault("sparse_init_block", 0)
    sac.setdefault("sparse_score_type", "max")
    tc["sparse_attention_config"] = sac


def _layer_kinds(tc_src, field, kinds, n, official, official_name, why, official_path=None):
    """One per-layer 0/1 list: from transformers' ``field`` (``kinds``: the names of 0 and 1, one per layer) when the
    source has it, else the official list the source already holds (``official``), checked; missing both, refused."""
    types = tc_src.get(field)
    if types is not None:
        if not isinstance(types, list) or len(types) != n or any(v not in kinds for v in types):
            raise CheckpointError(F, f"text_config.{field}", f"must list '{kinds[0]}'/'{kinds[1]}' for {n} layers")
        return [1 if v == kinds[1] else 0 for v in types]
    if official is None:
        raise CheckpointError(F, f"text_config.{field}", f"missing (and no {official_name}): {why}")
    return _layer_flags(official, n, official_path or official_name)


def _activation_and_rope(tc, tc_src):
    """hidden_act "swigluoai" (transformers forces "silu"), the SwiGLU parameters, rope_theta and
    partial_rotary_factor out of rope_parameters (vLLM reads them flat)."""
    tc["hidden_act"] = "swigluoai"
    tc.setdefault("swiglu_beta", 1.0)      # swiglu_alpha and swiglu_limit: required (_check_text_config)

    rp = tc_src.get("rope_parameters")
    rp = {} if rp is None else rp
    if not isinstance(rp, dict):
        raise CheckpointError(F, "text_config.rope_parameters", f"must be a JSON object, got {rp!r}")
    theta = rp.get("rope_theta", tc_src.get("rope_theta"))
    if theta is None:
        raise CheckpointError(F, "text_config.rope_parameters.rope_theta", "missing (vLLM would silently fall back to its default)")
    if "rope_theta" in tc_src and tc_src["rope_theta"] != theta:
        raise CheckpointError(F, "text_config.rope_theta", f"{tc_src['rope_theta']} disagrees with rope_parameters.rope_theta {theta}")
    tc["rope_theta"] = theta
    head_dim = _field(tc_src, "head_dim")
    prf = rp.get("partial_rotary_factor", tc_src.get("partial_rotary_factor", 1.0))
    problem = rules.value_problem(rules.TEXT_RULES["partial_rotary_factor"], prf)
    if problem:
        where = "rope_parameters.partial_rotary_factor" if "partial_rotary_factor" in rp else "partial_rotary_factor"
        raise CheckpointError(F, f"text_config.{where}", problem)
    rot = int(head_dim * prf)
    if "rotary_dim" in tc_src and tc_src["rotary_dim"] != rot:
        raise CheckpointError(F, "text_config.rotary_dim", f"{tc_src['rotary_dim']} disagrees with head_dim*partial_rotary_factor = {rot}")
    tc["partial_rotary_factor"] = prf
    tc["rotary_dim"] = rot


def _moe_fields(tc, tc_src):
    """n_shared_experts (vLLM builds no shared expert without it), the widths and routing fields vLLM reads."""
    inter = _field(tc_src, "intermediate_size")
    if "n_shared_experts" in tc_src:
        nse = _field(tc_src, "n_shared_experts")
    else:
        sis = _field(tc_src, "shared_intermediate_size", inter)
        if sis % inter:
            raise CheckpointError(F, "text_config.shared_intermediate_size", f"{sis} is not a multiple of intermediate_size {inter}: vLLM cannot build it")
        nse = sis // inter
    tc["n_shared_experts"] = nse
    tc.setdefault("shared_intermediate_size", inter * nse)   # dense_intermediate_size: rules.text_config_problems
    tc.setdefault("scoring_func", "sigmoid")
    tc.setdefault("use_routing_bias", True)
    tc.setdefault("use_gemma_norm", True)
    tc.setdefault("use_qk_norm", True)
    tc.setdefault("qk_norm_type", "per_head")
    tc.setdefault("attention_output_gate", False)


VL_ARCH = "MiniMaxM3SparseForConditionalGeneration"


def vl_config(out: dict, src: dict) -> dict:
    """--keep-vision: the converted config for vLLM's VL class (MiniMaxM3SparseForConditionalGeneration).

    vLLM hands ``vision_config`` as a dict to ``PreTrainedConfig.from_dict`` and reads attributes from it
    (vision_tower.py), so the fields it reads are written the way it reads them:
    ``img_token_compression_config`` {spatial_merge_size, temporal_patch_size} (an AttributeError without
    it; transformers keeps them flat) and a flat ``rope_theta`` (vLLM ignores ``rope_parameters``).
    ``projector_hidden_size`` is required: without it vLLM sizes the projector by the text hidden size."""
    vc_src = src.get("vision_config")
    if not isinstance(vc_src, dict):
        raise CheckpointError(F, "vision_config", "missing: --keep-vision needs the source's vision tower config")
    vc = copy.deepcopy(vc_src)
    cc = vc.get("img_token_compression_config")
    if not isinstance(cc, dict):
        cc = {"spatial_merge_size": _need(vc_src, "spatial_merge_size", "vision_config"),
              "temporal_patch_size": _need(vc_src, "temporal_patch_size", "vision_config")}
    vc["img_token_compression_config"] = cc
    rp = vc.get("rope_parameters") or {}
    theta = vc.get("rope_theta", rp.get("rope_theta") if isinstance(rp, dict) else None)
    if theta is None:
        raise CheckpointError(F, "vision_config.rope_parameters.rope_theta", "missing (vLLM ignores rope_parameters and would use 10000)")
    vc["rope_theta"] = theta
    vc.setdefault("hidden_act", "gelu")
    res = dict(out)
    res["architectures"] = [VL_ARCH]
    res["vision_config"] = vc
    for k in ("projector_hidden_size", "image_token_index", "video_token_index"):
        if k in src:
            res[k] = src[k]
    problems = rules.vision_config_problems(res)     # the rules m3-verify checks the output with
    if problems:
        raise CheckpointError(F, *problems[0])
    return res
