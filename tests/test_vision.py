"""--keep-vision: a checkpoint for vLLM's VL class (MiniMaxM3SparseForConditionalGeneration).

The expected vision names are written here independently of m3_convert.names (from vLLM 0.32's
vision_tower.py / hf_to_vllm_mapper and the inverse of transformers' conversion_mapping for
minimax_m3_vl); vLLM's own VL class and load_weights judge the result (test_vllm-style, needs vLLM).
"""
import json
import shutil

import pytest

from conftest import ALL, FIXTURES, all_tensors, copy_fixture, edit_checkpoint, run_convert, run_verify, need_vllm

# model-naming source prefix -> VL checkpoint prefix (MiniMax's original names)
VISION_ORACLE = (
    ("model.vision_tower.embeddings.proj.", "vision_tower.vision_model.embeddings.patch_embedding."),
    ("model.vision_tower.pre_layrnorm.", "vision_tower.vision_model.pre_layrnorm."),
    ("model.vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("model.multi_modal_projector.merge_linear_", "patch_merge_mlp.linear_"),
    ("model.multi_modal_projector.linear_", "multi_modal_projector.linear_"),
)


def oracle_vision_name(src):
    """VL checkpoint name of a source vision tensor, in either naming (None for a non-vision tensor)."""
    for a, b in VISION_ORACLE:
        if src.startswith(a):
            return b + src[len(a):]
    if src.startswith(("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")):
        # auto-round's reverted naming is MiniMax's original, except the vision MLP it mangles
        return src.replace(".block_sparse_moe.fc", ".mlp.fc")
    return None


def source_vision(name):
    return {oracle_vision_name(k): t for k, t in all_tensors(FIXTURES / name).items() if oracle_vision_name(k)}


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    out = {}
    for name in ALL:
        d = tmp_path_factory.mktemp("vl") / name
        r = run_convert(FIXTURES / name, d, "--keep-vision", "--max-shard-size", "1MB", "--json")
        assert r.exit_code == 0, r.output
        out[name] = d
    return out


@pytest.mark.parametrize("name", ALL)
def test_key_set_is_text_under_language_model_plus_the_vision_tower(vl, converted, name):
    text = set(all_tensors(converted[name]))
    got = set(all_tensors(vl[name]))
    vision = set(source_vision(name))
    assert len(vision) == 27
    assert got == {"language_model." + k for k in text} | vision


@pytest.mark.parametrize("name", ALL)
def test_every_tensor_is_the_text_output_or_the_source_vision_bytes(vl, converted, name):
    text = all_tensors(converted[name])
    got = all_tensors(vl[name])
    for k, t in text.items():
        assert got["language_model." + k].dtype == t.dtype and got["language_model." + k].equal(t), k
    for v, t in source_vision(name).items():
        assert got[v].dtype == t.dtype and got[v].equal(t), v


def test_three_namings_give_identical_vl_checkpoints(vl):
    ref = all_tensors(vl["ar_model_naming"])
    for n in ("ar_reverted_naming", "ar_gptq_gidx"):   # reverted naming mangles the vision MLP (block_sparse_moe.fc1)
        other = all_tensors(vl[n])
        assert set(other) == set(ref)
        assert all(other[k].equal(ref[k]) for k in ref)


def test_config_is_what_the_vl_class_reads(vl):
    cfg = json.loads((vl["ar_model_naming"] / "config.json").read_text())
    src = json.loads((FIXTURES / "ar_model_naming" / "config.json").read_text())
    assert cfg["architectures"] == ["MiniMaxM3SparseForConditionalGeneration"] and cfg["model_type"] == "minimax_m3_vl"
    vc = cfg["vision_config"]
    assert vc["img_token_compression_config"] == {"spatial_merge_size": src["vision_config"]["spatial_merge_size"],
                                                  "temporal_patch_size": src["vision_config"]["temporal_patch_size"]}
    assert vc["rope_theta"] == src["vision_config"]["rope_parameters"]["rope_theta"]
    assert cfg["projector_hidden_size"] == src["projector_hidden_size"]
    assert cfg["quantization_config"]["layout"] == "vl"


def test_text_config_and_modules_map_equal_the_text_only_output(vl, converted):
    cfg = json.loads((vl["ar_model_naming"] / "config.json").read_text())
    text = json.loads((converted["ar_model_naming"] / "config.json").read_text())
    assert cfg["text_config"] == text["text_config"]
    assert cfg["quantization_config"]["modules"] == text["quantization_config"]["modules"]


@pytest.mark.parametrize("name", ALL)
def test_verify_against_source(vl, name):
    r = run_verify(vl[name], "--against", FIXTURES / name, "--quiet")
    assert r.exit_code == 0, r.output


def test_missing_vision_tensor_is_refused(tmp_path):
    d = copy_fixture(tmp_path)
    t = "model.vision_tower.layers.0.mlp.fc2.bias"
    edit_checkpoint(d, remove=[t])
    r = run_convert(d, tmp_path / "o", "--keep-vision")
    assert r.exit_code == 3 and t in r.output and "uninitialised" in r.output, r.output
    assert run_convert(d, tmp_path / "o2", "--quiet").exit_code == 0      # text-only output does not need it


def test_unknown_vision_tensor_is_refused_with_keep_vision_and_counted_without(tmp_path):
    import torch
    d = copy_fixture(tmp_path)
    t = "model.vision_tower.post_layernorm.weight"
    edit_checkpoint(d, add={t: torch.ones(32, dtype=torch.bfloat16)})
    r = run_convert(d, tmp_path / "o", "--keep-vision")
    assert r.exit_code == 3 and t in r.output and "KeyError" in r.output, r.output
    r = run_convert(d, tmp_path / "o2", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["dropped"]["vision"]["tensors"] == 28


def test_wrong_vision_shape_is_caught_without_the_source(vl, tmp_path):
    d = tmp_path / "o"
    shutil.copytree(vl["gpu_tiny"], d)
    k = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    t = all_tensors(d)[k]
    edit_checkpoint(d, remove=[k], add={k: t.reshape(t.shape[1], t.shape[0]).contiguous()})
    r = run_verify(d, "--quiet")
    assert r.exit_code == 1 and k in r.output and f"expected {[t.shape[0], t.shape[1]]}" in r.output, r.output


def test_planted_config_faults_are_caught(vl, tmp_path):
    for drop in ("img_token_compression_config", "rope_theta"):
        d = tmp_path / drop
        shutil.copytree(vl["gpu_tiny"], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["vision_config"].pop(drop)
        (d / "config.json").write_text(json.dumps(cfg))
        r = run_verify(d, "--quiet")
        assert r.exit_code == 1 and f"vision_config.{drop}" in r.output, r.output
    d = tmp_path / "projector"
    shutil.copytree(vl["gpu_tiny"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("projector_hidden_size")
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_verify(d, "--quiet")
    assert r.exit_code == 1 and "projector_hidden_size" in r.output, r.output
    d = tmp_path / "tensor"
    shutil.copytree(vl["gpu_tiny"], d)
    victim = "vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight"
    edit_checkpoint(d, remove=[victim])
    r = run_verify(d, "--quiet")
    assert r.exit_code == 1 and victim in r.output and "missing" in r.output


# ---------------------------------------------------------------- vLLM's own VL class (needs vLLM)
@pytest.mark.vllm
@pytest.mark.parametrize("name", ["ar_reverted_naming", "gpu_tiny"])
def test_vllm_vl_class_loads_every_parameter_vision_included(vl, name):
    need_vllm()
    r = run_verify(vl[name], "--vllm", "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["ok"], rep["findings"]
    v = rep["vllm"]
    assert v["tensors"] == len(all_tensors(vl[name]))
    vision = {k: m for k, m in v["methods"].items() if k.startswith("vision_tower.")}
    assert len(vision) == 8 and set(vision.values()) == {"UnquantizedLinearMethod"}
    assert any(k.startswith("language_model.model.layers.") for k in v["methods"])


@pytest.mark.vllm
def test_vllm_vl_stock_target(tmp_path):
    need_vllm()
    d = tmp_path / "o"
    assert run_convert(FIXTURES / "gpu_tiny", d, "--keep-vision", "--target", "stock-vllm", "--quiet").exit_code == 0
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["block_name_to_quantize"] == "language_model.model.layers"
    assert all(k.startswith("language_model.") for k in qc["extra_config"])
    r = run_verify(d, "--vllm", "--against", FIXTURES / "gpu_tiny", "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 0 and rep["ok"], rep["findings"]
    m = rep["vllm"]["methods"]
    assert {k for k in m if k.startswith("vision_tower.")} and all(m[k] == "UnquantizedLinearMethod" for k in m if k.startswith("vision_tower."))


@pytest.mark.vllm
def test_vllm_check_catches_a_misnamed_vision_tensor(vl, tmp_path):
    need_vllm()
    d = tmp_path / "o"
    shutil.copytree(vl["gpu_tiny"], d)
    edit_checkpoint(d, rename={"patch_merge_mlp.linear_1.bias": "patch_merge_mlp.linear_one.bias"})
    r = run_verify(d, "--vllm", "--json")
    rep = json.loads(r.output)
    assert r.exit_code == 1
    assert any(f["check"] == "vllm" and "patch_merge_mlp" in (f["tensor"] or "") for f in rep["findings"]), rep["findings"]
