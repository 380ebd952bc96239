"""m3-verify: a good conversion passes; each planted fault is caught with one clear line."""
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import FIXTURES, edit_checkpoint, run_convert, run_verify

GOLDEN = FIXTURES.parent.parent / "golden" / "ar_model_naming.SHA256SUMS"
GOLDEN_ARGS = ("--max-shard-size", "1MB")


def rehash(d):
    """Recompute SHA256SUMS, as a careless (or malicious) tool would after editing files."""
    lines = []
    for f in sorted(os.listdir(d)):
        if f == "SHA256SUMS" or os.path.isdir(os.path.join(d, f)):
            continue
        lines.append(f"{hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()}  {f}\n")
    open(os.path.join(d, "SHA256SUMS"), "w").writelines(lines)


@pytest.fixture()
def good(converted, tmp_path):
    d = tmp_path / "out"
    shutil.copytree(converted["ar_model_naming"], d)
    return d


def verify_lines(*args):
    r = run_verify(*args, "--quiet")
    return r.exit_code, [l for l in r.output.splitlines() if l.strip()]


def test_good_conversion_passes_alone_and_against_source(good):
    assert verify_lines(good) == (0, [])
    assert verify_lines(good, "--against", FIXTURES / "ar_model_naming") == (0, [])
    # sha256sum agrees
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=good).returncode == 0


@pytest.mark.parametrize("name", ["ar_reverted_naming", "ar_gptq_gidx"])
def test_other_namings_pass_against_their_source(converted, name):
    assert verify_lines(converted[name], "--against", FIXTURES / name) == (0, [])


def test_golden_checksums(tmp_path):
    """CI's checksum gate: any change in output bytes fails until the golden file is regenerated (make golden)."""
    out = tmp_path / "golden-run"
    r = run_convert(FIXTURES / "ar_model_naming", out, *GOLDEN_ARGS, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "SHA256SUMS").read_text() == GOLDEN.read_text(), "output bytes changed: regenerate with `make golden` if intended"
    assert verify_lines(out) == (0, [])


def _flip_byte_in_tensor(d, tensor):
    from m3_convert import st
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    f = d / idx["weight_map"][tensor]
    info = st.read_header(str(f)).tensors[tensor]
    with open(f, "r+b") as fh:
        fh.seek(info.begin + info.nbytes // 2)
        b = fh.read(1)
        fh.seek(info.begin + info.nbytes // 2)
        fh.write(bytes([b[0] ^ 0x01]))
    return f.name


def test_flipped_byte(good):
    t = "model.layers.1.block_sparse_moe.experts.2.w1.qweight"
    fname = _flip_byte_in_tensor(good, t)
    code, lines = verify_lines(good)
    assert code == 1 and lines == [f"integrity: {fname}: sha256 mismatch" + lines[0].split("sha256 mismatch", 1)[1]]
    rehash(good)   # even with a recomputed manifest, the source comparison catches it
    code, lines = verify_lines(good, "--against", FIXTURES / "ar_model_naming")
    assert code == 1 and lines == [f"against: {fname}: {t}: bytes differ from the source "
                                   "model.language_model.layers.1.mlp.experts.2.gate_proj.qweight"]


def test_flipped_byte_in_dequantized_qkv(good):
    t = "model.layers.2.self_attn.q_proj.weight"
    fname = _flip_byte_in_tensor(good, t)
    rehash(good)
    code, lines = verify_lines(good, "--against", FIXTURES / "ar_model_naming")
    assert code == 1 and len(lines) == 1 and t in lines[0] and "is not the exact decode of" in lines[0] and "rounded to bf16" in lines[0] and fname in lines[0]


def test_deleted_shard(good):
    os.unlink(good / "model-00002-of-00003.safetensors")
    code, lines = verify_lines(good)
    assert code == 1
    assert "integrity: model-00002-of-00003.safetensors: listed in SHA256SUMS but absent" in lines
    assert "structure: model-00002-of-00003.safetensors: named in model.safetensors.index.json but absent" in lines


def test_extra_tensor_with_recomputed_manifest(good):
    import torch
    edit_checkpoint(good, add={"model.layers.0.self_attn.extra.weight": torch.zeros(4, dtype=torch.bfloat16)})
    rehash(good)
    code, lines = verify_lines(good)
    assert code == 1 and len(lines) == 2
    assert lines[0] == "structure: model.safetensors.index.json: metadata.total_size 2565872 != 2565880 bytes of tensors"
    assert lines[1].startswith("structure: model-00001-of-00003.safetensors: model.layers.0.self_attn.extra.weight: unexpected tensor")


def test_renamed_tensor_with_recomputed_manifest(good):
    old = "model.layers.2.block_sparse_moe.experts.1.w3.scales"
    new = "model.layers.2.block_sparse_moe.experts.1.w4.scales"
    edit_checkpoint(good, rename={old: new})
    rehash(good)
    code, lines = verify_lines(good)
    assert code == 1
    assert any(new in l and "unexpected tensor" in l for l in lines)
    assert any(old in l and "missing" in l for l in lines)


def _edit_config(d, fn):
    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c, indent=2))
    rehash(d)


