"""m3-verify --against IN_DIR: every output tensor and every config field vLLM reads, derived from the SOURCE by
m3-verify's own reading, sharing nothing with the converter's planner, executor or name table.

What is shared is checked by its own tests and carries no conversion rule: the safetensors header reader
(m3_convert.st) and the GPTQ math (m3_convert.gptq: unpack, exact decode, bf16 rounding, the finite-scales rule).

Written here, from the source format (docs/FORMAT.md#input and #output-names), independently of m3_convert.names:

* a source normaliser: any spelling the producers write (transformers' model naming, auto-round's partly
  reverted naming, MiniMax's own names in the MTP block and the vision tower) -> one canonical source name;
* the inverse map: each output tensor (vLLM's official names; ``language_model.`` under the VL layout; MTP and
  vision names) -> its source module, the half of a fused [gate; up] it holds, and its leaf;
* the config fields vLLM reads, derived from the source config.

Then per output module, by values: GPTQ written at the source width -> the same codes, zeros and scales (the
bytes, or the columns of its half); GPTQ written wider (promotion) -> the same exact decode; bf16 from GPTQ ->
the exact decode rounded once to bf16; plain -> the same bytes, or (m3-convert --dtype bf16) the source rounded
to bf16. Every source tensor of what the output holds must be used. A planning bug -- an expert's tensors under
another expert's name, swapped halves, a module under the wrong layer, a config field lost -- is a finding.
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict

import numpy as np

from m3_convert import gptq, st
from m3_convert.errors import CheckpointError

P = "model.language_model."                  # the canonical (model naming) text prefix
VL = "language_model."                       # the VL layout's text prefix in the output
MTP_OUT = "language_model.model.mtp.layers."
QUANT_LEAVES = ("qweight", "qzeros", "scales")

# ---------------------------------------------------------------- source names -> canonical
_SOURCE_RULES = tuple((re.compile(a), b) for a, b in (
    (r"^(?:model\.)?language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", P),                                        # auto-round's reverted naming
    (r"\.block_sparse_moe\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"\.self_attn\.index_([qk])_(proj|norm)\.", r".self_attn.indexer.\1_\2."),
    (r"\.mlp\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),         # MiniMax's expert names (MTP block)
    (r"\.mlp\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
    (r"\.mlp\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
    (r"^vision_tower\.vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.proj."),
    (r"^vision_tower\.vision_model\.encoder\.layers\.", "model.vision_tower.layers."),
    (r"^vision_tower\.vision_model\.pre_layrnorm\.", "model.vision_tower.pre_layrnorm."),
    (r"^multi_modal_projector\.linear_", "model.multi_modal_projector.linear_"),
    (r"^patch_merge_mlp\.linear_(\d)", r"model.multi_modal_projector.merge_linear_\1"),
))


def canonical(name: str) -> str:
    for rx, rep in _SOURCE_RULES:
        name = rx.sub(rep, name)
    return name


# ---------------------------------------------------------------- output names -> source
#: official layer-relative module -> (canonical layer-relative source module, half of a fused [gate; up] or None)
_LAYER = {
    "self_attn.index_q_proj": ("self_attn.indexer.q_proj", None), "self_attn.index_k_proj": ("self_attn.indexer.k_proj", None),
    "self_attn.index_q_norm": ("self_attn.indexer.q_norm", None), "self_attn.index_k_norm": ("self_attn.indexer.k_norm", None),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "block_sparse_moe.gate": ("mlp.gate", None), "block_sparse_moe": ("mlp.gate", None),   # router weight; its bias
    "block_sparse_moe.shared_experts.gate_proj": ("mlp.shared_experts.gate_up_proj", 0),
    "block_sparse_moe.shared_experts.up_proj": ("mlp.shared_experts.gate_up_proj", 1),
    "block_sparse_moe.shared_experts.down_proj": ("mlp.shared_experts.down_proj", None),
}
_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.w([123])$")
_EXPERT_SRC = {"1": "gate_proj", "3": "up_proj", "2": "down_proj"}


def _layer_rel(rel: str) -> list:
    """Candidates (canonical relative module, half) for an official layer-relative module name."""
    m = _EXPERT.match(rel)
    if m:
        return [(f"mlp.experts.{m.group(1)}.{_EXPERT_SRC[m.group(2)]}", None)]
    if rel in _LAYER:
        out = [_LAYER[rel]]
        if rel.startswith("block_sparse_moe.shared_experts.") and rel.endswith(("gate_proj", "up_proj")):
            out.append(("mlp.shared_experts." + rel.rsplit(".", 1)[1], None))   # MiniMax's unfused shared gate/up
        return out
    return [(rel, None)]


def sources_of(out_name: str, vl: bool) -> list:
    """Output tensor -> candidate (canonical source module, half, leaf), in order."""
    module, _, leaf = out_name.rpartition(".")
    if out_name.startswith(MTP_OUT):
        k, _, rest = module[len(MTP_OUT):].partition(".")
        base = f"{P}mtp.layers.{k}."
        if rest.startswith("transformer_layer."):
            return [(base + "transformer_layer." + r, h, leaf) for r, h in _layer_rel(rest[len("transformer_layer."):])]
        return [(base + rest, None, leaf)]
    if vl:
        if not module.startswith(VL):      # the vision tower: MiniMax's original names, as the source spells them
            return [(canonical(out_name).rpartition(".")[0], None, leaf)]
        module = module[len(VL):]
    if module == "lm_head":
        return [("lm_head", None, leaf)]
    if module in ("model.embed_tokens", "model.norm"):
        return [(P + module[len("model."):], None, leaf)]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
    if m:
        return [(f"{P}layers.{m.group(1)}.{r}", h, leaf) for r, h in _layer_rel(m.group(2))]
    return []


# ---------------------------------------------------------------- the config vLLM reads
def expected_config(src: dict, vl: bool) -> dict:
    """(dotted path -> value) that vLLM reads from config.json, from the source config (docs/FORMAT.md#output-config)."""
    tc = src.get("text_config") if isinstance(src.get("text_config"), dict) else src
    rp = tc.get("rope_parameters") or {}
    exp = {"model_type": "minimax_m3_vl", "torch_dtype": "bfloat16",
           "architectures": ["MiniMaxM3SparseForConditionalGeneration" if vl else "MiniMaxM3SparseForCausalLM"],
           "text_config.hidden_act": "swigluoai", "text_config.torch_dtype": "bfloat16",
           "text_config.swiglu_beta": tc.get("swiglu_beta", 1.0),
           "text_config.rope_theta": rp.get("rope_theta", tc.get("rope_theta")),
           "text_config.partial_rotary_factor": rp.get("partial_rotary_factor", tc.get("partial_rotary_factor", 1.0))}
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "dense_intermediate_size", "num_local_experts", "num_experts_per_tok", "vocab_size",
              "rms_norm_eps", "routed_scaling_factor", "scoring_func", "use_routing_bias", "swiglu_alpha", "swiglu_limit",
              "n_shared_experts"):
        if k in tc:
            exp["text_config." + k] = tc[k]
    if "n_shared_experts" not in tc:          # transformers keeps the width only
        exp["text_config.n_shared_experts"] = tc.get("shared_intermediate_size", tc["intermediate_size"]) // tc["intermediate_size"]
    if "mlp_layer_types" in tc:
        exp["text_config.moe_layer_freq"] = [1 if t == "sparse" else 0 for t in tc["mlp_layer_types"]]
    elif "moe_layer_freq" in tc:
        exp["text_config.moe_layer_freq"] = tc["moe_layer_freq"]
    sac = "text_config.sparse_attention_config."
    if "layer_types" in tc:
        exp[sac + "sparse_attention_freq"] = [1 if t == "minimax_m3_sparse" else 0 for t in tc["layer_types"]]
        for ours, theirs in (("sparse_num_index_heads", "index_n_heads"), ("sparse_index_dim", "index_head_dim"),
                             ("sparse_block_size", "index_block_size"), ("sparse_topk_blocks", "index_topk_blocks"),
                             ("sparse_local_block", "index_local_blocks")):
            if theirs in tc:
                exp[sac + ours] = tc[theirs]
    elif isinstance(tc.get("sparse_attention_config"), dict):
        for k, v in tc["sparse_attention_config"].items():
            if k in ("sparse_attention_freq", "sparse_num_index_heads", "sparse_index_dim", "sparse_block_size",
                     "sparse_topk_blocks", "sparse_local_block"):
                exp[sac + k] = v
    return exp


