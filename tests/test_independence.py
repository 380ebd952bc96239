"""m3-verify --against shares no logic with the planner (issue 19): its own source normaliser, inverse name map
and config reading (verify/against.py). A PLANNING bug -- planted here into the planner itself, so that it would
also be in any expectation re-derived from the planner -- must be a finding."""
import ast
import json
import subprocess
import sys
from pathlib import Path


import m3_convert.plan as planmod
from conftest import FIXTURES, run_convert, run_verify

VERIFY = Path(__file__).parent.parent / "verify"


def convert_with(monkeypatch, tmp_path, fixture, mutate, *args):
    real = planmod.make_plan

    def planted(*a, **k):
        plan = real(*a, **k)
        mutate(plan)
        return plan
    monkeypatch.setattr(planmod, "make_plan", planted)      # the CLI calls planmod.make_plan; verify never does
    out = tmp_path / "o"
    r = run_convert(FIXTURES / fixture, out, "--quiet", *args)
    assert r.exit_code == 0, r.output
    rep = run_verify(out, "--against", FIXTURES / fixture, "--json")
    return rep.exit_code, [(f["tensor"], f["message"]) for f in json.loads(rep.output)["findings"] if f["check"] == "against"]


def swap_names(plan, a, b):
    ta = {o.name[len(a):]: o for o in plan.tensors if o.name.startswith(a)}
    tb = {o.name[len(b):]: o for o in plan.tensors if o.name.startswith(b)}
    assert ta and set(ta) == set(tb), (a, b)
    for leaf in ta:
        ta[leaf].name, tb[leaf].name = b + leaf, a + leaf


def test_two_experts_swapped_in_the_plan(monkeypatch, tmp_path):
    code, found = convert_with(monkeypatch, tmp_path, "gpu_tiny", lambda p: swap_names(
        p, "model.layers.1.block_sparse_moe.experts.0.w1.", "model.layers.1.block_sparse_moe.experts.1.w1."))
    assert code == 1
    assert ("model.layers.1.block_sparse_moe.experts.0.w1.qweight",
            "bytes differ from the source model.language_model.layers.1.mlp.experts.0.gate_proj.qweight") in found, found
    assert any(t == "model.layers.1.block_sparse_moe.experts.1.w1.scales" for t, _ in found), found


def test_split_halves_swapped_in_the_plan(monkeypatch, tmp_path):
    code, found = convert_with(monkeypatch, tmp_path, "ar_model_naming", lambda p: swap_names(
        p, "model.layers.0.mlp.gate_proj.", "model.layers.0.mlp.up_proj."))
    assert code == 1
    assert ("model.layers.0.mlp.gate_proj.qweight", "differs from columns 0:256 of the source "
            "model.language_model.layers.0.mlp.gate_up_proj.qweight (its gate half)") in found, found


def test_output_under_the_wrong_layer(monkeypatch, tmp_path):
    code, found = convert_with(monkeypatch, tmp_path, "gpu_tiny", lambda p: swap_names(
        p, "model.layers.0.post_attention_layernorm.", "model.layers.1.post_attention_layernorm."))
    assert code == 1
    assert found == [("model.layers.0.post_attention_layernorm.weight",
                      "differs from the source model.language_model.layers.0.post_attention_layernorm.weight"),
                     ("model.layers.1.post_attention_layernorm.weight",
                      "differs from the source model.language_model.layers.1.post_attention_layernorm.weight")], found


def test_config_field_dropped_by_the_plan(monkeypatch, tmp_path):
    code, found = convert_with(monkeypatch, tmp_path, "ar_alt", lambda p: p.out_config["text_config"].pop("n_shared_experts"))
    assert code == 1
    assert ("text_config.n_shared_experts", "missing; the source says 2") in found, found


def test_a_module_left_out_by_the_plan(monkeypatch, tmp_path):
    def drop(plan):
        victims = [o for o in plan.tensors if o.name.startswith("model.layers.2.self_attn.index_k_norm.")]
        plan.tensors[:] = [o for o in plan.tensors if o not in victims]
        plan.shards[:] = [(f, [o for o in ts if o not in victims]) for f, ts in plan.shards]
    code, found = convert_with(monkeypatch, tmp_path, "ar_reverted_naming", drop)
    assert code == 1
    assert ("language_model.model.layers.2.self_attn.index_k_norm.weight", "source tensor not in the output") in found, found


def test_the_real_plan_passes(tmp_path):
    """The converter's own output passes the independent check (every fixture: test_verify / test_convert)."""
    out = tmp_path / "o"
    assert run_convert(FIXTURES / "gpu_mixed", out, "--quiet").exit_code == 0
    r = run_verify(out, "--against", FIXTURES / "gpu_mixed", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"], r.output


def test_verify_imports_no_planner_executor_or_name_table_for_against(tmp_path):
    tree = ast.parse((VERIFY / "against.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not {"m3_convert.plan", "m3_convert.execute", "m3_convert.names", "m3_convert.model_config"} & imported, imported
    assert not {"plan", "execute", "names", "config", "quantcfg"} & names, names
    out = tmp_path / "o"
    assert run_convert(FIXTURES / "ar_model_naming", out, "--quiet").exit_code == 0
    code = ("import sys, m3_verify.cli as c\n"
            "try:\n    c.main([sys.argv[1], '--against', sys.argv[2], '--quiet'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "bad = [m for m in ('m3_convert.plan', 'm3_convert.execute') if m in sys.modules]\n"
            "print('RC', rc, 'LOADED', bad)\n")
    p = subprocess.run([sys.executable, "-c", code, str(out), str(FIXTURES / "ar_model_naming")], capture_output=True, text=True)
    assert "RC 0 LOADED []" in p.stdout, p.stdout + p.stderr