def test_n_shared_experts_changed(good):
    _edit_config(good, lambda c: c["text_config"].update(n_shared_experts=2))
    code, lines = verify_lines(good)
    assert code == 1
    assert any("block_sparse_moe.shared_experts.gate_proj.qweight: shape" in l for l in lines), lines


def test_n_shared_experts_dropped(good):
    _edit_config(good, lambda c: c["text_config"].pop("n_shared_experts"))
    code, lines = verify_lines(good)
    assert code == 1 and "structure: config.json: text_config.n_shared_experts: missing: vLLM would use its default" in lines


def test_moe_layer_freq_changed(good):
    _edit_config(good, lambda c: c["text_config"].update(moe_layer_freq=[0, 1, 0, 0]))
    code, lines = verify_lines(good)
    assert code == 1
    assert any("model.layers.2.block_sparse_moe.gate.weight: unexpected tensor" in l for l in lines)
    assert any("model.layers.2.mlp.gate_proj" in l and "quantization_config.modules" in l and "missing" in l for l in lines)


def test_per_module_bits_out_of_sync(good):
    m = "model.layers.1.block_sparse_moe.experts.0.w1"
    _edit_config(good, lambda c: c["quantization_config"]["modules"][m].update(bits=4))   # tensors are 3-bit
    code, lines = verify_lines(good)
    assert code == 1
    assert any(f"{m}.qweight: shape" in l for l in lines) and any(f"{m}.qzeros: shape" in l for l in lines)


def test_json_report(good):
    r = run_verify(good, "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["ok"] is True and rep["findings"] == []
    os.unlink(good / "README.md")
    r = run_verify(good, "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 1 and rep["findings"] == [{"check": "integrity", "file": "README.md", "tensor": None,
                                                    "message": "listed in SHA256SUMS but absent"}]


def test_unlisted_file_reported(good):
    (good / "stray.txt").write_text("x")
    code, lines = verify_lines(good)
    assert (code, lines) == (1, ["integrity: stray.txt: present but not listed in SHA256SUMS"])


def test_missing_manifest_means_unfinished(good):
    os.unlink(good / "SHA256SUMS")
    code, lines = verify_lines(good)
    assert code == 1 and lines[0].startswith("integrity: SHA256SUMS: missing")


def _poke_nan(d, tensor, flat_index):
    import numpy as np
    from m3_convert import st
    idx_path = d / "model.safetensors.index.json"
    f = d / (json.loads(idx_path.read_text())["weight_map"][tensor] if idx_path.exists() else "model.safetensors")
    info = st.read_header(str(f)).tensors[tensor]
    with open(f, "r+b") as fh:
        fh.seek(info.begin + 2 * flat_index)
        fh.write(np.array([np.nan], dtype=np.float16).tobytes())


def test_nan_scale_in_an_output_is_a_finding(good):
    """The converter refuses a NaN scale; an output that holds one anyway (edited afterwards, SHA256SUMS redone) is a
    structure finding naming the module."""
    t = "model.layers.1.block_sparse_moe.experts.2.w3.scales"
    _poke_nan(good, t, 3)
    rehash(good)
    code, lines = verify_lines(good)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("structure: model"), lines
    assert lines[0].endswith(f": {t}: 1 NaN scale (the first at [group 0, output 3]): vLLM would serve NaN/inf from "
                             f"{t[:-len('.scales')]}"), lines


def test_nan_scale_in_the_source_of_a_dequantized_module_is_an_against_finding(converted, tmp_path):
    """A de-quantized module keeps no scales in the output: --against checks the source's (here planted after the
    conversion)."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "ar_model_naming", src)
    t = "model.language_model.layers.2.self_attn.q_proj.scales"
    _poke_nan(src, t, 0)
    code, lines = verify_lines(converted["ar_model_naming"], "--against", src)
    assert code == 1 and any(t in l and "1 NaN scale (the first at [group 0, output 0]): model.layers.2.self_attn.q_proj "
                             "would hold NaN/inf" in l for l in lines), lines


def test_a_g_idx_in_an_output_is_reported(good):
    """vLLM drops every g_idx tensor whatever the quantization config (0.32/0.33 base_config.py), so an act-order
    g_idx could never be served; m3-convert writes none, and m3-verify reports one slipped into an output."""
    import torch
    name = "model.layers.0.self_attn.o_proj.g_idx"
    edit_checkpoint(good, add={name: torch.arange(256, dtype=torch.int32) // 128})
    rehash(good)
    code, lines = verify_lines(good)
    assert code == 1 and any(name in l and "unexpected tensor" in l for l in lines), lines