def _get(cfg, path):
    cur = cfg
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return KeyError
        cur = cur[k]
    return cur


# ---------------------------------------------------------------- reading the source
def _json(path):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def source_tensors(in_dir):
    """canonical source name -> TensorInfo, every shard the index names (plus model_extra_tensors), or the single
    model.safetensors; two spellings of one tensor are an error."""
    idx = os.path.join(in_dir, st.INDEX_FILE)
    files = sorted(set(_json(idx)["weight_map"].values())) if os.path.exists(idx) else [st.SINGLE_FILE]
    if os.path.exists(os.path.join(in_dir, "model_extra_tensors.safetensors")) and "model_extra_tensors.safetensors" not in files:
        files.append("model_extra_tensors.safetensors")
    out = {}
    for f in files:
        for t in st.read_header(os.path.join(in_dir, f)).tensors.values():
            c = canonical(t.name)
            if c in out:
                raise CheckpointError(f, t.name, f"another spelling of {out[c].name}")
            out[c] = t
    return out


def _category(canon: str):
    if canon.startswith(("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.",
                         "patch_merge_mlp.")):
        return "vision"
    if canon.startswith((P + "mtp.", "mtp.", "model.mtp.")):
        return "mtp"
    return "text"


# ---------------------------------------------------------------- the check
class _Reader:
    """Reads for the check: each tensor read once while it is needed (the two halves of a split [gate; up] read
    their source once: the last 8 source arrays are kept, never a whole shard), each source module decoded once."""

    def __init__(self):
        self.fds = {}
        self.recent = OrderedDict()       # (file, begin) -> array
        self.decoded = (None, None)       # (source qweight (file, begin), its exact decode)

    def fd(self, path):
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def array(self, info):
        return st.read_array(self.fd(info.file), info)

    def source(self, info):
        """A source tensor, kept among the last 8 read (the GPTQ triple of the module the next output shares)."""
        key = (info.file, info.begin)
        arr = self.recent.get(key)
        if arr is None:
            arr = self.recent[key] = self.array(info)
            if len(self.recent) > 8:
                self.recent.popitem(last=False)
        return arr

    def decode(self, s):
        """The exact decode of source module ``s`` (leaf -> TensorInfo), kept for the other half of a split."""
        key = (s["qweight"].file, s["qweight"].begin)
        if self.decoded[0] != key:
            self.decoded = (key, gptq.dequantize(*(self.source(s[x]) for x in QUANT_LEAVES)))
        return self.decoded[1]

    def rows(self, info, a, b):
        """Rows [a, b) of a tensor (its first axis), read alone."""
        item = st.DTYPES[info.dtype][0]
        row = item * int(np.prod(info.shape[1:])) if len(info.shape) > 1 else item
        raw = os.pread(self.fd(info.file), (b - a) * row, info.begin + a * row)
        return np.frombuffer(raw, dtype=st.DTYPES[info.dtype][1]).reshape((b - a, *info.shape[1:]))

    def same_bytes(self, a, b):
        n, off = a.nbytes, 0
        while off < n:
            k = min(64 << 20, n - off)
            if os.pread(self.fd(a.file), k, a.begin + off) != os.pread(self.fd(b.file), k, b.begin + off):
                return False
            off += k
        return True

    def close(self):
        for x in self.fds.values():
            os.close(x)


