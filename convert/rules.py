"""What a converted config.json must hold, and the tensor shapes it gives: one home for both users.

The planner applies these rules before it writes anything (a config that cannot describe the tensors is refused,
naming the field, its value and the tensor that disagrees); m3-verify's structure check applies the same rules to
an output. (m3-verify ``--against`` does not use them: it derives the config from the source on its own.)

* ``TEXT_RULES`` / ``text_config_problems``: every ``text_config`` field vLLM's ``MiniMaxM3SparseForCausalLM`` sizes
  or computes the model by, present, of its JSON type (an integer is never a bool, a float, a string or null) and in
  range, plus the relations between them (whole KV-head groups, top-k within the experts);
* ``SHAPES`` / ``expected_shapes`` / ``shape_disagreement``: the ``[out, in]`` (or ``[n]``) of every text module as
  vLLM builds it, each dimension a product of ``text_config`` fields, so that a disagreement names its fields;
* ``vision_config_problems`` / ``vision_shape``: the same for the vision tower (``--keep-vision``);
* ``mtp_shape``: the MTP block's own modules (``--keep-mtp``).
Field paths are relative to ``text_config`` unless they start with ``vision_config`` or are top-level.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class Rule(NamedTuple):
    kind: str                      # "int" (never a bool), "number" (int or float, finite, never a bool), "bool", "str"
    low: float | None = None       # smallest allowed value
    high: float | None = None      # largest allowed value
    low_open: bool = False         # ``low`` itself is not allowed
    required: bool = True
    why: str = ""                  # what vLLM does without it (added to "missing")


SAC = "sparse_attention_config."
#: text_config fields vLLM reads (the converter writes each explicitly; see model_config.py)
TEXT_RULES = {
    "hidden_size": Rule("int", 1), "num_hidden_layers": Rule("int", 1), "num_attention_heads": Rule("int", 1),
    "num_key_value_heads": Rule("int", 1), "head_dim": Rule("int", 1), "vocab_size": Rule("int", 1),
    "intermediate_size": Rule("int", 1), "num_local_experts": Rule("int", 1), "num_experts_per_tok": Rule("int", 1),
    "n_shared_experts": Rule("int", 0, why="vLLM would use its default"),
    "dense_intermediate_size": Rule("int", 1, required=False),   # required where a layer has a dense MLP (relations)
    "shared_intermediate_size": Rule("int", 0, required=False),
    "rotary_dim": Rule("int", 1, required=False),
    "num_mtp_modules": Rule("int", 1, required=False),
    "rope_theta": Rule("number", 0, low_open=True, why="vLLM would use its default"),
    "partial_rotary_factor": Rule("number", 0, 1, low_open=True),
    "routed_scaling_factor": Rule("number", 0, low_open=True),
    "swiglu_alpha": Rule("number"), "swiglu_beta": Rule("number"), "swiglu_limit": Rule("number", 0, low_open=True),
    "rms_norm_eps": Rule("number", 0, low_open=True, required=False),
    "use_routing_bias": Rule("bool", required=False), "use_qk_norm": Rule("bool", required=False),
    "use_gemma_norm": Rule("bool", required=False), "attention_output_gate": Rule("bool", required=False),
    "tie_word_embeddings": Rule("bool", required=False), "scoring_func": Rule("str", required=False),
    SAC + "sparse_num_index_heads": Rule("int", 1), SAC + "sparse_index_dim": Rule("int", 1),
    SAC + "sparse_block_size": Rule("int", 1), SAC + "sparse_topk_blocks": Rule("int", 1),
    SAC + "sparse_local_block": Rule("int", 0), SAC + "sparse_init_block": Rule("int", 0),
    SAC + "sparse_score_type": Rule("str"),
}

#: vision_config sizes vLLM's vision tower reads (positive integers), and the other vision fields it needs
VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "patch_size")
VISION_RULES = {
    **{k: Rule("int", 1) for k in VISION_SIZES},
    "img_token_compression_config.spatial_merge_size": Rule("int", 1),
    "img_token_compression_config.temporal_patch_size": Rule("int", 1),
    "rope_theta": Rule("number", 0, low_open=True, why="vLLM ignores rope_parameters and would use 10000"),
    "layer_norm_eps": Rule("number", 0, low_open=True),
}

MISSING = object()


def get(cfg: dict, path: str):
    """The value at a dotted ``path`` of ``cfg``, or MISSING."""
    cur = cfg
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return MISSING
        cur = cur[k]
    return cur


def value_problem(rule: Rule, value) -> str | None:
    """None when ``value`` satisfies ``rule``, else why not (the value included)."""
    if value is MISSING:
        return ("missing" + (f": {rule.why}" if rule.why else "")) if rule.required else None
    if rule.kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if rule.kind == "str":
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if rule.kind == "int" and (type(value) is not int):
        return f"must be an integer, got {value!r}"
    if rule.kind == "number" and (type(value) not in (int, float) or not math.isfinite(value)):
        return f"must be a finite number, got {value!r}"
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        return f"must be {'>' if rule.low_open else '>='} {rule.low:g}, got {value!r}"
    if rule.high is not None and value > rule.high:
        return f"must be <= {rule.high:g}, got {value!r}"
    return None


#: the per-layer kinds (one 0/1 per layer): without moe_layer_freq vLLM uses the real M3's layout
LAYER_FLAGS = {"moe_layer_freq": "vLLM would use the real M3's layout", SAC + "sparse_attention_freq": ""}


def layer_flags_problem(value, n) -> str | None:
    """None when ``value`` is a list of ``n`` 0/1 values (one per layer), else why not."""
    if isinstance(value, list) and type(n) is int and len(value) == n and all(v in (0, 1) for v in value):
        return None
    return f"must be a list of {n} 0/1 values (one per layer), got {value!r}"


def text_config_problems(tc: dict) -> list:
    """[(path under text_config, message)] for every rule ``tc`` breaks; empty when vLLM can build from it."""
    out = [(path, p) for path, rule in TEXT_RULES.items() if (p := value_problem(rule, get(tc, path)))]
    for path, why in LAYER_FLAGS.items():
        value = get(tc, path)
        p = ("missing" + (f": {why}" if why else "")) if value is MISSING else layer_flags_problem(value, tc.get("num_hidden_layers"))
        if p:
            out.append((path, p))
    bad = {path for path, _ in out}
    nh, nkv = tc.get("num_attention_heads"), tc.get("num_key_value_heads")
    if not {"num_attention_heads", "num_key_value_heads"} & bad and nh % nkv:
        out.append(("num_key_value_heads", f"{nkv} does not divide num_attention_heads {nh}: vLLM's attention needs "
                                           "whole groups of query heads per KV head"))
    k, e = tc.get("num_experts_per_tok"), tc.get("num_local_experts")
    if not {"num_experts_per_tok", "num_local_experts"} & bad and k > e:
        out.append(("num_experts_per_tok", f"{k} is more than num_local_experts {e}: the router cannot pick {k} experts"))
    moe = tc.get("moe_layer_freq")
    if isinstance(moe, list) and 0 in moe and "dense_intermediate_size" not in tc:
        out.append(("dense_intermediate_size", "missing on a model with dense-MLP layers"))
    return out


def vision_config_problems(cfg: dict) -> list:
    """[(path, message)] for the fields vLLM's VL class reads from the converted config (paths from the top)."""
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        return [("vision_config", "missing")]
    out = [(f"vision_config.{path}", p) for path, rule in VISION_RULES.items() if (p := value_problem(rule, get(vc, path)))]
    if p := value_problem(Rule("int", 1), cfg.get("projector_hidden_size", MISSING)):
        out.append(("projector_hidden_size", p + " (without it vLLM sizes the projector by the text hidden size)"))
    return out


