"""Every refusal: exit code and a message naming the file and tensor; nothing complete-looking left behind."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import FIXTURES, copy_fixture, edit_checkpoint, edit_quant_config, run_convert, shard_of
from m3_convert import gptq

EXIT_USAGE, EXIT_INPUT = 2, 3
L0 = "model.language_model.layers.0."


def convert_fails(in_dir, out_dir, code, *needles):
    r = run_convert(in_dir, out_dir)
    assert r.exit_code == code, r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    assert "Traceback" not in r.output
    assert not (out_dir / "SHA256SUMS").exists()
    return r.output


def test_unknown_key(tmp_path):
    d = copy_fixture(tmp_path)
    edit_checkpoint(d, add={L0 + "self_attn.rogue.weight": torch.zeros(4, dtype=torch.bfloat16)})
    convert_fails(d, tmp_path / "o", EXIT_INPUT, L0 + "self_attn.rogue.weight", "unknown tensor", ".safetensors")


def test_missing_partner_tensor(tmp_path):
    d = copy_fixture(tmp_path)
    t = L0 + "self_attn.o_proj.qzeros"
    edit_checkpoint(d, remove=[t])
    convert_fails(d, tmp_path / "o", EXIT_INPUT, t, "missing partner tensor")


def test_config_bits_disagree_with_tensors(tmp_path):
    d = copy_fixture(tmp_path)
    edit_quant_config(d, lambda q: q["extra_config"][L0 + "self_attn.o_proj"].update(bits=4))
    out = convert_fails(d, tmp_path / "o", EXIT_INPUT, L0 + "self_attn.o_proj.qweight", "says 4 bits, tensors say 8 bits")
    assert shard_of(d, L0 + "self_attn.o_proj.qweight") in out


def test_bits_outside_supported_set(tmp_path):
    d = copy_fixture(tmp_path)
    edit_quant_config(d, lambda q: q["extra_config"][L0 + "self_attn.o_proj"].update(bits=5))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "config.json", "bits 5 not supported")


def test_config_and_quantization_config_json_disagree(tmp_path):
    d = copy_fixture(tmp_path)
    q = json.loads((d / "quantization_config.json").read_text())
    q["group_size"] = 64
    (d / "quantization_config.json").write_text(json.dumps(q))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "quantization_config.json", "differs")


def test_truncated_shard(tmp_path):
    d = copy_fixture(tmp_path)
    f = d / "model-00002-of-00006.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model-00002-of-00006.safetensors", "truncated")


def test_shard_listed_in_index_but_absent(tmp_path):
    d = copy_fixture(tmp_path)
    os.unlink(d / "model-00003-of-00006.safetensors")
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model-00003-of-00006.safetensors", "absent")


def test_invalid_json_config(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "config.json").write_text("{not json")
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "config.json", "not valid JSON")


def test_three_bit_split_off_word_boundary(tmp_path):
    """A fused 3-bit gate_up with 2 x 48 outputs: 48*3/32 = 4.5 qzeros words, so no lossless split exists. The config
    says 48 (dense_intermediate_size) and both dense layers have that width, so only the split is wrong."""
    d = copy_fixture(tmp_path)
    rng = np.random.default_rng(0)
    H, out = 256, 96
    add, remove = {}, []
    for L in (0, 3):                       # the fixture's dense-MLP layers
        p = f"model.language_model.layers.{L}.mlp."
        codes = rng.integers(0, 8, size=(H, out))
        add.update({p + "gate_up_proj.qweight": torch.from_numpy(gptq.pack_qweight(codes, 3)),
                    p + "gate_up_proj.qzeros": torch.from_numpy(gptq.pack_qzeros(np.full((H // 128, out), 3), 3)),
                    p + "gate_up_proj.scales": torch.ones(H // 128, out, dtype=torch.float16),
                    p + "down_proj.weight": torch.zeros(H, out // 2, dtype=torch.bfloat16)})
        remove += [p + f"{m}.{leaf}" for m in ("gate_up_proj", "down_proj") for leaf in ("qweight", "qzeros", "scales")]
    edit_checkpoint(d, remove=remove)
    edit_checkpoint(d, add=add)

    def widths(q):
        for L in (0, 3):
            q["extra_config"][f"model.language_model.layers.{L}.mlp.gate_up_proj"] = {"bits": 3}
            q["extra_config"][f"model.language_model.layers.{L}.mlp.down_proj"] = {"bits": 16}
    edit_quant_config(d, widths)
    c = json.loads((d / "config.json").read_text())
    c["text_config"]["dense_intermediate_size"] = out // 2
    (d / "config.json").write_text(json.dumps(c))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, L0 + "mlp.gate_up_proj.qzeros", "packing", "3-bit")


def test_out_dir_is_in_dir(tmp_path):
    d = copy_fixture(tmp_path)
    convert_fails(d, d, EXIT_USAGE, "in place")
    convert_fails(d, d / "sub", EXIT_USAGE, "inside IN_DIR")


def test_non_empty_out_dir_needs_force_and_unrelated_files_survive(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    convert_fails(FIXTURES / "ar_model_naming", out, EXIT_USAGE, "not empty", "--force")
    r = run_convert(FIXTURES / "ar_model_naming", out, "--force", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in (out / "SHA256SUMS").read_text()


def test_unreferenced_safetensors_file(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "stray.safetensors").write_bytes((d / "model-00001-of-00006.safetensors").read_bytes())
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "stray.safetensors", "not referenced")


def test_same_tensor_in_two_shards(tmp_path):
    d = copy_fixture(tmp_path)
    from safetensors.torch import load_file, save_file
    a = load_file(str(d / "model-00001-of-00006.safetensors"))
    k = sorted(a)[0]
    b = load_file(str(d / "model-00002-of-00006.safetensors"))
    b[k] = a[k]
    save_file(b, str(d / "model-00002-of-00006.safetensors"))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, k, "same tensor also in")


def test_layer_kind_disagrees_with_config(tmp_path):
    d = copy_fixture(tmp_path)
    for f in ("config.json",):
        c = json.loads((d / f).read_text())
        c["text_config"]["layer_types"][2] = "full_attention"   # layer 2 has indexer weights
        (d / f).write_text(json.dumps(c))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model.language_model.layers.2.self_attn.indexer", "config says layer 2")


def test_gptq_dynamic_keys():
    """auto_gptq exports: '+:regex' overrides bits, '-:regex' means not quantized, exact keys win."""
    from m3_convert.quantcfg import SourceQuantConfig
    m = "model.language_model.layers.0.self_attn.o_proj"
    q = SourceQuantConfig({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "dynamic": {
        r"+:.*layers\.0\.self_attn\.o_proj.*": {"bits": 8, "group_size": 128, "sym": True},
        r"-:.*layers\.1\.mlp\.gate.*": {},
    }})
    assert q.lookup(m).bits == 8
    assert q.lookup("model.language_model.layers.1.mlp.gate").bits is None          # "-:" excludes, global is 4
    assert q.lookup("model.language_model.layers.1.mlp.down_proj").bits == 4        # its neighbour keeps the global
    assert q.lookup("model.language_model.layers.2.self_attn.q_proj").bits == 4


def _edit_index(d, fn):
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


def test_index_places_a_tensor_in_the_wrong_shard(tmp_path):
    d = copy_fixture(tmp_path)
    t = L0 + "self_attn.o_proj.qweight"
    right = shard_of(d, t)
    wrong = next(f for f in sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())) if f != right)
    _edit_index(d, lambda wm: wm.__setitem__(t, wrong))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, right, t, "places it in", wrong)


def test_index_lists_a_tensor_no_shard_has(tmp_path):
    d = copy_fixture(tmp_path)
    ghost = L0 + "self_attn.o_proj.ghost"
    shard = shard_of(d, L0 + "self_attn.o_proj.qweight")
    _edit_index(d, lambda wm: wm.__setitem__(ghost, shard))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, shard, ghost, "but not in the file's header")


def test_index_leaves_out_a_tensor_a_shard_has(tmp_path):
    d = copy_fixture(tmp_path)
    t = L0 + "self_attn.o_proj.scales"
    shard = shard_of(d, t)
    _edit_index(d, lambda wm: wm.pop(t))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, shard, t, "not listed in model.safetensors.index.json")


# ---------------------------------------------------------------- config fields that cannot describe the tensors
def _edit_text_config(d, **fields):
    c = json.loads((d / "config.json").read_text())
    c["text_config"].update(fields)
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("field, value, needles", [
    ("vocab_size", 10**9, ["text_config.vocab_size = 1000000000: disagrees with the tensors",
                           "model.language_model.embed_tokens.weight (model-00005-of-00006.safetensors) has shape "
                           "[512, 256], the config gives [1000000000, 256]"]),
    ("hidden_size", None, ["config.json: text_config.hidden_size: must be an integer, got None"]),
    ("num_key_value_heads", "1", ["config.json: text_config.num_key_value_heads: must be an integer, got '1'"]),
    ("num_experts_per_tok", 5, ["text_config.num_experts_per_tok: 5 is more than num_local_experts 4"]),
    ("num_local_experts", 8, ["text_config.num_local_experts = 8: disagrees with the tensors", "mlp.gate.weight",
                              "has shape [4, 256], the config gives [8, 256]"]),
    ("head_dim", True, ["text_config.head_dim: must be an integer, got True"]),
    ("num_attention_heads", 4, ["text_config.num_attention_heads x text_config.head_dim = 4 x 128 = 512: disagrees"]),
    ("index_head_dim", 64, ["config.json: text_config.index_head_dim = 64: disagrees with the tensors", "indexer"]),
    ("dense_intermediate_size", 128, ["text_config.dense_intermediate_size", "model.language_model.layers.0.mlp."]),
    ("intermediate_size", 64, ["text_config.intermediate_size = 64: disagrees", "mlp.experts."]),
    ("rms_norm_eps", "1e-6", ["text_config.rms_norm_eps: must be a finite number, got '1e-6'"]),
    ("rope_parameters", [], ["text_config.rope_parameters: must be a JSON object, got []"]),
    ("hidden_size", "<drop>", ["text_config.hidden_size: missing"]),
    ("num_key_value_heads", 1.0, ["text_config.num_key_value_heads: must be an integer, got 1.0"]),
    ("num_attention_heads", 0, ["text_config.num_attention_heads: must be >= 1, got 0"]),
    ("rms_norm_eps", float("nan"), ["text_config.rms_norm_eps: must be a finite number, got nan"]),
    ("num_key_value_heads", 3, ["text_config.num_key_value_heads: 3 does not divide num_attention_heads 2"]),
    ("head_dim", 64, ["text_config.rotary_dim: 64 disagrees with head_dim*partial_rotary_factor = 32"]),
])
def test_config_that_cannot_describe_the_tensors_is_refused_before_writing(tmp_path, field, value, needles):
    d = copy_fixture(tmp_path)
    if value == "<drop>":
        c = json.loads((d / "config.json").read_text())
        del c["text_config"][field]
        (d / "config.json").write_text(json.dumps(c))
    else:
        _edit_text_config(d, **{field: value})
    out = convert_fails(d, tmp_path / "o", EXIT_INPUT, "m3-convert: error: config.json: text_config.", *needles)
    assert out.count("\n") == 1 and not (tmp_path / "o").exists(), out


def test_vision_config_and_vision_shapes_are_checked_with_keep_vision(tmp_path):
    d = copy_fixture(tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["vision_config"]["hidden_size"] = None
    (d / "config.json").write_text(json.dumps(c))
    r = run_convert(d, tmp_path / "o", "--keep-vision")
    assert r.exit_code == EXIT_INPUT and "m3-convert: error: config.json: vision_config.hidden_size: must be an " \
        "integer, got None" in r.output and not (tmp_path / "o" / "SHA256SUMS").exists(), r.output
    c["vision_config"]["hidden_size"] = json.loads((FIXTURES / "ar_model_naming" / "config.json").read_text())[
        "vision_config"]["hidden_size"]
    c["vision_config"]["intermediate_size"] *= 2
    (d / "config.json").write_text(json.dumps(c))
    r = run_convert(d, tmp_path / "o2", "--keep-vision")
    assert r.exit_code == EXIT_INPUT and ".safetensors: model.vision_tower.layers.0.mlp.fc1." in r.output \
        and "but vision_config" in r.output and not (tmp_path / "o2" / "SHA256SUMS").exists(), r.output


def test_mtp_shape_is_checked_with_keep_mtp(tmp_path):
    d = copy_fixture(tmp_path, "gpu_tiny")
    name = "language_model.model.mtp.layers.0.enorm.weight"
    edit_checkpoint(d, remove=[name])
    edit_checkpoint(d, add={name: torch.zeros(512, dtype=torch.bfloat16)})       # hidden_size is 256
    r = run_convert(d, tmp_path / "o", "--keep-vision", "--keep-mtp")
    assert r.exit_code == EXIT_INPUT, r.output
    assert f".safetensors: {name}: MTP tensor of shape [512]" in r.output and "the config gives [256]" in r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "o" / "SHA256SUMS").exists(), r.output


@pytest.mark.parametrize("make", ["missing", "file"])
def test_an_input_that_is_not_a_directory(tmp_path, make):
    src = tmp_path / "src"
    if make == "file":
        src.write_text("not a checkpoint")
    want = "IN_DIR is not a directory" if make == "file" else "IN_DIR does not exist"
    convert_fails(src, tmp_path / "o", EXIT_INPUT, f"m3-convert: error: {src}: {want}")
    assert not (tmp_path / "o").exists()


def test_a_module_the_config_has_but_the_source_lacks(tmp_path):
    d = copy_fixture(tmp_path)
    m = "model.language_model.layers.1.mlp.experts.3.gate_proj"
    edit_checkpoint(d, remove=[f"{m}.{leaf}" for leaf in ("qweight", "qzeros", "scales")])
    convert_fails(d, tmp_path / "o", EXIT_INPUT, f"(all shards): {m}: missing from the source",
                  "text_config.num_local_experts = 4", "uninitialised")


def test_more_layers_in_the_config_than_in_the_source(tmp_path):
    d = copy_fixture(tmp_path)
    c = json.loads((d / "config.json").read_text())["text_config"]
    _edit_text_config(d, num_hidden_layers=5, layer_types=c["layer_types"] + ["full_attention"],
                      mlp_layer_types=c["mlp_layer_types"] + ["dense"])
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model.language_model.layers.4.input_layernorm: missing from the source",
                  "text_config.num_hidden_layers = 5")


# ---------------------------------------------------------------- GPTQ scales that are not finite
def poke_f16(ckpt, tensor, flat_index, value):
    """Overwrite one float16 element of a tensor in place (a real fixture's bytes otherwise unchanged)."""
    from m3_convert import st
    f = ckpt / shard_of(ckpt, tensor)
    info = st.read_header(str(f)).tensors[tensor]
    with open(f, "r+b") as fh:
        fh.seek(info.begin + 2 * flat_index)
        fh.write(np.array([value], dtype=np.float16).tobytes())
    return f.name


@pytest.mark.parametrize("module, value, what", [
    ("model.language_model.layers.1.mlp.experts.0.gate_proj", np.nan, "1 NaN scale"),        # copied as GPTQ
    ("model.language_model.layers.2.self_attn.q_proj", -np.inf, "1 inf scale"),              # de-quantized to bf16
    ("model.language_model.layers.0.mlp.gate_up_proj", np.nan, "1 NaN scale"),               # split
])
def test_non_finite_scale_is_refused_naming_the_module(tmp_path, module, value, what):
    d = copy_fixture(tmp_path)
    shard = poke_f16(d, module + ".scales", 5, value)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, f"{shard}: {module}.scales: {what} (the first at [group 0, output 5])",
                  f"module {module} would decode to NaN/inf")
    assert not (tmp_path / "o").exists()
    r = run_convert(d, tmp_path / "o", "--dry-run")        # a dry run that passes means the real run passes
    assert r.exit_code == EXIT_INPUT and what in r.output


