"""m3-convert on real auto-round fixtures: names, numerics, config, determinism.

The expected names here are an independent oracle written from docs/FORMAT.md#output-names (vLLM's
MiniMaxM3SparseForCausalLM), not the converter's own table; the numerical
reference is auto-round's own decoder (stored in <fixture>.reference.safetensors
by tests/fixtures/make_fixtures.py).
"""
import hashlib
import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import ALL, FIXTURES, NAMINGS, all_tensors, run_convert
from m3_convert import gptq

P = "model.language_model.layers.{L}."


def oracle(tc):
    """official module -> (source module in model naming, half or None), and plain tensors -> source tensor."""
    lin, plain = {}, {}
    moe = [t == "sparse" for t in tc["mlp_layer_types"]]
    sparse = [t == "minimax_m3_sparse" for t in tc["layer_types"]]
    plain["model.embed_tokens.weight"] = "model.language_model.embed_tokens.weight"
    plain["model.norm.weight"] = "model.language_model.norm.weight"
    plain["lm_head.weight"] = "language_model.lm_head.weight"
    for L in range(tc["num_hidden_layers"]):
        o, s = f"model.layers.{L}.", P.format(L=L)
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            plain[o + n + ".weight"] = s + n + ".weight"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin[o + "self_attn." + n] = (s + "self_attn." + n, None)
        if sparse[L]:
            for x in ("q", "k"):
                lin[o + f"self_attn.index_{x}_proj"] = (s + f"self_attn.indexer.{x}_proj", None)
                plain[o + f"self_attn.index_{x}_norm.weight"] = s + f"self_attn.indexer.{x}_norm.weight"
        if moe[L]:
            plain[o + "block_sparse_moe.gate.weight"] = s + "mlp.gate.weight"
            plain[o + "block_sparse_moe.e_score_correction_bias"] = s + "mlp.gate.e_score_correction_bias"
            for e in range(tc["num_local_experts"]):
                for w, n in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    lin[o + f"block_sparse_moe.experts.{e}.{w}"] = (s + f"mlp.experts.{e}.{n}", None)
            lin[o + "block_sparse_moe.shared_experts.gate_proj"] = (s + "mlp.shared_experts.gate_up_proj", 0)
            lin[o + "block_sparse_moe.shared_experts.up_proj"] = (s + "mlp.shared_experts.gate_up_proj", 1)
            lin[o + "block_sparse_moe.shared_experts.down_proj"] = (s + "mlp.shared_experts.down_proj", None)
        else:
            lin[o + "mlp.gate_proj"] = (s + "mlp.gate_up_proj", 0)
            lin[o + "mlp.up_proj"] = (s + "mlp.gate_up_proj", 1)
            lin[o + "mlp.down_proj"] = (s + "mlp.down_proj", None)
    return lin, plain


def src_cfg(name):
    return json.loads((FIXTURES / name / "config.json").read_text())


def reference():
    """auto-round's own decode of every quantized module, keyed by model-naming module name."""
    f = safe_open(str(FIXTURES / "ar_model_naming.reference.safetensors"), "pt")
    meta = json.loads(f.metadata()["reference"])
    return {k: f.get_tensor(k) for k in f.keys()}, meta


def _canon(k):
    from m3_convert.names import canonical
    return canonical(k)


@pytest.mark.parametrize("name", ALL)
def test_key_set_is_exactly_the_official_names(converted, name):
    tc = src_cfg(name)["text_config"]
    lin, plain = oracle(tc)
    out = all_tensors(converted[name])
    qc = json.loads((converted[name] / "config.json").read_text())["quantization_config"]
    expected = set(plain)
    for mod in lin:
        bits = qc["modules"][mod]["bits"]
        expected |= {f"{mod}.weight"} if bits is None else {f"{mod}.{x}" for x in ("qweight", "qzeros", "scales")}
    assert set(out) == expected
    assert set(qc["modules"]) == set(lin)