# ---------------------------------------------------------------- the shapes a config gives
H, V, HD, NH, NKV = "hidden_size", "vocab_size", "head_dim", "num_attention_heads", "num_key_value_heads"
NI, DI = SAC + "sparse_num_index_heads", SAC + "sparse_index_dim"
I, ID, NSE, E = "intermediate_size", "dense_intermediate_size", "n_shared_experts", "num_local_experts"

#: source module (names.Module.src) -> the shape of each official module it becomes (two for a fused [gate; up]),
#: each dimension the product of these text_config fields
SHAPES = {
    "model.language_model.embed_tokens": (((V,), (H,)),), "model.language_model.norm": (((H,),),), "lm_head": (((V,), (H,)),),
    "input_layernorm": (((H,),),), "post_attention_layernorm": (((H,),),),
    "self_attn.q_proj": (((NH, HD), (H,)),), "self_attn.k_proj": (((NKV, HD), (H,)),),
    "self_attn.v_proj": (((NKV, HD), (H,)),), "self_attn.o_proj": (((H,), (NH, HD)),),
    "self_attn.q_norm": (((HD,),),), "self_attn.k_norm": (((HD,),),),
    "self_attn.indexer.q_proj": (((NI, DI), (H,)),), "self_attn.indexer.k_proj": (((DI,), (H,)),),
    "self_attn.indexer.q_norm": (((DI,),),), "self_attn.indexer.k_norm": (((DI,),),),
    "mlp.gate_up_proj": (((ID,), (H,)), ((ID,), (H,))), "mlp.down_proj": (((H,), (ID,)),),
    "mlp.gate": (((E,), (H,)),),
    "mlp.experts.{E}.gate_proj": (((I,), (H,)),), "mlp.experts.{E}.up_proj": (((I,), (H,)),),
    "mlp.experts.{E}.down_proj": (((H,), (I,)),),
    "mlp.shared_experts.gate_up_proj": (((I, NSE), (H,)), ((I, NSE), (H,))),
    "mlp.shared_experts.down_proj": (((H,), (I, NSE)),),
}
#: the router's e_score_correction_bias: one per expert
ROUTER_BIAS = ((E,),)


