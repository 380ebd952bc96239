"""The plugin's serving decisions and its per-width expert loading, without vLLM (m3_convert.serve).

The loader is checked on the real producer's tensors (gpu_mixed: every MoE layer mixes 2/3/4/8-bit experts):
each tensor-parallel rank of a TP 1/2 layer must hold exactly its slice of every expert, at the stored width,
so that its slots decode to exactly the rows (gate/up) or columns (down) of the full exact decode.
"""
import json

import numpy as np
import pytest
import torch

from conftest import FIXTURES, all_tensors
from m3_convert import gptq, names
from m3_convert.serve import compat, decide
from m3_convert.serve.linear import check_symmetric_zeros
from m3_convert.serve.moe import create_expert_params, load_expert, part_view, slot_table

P = "model.layers.{L}.block_sparse_moe.experts"


def _modules(per, L=1, group=128):
    return {f"{P.format(L=L)}.{e}.{s}": {"bits": b, "group_size": group} for e, bits in enumerate(per)
            for s, b in zip(("w1", "w3", "w2"), bits)}


def test_parts_hold_every_slot_once_at_its_width():
    per = [(2, 3, 4), (8, 8, 2), (3, 2, 3), (4, 4, 8)]
    d = decide.select_moe(P.format(L=1), _modules(per), 4, 1024, 512)
    assert d.kernel == decide.HUMMING and d.promoted == 0
    assert [(p.name, p.slots) for p in d.parts] == [
        ("w13_b2", (0, 5)), ("w13_b3", (1, 4)), ("w13_b4", (6, 7)), ("w13_b8", (2, 3)),
        ("w2_b2", (1,)), ("w2_b3", (2,)), ("w2_b4", (0,)), ("w2_b8", (3,))]
    index = decide.slot_index(d.parts)
    for e, (b1, b3, b2) in enumerate(per):
        for s, b in (("w1", b1), ("w3", b3), ("w2", b2)):
            part, i = index[decide.slot_of(s, e)]
            assert part.bits == b and part.slots[i] == decide.slot_of(s, e)[1]


@pytest.mark.parametrize("per,kernels,want", [
    ([(4, 4, 4)] * 4, decide.GPU_KERNELS, (decide.MARLIN, 4, 0)),             # uniform 4/8: vLLM's Marlin
    ([(8, 8, 8)] * 4, decide.GPU_KERNELS, (decide.MARLIN, 8, 0)),
    ([(3, 3, 3)] * 4, decide.GPU_KERNELS, (decide.HUMMING, None, 0)),          # 2/3-bit: humming, not promoted
    ([(2, 3, 4), (8, 8, 8)] * 2, decide.GPU_KERNELS, (decide.HUMMING, None, 0)),
    ([(2, 3, 4), (8, 8, 8)] * 2, decide.PROMOTE_KERNELS, (decide.MARLIN, 8, 6)),   # fallback: old behaviour
    ([(3, 3, 3)] * 4, decide.PROMOTE_KERNELS, (decide.MARLIN, 4, 12)),
])
def test_moe_kernel_choice(per, kernels, want):
    d = decide.select_moe(P.format(L=1), _modules(per), 4, 1024, 512, kernels)
    assert (d.kernel, d.width, d.promoted) == want
    assert bool(d.note) == (want[2] > 0)


def test_marlin_shape_problem_goes_to_humming_instead_of_failing():
    mods = _modules([(4, 4, 4)] * 4)
    assert decide.marlin_moe_shape_problem(256, 128, 128)
    d = decide.select_moe(P.format(L=1), mods, 4, 256, 128)
    assert d.kernel == decide.HUMMING and "Marlin" in d.note
    with pytest.raises(decide.ServeError, match="humming-kernels .* is unavailable"):
        decide.select_moe(P.format(L=1), mods, 4, 256, 128, decide.PROMOTE_KERNELS)


