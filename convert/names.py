"""THE name table: the one source of truth for every name rule.

Read by the planner (what each source tensor becomes), the quant-config
rewrite (which official module a setting belongs to) and m3-verify (the exact
key set vLLM expects for a config).  Nothing else in the project spells a
checkpoint name.

Two stages, both declarative:

1. ``ALIASES``: spellings seen in the wild -> the *canonical source name*, the
   transformers "model naming" that AutoRound's ``extra_config`` keys use
   (``model.language_model.layers.N.mlp.experts.E.gate_proj``).  auto-round 0.16.1
   writes a partly reverted naming (``language_model.model.layers.N.block_sparse_moe...``);
   it is undone here before anything else.
2. ``MODULES``: canonical source module -> official vLLM module(s)
   (``MiniMaxM3SparseForCausalLM``'s own names), with the layer kinds the module
   exists on and its role (which decides copy / split / de-quantize).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

# ---------------------------------------------------------------- stage 1: aliases
#: (regex, replacement), applied in order with re.sub to a tensor name.
ALIASES: tuple[tuple[str, str], ...] = (
    # lm_head: all three spellings
    (r"^(?:model\.)?language_model\.lm_head\.", "lm_head."),
    # auto-round 0.16.1 reverted naming (inverse of transformers' conversion_mapping for minimax_m3_vl)
    (r"^language_model\.model\.", "model.language_model."),
    (r"\.block_sparse_moe\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"\.self_attn\.index_([qk])_(proj|norm)\.", r".self_attn.indexer.\1_\2."),
    (r"\.mlp\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
    (r"\.mlp\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
    (r"\.mlp\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
    # vision: auto-round's reverted naming (= MiniMax's original names) -> model naming; the exact inverse of
    # transformers' conversion_mapping for minimax_m3_vl. The reverted vision MLP comes out mangled as
    # `...layers.N.block_sparse_moe.fc1` and is repaired by the `.block_sparse_moe.` rule above.
    (r"^vision_tower\.vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.proj."),
    (r"^vision_tower\.vision_model\.encoder\.layers\.", "model.vision_tower.layers."),
    (r"^vision_tower\.vision_model\.pre_layrnorm\.", "model.vision_tower.pre_layrnorm."),
    (r"^multi_modal_projector\.linear_", "model.multi_modal_projector.linear_"),
    (r"^patch_merge_mlp\.linear_(\d)", r"model.multi_modal_projector.merge_linear_\1"),
)

#: canonical prefixes that are not part of the text model: left out, counted, reported.
EXCLUDED = (
    ("vision", r"^(model\.)?(vision_tower|multi_modal_projector|patch_merge_mlp)\."),
    ("mtp", r"^(model\.language_model\.)?mtp\.|^model\.mtp\."),
)

LEAVES_QUANT = ("qweight", "qzeros", "scales", "g_idx")

# ---------------------------------------------------------------- dtypes: one policy (planner, m3-verify, --vllm)
#: a plain (non-GPTQ) floating tensor may be stored in any of these. vLLM casts each to its parameter's dtype when
#: it loads it (param.copy_), so all three serve; AutoRound writes F32 on a CPU without bf16 and F16 where it
#: quantizes a float16 model in its own dtype (docs/FORMAT.md#plain-dtypes).
PLAIN_DTYPES = ("BF16", "F16", "F32")
#: GPTQ tensors: the exact decode needs fp16 scales (float32 product of an fp16 scale and a <= 9-bit integer)
GPTQ_DTYPES = {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}
#: a module m3-convert de-quantizes is written in bf16, rounded once
DEQUANT_DTYPE = "BF16"
#: the plain tensors vLLM holds in float32 (MiniMax-M3's router: its gate is built with params_dtype float32, and the
#: routing bias is a float32 parameter); every other plain tensor it holds in the model dtype, bfloat16
SERVED_F32 = ("block_sparse_moe.gate.weight", "block_sparse_moe.e_score_correction_bias")


def served_dtype(official_tensor: str) -> str:
    """The dtype vLLM holds a plain tensor in (any written name: text, VL, MTP): what ``--dtype bf16`` casts to.
    Written as stored by default (exact bytes); ``--dtype bf16`` rounds F32/F16 tensors that vLLM holds in bf16
    exactly as vLLM's load would (round to nearest even), and never the float32 router."""
    return "F32" if official_tensor.endswith(SERVED_F32) else "BF16"
