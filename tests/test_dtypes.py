"""Plain tensors stored F32 or F16 (issue 14): one dtype policy (names.PLAIN_DTYPES / served_dtype) read by the
planner, m3-verify's structure check and the --vllm check.

ar_f32 is the real producer's export on a CPU without bf16 (auto-round: "amp is set to FALSE"), ar_f16 a float16
model quantized in its own dtype: every plain tensor (embeddings, lm_head, norms, router and bias, indexer, vision)
is F32 / F16. By default m3-convert writes them as stored (exact bytes; vLLM casts on load); ``--dtype bf16`` rounds
those vLLM holds in bf16 exactly as torch's .to(torch.bfloat16) (vLLM's load) and keeps the float32 router.
"""
import json
import shutil

import pytest
import torch

from conftest import FIXTURES, all_tensors, edit_checkpoint, need_vllm, run_convert, run_verify
from m3_convert import names
from test_verify import rehash

PLAIN_LEAVES = ("weight", "bias", "e_score_correction_bias")


def _plain(tensors):
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] in PLAIN_LEAVES and v.dtype != torch.int32}


@pytest.mark.parametrize("name,dtype", [("ar_f32", torch.float32), ("ar_f16", torch.float16)])
def test_default_keeps_every_plain_tensor_as_stored(converted, name, dtype):
    out = all_tensors(converted[name])
    src = all_tensors(FIXTURES / name)
    kept = [k for k, v in _plain(out).items() if v.dtype == dtype]
    assert len(kept) >= 27, kept                # embeddings, lm_head, norms, router + bias, indexer
    r = run_verify(converted[name], "--against", FIXTURES / name, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output
    assert any(torch.equal(out["lm_head.weight"], v) for k, v in src.items() if k.endswith("lm_head.weight"))


@pytest.mark.parametrize("name", ["ar_f32", "ar_f16"])
def test_summary_reports_plain_dtypes(name, tmp_path):
    r = run_convert(FIXTURES / name, tmp_path / "o", "--dry-run", "--json")
    stats = json.loads(r.output)
    wide = "F32" if name == "ar_f32" else "F16"
    assert stats["plain_dtypes"][wide]["tensors"] >= 27 and stats["plain_dtype_mode"] == "source"
    text = run_convert(FIXTURES / name, tmp_path / "o", "--dry-run").output
    assert f"{wide} (" in text and "--dtype bf16 rounds" in text


@pytest.mark.parametrize("name", ["ar_f32", "ar_f16"])
def test_dtype_bf16_rounds_exactly_as_torch_and_keeps_the_router(name, tmp_path):
    out_dir = tmp_path / "o"
    r = run_convert(FIXTURES / name, out_dir, "--dtype", "bf16", "--quiet")
    assert r.exit_code == 0, r.output
    base = run_convert(FIXTURES / name, tmp_path / "d", "--quiet")
    assert base.exit_code == 0
    cast, ref = all_tensors(out_dir), all_tensors(tmp_path / "d")     # the default output holds the source values
    n_cast = saved = 0
    for k, v in _plain(ref).items():
        if names.served_dtype(k) == "F32":          # the router: vLLM holds it in float32, never rounded here
            assert cast[k].dtype == v.dtype and torch.equal(cast[k], v), k
            continue
        assert cast[k].dtype == torch.bfloat16, k
        want = v.to(torch.bfloat16)                  # torch's own rounding: what vLLM's load does
        assert torch.equal(cast[k].view(torch.int16), want.view(torch.int16)), k
        n_cast += v.dtype != torch.bfloat16
        saved += v.numel() * (v.element_size() - 2)
    assert n_cast >= 25
    for k, v in ref.items():                         # GPTQ tensors untouched (scales stay fp16)
        if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales"):
            assert cast[k].dtype == v.dtype and torch.equal(cast[k], v), k
    if name == "ar_f32":
        assert saved > 700_000                       # every F32 tensor vLLM holds in bf16: half its bytes
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["quantization_config"]["plain_dtype"] == "bf16"
    r = run_verify(out_dir, "--against", FIXTURES / name, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output


def test_a_wrong_cast_is_found(tmp_path):
    out_dir = tmp_path / "o"
    assert run_convert(FIXTURES / "ar_f32", out_dir, "--dtype", "bf16", "--quiet").exit_code == 0
    t = all_tensors(out_dir)["model.norm.weight"].clone()
    t.view(torch.int16)[3] += 1                       # one ulp off the round-to-nearest-even result
    edit_checkpoint_single(out_dir, "model.norm.weight", t)
    rehash(out_dir)
    r = run_verify(out_dir, "--against", FIXTURES / "ar_f32", "--json")
    found = json.loads(r.output)["findings"]
    assert r.exit_code == 1
    assert [(f["tensor"], f["message"]) for f in found] == [
        ("model.norm.weight", "is not model.language_model.norm.weight (F32) rounded to bf16")]


def edit_checkpoint_single(d, name, value):
    from safetensors.torch import load_file, save_file
    f = d / "model.safetensors"
    ts = load_file(str(f))
    ts[name] = value
    save_file(ts, str(f), metadata={"format": "pt"})


def test_structure_accepts_any_plain_float_but_nothing_else(converted, tmp_path):
    d = tmp_path / "o"
    shutil.copytree(converted["ar_f32"], d)
    edit_checkpoint(d, remove=["model.norm.weight"])
    edit_checkpoint(d, add={"model.norm.weight": torch.zeros(256, dtype=torch.int32)})
    rehash(d)
    r = run_verify(d, "--json")
    assert [(f["check"], f["tensor"], f["message"]) for f in json.loads(r.output)["findings"]] == [
        ("structure", "model.norm.weight", "dtype I32, expected BF16/F16/F32")]


@pytest.mark.parametrize("use_bias", [True, False])
def test_routing_bias_follows_the_config_in_convert_and_verify(tmp_path, use_bias):
    """vLLM builds the router's e_score_correction_bias exactly when use_routing_bias: the converter refuses a
    checkpoint that disagrees (a missing bias would be uninitialised, an extra one skipped silently) and m3-verify
    expects the bias exactly then."""
    src = tmp_path / "in"
    shutil.copytree(FIXTURES / "gpu_tiny", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["use_routing_bias"] = use_bias
    (src / "config.json").write_text(json.dumps(cfg))
    if use_bias:
        wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        edit_checkpoint(src, remove=[k for k in wm if k.endswith("layers.1.mlp.gate.e_score_correction_bias")])
    r = run_convert(src, tmp_path / "o", "--quiet")
    assert r.exit_code == 3
    msg = "missing, but text_config.use_routing_bias is true" if use_bias else "present, but text_config.use_routing_bias is false"
    assert "model.language_model.layers.1.mlp.gate.e_score_correction_bias: " + msg in r.output
    if not use_bias:   # without the bias tensors, convert and verify agree (and vLLM loads every parameter)
        wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        edit_checkpoint(src, remove=[k for k in wm if k.endswith("mlp.gate.e_score_correction_bias") and ".mtp." not in k])
        assert run_convert(src, tmp_path / "o2", "--quiet").exit_code == 0
        r = run_verify(tmp_path / "o2", "--against", src, "--json")
        assert r.exit_code == 0, r.output


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["ar_f32", "ar_f16"])
def test_dtype_bf16_loads_exactly_in_vllm(name, tmp_path):
    need_vllm()
    out_dir = tmp_path / "o"
    assert run_convert(FIXTURES / name, out_dir, "--dtype", "bf16", "--quiet").exit_code == 0
    r = run_verify(out_dir, "--vllm", "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["ok"], rep["findings"]


def test_against_refuses_a_rounding_nobody_asked_for(tmp_path):
    """m3-verify --against accepts F32 -> BF16 rounding only where --dtype bf16 asked for it (the config records
    plain_dtype) and never for the router, which vLLM holds in float32: its own rule, not the planner's."""
    out_dir = tmp_path / "o"
    assert run_convert(FIXTURES / "ar_f32", out_dir, "--dtype", "bf16", "--quiet").exit_code == 0
    ts = all_tensors(out_dir)
    router = next(k for k in ts if k.endswith("block_sparse_moe.gate.weight"))
    assert ts[router].dtype == torch.float32
    edit_checkpoint_single(out_dir, router, ts[router].to(torch.bfloat16))     # the router rounded too
    rehash(out_dir)
    found = json.loads(run_verify(out_dir, "--against", FIXTURES / "ar_f32", "--json").output)["findings"]
    assert [(f["check"], f["tensor"]) for f in found] == [("against", router)]
    assert "router in float32" in found[0]["message"]
    cfg = json.loads((out_dir / "config.json").read_text())
    del cfg["quantization_config"]["plain_dtype"]                               # as if --dtype source wrote it
    (out_dir / "config.json").write_text(json.dumps(cfg))
    rehash(out_dir)
    found = json.loads(run_verify(out_dir, "--against", FIXTURES / "ar_f32", "--json").output)["findings"]
    rounded = {f["tensor"] for f in found if "plain_dtype does not say bf16" in f["message"]}
    assert "model.norm.weight" in rounded and len(rounded) >= 25 and router not in rounded