def test_marlin_moe_shape_guard():
    """The vLLM Marlin MoE scale-permutation shape that served wrong experts on the GPU."""
    assert decide.marlin_moe_shape_problem(256, 128, 128) is not None           # the GPU check's first gpu_tiny
    assert decide.marlin_moe_shape_problem(6144, 3072 // 24, 128) is not None   # real M3 at tensor-parallel 24
    assert decide.marlin_moe_shape_problem(6144, 3072 // 8, 128) is None        # real M3 at tensor-parallel 8
    assert decide.marlin_moe_shape_problem(256, 256, 128) is None               # gpu_tiny now


def test_tensor_parallel_shapes_refused_when_the_packing_cannot_split():
    mods = _modules([(3, 3, 3)] * 4)
    with pytest.raises(decide.ServeError, match="64 inputs per rank is not a whole number of 128-wide groups"):
        decide.select_moe(P.format(L=1), mods, 4, 1024, 64)                  # 256 / TP 4
    assert decide.split_problem(3072 // 8, 3, 128, "in") is None             # real M3, TP 8
    assert decide.split_problem(48, 3, 128, "out") == "48 features per rank do not fill whole 3-bit packing words"


def test_moe_refusals_name_the_layer():
    mods = _modules([(4, 4, 4)] * 2)
    mods[f"{P.format(L=1)}.1.w2"] = {"bits": None}
    with pytest.raises(decide.ServeError, match=r"model.layers.1.block_sparse_moe.experts mixes bf16 and GPTQ"):
        decide.select_moe(P.format(L=1), mods, 2, 1024, 512)
    mods = _modules([(4, 4, 4)] * 2)
    mods[f"{P.format(L=1)}.1.w2"]["group_size"] = 64
    with pytest.raises(decide.ServeError, match="mixes group sizes"):
        decide.select_moe(P.format(L=1), mods, 2, 1024, 512)
    mods = _modules([(4, 4, 4)] * 2)
    del mods[f"{P.format(L=1)}.0.w3"]
    with pytest.raises(decide.ServeError, match=r"no entry for model.layers.1.block_sparse_moe.experts.0.w3"):
        decide.select_moe(P.format(L=1), mods, 2, 1024, 512)


def test_linear_kernel_choice():
    shards = names.fused_shards()
    qkv = lambda b: {f"model.layers.0.self_attn.{n}_proj": {"bits": b, "group_size": 128} for n in "qkv"}
    sel = lambda b: decide.select_linear("model.layers.0.self_attn.qkv_proj", qkv(b), shards)
    assert (sel(4).kernel, sel(4).width, sel(8).kernel, sel(8).width) == (decide.GPTQ, 4, decide.GPTQ, 8)
    assert (sel(3).kernel, sel(3).width, sel(2).kernel, sel(2).width) == (decide.HUMMING, 3, decide.HUMMING, 2)
    d = decide.select_linear("model.layers.0.self_attn.qkv_proj", qkv(2), shards, decide.PROMOTE_KERNELS)
    assert (d.kernel, d.bits, d.width, d.promoted) == (decide.GPTQ, 2, 4, True)
    assert decide.select_linear("model.layers.0.self_attn.qkv_proj", qkv(None), shards).kernel == decide.BF16
    mixed = dict(qkv(4), **{"model.layers.0.self_attn.v_proj": {"bits": 8, "group_size": 128}})
    with pytest.raises(decide.ServeError, match="model.layers.0.self_attn.qkv_proj mixes quantization schemes"):
        decide.select_linear("model.layers.0.self_attn.qkv_proj", mixed, shards)


def test_gpu_bytes_native_vs_promoted():
    """The real M3 MoE layer: 128 experts of 3072 x 6144; one 8-bit expert among 2-bit ones makes promotion hold
    the whole layer at 8 bits (3.74x), native holds each at its width (plus scales, no zeros)."""
    per = [(2, 2, 2)] * 127 + [(8, 8, 8)]
    mods = _modules(per)
    native = decide.select_moe(P.format(L=1), mods, 128, 6144, 3072)
    promoted = decide.select_moe(P.format(L=1), mods, 128, 6144, 3072, decide.PROMOTE_KERNELS)
    n, p = decide.moe_bytes(native, 128, 6144, 3072), decide.moe_bytes(promoted, 128, 6144, 3072)
    codes = 3 * 6144 * 3072 * (127 * 2 + 8) // 8
    scales = 3 * 6144 * 3072 // 128 * 2 * 128
    assert n == codes + scales
    assert p == 3 * 6144 * 3072 * 8 * 128 // 8 + scales
    assert 3.7 < p / n < 3.8
    # humming pads a part's N to 256: real M3 at TP 8 (384 per rank) holds w13 halves at 512
    assert decide.humming_bytes(384, 6144, 2, 128) == 512 * 6144 * 2 // 8 + 512 * 48 * 2


def test_compact_tuning_keeps_the_default_kernel_of_each_size():
    full = [[0, 2, {"k": "a"}], [2, 16, {"k": "b"}], [16, 100, {"k": "c"}], [100, 1 << 30, {"k": "d"}]]
    out = compat.compact_tuning(full, rows=(1, 8, 32, 1024))
    assert out == [[0, 1, {"k": "a"}], [1, 8, {"k": "b"}], [8, 32, {"k": "c"}], [32, 1 << 30, {"k": "d"}]]
    for m in (1, 7, 8, 30, 5000):
        assert compat.block_m([[lo, hi, {"block_shape": [i, 0, 0]}] for i, (lo, hi, _) in enumerate(out)], m) == \
            next(i for i, (lo, hi, _) in enumerate(out) if lo < m <= hi)


def test_symmetric_zero_check():
    t = all_tensors(FIXTURES / "gpu_mixed")
    for name, v in t.items():
        if name.endswith(".qzeros"):
            base = name[: -len(".qzeros")]
            bits = gptq.infer_shape(t[base + ".qweight"].shape, v.shape, t[base + ".scales"].shape).bits
            check_symmetric_zeros(v, bits, base)           # every module of the real producer is symmetric
    qz = t["model.language_model.layers.1.mlp.experts.0.gate_proj.qzeros"].clone()
    qz.view(-1)[5] ^= 1
    with pytest.raises(ValueError, match=r"m3_gptq: E0\.qzeros: not the symmetric 2-bit zero point 2"):
        check_symmetric_zeros(qz, 2, "E0")


class _MoeConfig:
    def __init__(self, rank, size):
        self.tp_rank, self.tp_size = rank, size


class _Layer(torch.nn.Module):
    def __init__(self, rank, size):
        super().__init__()
        self.moe_config = _MoeConfig(rank, size)


@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_holds_exactly_its_slice_of_every_mixed_width_expert(tp):
    src = FIXTURES / "gpu_mixed"
    tc = json.loads((src / "config.json").read_text())["text_config"]
    E, H, I = tc["num_local_experts"], tc["hidden_size"], tc["intermediate_size"]
    t = all_tensors(src)
    for L in (1, 2, 3):
        mods, full = {}, {}
        for e in range(E):
            for s, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                base = f"model.language_model.layers.{L}.mlp.experts.{e}.{hf}"
                qw, qz, sc = (t[f"{base}.{x}"] for x in ("qweight", "qzeros", "scales"))
                mods[f"{P.format(L=L)}.{e}.{s}"] = {"bits": gptq.infer_shape(qw.shape, qz.shape, sc.shape).bits, "group_size": 128}
                full[e, s] = (qw, qz, sc)
        d = decide.select_moe(P.format(L=L), mods, E, H, I // tp)
        assert d.kernel == decide.HUMMING and {p.bits for p in d.parts} == {2, 3, 4, 8}
        for rank in range(tp):
            layer = _Layer(rank, tp)
            create_expert_params(layer, d, H, I // tp, E, torch.bfloat16)
            for (e, s), tensors in full.items():
                sub = "w2" if s == "w2" else "w13"
                for leaf, v in zip(("qweight", "qzeros", "scales"), tensors):
                    load_expert(layer, getattr(layer, f"{sub}_{leaf}"), v, sub, leaf, s, e)
            seen = 0
            for part in d.parts:
                views = [part_view(layer, part, leaf) for leaf in ("qweight", "qzeros", "scales")]
                for i, slot in enumerate(part.slots):
                    e, s = decide.expert_of(part.sublayer, slot)
                    got = gptq.dequantize(*(v[i].numpy() for v in views))
                    want = gptq.dequantize(*(x.numpy() for x in full[e, s]))
                    r0, r1 = rank * I // tp, (rank + 1) * I // tp
                    want = want[r0:r1] if part.sublayer == "w13" else want[:, r0:r1]
                    assert np.array_equal(got, want), (L, rank, part.name, e, s)
                    seen += 1
            assert seen == 3 * E
            _check_slot_tables(layer, d)


def _check_slot_tables(layer, d):
    """wmix's slot tables (issue 25) point each slot at exactly its part's view in the flat tensors."""
    for sub in ("w13", "w2"):
        tbl = slot_table(layer, sub, "cpu")
        assert tbl.halves == (2 if sub == "w13" else 1) and tbl.bits.numel() == tbl.halves * layer.m3_dims.num_experts
        held = 0
        for part in d.parts:
            if part.sublayer != sub:
                continue
            for leaf, offs in (("qweight", tbl.qoff), ("scales", tbl.soff)):
                flat, view = getattr(layer, f"{sub}_{leaf}").data, part_view(layer, part, leaf)
                for i, slot in enumerate(part.slots):
                    o = int(offs[slot])
                    assert torch.equal(flat[o:o + view[i].numel()].view_as(view[i]), view[i]), (part.name, slot)
            for slot in part.slots:
                assert int(tbl.bits[slot]) == part.bits
                held += 1
        assert held == tbl.bits.numel()


@pytest.mark.parametrize("rows, n, halves, sms, split", [(4, 3072, 2, 132, 4), (4, 6144, 1, 132, 4),
                                                         (1, 6144, 1, 132, 8), (1, 64, 1, 132, 8), (32, 6144, 1, 132, 1)])
def test_wmix_split_fills_the_sms(rows, n, halves, sms, split):
    assert decide.wmix_split(rows, n, 64, halves, sms) == split
    tiles = rows * halves * -(-n // 64)
    assert tiles * split >= decide.WMIX_PROGRAMS_PER_SM * sms or split == 8
    assert split == 1 or tiles * split // 2 < decide.WMIX_PROGRAMS_PER_SM * sms      # the smallest that does


def test_wmix_path_is_a_function_of_the_rows_per_expert():
    assert decide.wmix_path(1, 128) == decide.wmix_path(128, 128) == decide.wmix_path(8, 8) == "gemv"
    assert decide.wmix_path(129, 128) == decide.wmix_path(9, 8) == "tiled"
    small, large = (16, 64, 4, 1, "fields"), (64, 64, 4, 2, "words")
    assert decide.wmix_tile(129, 128) == decide.wmix_tile(2047, 128) == decide.wmix_tile(127, 8) == small
    assert decide.wmix_tile(2048, 128) == decide.wmix_tile(32768, 128) == decide.wmix_tile(128, 8) == large


def test_wmix_slot_table_refuses_a_slot_no_part_holds():
    """A decision whose parts leave a slot empty (never written by decide; a hand-made one here) stops the prepare
    with the layer and the slots named, instead of serving zeros or another expert's codes."""
    import dataclasses
    per = [(4, 4, 4)] * 7 + [(2, 2, 2)]
    d = decide.select_moe(P.format(L=3), _modules(per, L=3), 8, 256, 256)
    w2_parts = [p for p in d.parts if p.sublayer == "w2"]
    d = dataclasses.replace(d, parts=tuple(p for p in d.parts if p is not w2_parts[-1]))     # the 4-bit w2: experts 0-6
    layer = _Layer(0, 1)
    create_expert_params(layer, d, 256, 256, 8, torch.bfloat16)
    slot_table(layer, "w13", "cpu")                        # w13 whole: fine
    with pytest.raises(decide.ServeError, match=r"model.layers.3.block_sparse_moe.experts: w2 slots \[0, 1, 2, 3, 4, 5, 6\] are held by no part"):
        slot_table(layer, "w2", "cpu")


def test_loader_names_the_tensor_whose_bits_disagree():
    src = FIXTURES / "gpu_mixed"
    t = all_tensors(src)
    per = [(4, 4, 4)] * 7 + [(2, 2, 2)]       # the config claims 4 bits; expert 0's gate is 8-bit in the tensors
    d = decide.select_moe(P.format(L=3), _modules(per, L=3), 8, 256, 256)
    layer = _Layer(0, 1)
    create_expert_params(layer, d, 256, 256, 8, torch.bfloat16)
    qw = t["model.language_model.layers.3.mlp.experts.0.gate_proj.qweight"]
    with pytest.raises(decide.ServeError, match=r"model.layers.3.block_sparse_moe.experts.0.w1.qweight: shape \[64, 256\]"):
        load_expert(layer, layer.w13_qweight, qw, "w13", "qweight", "w1", 0)


def test_dry_run_reports_gpu_bytes_native_and_promoted(tmp_path):
    """--dry-run --json: gpu_weight_bytes from the headers alone. Routed experts native = every expert's codes at its
    stored width + its bf16 scales (computed here from the source tensors' shapes), promoted = every expert of a
    layer at the layer's widest width; TP sizes whose per-rank shapes cannot be served are named, not counted."""
    from conftest import run_convert
    r = run_convert(FIXTURES / "gpu_mixed", tmp_path / "o", "--dry-run", "--json", "--gpu-memory", "80")
    g = json.loads(r.output)["gpu_weight_bytes"]
    t = all_tensors(FIXTURES / "gpu_mixed")
    native = promoted = 0
    for L in (1, 2, 3):
        widths, sizes = [], []
        for e in range(8):
            for hf in ("gate_proj", "up_proj", "down_proj"):
                base = f"model.language_model.layers.{L}.mlp.experts.{e}.{hf}"
                sh = gptq.infer_shape(t[base + ".qweight"].shape, t[base + ".qzeros"].shape, t[base + ".scales"].shape)
                widths.append(sh.bits)
                sizes.append((sh.in_features * sh.out_features, sh.groups * sh.out_features * 2))
        native += sum(n * b // 8 + s for (n, s), b in zip(sizes, widths))
        promoted += sum(n * max(widths) // 8 + s for n, s in sizes)
    assert g["by_kind"]["routed_experts"] == {"native": native, "promoted": promoted}
    assert g["native"] < g["promoted"] and g["gpu_memory_gib"] == 80
    assert g["tp"]["1"]["fits"] and g["tp"]["2"]["promoted_problems"] and not g["tp"]["2"]["problems"]
    assert "64 inputs per rank is not a whole number of 128-wide groups" in g["tp"]["4"]["problems"][0]
    text = run_convert(FIXTURES / "gpu_mixed", tmp_path / "o", "--dry-run", "--gpu-memory", "80").output
    assert "GPU    : weights" in text and "TP 4: cannot be served" in text and "fits 80 GiB GPUs" in text


# ---------------------------------------------------------------- issue 24: what the MoE method relies on
class _Attrs:
    """A stand-in carrying only the attributes vLLM's RoutedExperts (0.32/0.33) sets before create_weights."""

    def __init__(self, **kw):
        self.activation, self.apply_router_weight_on_input, self.expert_map = "swigluoai_uninterleave", False, None
        self.local_num_experts = self.global_num_experts = 128
        self.swiglu_limit, self.swiglu_alpha, self.swiglu_beta = 7.0, 1.702, 1.0
        self.moe_config = None
        self.__dict__.update(kw)


def test_swiglu_parameters_are_read_never_defaulted():
    assert compat.swiglu(_Attrs()) == (7.0, 1.702, 1.0)
    cfg = _Attrs(moe_config=None)                      # vLLM keeps them on the layer and on its moe_config
    cfg.swiglu_beta = None
    cfg.moe_config = type("C", (), {"swiglu_beta": 1.0})()
    assert compat.swiglu(cfg) == (7.0, 1.702, 1.0)
    for name in compat.SWIGLU_FIELDS:                  # a None anywhere stops the load: no alpha 1 / beta 0 default
        with pytest.raises(ValueError, match=name):
            compat.swiglu(_Attrs(**{name: None}))


@pytest.mark.parametrize("kw, want", [
    ({}, None),
    ({"activation": type("E", (), {"value": "swigluoai_uninterleave"})()}, None),     # vLLM's MoEActivation enum
    ({"activation": "silu"}, "activation 'silu'"),
    ({"apply_router_weight_on_input": True}, "apply_router_weight_on_input"),
    ({"expert_map": object()}, "expert map"),
    ({"local_num_experts": 64}, "64 local of 128"),
])
def test_moe_contract_refuses_what_the_kernels_do_not_compute(kw, want):
    got = compat.moe_contract_problem(_Attrs(**kw))
    assert (got is None) if want is None else (want in got)


def test_only_the_vllm_releases_run_are_served(monkeypatch):
    monkeypatch.delenv("M3_GPTQ_ANY_VLLM", raising=False)
    for v in compat.SUPPORTED_VLLM:
        assert compat.vllm_version_problem(v) is None
    assert compat.vllm_version_problem("0.32.0+cpu") is None
    msg = compat.vllm_version_problem("0.31.0")
    assert "vLLM 0.31.0" in msg and all(v in msg for v in compat.SUPPORTED_VLLM)
    monkeypatch.setenv("M3_GPTQ_ANY_VLLM", "1")
    assert compat.vllm_version_problem("0.31.0") is None


def test_uniform_moe_layers_ask_vllm_for_marlin():
    moe = type("Cfg", (), {"moe_backend": "auto"})()
    assert compat.marlin_moe_config(moe) is moe and moe.moe_backend == "marlin"
    old = type("Cfg026", (), {})()                     # vLLM 0.26: no moe_backend field, nothing to ask
    assert compat.marlin_moe_config(old) is old and not hasattr(old, "moe_backend")


def test_plugin_refuses_act_order_and_other_conventions(monkeypatch):
    from m3_convert.serve.routing import full_config_problem
    monkeypatch.setattr(compat, "vllm_version_problem", lambda: None)
    ok = {"quant_method": "m3_gptq", "modules": {}, "desc_act": False, "zero_point": "gptq_v1"}
    assert full_config_problem(ok) is None
    assert "desc_act must be false" in full_config_problem({**ok, "desc_act": True})
    assert "desc_act must be false" in full_config_problem({k: v for k, v in ok.items() if k != "desc_act"})
    assert "zero_point" in full_config_problem({**ok, "zero_point": "gptq_v2"})
    assert "per-module map" in full_config_problem({**ok, "modules": None})
    monkeypatch.setattr(compat, "vllm_version_problem", lambda: "m3_gptq: vLLM 0.31.0 has not been run")
    assert "0.31.0" in full_config_problem(ok)


def test_moe_kernel_choice_defaults_to_humming_and_refuses_unknown(monkeypatch):
    monkeypatch.delenv("M3_MOE_KERNEL", raising=False)
    assert compat.moe_kernel() == "humming"          # wmix opts in: slower in prefill (issue 25)
    monkeypatch.setenv("M3_MOE_KERNEL", "WMIX")
    assert compat.moe_kernel() == "wmix"
    monkeypatch.setenv("M3_MOE_KERNEL", "hgemv")      # humming's weights, decode by hgemv: not yet run on a GPU
    assert compat.moe_kernel() == "hgemv"
    monkeypatch.setenv("M3_MOE_KERNEL", "triton")
    with pytest.raises(ValueError, match="M3_MOE_KERNEL='triton'"):
        compat.moe_kernel()