LEAVES = LEAVES_QUANT + ("weight", "e_score_correction_bias")

TEXT_PREFIX = "model.language_model."
LAYER_PREFIX = TEXT_PREFIX + "layers.{L}."
OUT_LAYER_PREFIX = "model.layers.{L}."


def canonical(name: str) -> str:
    """Any accepted spelling of a tensor or module name -> canonical source name."""
    if not _ANY_ALIAS.search(name):      # fast path: already canonical (the real checkpoint's naming)
        return name
    for pat, rep in _ALIASES_RE:
        name = pat.sub(rep, name)
    return name


_ALIASES_RE = tuple((re.compile(p), r) for p, r in ALIASES)
_ANY_ALIAS = re.compile("|".join(f"(?:{p})" for p, _ in ALIASES))


_EXCLUDED_RX = tuple((cat, re.compile(pat)) for cat, pat in EXCLUDED)
_ANY_EXCLUDED = re.compile("|".join(f"(?:{pat})" for _, pat in EXCLUDED))


def excluded_category(canon: str) -> str | None:
    if not _ANY_EXCLUDED.search(canon):     # fast path: a text-model tensor
        return None
    for cat, rx in _EXCLUDED_RX:
        if rx.search(canon):
            return cat
    return None


# ---------------------------------------------------------------- stage 2: modules
# roles
NORM = "norm"            # 1-D weight, copied
EMBED = "embed"          # plain 2-D weight, copied
LINEAR = "linear"        # GPTQ or bf16, copied as is
QKV = "qkv"              # q/k/v: de-quantized on sparse layers (fused with the bf16 indexer); see plan.py
INDEX = "index"          # indexer projections: bf16 (part of the sparse qkv GEMM)
GATE_UP = "gate_up"      # fused [gate; up]: split by outputs into two official modules
ROUTER = "router"        # router weight (+ e_score_correction_bias, which moves out of .gate)
EXPERT = "expert"        # routed expert Linear, copied as is
#: the roles whose modules are Linears (GPTQ or bf16 weights): the planner's and m3-verify's structure check
LINEAR_ROLES = (LINEAR, EXPERT, QKV, INDEX, GATE_UP)

# where a module exists
ALL, DENSE_ATTN, SPARSE_ATTN, DENSE_MLP, MOE, SHARED = "all", "dense_attn", "sparse_attn", "dense_mlp", "moe", "shared"


@dataclass(frozen=True, eq=False)     # each rule is one object: identity hash (hot in the planner's dict keys)
class Module:
    src: str                 # canonical source module, relative to the layer prefix (or absolute if global)
    dst: tuple               # official module name(s), same convention; two for a split
    where: str
    role: str
    vllm_fused: str | None = None   # the vLLM parameter this module is a shard of (for verify --vllm)