def dim_value(tc, factors) -> int:
    """One dimension of a symbolic shape: the product of its factors (text_config fields, or integers)."""
    n = 1
    for f in factors:
        v = f if isinstance(f, int) else get(tc, f)
        if type(v) is not int:
            raise KeyError(f"text_config.{f} is {'missing' if v is MISSING else repr(v)}")
        n *= v
    return n


def expected_shapes(tc: dict, src_module: str) -> list:
    """[out, in] (or [n]) of each official module of source module ``src_module`` for this text config. Raises
    KeyError when a field it needs is missing or not an integer (text_config_problems names it)."""
    return [tuple(dim_value(tc, d) for d in shape) for shape in SHAPES[src_module]]


def stored_shape(src_module: str):
    """The symbolic shape of the source tensor of ``src_module``: a fused [gate; up] is stored as one tensor with
    the outputs of both halves."""
    shapes = SHAPES[src_module]
    if len(shapes) == 1:
        return shapes[0]
    return ((len(shapes),) + shapes[0][0],) + shapes[0][1:]


def shape_disagreement(tc: dict, dims, actual) -> str | None:
    """None when ``actual`` is the shape the symbolic ``dims`` give for ``tc``; else the first disagreeing dimension's
    fields with their values, e.g. ``"text_config.num_attention_heads x text_config.head_dim = 2 x 128 = 256"``."""
    want = tuple(dim_value(tc, d) for d in dims)
    if tuple(actual) == want:
        return None
    if len(actual) != len(want):
        return f"{len(want)} dimensions ({' x '.join(_describe(tc, d) for d in dims)})"
    i = next(i for i, (a, w) in enumerate(zip(actual, want)) if a != w)
    return _describe(tc, dims[i])


def _describe(tc, factors) -> str:
    names = " x ".join(str(f) if isinstance(f, int) else f"text_config.{f}" for f in factors)
    values = " x ".join(str(f if isinstance(f, int) else get(tc, f)) for f in factors)
    return f"{names} = {values}" + (f" = {dim_value(tc, factors)}" if len(factors) > 1 else "")


def mtp_shape(tc: dict, module_src: str | None, own: str | None, index: int, leaf: str):
    """The shape of one MTP tensor vLLM's MiniMaxM3MTP builds: its own modules (eh_proj [H, 2H], the norms [H]) or a
    decoder-layer module (``module_src``, ``index`` in its official modules; the router's bias [E])."""
    H_ = dim_value(tc, (H,))
    if module_src is None:
        return (H_, 2 * H_) if own == "eh_proj" else (H_,)
    if leaf == "e_score_correction_bias":
        return (dim_value(tc, (E,)),)
    return expected_shapes(tc, module_src)[index]


def vision_shape(module, leaf: str, cfg: dict):
    """Shape of a vision tensor (``module``: its names.VisionModule rule) as vLLM 0.32's vision tower builds it
    (models/minimax_m3/common/vision_tower.py), or None when config.json lacks a size (vision_config_problems names
    it)."""
    vc = cfg.get("vision_config") or {}
    try:
        Hv, Iv, C, p = vc["hidden_size"], vc["intermediate_size"], vc["num_channels"], vc["patch_size"]
        cc = vc["img_token_compression_config"]
        t, sm = cc["temporal_patch_size"], cc["spatial_merge_size"]
        Ht, P = cfg["text_config"]["hidden_size"], cfg.get("projector_hidden_size") or cfg["text_config"]["hidden_size"]
    except (KeyError, TypeError):
        return None
    rel = module.src.rsplit(".", 1)[-1] if "{L}" not in module.src else module.src.split("{L}.", 1)[1]
    table = {   # module -> (weight shape, bias shape)
        "proj": ((Hv, C, t, p, p), None), "pre_layrnorm": ((Hv,), (Hv,)),
        "layer_norm1": ((Hv,), (Hv,)), "layer_norm2": ((Hv,), (Hv,)),
        "self_attn.q_proj": ((Hv, Hv), (Hv,)), "self_attn.k_proj": ((Hv, Hv), (Hv,)), "self_attn.v_proj": ((Hv, Hv), (Hv,)),
        "self_attn.out_proj": ((Hv, Hv), (Hv,)), "mlp.fc1": ((Iv, Hv), (Iv,)), "mlp.fc2": ((Hv, Iv), (Hv,)),
        "linear_1": ((P, Hv), (P,)), "linear_2": ((Ht, P), (Ht,)),
        "merge_linear_1": ((P, Ht * sm * sm), (P,)), "merge_linear_2": ((Ht, P), (Ht,)),
    }
    w, b = table[rel]
    return w if leaf == "weight" else b