def test_zero_scale_is_converted_and_counted(tmp_path):
    """auto-round writes a 0 scale where a group's weights underflow fp16: kept (the group decodes to zeros, exactly
    the checkpoint's value), counted in the summary, and m3-verify accepts the output."""
    from conftest import run_verify
    d = copy_fixture(tmp_path)
    poke_f16(d, "model.language_model.layers.1.mlp.experts.0.gate_proj.scales", 7, 0.0)
    r = run_convert(d, tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert [v for k, v in json.loads(r.output)["notes"].items() if k.startswith("GPTQ scales exactly 0")] == [1]
    assert run_verify(tmp_path / "o", "--against", d, "--quiet").exit_code == 0


# ---------------------------------------------------------------- no input ends in a traceback
def _planted_bug(monkeypatch):
    """An exception no check anticipates, raised while the planner reads the second shard."""
    from m3_convert import names
    real = names.resolve

    def resolve(name):
        if name.startswith("model.language_model.layers.1.mlp.experts.2.") and name.endswith(".qweight"):
            raise ZeroDivisionError("planted")
        return real(name)
    monkeypatch.setattr(names, "resolve", resolve)


def test_unexpected_error_is_one_line_naming_the_file(monkeypatch, tmp_path):
    _planted_bug(monkeypatch)
    out = convert_fails(FIXTURES / "ar_model_naming", tmp_path / "o", EXIT_INPUT,
                        "m3-convert: error: model-0000", ".safetensors: unexpected ZeroDivisionError: planted", "--debug")
    assert out.count("\n") == 1 and not (tmp_path / "o").exists()
    monkeypatch.setenv("M3_CONVERT_DEBUG", "1")
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o")
    assert r.exit_code == EXIT_INPUT and "Traceback" in r.output and "raise ZeroDivisionError" in r.output
    monkeypatch.delenv("M3_CONVERT_DEBUG")
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "o", "--debug")
    assert r.exit_code == EXIT_INPUT and "Traceback" in r.output


def test_verify_unexpected_error_is_one_line(monkeypatch, converted):
    from conftest import run_verify
    from m3_verify import checks

    def broken(out_dir):
        raise ValueError("planted")
        yield
    monkeypatch.setattr(checks, "check_structure", broken)
    r = run_verify(converted["ar_model_naming"], "--quiet")
    where = f"{converted['ar_model_naming']} (structure check)"
    assert r.exit_code == EXIT_INPUT and r.output.startswith(f"m3-verify: error: {where}: unexpected ValueError: planted"), r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1
    r = run_verify(converted["ar_model_naming"], "--quiet", "--debug")
    assert r.exit_code == EXIT_INPUT and "Traceback" in r.output