@pytest.mark.parametrize("name", NAMINGS)
def test_every_module_decodes_to_the_autoround_reference(converted, name):
    tc = src_cfg(name)["text_config"]
    lin, _ = oracle(tc)
    refs, meta = reference()
    out = all_tensors(converted[name])
    qc = json.loads((converted[name] / "config.json").read_text())["quantization_config"]["modules"]
    sparse = [t == "minimax_m3_sparse" for t in tc["layer_types"]]
    n_quant = n_deq = 0
    for mod, (src, half) in lin.items():
        if ".index_" in mod:
            continue  # bf16 in the source: byte-compared below
        ref = refs[src]
        if half is not None:
            n = ref.shape[0] // 2
            ref = ref[:n] if half == 0 else ref[n:]
        if qc[mod]["bits"] is None:  # de-quantized: exactly the bf16 rounding of the exact decode
            got = out[f"{mod}.weight"]
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, ref.to(torch.bfloat16)), mod
            n_deq += 1
        else:
            qw, qz, sc = (out[f"{mod}.{x}"].numpy() for x in ("qweight", "qzeros", "scales"))
            dec = gptq.dequantize(qw, qz, sc)
            assert np.array_equal(dec, ref.numpy()), mod
            assert qc[mod]["bits"] == meta["bits"][src]
            n_quant += 1
    # sparse layers' q/k/v are always bf16; the fixture has every width in every role
    for L, sp in enumerate(sparse):
        for n in ("q_proj", "k_proj", "v_proj"):
            if sp:
                assert qc[f"model.layers.{L}.self_attn.{n}"]["bits"] is None
    assert n_quant > 40 and n_deq >= 9
    assert {qc[m]["bits"] for m in qc if qc[m]["bits"]} == {2, 3, 4, 8}


@pytest.mark.parametrize("name", ALL)
def test_untouched_tensors_are_the_source_bytes(converted, name):
    tc = src_cfg(name)["text_config"]
    lin, plain = oracle(tc)
    out = all_tensors(converted[name])
    src = {_canon(k): v for k, v in all_tensors(FIXTURES / name).items()}
    src["lm_head.weight"] = src.pop("lm_head.weight")
    checked = 0
    for o, s in plain.items():
        s = _canon(s)
        assert out[o].dtype == src[s].dtype and torch.equal(out[o].view(torch.uint8) if out[o].dim() else out[o], src[s].view(torch.uint8) if src[s].dim() else src[s]), o
        checked += 1
    for mod, (s, half) in lin.items():
        if half is not None:
            continue
        for leaf in ("qweight", "qzeros", "scales", "weight"):
            if f"{mod}.{leaf}" in out and f"{s}.{leaf}" in src:
                assert torch.equal(out[f"{mod}.{leaf}"], src[f"{s}.{leaf}"]), mod
                checked += 1
    assert checked > 100


def test_other_topology_decodes_to_the_autoround_reference(converted):
    """ar_alt (5 layers, n_shared_experts 2, seeded bits): sha256 of auto-round's own float32 decode."""
    ref = json.loads((FIXTURES / "ar_alt.reference.json").read_text())
    tc = src_cfg("ar_alt")["text_config"]
    lin, _ = oracle(tc)
    out = all_tensors(converted["ar_alt"])
    qc = json.loads((converted["ar_alt"] / "config.json").read_text())["quantization_config"]["modules"]
    fused = {}
    n = 0
    for mod, (src, half) in lin.items():
        if src not in ref:
            continue   # bf16 in the source (indexer)
        if qc[mod]["bits"] is None:
            w = out[f"{mod}.weight"].float().numpy()
            fused.setdefault(src, {})[half] = ("bf16", w)
            continue
        qw, qz, sc = (out[f"{mod}.{x}"].numpy() for x in ("qweight", "qzeros", "scales"))
        assert qc[mod]["bits"] == ref[src]["bits"], mod
        fused.setdefault(src, {})[half] = ("f32", gptq.dequantize(qw, qz, sc))
    for src, parts in fused.items():
        kinds = {k for k, _ in parts.values()}
        w = np.concatenate([parts[h][1] for h in sorted(parts, key=lambda h: -1 if h is None else h)])
        if kinds == {"f32"}:
            # auto-round's decoder multiplies by an identity matrix, which turns -0.0 into +0.0: compare values
            w = np.ascontiguousarray(w + np.float32(0.0), dtype="<f4")
            assert hashlib.sha256(w.tobytes()).hexdigest() == ref[src]["sha256"], src
            n += 1
    assert n >= len(ref) - 12   # every module kept quantized is checked (de-quantized q/k/v: exact by test below)
    assert {v["bits"] for v in ref.values()} == {2, 3, 4, 8}