def check_against(out_dir, in_dir, output_headers, Finding, progress=None):
    """Yield a Finding for every output tensor or config field that is not what the source gives."""
    cfg = _json(os.path.join(out_dir, "config.json"))
    src_cfg = _json(os.path.join(in_dir, "config.json"))
    qc = cfg.get("quantization_config") or {}
    vl = qc.get("layout") == "vl" or cfg.get("architectures") == ["MiniMaxM3SparseForConditionalGeneration"]
    for path, want in expected_config(src_cfg, vl).items():
        got = _get(cfg, path)
        if got is KeyError:
            yield Finding("against", "config.json", path, f"missing; the source says {want!r}")
        elif got != want:
            yield Finding("against", "config.json", path, f"{got!r}, but the source says {want!r}")
    try:
        src = source_tensors(in_dir)
    except (CheckpointError, OSError, ValueError) as e:
        yield Finding("against", getattr(e, "file", in_dir), getattr(e, "tensor", None), f"source unreadable: {getattr(e, 'msg', e)}")
        return
    headers, hfind = output_headers(out_dir)
    yield from (Finding("against", f.file, f.tensor, f.message) for f in hfind)
    modules: dict = {}
    for h in headers.values():
        for t in h.tensors.values():
            mod, _, leaf = t.name.rpartition(".")
            modules.setdefault(mod, {})[leaf] = t
    used = set()
    kept = {"text"} | ({"vision"} if vl else set()) | ({"mtp"} if qc.get("mtp_blocks") else set())
    stock = qc.get("target") == "stock-vllm" or qc.get("quant_method") == "auto-round"
    # F32/F16 -> BF16 rounding is what --dtype bf16 asked for (recorded in the m3 plugin's config; the stock config
    # has no field for it), never for the router, which vLLM holds in float32
    may_round = stock or qc.get("plain_dtype") == "bf16"
    io = _Reader()
    try:
        for mod in sorted(modules):
            leaves = modules[mod]
            for finding in _check_module(mod, leaves, src, vl, stock, used, io, may_round and not _router(mod)):
                yield Finding("against", *finding)
            if progress:
                progress(sum(t.nbytes for t in leaves.values()))
    finally:
        io.close()
    for canon, t in sorted(src.items()):
        if canon not in used and _category(canon) in kept:
            yield Finding("against", os.path.basename(t.file), t.name, "source tensor not in the output")