MODULES: tuple[Module, ...] = (
    Module("input_layernorm", ("input_layernorm",), ALL, NORM),
    Module("post_attention_layernorm", ("post_attention_layernorm",), ALL, NORM),
    Module("self_attn.q_proj", ("self_attn.q_proj",), ALL, QKV, "self_attn.qkv_proj"),
    Module("self_attn.k_proj", ("self_attn.k_proj",), ALL, QKV, "self_attn.qkv_proj"),
    Module("self_attn.v_proj", ("self_attn.v_proj",), ALL, QKV, "self_attn.qkv_proj"),
    Module("self_attn.o_proj", ("self_attn.o_proj",), ALL, LINEAR),
    Module("self_attn.q_norm", ("self_attn.q_norm",), ALL, NORM),
    Module("self_attn.k_norm", ("self_attn.k_norm",), ALL, NORM),
    Module("self_attn.indexer.q_proj", ("self_attn.index_q_proj",), SPARSE_ATTN, INDEX, "self_attn.qkv_proj"),
    Module("self_attn.indexer.k_proj", ("self_attn.index_k_proj",), SPARSE_ATTN, INDEX, "self_attn.qkv_proj"),
    Module("self_attn.indexer.q_norm", ("self_attn.index_q_norm",), SPARSE_ATTN, NORM),
    Module("self_attn.indexer.k_norm", ("self_attn.index_k_norm",), SPARSE_ATTN, NORM),
    Module("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), DENSE_MLP, GATE_UP, "mlp.gate_up_proj"),
    Module("mlp.down_proj", ("mlp.down_proj",), DENSE_MLP, LINEAR),
    Module("mlp.gate", ("block_sparse_moe.gate",), MOE, ROUTER),
    Module("mlp.experts.{E}.gate_proj", ("block_sparse_moe.experts.{E}.w1",), MOE, EXPERT, "block_sparse_moe.experts.w13"),
    Module("mlp.experts.{E}.up_proj", ("block_sparse_moe.experts.{E}.w3",), MOE, EXPERT, "block_sparse_moe.experts.w13"),
    Module("mlp.experts.{E}.down_proj", ("block_sparse_moe.experts.{E}.w2",), MOE, EXPERT, "block_sparse_moe.experts.w2"),
    Module("mlp.shared_experts.gate_up_proj", ("block_sparse_moe.shared_experts.gate_proj", "block_sparse_moe.shared_experts.up_proj"),
           SHARED, GATE_UP, "block_sparse_moe.shared_experts.gate_up_proj"),
    Module("mlp.shared_experts.down_proj", ("block_sparse_moe.shared_experts.down_proj",), SHARED, LINEAR),
)

#: the shared expert's fused [gate; up] (its width must be intermediate_size * n_shared_experts)
SHARED_GATE_UP = next(m for m in MODULES if m.where == SHARED and m.role == GATE_UP)

#: modules outside the decoder layers (absolute names)
GLOBAL_MODULES: tuple[Module, ...] = (
    Module("model.language_model.embed_tokens", ("model.embed_tokens",), ALL, EMBED),
    Module("model.language_model.norm", ("model.norm",), ALL, NORM),
    Module("lm_head", ("lm_head",), ALL, EMBED),
)

#: tensor-level exceptions: (canonical source leaf of a module, official tensor name relative to the layer)
LEAF_MOVES = {("mlp.gate", "e_score_correction_bias"): "block_sparse_moe.e_score_correction_bias"}


def _template_regex(t: str) -> str:
    return re.escape(t).replace(re.escape("{L}"), r"(?P<L>\d+)").replace(re.escape("{E}"), r"(?P<E>\d+)")


class Match(NamedTuple):     # a tuple: built once per tensor (67k-90k of them)
    module: Module
    src_module: str          # canonical source module name, absolute
    leaf: str
    layer: int | None
    expert: int | None

    def dst_modules(self) -> tuple:
        return tuple(_fill(OUT_LAYER_PREFIX + d if self.layer is not None else d, self.layer, self.expert) for d in self.module.dst)

    def dst_tensor(self, index: int = 0) -> str:
        moved = LEAF_MOVES.get((self.module.src, self.leaf))
        if moved:
            return _fill(OUT_LAYER_PREFIX + moved, self.layer, self.expert)
        return f"{self.dst_modules()[index]}.{self.leaf}"


def _fill(t: str, layer, expert) -> str:
    return t.replace("{L}", str(layer)).replace("{E}", str(expert))




@lru_cache(maxsize=1)
def _by_template():
    """Module rules keyed by their (relative) source template: matching is one regex and a dict lookup."""
    layer = {m.src: m for m in MODULES}
    glob = {m.src: m for m in GLOBAL_MODULES}
    return layer, glob


_LEAF_SET = frozenset(LEAVES)
_LAYERS_AT = TEXT_PREFIX + "layers."
_EXPERTS_AT = "mlp.experts."


def _index(s: str) -> int | None:
    """A layer / expert number as written in a name (ASCII digits only), else None."""
    return int(s) if s.isdigit() and s.isascii() else None


def _expert_template(rel: str):
    """``mlp.experts.<E>.<x>`` -> (``mlp.experts.{E}.<x>``, E); any other layer-relative name -> (rel, None);
    a malformed expert number -> (None, None). Shared by the text rules and the MTP rules."""
    if not rel.startswith(_EXPERTS_AT):
        return rel, None
    expert_s, dot, tail = rel[len(_EXPERTS_AT):].partition(".")
    expert = _index(expert_s)
    if expert is None or not dot:
        return None, None
    return "mlp.experts.{E}." + tail, expert


def match(canon: str) -> Match | None:
    """Canonical tensor name -> its module rule, or None if no rule knows it.

    ``model.language_model.layers.<L>.<module>.<leaf>`` with ``<module>`` a MODULES template (experts:
    ``mlp.experts.<E>.<x>`` -> ``mlp.experts.{E}.<x>``), or ``<global module>.<leaf>``. String
    operations, not a regex: this runs once per tensor (~90k)."""
    layer_rules, global_rules = _by_template()
    base, dot, leaf = canon.rpartition(".")
    if not dot or leaf not in _LEAF_SET:
        return None
    if base.startswith(_LAYERS_AT):
        layer_s, dot, rel = base[len(_LAYERS_AT):].partition(".")
        layer = _index(layer_s)
        if layer is None or not dot:
            return None
        rel, expert = _expert_template(rel)
        m = layer_rules.get(rel) if rel is not None else None
        return Match(m, base, leaf, layer, expert) if m is not None else None
    m = global_rules.get(base)
    return Match(m, base, leaf, None, None) if m is not None else None


def resolve(name: str) -> tuple:
    """Any spelling of a tensor name -> (canonical name, Match or None): ``match(canonical(name))``.

    Fast path for names already canonical (the real checkpoint's naming): a name that ``match`` accepts
    as it is has no alias to undo (no ALIASES pattern can match a name of a MODULES rule; the table's
    tests check this for every rule), so the alias scan, the slowest step per tensor, is skipped."""
    m = match(name)
    if m is not None:
        return name, m
    canon = canonical(name)
    return canon, (match(canon) if canon != name else None)


def out_layer(prefix: str) -> int | None:
    """The decoder layer K of an official (vLLM) module name ``model.layers.K.<...>``, else None."""
    at = OUT_LAYER_PREFIX.split("{L}", 1)[0]
    if not prefix.startswith(at):
        return None
    k, dot, _ = prefix[len(at):].partition(".")
    return _index(k) if dot else None


def source_module(module: Module, layer: int | None, expert: int | None = None) -> str:
    t = LAYER_PREFIX + module.src if module in MODULES else module.src
    return _fill(t, layer, expert)


# ---------------------------------------------------------------- layout from a config
@dataclass(frozen=True)
class Layout:
    num_layers: int
    sparse_attn: tuple       # bool per layer
    moe: tuple               # bool per layer
    num_experts: int
    n_shared_experts: int

    def applies(self, where: str, layer: int) -> bool:
        return {
            ALL: True,
            DENSE_ATTN: not self.sparse_attn[layer],
            SPARSE_ATTN: self.sparse_attn[layer],
            DENSE_MLP: not self.moe[layer],
            MOE: self.moe[layer],
            SHARED: self.moe[layer] and self.n_shared_experts > 0,
        }[where]


def expected_modules(layout: Layout):
    """Every (Module, layer, expert) the text model has for this layout, in a stable order."""
    for m in GLOBAL_MODULES[:1]:
        yield m, None, None
    for L in range(layout.num_layers):
        for m in MODULES:
            if not layout.applies(m.where, L):
                continue
            if "{E}" in m.src:
                for e in range(layout.num_experts):
                    yield m, L, e
            else:
                yield m, L, None
    for m in GLOBAL_MODULES[1:]:
        yield m, None, None


def official_modules(module: Module, layer, expert) -> tuple:
    return Match(module, source_module(module, layer, expert), "weight", layer, expert).dst_modules()


def official_tensor(module: Module, layer, expert, leaf: str, index: int = 0) -> str:
    return Match(module, source_module(module, layer, expert), leaf, layer, expert).dst_tensor(index)


# ---------------------------------------------------------------- where vLLM puts each official tensor
@lru_cache(maxsize=1)
def _vllm_targets():
    """(regex over official tensor names, fused param template, shard position) from MODULES' vllm_fused."""
    order: dict[str, list] = {}
    for m in MODULES:
        if m.vllm_fused:
            for i, d in enumerate(m.dst):
                order.setdefault(m.vllm_fused, []).append(d)
    out = []
    leaf = "(?P<leaf>" + "|".join(LEAVES) + ")"
    for fused, members in order.items():
        for pos, d in enumerate(members):
            rx = re.compile("^" + _template_regex(OUT_LAYER_PREFIX + d) + r"\." + leaf + "$")
            # experts: w1 and w3 share w13 (positions 0, 1); w2 is alone
            if "{E}" in d:
                same = [x for x in members if x.rsplit(".", 1)[-1] in ("w1", "w3")] if d.endswith(("w1", "w3")) else [d]
                pos = same.index(d)
                fused_name = fused if d.endswith(("w1", "w3")) else fused.rsplit(".", 1)[0] + ".w2"
            else:
                fused_name = fused
            out.append((rx, OUT_LAYER_PREFIX + fused_name, pos))
    return tuple(out)


def vllm_target(official: str):
    """Official tensor name -> (fused vLLM parameter base, shard position, expert id, leaf), or None if not fused.

    For experts the base is ``model.layers.L.block_sparse_moe.experts.w13`` / ``.w2``; the vLLM
    parameter is then ``<experts module>.<routed_experts.>w13_<leaf>`` depending on the vLLM version.
    """
    for rx, fused, pos in _vllm_targets():
        mt = rx.match(official)
        if mt:
            gd = mt.groupdict()
            expert = int(gd["E"]) if gd.get("E") is not None else None
            return _fill(fused, gd.get("L"), expert), pos, expert, gd["leaf"]
    return None


@lru_cache(maxsize=1)
def fused_shards() -> dict:
    """vLLM fused parameter (last name component) -> ((official shard, required), ...) in vLLM's order.

    E.g. ``qkv_proj`` -> q_proj, k_proj, v_proj (required), index_q_proj, index_k_proj (sparse layers only).
    Read by the vLLM plugin to find the checkpoint modules behind a fused layer prefix.
    """
    out: dict = {}
    for m in MODULES:
        if m.vllm_fused and m.role != EXPERT:
            key = m.vllm_fused.rsplit(".", 1)[-1]
            for d in m.dst:
                entry = (d.rsplit(".", 1)[-1], m.where != SPARSE_ATTN)
                if entry not in out.setdefault(key, []):
                    out[key].append(entry)
    return {k: tuple(v) for k, v in out.items()}


#: the official per-expert module names (w1 gate, w3 up, w2 down)
EXPERT_SHARDS = tuple(m.dst[0].rsplit(".", 1)[-1] for m in MODULES if m.role == EXPERT)


# ---------------------------------------------------------------- the module vLLM builds for an official module
@lru_cache(maxsize=1)
def _vllm_modules():
    """(regex over official module names, vLLM module template) from MODULES: fused shards map to their
    fused module (``qkv_proj``, ``gate_up_proj``), routed experts to the layer's ``block_sparse_moe.experts``
    (one quant method per MoE layer), every other Linear to itself."""
    out = []
    for m in MODULES:
        for d in m.dst:
            rx = re.compile("^" + _template_regex(OUT_LAYER_PREFIX + d) + "$")
            if m.role == EXPERT:
                target = m.vllm_fused.rsplit(".", 1)[0]          # block_sparse_moe.experts
            else:
                target = m.vllm_fused or d
            out.append((rx, OUT_LAYER_PREFIX + target))
    return tuple(out)


def vllm_module(official_module: str) -> str:
    """Official module name -> the vLLM module (layer prefix) that loads it, e.g.
    ``model.layers.3.self_attn.k_proj`` -> ``model.layers.3.self_attn.qkv_proj``,
    ``model.layers.3.block_sparse_moe.experts.7.w2`` -> ``model.layers.3.block_sparse_moe.experts``."""
    for rx, target in _vllm_modules():
        mt = rx.match(official_module)
        if mt:
            return _fill(target, mt.group("L"), None)
    return official_module


# ---------------------------------------------------------------- vision tower (--keep-vision: the VL class)
#: The VL class (MiniMaxM3SparseForConditionalGeneration) loads text as ``language_model.`` + the official
#: text names, and vision under MiniMax's original names, which its hf_to_vllm_mapper and the vision
#: tower's load_weights turn into parameters.
VL_TEXT_PREFIX = "language_model."
#: where vLLM's VL class builds the vision tower, projector and merge MLP (VisionModule.vllm starts with it)
VLLM_VISION_PREFIX = "vision_tower."


@dataclass(frozen=True, eq=False)
class VisionModule:
    src: str                 # canonical source (model naming); {L} = encoder layer
    dst: str                 # name written for the VL class
    leaves: tuple            # tensors the module has (all bf16)
    vllm: str                # vLLM parameter module (after its mapper and stacking)
    shard: int | None = None # position in vLLM's stacked qkv_proj (q, k, v), else None


VISION_MODULES: tuple = (
    VisionModule("model.vision_tower.embeddings.proj", "vision_tower.vision_model.embeddings.patch_embedding", ("weight",),
                 "vision_tower.vision_model.embeddings.patch_embedding"),
    VisionModule("model.vision_tower.pre_layrnorm", "vision_tower.vision_model.pre_layrnorm", ("weight", "bias"),
                 "vision_tower.vision_model.pre_layrnorm"),
    *(VisionModule(f"model.vision_tower.layers.{{L}}.{m}", f"vision_tower.vision_model.encoder.layers.{{L}}.{m}", ("weight", "bias"), v, sh)
      for m, v, sh in (
          ("layer_norm1", "vision_tower.vision_model.encoder.layers.{L}.layer_norm1", None),
          ("layer_norm2", "vision_tower.vision_model.encoder.layers.{L}.layer_norm2", None),
          ("self_attn.q_proj", "vision_tower.vision_model.encoder.layers.{L}.self_attn.qkv_proj", 0),
          ("self_attn.k_proj", "vision_tower.vision_model.encoder.layers.{L}.self_attn.qkv_proj", 1),
          ("self_attn.v_proj", "vision_tower.vision_model.encoder.layers.{L}.self_attn.qkv_proj", 2),
          ("self_attn.out_proj", "vision_tower.vision_model.encoder.layers.{L}.self_attn.out_proj", None),
          ("mlp.fc1", "vision_tower.vision_model.encoder.layers.{L}.fc1", None),
          ("mlp.fc2", "vision_tower.vision_model.encoder.layers.{L}.fc2", None))),
    *(VisionModule(f"model.multi_modal_projector.linear_{i}", f"multi_modal_projector.linear_{i}", ("weight", "bias"),
                   f"vision_tower.multi_modal_projector.linear_{i}") for i in (1, 2)),
    *(VisionModule(f"model.multi_modal_projector.merge_linear_{i}", f"patch_merge_mlp.linear_{i}", ("weight", "bias"),
                   f"vision_tower.patch_merge_mlp.linear_{i}") for i in (1, 2)),
)


@lru_cache(maxsize=2)
def _vision_rx(attr: str):
    """(regex over VisionModule.<attr> tensor names, module): the same {L} templates as the text rules."""
    return tuple((re.compile("^" + _template_regex(getattr(m, attr)) + r"\.(?P<leaf>weight|bias)$"), m) for m in VISION_MODULES)


def _vision_find(name: str, attr: str):
    for rx, m in _vision_rx(attr):
        mt = rx.match(name)
        if mt and mt.group("leaf") in m.leaves:
            L = mt.groupdict().get("L")
            return m, (int(L) if L is not None else None), mt.group("leaf")
    return None


def vision_match(canon: str):
    """Canonical vision tensor -> (VisionModule, layer or None, leaf), or None if the table does not know it."""
    return _vision_find(canon, "src")


def source_vision(m: VisionModule, layer, leaf: str) -> str:
    return _fill(m.src, layer, None) + "." + leaf


def vision_tensor(m: VisionModule, layer, leaf: str) -> str:
    return _fill(m.dst, layer, None) + "." + leaf


def expected_vision(num_layers: int):
    """Every (VisionModule, layer, leaf) of a vision tower with this many encoder layers."""
    for m in VISION_MODULES:
        for L in (range(num_layers) if "{L}" in m.src else (None,)):
            for leaf in m.leaves:
                yield m, L, leaf


def vision_vllm_param(dst_tensor: str):
    """VL checkpoint vision tensor -> (vLLM parameter, stacked shard position or None)."""
    found = _vision_find(dst_tensor, "dst")
    if found is None:
        return None
    m, layer, leaf = found
    return _fill(m.vllm, layer, None) + "." + leaf, m.shard


# ---------------------------------------------------------------- MTP block (--keep-mtp: vLLM's MiniMaxM3MTP)
#: vLLM's MiniMaxM3MTP.load_weights strips ``language_model.``, keeps names containing ``model.mtp.layers``
#: and drops ``.mtp.``: so each block K is written as ``language_model.model.mtp.layers.K.`` + the names
#: below, the decoder layer under ``transformer_layer.`` with the official (vLLM) layer-relative names.
MTP_TEXT_PREFIX = "model.language_model.mtp.layers."      # canonical source (model naming)
MTP_OUT_PREFIX = VL_TEXT_PREFIX + "model.mtp.layers."
MTP_DECODER = "transformer_layer."     # the block's decoder layer, relative to the block
MTP_OWN = ("enorm", "hnorm", "final_layernorm", "eh_proj")   # MTP block modules outside the decoder layer
#: the MTP decoder layer is always sparse attention + MoE + shared expert (mtp.py: force_sparse_attn, force_moe)
MTP_LAYOUT_WHERE = (ALL, SPARSE_ATTN, MOE, SHARED)
#: MiniMax's own names for the shared expert (separate gate/up), canonicalised by ALIASES to mlp.shared_experts.*
MTP_EXTRA = {"mlp.shared_experts.gate_proj": "block_sparse_moe.shared_experts.gate_proj",
             "mlp.shared_experts.up_proj": "block_sparse_moe.shared_experts.up_proj"}

_MTP_RX = re.compile(r"^" + re.escape(MTP_TEXT_PREFIX) + r"(\d+)\.(.+)\.(" + "|".join(LEAVES) + r")$")


@dataclass(frozen=True)
class MtpMatch:
    block: int
    rel: str                  # canonical source module relative to the block (MTP_DECODER + layer-relative)
    leaf: str
    dst: tuple                # official output module name(s) relative to the block (two for a fused gate_up)
    role: str


def mtp_match(canon: str):
    """Canonical MTP tensor -> MtpMatch, or None when no rule knows it (e.g. the placeholder ``mtp.0.*``)."""
    mt = _MTP_RX.match(canon)
    if not mt:
        return None
    block, rel, leaf = int(mt.group(1)), mt.group(2), mt.group(3)
    if rel in MTP_OWN:
        return MtpMatch(block, rel, leaf, (rel,), LINEAR if rel == "eh_proj" else NORM)
    if not rel.startswith(MTP_DECODER):
        return None
    inner = rel[len(MTP_DECODER):]
    if inner in MTP_EXTRA:
        return MtpMatch(block, rel, leaf, (MTP_DECODER + MTP_EXTRA[inner],), LINEAR)
    inner, expert = _expert_template(inner)
    m = _by_template()[0].get(inner) if inner is not None else None
    if m is None or m.where not in MTP_LAYOUT_WHERE:
        return None
    moved = LEAF_MOVES.get((m.src, leaf))
    if moved:
        return MtpMatch(block, rel, leaf, (MTP_DECODER + _fill(moved, None, expert).rsplit(".", 1)[0],), m.role)
    return MtpMatch(block, rel, leaf, tuple(MTP_DECODER + _fill(d, None, expert) for d in m.dst), m.role)


def mtp_tensor(block: int, dst: str, leaf: str) -> str:
    return f"{MTP_OUT_PREFIX}{block}.{dst}.{leaf}"


#: the main model's tensors vLLM's MTP drafter loads too (its embedding and head): the EMBED rules
MTP_SHARED_TENSORS = tuple(m.dst[0] + ".weight" for m in GLOBAL_MODULES if m.role == EMBED)


def mtp_drafter_name(written: str):
    """A written MTP tensor -> (the drafter's layer prefix ``model.layers.K.``, name relative to the block),
    as vLLM's MiniMaxM3MTP.load_weights sees it (``language_model.`` and ``.mtp.`` dropped); else None."""
    if not written.startswith(MTP_OUT_PREFIX):
        return None
    k, dot, rest = written[len(MTP_OUT_PREFIX):].partition(".")
    K = _index(k)
    return (_fill(OUT_LAYER_PREFIX, K, None), rest) if K is not None and dot else None


def expected_mtp_modules(num_blocks: int, num_experts: int):
    """(output MTP tensor name, its Module rule or None, own module name or None, index in the rule's dst),
    for this many blocks."""
    for K in range(num_blocks):
        for own in MTP_OWN:
            yield mtp_tensor(K, own, "weight"), None, own, 0
        for m in MODULES:
            if m.where not in MTP_LAYOUT_WHERE:
                continue
            for e in (range(num_experts) if "{E}" in m.src else (None,)):
                for i, d in enumerate(m.dst):
                    yield mtp_tensor(K, MTP_DECODER + _fill(d, None, e), "weight"), m, None, i
            if m.role == ROUTER:
                yield (mtp_tensor(K, MTP_DECODER + LEAF_MOVES[(m.src, "e_score_correction_bias")].rsplit(".", 1)[0],
                                  "e_score_correction_bias"), m, None, 0)


def expected_mtp(num_blocks: int, num_experts: int):
    """Every output MTP tensor name (official), for this many blocks."""
    return (name for name, _, _, _ in expected_mtp_modules(num_blocks, num_experts))
