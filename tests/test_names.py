"""The name table's fast paths give exactly what its plain two-stage definition gives.

``names.resolve`` skips the alias scan for a name that ``match`` accepts as it is; that is only
right if no ALIASES rule can rewrite a canonical module name. ``match`` is string operations,
not a regex. Both are checked here against the definitions, on every rule and on every tensor
name of the committed real exports (all three namings).
"""
import pytest

from conftest import ALL, FIXTURES
from m3_convert import names, st


def canonical_tensor_names():
    """One canonical source name per (rule, leaf), at a few layers / experts (multi-digit included)."""
    for m in names.MODULES:
        for layer in (0, 3, 59):
            for expert in ((0, 7, 127) if "{E}" in m.src else (None,)):
                for leaf in names.LEAVES:
                    yield names.source_module(m, layer, expert) + "." + leaf, m, layer, expert, leaf
    for m in names.GLOBAL_MODULES:
        for leaf in names.LEAVES:
            yield names.source_module(m, None) + "." + leaf, m, None, None, leaf


def test_no_alias_rewrites_a_canonical_rule_name():
    # the invariant resolve's fast path rests on, for every rule of the table
    checked = 0
    for name, module, layer, expert, leaf in canonical_tensor_names():
        assert names._ANY_ALIAS.search(name) is None, name
        assert names.canonical(name) == name
        m = names.match(name)
        assert m is not None and (m.module, m.layer, m.expert, m.leaf) == (module, layer, expert, leaf), name
        assert m.src_module == name.rsplit(".", 1)[0]
        assert names.resolve(name) == (name, m)
        checked += 1
    assert checked == len(names.LEAVES) * (sum(9 if "{E}" in m.src else 3 for m in names.MODULES) + len(names.GLOBAL_MODULES))


@pytest.mark.parametrize("fixture", ALL)
def test_resolve_equals_canonical_then_match_on_real_exports(fixture):
    seen = 0
    for path in sorted((FIXTURES / fixture).glob("*.safetensors")):
        for tname in st.read_header(str(path)).tensors:
            canon = names.canonical(tname)
            assert names.resolve(tname) == (canon, names.match(canon)), tname
            seen += 1
    assert seen > 50


@pytest.mark.parametrize("name", [
    "model.language_model.layers.3.mlp.experts.7.gate_proj",            # no leaf
    "model.language_model.layers.3.mlp.experts.7.gate_proj.bias",       # leaf no rule has
    "model.language_model.layers.x.self_attn.q_proj.qweight",           # layer not a number
    "model.language_model.layers.\u0663.self_attn.q_proj.qweight",      # a non-ASCII digit
    "model.language_model.layers.3.mlp.experts.-1.gate_proj.qweight",   # expert not a number
    "model.language_model.layers.3.mlp.experts.gate_proj.qweight",      # expert missing
    "model.language_model.layers.3.qweight",                            # no module
    "model.language_model.layers.3.self_attn.q_proj.weight\n",          # trailing newline
    "model.language_model.layers.3.self_attn.nope.qweight",             # unknown module
    "model.language_model.lm_head.weight",                              # an alias spelling, not canonical
    "weight", "", ".weight",
])
def test_match_refuses_what_no_rule_describes(name):
    assert names.match(name) is None


def test_resolve_undoes_aliases():
    canon, m = names.resolve("language_model.model.layers.4.block_sparse_moe.experts.9.w2.qzeros")
    assert canon == "model.language_model.layers.4.mlp.experts.9.down_proj.qzeros"
    assert (m.layer, m.expert, m.leaf, m.module.src) == (4, 9, "qzeros", "mlp.experts.{E}.down_proj")
    assert names.resolve("model.language_model.lm_head.weight")[0] == "lm_head.weight"
    assert names.resolve("mtp.0.enorm.weight") == ("mtp.0.enorm.weight", None)


@pytest.mark.parametrize("key", ["lm_head", "language_model.lm_head", "model.language_model.lm_head"])
def test_quant_config_keys_in_every_lm_head_spelling_are_exact(key):
    # the config keys go through the same name table as the tensors: every spelling of the lm_head
    # tensor names the same module (before, a key in the longer spellings was read as a regex, matched
    # nothing, and the module silently took the default scheme)
    from m3_convert.quantcfg import SourceQuantConfig
    q = SourceQuantConfig({"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True,
                           "extra_config": {key: {"bits": 8}}})
    assert q.exact == {"lm_head": q.lookup("lm_head")} and q.lookup("lm_head").bits == 8
    assert q.regex == []


def test_prefix_helpers_read_the_table():
    # every vision module vLLM builds sits under the one prefix the plugin and m3-verify test
    assert all(m.vllm.startswith(names.VLLM_VISION_PREFIX) for m in names.VISION_MODULES)
    assert names.out_layer("model.layers.12.self_attn.qkv_proj") == 12
    assert [names.out_layer(p) for p in ("model.layers.x.mlp", "model.layers.3", "lm_head", "language_model.model.layers.3.mlp")] == [None] * 4
    assert names.MTP_SHARED_TENSORS == ("model.embed_tokens.weight", "lm_head.weight")
    assert names.mtp_drafter_name(names.mtp_tensor(2, names.MTP_DECODER + "mlp.x", "weight")) == ("model.layers.2.", "transformer_layer.mlp.x.weight")
    assert names.mtp_drafter_name("language_model.model.layers.2.mlp.x.weight") is None
    # the MTP rules parse experts like the text rules
    mm = names.mtp_match(names.MTP_TEXT_PREFIX + "0.transformer_layer.mlp.experts.5.gate_proj.weight")
    assert mm.dst == ("transformer_layer.block_sparse_moe.experts.5.w1",)
    assert names.mtp_match(names.MTP_TEXT_PREFIX + "0.transformer_layer.mlp.experts.x.gate_proj.weight") is None
