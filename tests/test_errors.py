"""Every refusal: exit code and a message naming the file and tensor; nothing complete-looking left behind."""
import json
import os

import numpy as np
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
    """A fused 3-bit gate_up with 2 x 48 outputs: 48*3/32 = 4.5 qzeros words, so no lossless split exists."""
    d = copy_fixture(tmp_path)
    rng = np.random.default_rng(0)
    H, out = 256, 96
    codes = rng.integers(0, 8, size=(H, out))
    zeros = np.full((H // 128, out), 3)
    add = {
        L0 + "mlp.gate_up_proj.qweight": torch.from_numpy(gptq.pack_qweight(codes, 3)),
        L0 + "mlp.gate_up_proj.qzeros": torch.from_numpy(gptq.pack_qzeros(zeros, 3)),
        L0 + "mlp.gate_up_proj.scales": torch.ones(H // 128, out, dtype=torch.float16),
    }
    edit_checkpoint(d, remove=list(add), add=add)
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