def test_dense_attention_rule(converted):
    """L0 (q/k/v all 4-bit) stays quantized; L1 (8/3/2-bit) cannot share one scheme: de-quantized."""
    qc = json.loads((converted["ar_model_naming"] / "config.json").read_text())["quantization_config"]["modules"]
    assert [qc[f"model.layers.0.self_attn.{n}_proj"]["bits"] for n in "qkv"] == [4, 4, 4]
    assert [qc[f"model.layers.1.self_attn.{n}_proj"]["bits"] for n in "qkv"] == [None, None, None]
    assert qc["model.layers.0.mlp.gate_proj"] == qc["model.layers.0.mlp.up_proj"] == {"bits": 3, "group_size": 128}
    assert qc["model.layers.1.block_sparse_moe.shared_experts.down_proj"]["bits"] == 8


@pytest.mark.parametrize("name", ALL)
def test_config_is_what_vllm_reads(converted, name):
    src = src_cfg(name)["text_config"]
    out = json.loads((converted[name] / "config.json").read_text())
    tc = out["text_config"]
    assert out["model_type"] == "minimax_m3_vl" and out["architectures"] == ["MiniMaxM3SparseForCausalLM"]
    assert tc["hidden_act"] == "swigluoai"
    assert tc["rope_theta"] == src["rope_parameters"]["rope_theta"]
    assert tc["partial_rotary_factor"] == src["rope_parameters"]["partial_rotary_factor"]
    assert tc["rotary_dim"] == int(src["head_dim"] * src["rope_parameters"]["partial_rotary_factor"])
    assert tc["swiglu_beta"] == 1.0 and tc["swiglu_alpha"] == src["swiglu_alpha"] and tc["swiglu_limit"] == src["swiglu_limit"]
    assert tc["n_shared_experts"] == src["n_shared_experts"]
    assert tc["moe_layer_freq"] == [1 if t == "sparse" else 0 for t in src["mlp_layer_types"]]
    sac = tc["sparse_attention_config"]
    assert sac["sparse_attention_freq"] == [1 if t == "minimax_m3_sparse" else 0 for t in src["layer_types"]]
    assert (sac["sparse_num_index_heads"], sac["sparse_index_dim"], sac["sparse_block_size"], sac["sparse_topk_blocks"],
            sac["sparse_local_block"]) == (src["index_n_heads"], src["index_head_dim"], src["index_block_size"],
                                           src["index_topk_blocks"], src["index_local_blocks"])
    for k in ("hidden_size", "intermediate_size", "dense_intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "routed_scaling_factor", "vocab_size"):
        assert tc[k] == src[k], k
    assert tc["torch_dtype"] == "bfloat16"
    qc = out["quantization_config"]
    assert qc["quant_method"] == "m3_gptq" and "bits" not in qc and qc["zero_point"] == "gptq_v1"
    assert json.loads((converted[name] / "quantization_config.json").read_text()) == qc


def test_namings_give_identical_tensors_and_configs(converted):
    a = all_tensors(converted["ar_model_naming"])
    for other in ("ar_reverted_naming", "ar_gptq_gidx"):
        b = all_tensors(converted[other])
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (other, k)
        ca = json.loads((converted["ar_model_naming"] / "config.json").read_text())
        cb = json.loads((converted[other] / "config.json").read_text())
        assert ca["text_config"] == cb["text_config"]
        assert ca["quantization_config"]["modules"] == cb["quantization_config"]["modules"]


def test_two_runs_are_byte_identical_and_sha256sum_compatible(converted, tmp_path):
    again = tmp_path / "again"
    r = run_convert(FIXTURES / "ar_model_naming", again, "--max-shard-size", "1MB", "--quiet")
    assert r.exit_code == 0, r.output
    assert (again / "SHA256SUMS").read_bytes() == (converted["ar_model_naming"] / "SHA256SUMS").read_bytes()
    p = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=again, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    listed = {line.split("  ", 1)[1] for line in (again / "SHA256SUMS").read_text().splitlines()}
    import os
    assert listed == set(os.listdir(again)) - {"SHA256SUMS"}


def test_non_weight_files_are_copied_byte_for_byte(converted):
    for f in ("LICENSE", "README.md", "generation_config.json"):
        assert (converted["ar_model_naming"] / f).read_bytes() == (FIXTURES / "ar_model_naming" / f).read_bytes()


def test_index_total_size_and_map(converted):
    d = converted["ar_model_naming"]
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    sizes = 0
    for f in set(idx["weight_map"].values()):
        with safe_open(str(d / f), "pt") as h:
            for k in h.keys():
                assert idx["weight_map"][k] == f
                t = h.get_slice(k)
                sizes += int(np.prod(t.get_shape())) * {"BF16": 2, "F16": 2, "I32": 4, "F32": 4}[t.get_dtype()]
    assert idx["metadata"]["total_size"] == sizes


def test_dry_run_reports_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    r = run_convert(FIXTURES / "ar_model_naming", out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert not out.exists()
    assert s["dropped"]["vision"]["tensors"] > 0 and s["dropped"]["mtp"]["tensors"] == 3
    assert s["bits_histogram"]["3"] > 0 and s["modules"]["dequant"] == 9 and s["modules"]["split"] == 4
    assert s["input_bytes"] > 0 and s["output_bytes"] > 0
    r = run_convert(FIXTURES / "ar_model_naming", out, "--dry-run")
    assert "left out (vision" in r.output and "left out (mtp" in r.output and "bits" in r.output


def test_dry_run_quiet_prints_nothing_and_leaves_the_collector_on(tmp_path):
    """--dry-run --quiet (the benchmark's fixed part) prints nothing; the collector, off while planning, is on again
    after a run, a dry run and a refused run, for a process that calls main() (tests, notebooks)."""
    import gc
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "never", "--dry-run", "--quiet")
    assert r.exit_code == 0 and r.output == "" and not (tmp_path / "never").exists()
    assert gc.isenabled()
    assert run_convert(FIXTURES / "ar_model_naming", tmp_path / "o", "--quiet").exit_code == 0 and gc.isenabled()
    assert run_convert(tmp_path / "missing", tmp_path / "o2", "--quiet").exit_code == 3 and gc.isenabled()


def test_summary_names_what_was_left_out(tmp_path):
    r = run_convert(FIXTURES / "ar_reverted_naming", tmp_path / "o")
    assert r.exit_code == 0
    assert "left out (mtp, not part of the text model): 3 tensors" in r.output
    assert "SHA256SUMS" in r.output


def _tensors_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("lm_head", ["model.language_model.lm_head.weight", "lm_head.weight"])
def test_all_lm_head_spellings(converted, tmp_path, lm_head):
    from conftest import copy_fixture, edit_checkpoint
    d = copy_fixture(tmp_path)
    edit_checkpoint(d, rename={"language_model.lm_head.weight": lm_head})
    r = run_convert(d, tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    _tensors_equal(all_tensors(tmp_path / "o"), all_tensors(converted["ar_model_naming"]))


def test_single_file_checkpoint_without_index(converted, tmp_path):
    from safetensors.torch import save_file
    from conftest import copy_fixture
    d = copy_fixture(tmp_path)
    merged = {}
    for f in sorted(d.glob("model-*.safetensors")):
        merged.update(all_tensors_of(f))
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    save_file(merged, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = run_convert(d, tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["input_files"] == 2 and s["dropped"]["mtp"]["tensors"] == 3   # model.safetensors + model_extra_tensors
    _tensors_equal(all_tensors(tmp_path / "o"), all_tensors(converted["ar_model_naming"]))
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()   # one output file: no index


def all_tensors_of(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_regex_extra_config_keys(converted, tmp_path):
    """A module's bits given by a regex (re.search, as auto-round does) instead of an exact key."""
    from conftest import copy_fixture, edit_quant_config
    d = copy_fixture(tmp_path)

    def to_regex(q):
        ec = q["extra_config"]
        for e in range(4):
            k = f"model.language_model.layers.2.mlp.experts.{e}.down_proj"
            ec[f".*layers\\.2\\.mlp\\.experts\\.{e}\\.down_proj$"] = ec.pop(k)
    edit_quant_config(d, to_regex)
    r = run_convert(d, tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    _tensors_equal(all_tensors(tmp_path / "o"), all_tensors(converted["ar_model_naming"]))


def test_quantization_config_only_in_its_own_file(converted, tmp_path):
    from conftest import copy_fixture
    d = copy_fixture(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c.pop("quantization_config")
    (d / "config.json").write_text(json.dumps(c))
    r = run_convert(d, tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    _tensors_equal(all_tensors(tmp_path / "o"), all_tensors(converted["ar_model_naming"]))


# ---------------------------------------------------------------- issue 27: output that never misleads
def test_a_layer_that_cannot_be_served_promoted_is_never_counted_as_zero(tmp_path):
    """ar_model_naming's MoE layer hits the Marlin shape problem, so the promoting fallback cannot serve it: the
    promoted figures say so (null in --json), they are not the other layers' sum."""
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o", "--dry-run", "--json")
    g = json.loads(r.stdout)["gpu_weight_bytes"]
    assert g["promoted"] is None and g["by_kind"]["routed_experts"]["promoted"] is None
    assert g["native"] > 0 and g["by_kind"]["routed_experts"]["native"] > 0
    assert g["tp"]["1"]["promoted_per_gpu"] is None and g["tp"]["1"]["promoted_problems"]
    text = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o", "--dry-run").output
    assert "every layer promoted: cannot be served: m3_gptq: model.layers.1.block_sparse_moe.experts" in text


def test_summary_mentions_reuse_only_when_resuming(tmp_path):
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o")
    assert r.exit_code == 0 and "wrote 1 shards, 6 files in SHA256SUMS" in r.output and "reused" not in r.output
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o", "--resume")
    assert r.exit_code == 0 and "wrote 1 shards, reused 0 (--resume, re-hashed)" in r.output   # no journal: rewritten


def test_errors_print_json_with_json_and_a_missing_input_is_bad_input(tmp_path):
    from conftest import run_verify
    for run, args in ((run_convert, (tmp_path / "missing", tmp_path / "o")), (run_verify, (tmp_path / "missing",)),
                      (run_verify, (tmp_path, "--against", tmp_path / "missing"))):
        r = run(*args, "--json")
        assert r.exit_code == 3, r.output
        d = json.loads(r.stdout)
        assert d["ok"] is False and d["exit_code"] == 3 and "does not exist" in d["error"]
        assert "does not exist" in r.stderr
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o2", "--keep-mtp", "--json")   # a usage error too
    assert r.exit_code == 2 and json.loads(r.stdout)["exit_code"] == 2


def test_verify_verdict_is_on_stdout(converted):
    from conftest import run_verify
    r = run_verify(converted["ar_model_naming"])
    assert r.exit_code == 0 and r.stdout.startswith("OK: 0 finding(s)")
