"""--keep-mtp: the MTP block for vLLM's MiniMaxM3MTP (speculative decoding), bf16, under the VL layout.

gpu_tiny's source carries a complete MTP block in the naming the released checkpoint most likely uses
(``language_model.model.mtp.layers.0.{enorm,hnorm,eh_proj,final_layernorm}`` + ``...transformer_layer.*``
with MiniMax's own layer names), copied by auto-round's own copy_missing_tensors_from_source. vLLM's own
MTP class and load_weights judge the output (needs vLLM).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, all_tensors, copy_fixture, edit_checkpoint, run_convert, run_verify, need_vllm

SRC = FIXTURES / "gpu_tiny"
MTP = "language_model.model.mtp.layers.0."


@pytest.fixture(scope="module")
def mtp_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp") / "o"
    r = run_convert(SRC, d, "--keep-vision", "--keep-mtp", "--max-shard-size", "1MB", "--json")
    assert r.exit_code == 0, r.output
    return d, json.loads(r.output)


def test_mtp_tensors_are_the_source_bytes_under_the_names_vllm_loads(mtp_out):
    d, rep = mtp_out
    src = {k: t for k, t in all_tensors(SRC).items() if k.startswith(MTP)}
    assert len(src) == 45                      # 4 own + 41 decoder-layer tensors (8 experts)
    out = all_tensors(d)
    got = {k: t for k, t in out.items() if ".mtp." in k}
    # MiniMax's own layer names are already the ones vLLM's MiniMaxM3MTP.load_weights expects
    assert set(got) == set(src)
    assert all(got[k].dtype == src[k].dtype and got[k].equal(src[k]) for k in src)
    assert rep["mtp_kept"]["tensors"] == 45 and "mtp" not in rep["dropped"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["mtp_blocks"] == 1 and cfg["text_config"]["num_mtp_modules"] == 1


def test_verify_against_source(mtp_out):
    r = run_verify(mtp_out[0], "--against", SRC, "--quiet")
    assert r.exit_code == 0, r.output


def test_transformers_naming_with_fused_shared_gate_up_gives_the_same_output(mtp_out, tmp_path):
    d = copy_fixture(tmp_path, "gpu_tiny")
    t = all_tensors(d)
    sh = MTP + "transformer_layer.block_sparse_moe.shared_experts."
    fused = torch.cat([t[sh + "gate_proj.weight"], t[sh + "up_proj.weight"]])
    renames = {k: "model.language_model.mtp.layers.0." + k[len(MTP):].replace("block_sparse_moe.", "mlp.")
               .replace("index_q_proj", "indexer.q_proj").replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.")
               .replace(".w2.", ".down_proj.")
               for k in t if k.startswith(MTP + "transformer_layer.block_sparse_moe.experts.")}
    edit_checkpoint(d, remove=[sh + "gate_proj.weight", sh + "up_proj.weight"], rename=renames,
                    add={"model.language_model.mtp.layers.0.transformer_layer.mlp.shared_experts.gate_up_proj.weight": fused})
    o = tmp_path / "o"
    r = run_convert(d, o, "--keep-vision", "--keep-mtp", "--quiet")
    assert r.exit_code == 0, r.output
    a, b = all_tensors(o), all_tensors(mtp_out[0])
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in b)


def test_refusals(tmp_path):
    r = run_convert(SRC, tmp_path / "a", "--keep-mtp")
    assert r.exit_code == 2 and "--keep-mtp needs --keep-vision" in r.output and "Duplicate layer name" in r.output
    r = run_convert(SRC, tmp_path / "b", "--keep-mtp", "--keep-vision", "--target", "stock-vllm")
    assert r.exit_code == 2
    # placeholder mtp.* tensors (the other fixtures) match no rule: refused, not dropped
    r = run_convert(FIXTURES / "ar_model_naming", tmp_path / "c", "--keep-mtp", "--keep-vision")
    assert r.exit_code == 3 and "mtp.0." in r.output and "MTP tensor with no rule" in r.output
    d = copy_fixture(tmp_path, "gpu_tiny")
    victim = MTP + "transformer_layer.block_sparse_moe.experts.5.w2.weight"
    edit_checkpoint(d, remove=[victim])
    r = run_convert(d, tmp_path / "e", "--keep-mtp", "--keep-vision")
    assert r.exit_code == 3 and "MTP tensor missing" in r.output and "experts.5.w2.weight" in r.output
    assert not (tmp_path / "e" / "SHA256SUMS").exists()


def test_verify_catches_a_dropped_mtp_tensor(mtp_out, tmp_path):
    d = tmp_path / "o"
    shutil.copytree(mtp_out[0], d)
    victim = MTP + "transformer_layer.self_attn.index_k_norm.weight"
    edit_checkpoint(d, remove=[victim])
    r = run_verify(d, "--quiet")
    assert r.exit_code == 1 and victim in r.output and "missing" in r.output


# ---------------------------------------------------------------- vLLM's own MTP class (needs vLLM)
@pytest.mark.vllm
def test_vllm_mtp_drafter_loads_every_parameter_exactly(mtp_out):
    need_vllm()
    r = run_verify(mtp_out[0], "--vllm", "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["ok"], rep["findings"]
    m = rep["vllm"]["mtp"]
    assert m["params"] == 20 and set(m["bypassed"]) <= {"select_unquantized_moe_backend"}
    assert m["tensors"] == 45 + 2   # the MTP block + the shared embedding and lm_head: all the drafter compares
    assert set(m["methods"].values()) == {"UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"}
    assert "model.layers.0.block_sparse_moe.experts" in m["methods"]


@pytest.mark.vllm
def test_vllm_mtp_check_catches_a_misnamed_mtp_tensor(mtp_out, tmp_path):
    need_vllm()
    d = tmp_path / "o"
    shutil.copytree(mtp_out[0], d)
    edit_checkpoint(d, rename={MTP + "hnorm.weight": MTP + "h_norm.weight"})
    rep = json.loads(run_verify(d, "--vllm", "--json").output)
    assert not rep["ok"]
    assert any("hnorm" in (f["tensor"] or "") or "h_norm" in (f["tensor"] or "") for f in rep["findings"]), rep["findings"]


@pytest.mark.vllm
def test_vllm_main_model_and_drafter_build_together_only_in_the_vl_layout(mtp_out, tmp_path):
    """Why --keep-mtp needs --keep-vision, from vLLM itself: the text-only class's layer names collide with the
    drafter's ("Duplicate layer name"); the VL class's do not."""
    need_vllm()
    from m3_verify.vllm_check import CPU_SITE, _needs_cpu_site
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
    if _needs_cpu_site():
        env["PYTHONPATH"] = CPU_SITE + os.pathsep + env.get("PYTHONPATH", "")
    helper = os.path.join(os.path.dirname(__file__), "vllm_mtp_build.py")

    def build(d):
        p = subprocess.run([sys.executable, helper, str(d)], capture_output=True, text=True, env=env, timeout=600)
        return p.stdout
    out = build(mtp_out[0])
    assert "MAIN MiniMaxM3SparseForConditionalGeneration" in out and "DRAFT MiniMaxM3MTP" in out, out
    bare = tmp_path / "causal"
    bare.mkdir()
    assert run_convert(SRC, tmp_path / "c", "--quiet").exit_code == 0
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg.pop("quantization_config")       # bf16 build: the collision is vLLM's, not the plugin's
    (bare / "config.json").write_text(json.dumps(cfg))
    out = build(bare)
    assert "MAIN MiniMaxM3SparseForCausalLM" in out and "DRAFT-FAILED ValueError Duplicate layer name" in out, out


def test_verify_catches_a_wrong_mtp_shape(mtp_out, tmp_path):
    from test_verify import rehash
    # the shapes come from the config (MTP_OWN norms / eh_proj, and the decoder layer's rules)
    for victim in (MTP + "eh_proj.weight", MTP + "transformer_layer.block_sparse_moe.experts.1.w2.weight"):
        d = tmp_path / victim.rsplit(".", 2)[-2]
        shutil.copytree(mtp_out[0], d)
        t = all_tensors(d)[victim]
        edit_checkpoint(d, remove=[victim], add={victim: t[: t.shape[0] // 2].contiguous()})   # half the rows
        rehash(d)   # a manifest that matches: only the structure check can tell
        r = run_verify(d, "--quiet")
        assert r.exit_code == 1 and victim in r.output and f"expected {[t.shape[0], t.shape[1]]}" in r.output, r.output