#: the router's output modules (vLLM's names; the bias leaf sits on the MoE block itself): vLLM holds them in
#: float32, so they stay as stored
ROUTER_MODULES = (".block_sparse_moe.gate", ".block_sparse_moe")


def _router(mod):
    return mod.endswith(ROUTER_MODULES)


def _check_module(mod, leaves, src, vl, stock, used, io, may_round=True):
    """(file, tensor, message) for every way output module ``mod`` differs from its source."""
    any_leaf = next(iter(leaves))
    f_out = os.path.basename(leaves[any_leaf].file)
    for canon_mod, half, _ in sources_of(f"{mod}.{any_leaf}", vl):
        if any(f"{canon_mod}.{x}" in src for x in ("weight", "qweight") + tuple(leaves)):
            break
    else:
        yield f_out, f"{mod}.{any_leaf}", "has no source tensor"
        return
    s = {x: src[f"{canon_mod}.{x}"] for x in QUANT_LEAVES + ("g_idx", "weight", "bias", "e_score_correction_bias")
         if f"{canon_mod}.{x}" in src}
    if "qweight" in s and ("qweight" in leaves or "weight" in leaves):
        first = f"{canon_mod}.qweight" not in used      # a split source is checked once, not once per half
        used.update(f"{canon_mod}.{x}" for x in QUANT_LEAVES + ("g_idx",) if x in s)
        if "g_idx" in s and first:
            shape = gptq.infer_shape(s["qweight"].shape, s["qzeros"].shape, s["scales"].shape)
            if not gptq.is_trivial_g_idx(io.array(s["g_idx"]), shape):
                yield os.path.basename(s["g_idx"].file), s["g_idx"].name, "act-order g_idx: the output cannot hold it"
        if first and "scales" in s and s["scales"].dtype == "F16":    # the source's, whatever the output holds
            problem = gptq.scales_problem(io.source(s["scales"]))
            if problem:
                yield os.path.basename(s["scales"].file), s["scales"].name, f"{problem}: {mod} would hold NaN/inf"
    if "qweight" in leaves:
        yield from _gptq_module(mod, leaves, s, half, stock, io)
    for leaf, t in leaves.items():
        if leaf in QUANT_LEAVES:
            continue
        if leaf == "weight" and "qweight" in s:
            yield from _dequantized(mod, t, s, half, io)
            continue
        if leaf not in s:
            yield os.path.basename(t.file), t.name, f"no source tensor {canon_mod}.{leaf}"
            continue
        used.add(f"{canon_mod}.{leaf}")
        yield from _plain(t, s[leaf], half, io, may_round)


def _cols(n, half):
    return (0, n) if half is None else (half * n // 2, (half + 1) * n // 2)


def _gptq_module(mod, out, s, half, stock, io):
    f = os.path.basename(out["qweight"].file)
    if "qweight" not in s:
        yield f, f"{mod}.qweight", f"GPTQ in the output, but the source {s.get('weight', next(iter(s.values()))).name} is a plain weight"
        return
    try:
        so = gptq.infer_shape(out["qweight"].shape, out["qzeros"].shape, out["scales"].shape)
        ss = gptq.infer_shape(s["qweight"].shape, s["qzeros"].shape, s["scales"].shape)
    except (gptq.GPTQError, KeyError) as e:
        yield f, f"{mod}.qweight", f"not a GPTQ triple: {e}"
        return
    a, b = _cols(ss.out_features, half)
    if (so.in_features, so.out_features, so.group_size) != (ss.in_features, b - a, ss.group_size):
        yield f, f"{mod}.qweight", (f"[{so.in_features} -> {so.out_features}] group {so.group_size}, but the source "
                                    f"{s['qweight'].name} gives [{ss.in_features} -> {b - a}] group {ss.group_size}")
        return
    if so.bits == ss.bits:
        if half is None:
            for leaf in QUANT_LEAVES:
                if not io.same_bytes(out[leaf], s[leaf]):
                    yield f, f"{mod}.{leaf}", f"bytes differ from the source {s[leaf].name}"
            return
        per = ss.bits / 32
        za, zb = int(a * per), int(b * per)
        for leaf, (x, y) in (("qweight", (a, b)), ("scales", (a, b)), ("qzeros", (za, zb))):
            if not np.array_equal(io.array(out[leaf]), io.source(s[leaf])[:, x:y]):
                yield f, f"{mod}.{leaf}", f"differs from columns {x}:{y} of the source {s[leaf].name} (its {'gate' if half == 0 else 'up'} half)"
        return
    if not stock or so.bits < ss.bits:
        yield f, f"{mod}.qweight", f"written at {so.bits} bits, but the source {s['qweight'].name} is {ss.bits}-bit"
        return
    got = gptq.dequantize(*(io.array(out[x]) for x in QUANT_LEAVES))
    want = io.decode(s)[a:b]
    if not np.array_equal(got, want):
        yield f, f"{mod}.qweight", f"promoted {ss.bits} -> {so.bits} bits, but does not decode to the source {s['qweight'].name}"


_DEQUANTIZABLE = re.compile(r"\.self_attn\.(q|k|v|index_q|index_k)_proj$")


def _dequantized(mod, t, s, half, io):
    f = os.path.basename(t.file)
    if not _DEQUANTIZABLE.search(mod):
        yield f, t.name, f"bf16 in the output, but the source {s['qweight'].name} is GPTQ (only attention q/k/v and index projections are de-quantized)"
        return
    if t.dtype != "BF16":
        yield f, t.name, f"de-quantized module in {t.dtype}, expected BF16"
        return
    ss = gptq.infer_shape(s["qweight"].shape, s["qzeros"].shape, s["scales"].shape)
    a, b = _cols(ss.out_features, half)
    want = gptq.to_bf16(io.decode(s)[a:b])
    if not np.array_equal(io.array(t), want):
        yield f, t.name, f"is not the exact decode of {s['qweight'].name} rounded to bf16"


def _plain(t, s, half, io, may_round=True):
    f = os.path.basename(t.file)
    rows = s.shape[0] if s.shape else 1
    a, b = _cols(rows, half)
    if tuple(t.shape) != ((b - a,) + tuple(s.shape[1:]) if s.shape else ()):
        yield f, t.name, f"shape {list(t.shape)}, but the source {s.name} gives {[b - a, *s.shape[1:]]}"
        return
    if t.dtype == s.dtype:
        if half is None:
            ok = io.same_bytes(t, s)
        else:
            ok = np.array_equal(io.array(t).view(np.uint8).ravel(), io.rows(s, a, b).view(np.uint8).ravel())
        if not ok:
            yield f, t.name, f"differs from the source {s.name}" + (f" (rows {a}:{b})" if half is not None else "")
        return
    if t.dtype != "BF16" or s.dtype not in ("F32", "F16"):
        yield f, t.name, f"{t.dtype}, but the source {s.name} is {s.dtype} (only F32/F16 -> BF16 is a rounding)"
        return
    if not may_round:
        yield f, t.name, (f"rounded to {t.dtype} from the source's {s.dtype}, but "
                          + ("vLLM holds the router in float32: it must stay as stored" if _router(t.name.rpartition(".")[0])
                             else "quantization_config.plain_dtype does not say bf16 (--dtype bf16)"))
        return
    step = max(1, (64 << 20) // max(1, t.nbytes // max(1, b - a)))
    for r in range(a, b, step):                      # row blocks: an embedding table stays out of memory
        e = min(b, r + step)
        want = gptq.to_bf16(io.rows(s, r, e).astype(np.float32))
        got = io.rows(t, r - a, e - a)
        if not np.array_equal(got.view(np.uint16), want.reshape(got.shape)):
            yield f, t.name, f"is not {s.name} ({s.dtype}) rounded to bf16"
            return
