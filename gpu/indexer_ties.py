#!/usr/bin/env python3
"""Near-ties of MiniMax-M3's sparse-attention block selection on a test model's prompts (CPU; transformers in
float32 on the unconverted checkpoint, de-quantized exactly as serve_check.load_hf does).

    PYTHONPATH=gpu python3 gpu/indexer_ties.py tests/fixtures/data/gpu_mixed gpu/prompts_gpu_mixed.json OUT.json \\
        [--bf16] [--flip PROMPT:QUERY ...]

Why: a sparse layer's indexer scores each 128-token key block per query (the maximum over the block's keys of the
indexer head's q.k, causal), forces the query's own (local) block in and attends the top-k blocks. Where the last
chosen block and the best unchosen one score nearly the same, any other rounding (a bf16 engine, another kernel's
summation order) may attend the other block, and that one query's logprob moves by up to several nats for a reason
that is no kernel's error. On gpu_mixed (2026-12-07, gpu/README.md) the wmix MoE kernels gave the 700-token
prompt's position 393 a logprob 2.7 from the exact bf16 reference; the margin there is 0.081 (block scores 27.87
and 27.79, the 6th smallest at layer 3 of the 443 contested queries with a prompt logprob), and forcing the
runner-up block in float32 gives -3.650 where wmix gave -3.588.

Output: per prompt and sparse layer, every competing query's margin (last chosen minus best unchosen block score,
float32), the queries under ``TIE`` at some layer (serve_check.py ``compare`` reports each pair's maximum outside
them too), with ``--bf16`` the (layer, query) choices transformers' bf16 run makes otherwise than float32 (with
their float32 margins: how far a bf16 rounding reaches), and for each ``--flip P:Q`` (prompt index, query index = prompt-logprob index: the logprob of token Q+1) the float32
logprob with the runner-up block forced at Q in each sparse layer where Q competes.

The scores are computed here from the indexer's own modules (q/k projections, norms, transformers' rotary) and the
selection they imply is checked equal to the module's output at every contested query, so a misreading of the indexer stops
the script instead of listing wrong margins. Needs transformers 5.19 (as cpu_floor.py); ~1 min per prompt set.
"""
from __future__ import annotations

import json
import os
import sys

for _m in ("torchvision", "torchaudio", "torchcodec"):     # the local CPU torch has no matching builds: not needed
    sys.modules.setdefault(_m, None)
import torch  # noqa: E402

#: a margin under this (float32 block-score units) is a near-tie: on gpu_mixed's 700-token prompt transformers' bf16
#: run chose otherwise than float32 at 13 of the 43 contested (layer, query) pairs under 0.3, 4 of 103 at 0.3-1, 2 of
#: 252 at 1-3 (the largest margin flipped: 1.075) and none of the 490 at 3 or more (``--bf16``; 2026-12-07,
#: gpu/results/indexer_ties_gpu_mixed.json)
TIE = 0.3


def block_scores(ix, hidden, pos_emb, position_ids):
    """[heads, queries, blocks] float32: max over each block's keys of q.k (causal), as the indexer scores them."""
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as M
    b, T, _ = hidden.shape
    q = ix.q_norm(ix.q_proj(hidden).view(b, T, -1, ix.head_dim)).transpose(1, 2)
    k = ix.k_norm(ix.k_proj(hidden).view(b, T, 1, ix.head_dim)).transpose(1, 2)
    cos, sin = pos_emb
    q, k = M.apply_rotary_pos_emb(q, k, cos[..., : ix.head_dim], sin[..., : ix.head_dim])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2))[0]                     # [heads, T, T]
    s = s.masked_fill(torch.arange(T)[None, :] > position_ids[0][:, None], float("-inf"))
    nb = -(-T // ix.block_size)
    s = torch.nn.functional.pad(s, (0, nb * ix.block_size - T), value=float("-inf"))
    return s.view(s.shape[0], T, nb, ix.block_size).amax(-1)


def competition(ix, q: int):
    """(forced blocks, candidate blocks, free slots) of query ``q``."""
    qb = q // ix.block_size
    forced = sorted({max(qb - j, 0) for j in range(ix.local_blocks)})
    cand = [blk for blk in range(qb + 1) if blk not in forced]
    return forced, cand, ix.topk_blocks - len(forced)


def margins(ix, scores, selected):
    """{head: {query: (margin, chosen block last in, runner-up, chosen blocks, last chosen's score, runner-up's
    score)}} for every query with a contest; checks that the scores give the module's own selection."""
    if scores.shape[0] != 1:
        raise SystemExit(f"indexer_ties: layer {ix.layer_idx} has {scores.shape[0]} indexer heads; margins and flips "
                         "are read for one head (M3's and the fixtures' configs have one)")
    out = {}
    for h in range(scores.shape[0]):
        per = {}
        for q in range(scores.shape[1]):
            forced, cand, slots = competition(ix, q)
            if slots <= 0 or len(cand) <= slots:
                continue
            s = scores[h, q, cand]
            order = torch.argsort(-s, stable=True).tolist()
            chosen = sorted(cand[i] for i in order[:slots])
            got = sorted(int(v) for v in selected[0, h, q].tolist() if v >= 0 and v not in forced)
            if got != chosen:
                raise SystemExit(f"indexer_ties: layer {ix.layer_idx} query {q}: the module selected {got}, these "
                                 f"scores give {chosen}: the indexer is not read as it computes")
            kth, best = float(s[order[slots - 1]]), float(s[order[slots]])
            per[q] = (round(kth - best, 5), cand[order[slots - 1]], cand[order[slots]], chosen, round(kth, 4),
                      round(best, 4))
        out[h] = per
    return out


class Probe:
    """Forward hooks on every indexer: record margins, or force the runner-up block at one query."""

    def __init__(self, model):
        self.rec, self.force = {}, None
        for mod in model.modules():
            if type(mod).__name__.endswith("Indexer"):
                mod.register_forward_hook(self.hook)

    def hook(self, ix, args, out):
        hidden, pos_emb, _, position_ids = args
        if hidden.shape[1] == 1:                   # decode steps: not recorded
            return None
        if self.force is None:
            self.rec[ix.layer_idx] = margins(ix, block_scores(ix, hidden, pos_emb, position_ids), out)
            return None
        layer, q, last, runner = self.force
        if layer != ix.layer_idx:
            return None
        out = out.clone()
        row = out[0, :, q]
        row[row == last] = runner
        return out


def logprobs(model, p):
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0].float(), -1)
    return [lp[i, p[i + 1]].item() for i in range(len(p) - 1)]


def main():
    src, prompts_file, out = sys.argv[1:4]
    flips = [tuple(int(v) for v in a.split(":")) for a in sys.argv[4:] if not a.startswith("--")]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import serve_check as sc
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = sc.load_hf(src, "float32", "cpu")
    probe = Probe(model)
    prompts = json.load(open(prompts_file))
    res = {"model": src, "prompts_file": prompts_file, "tie": TIE, "prompts": [], "flips": []}
    for p in prompts:
        probe.rec.clear()
        base = logprobs(model, p)
        layers = {L: {q: m for q, m in per[0].items()} for L, per in probe.rec.items()}
        ties = sorted({q for per in layers.values() for q, m in per.items() if m[0] < TIE})
        res["prompts"].append({"len": len(p), "near_tie_queries": ties,
                               "layers": {str(L): {str(q): m for q, m in per.items()} for L, per in layers.items()},
                               "logprobs": [round(v, 5) for v in base]})
        print(f"prompt of {len(p)} tokens: {sum(len(v) for v in layers.values())} contested (layer, query), "
              f"{len(ties)} queries with a margin under {TIE}: {ties}", flush=True)
    for pi, q in flips:
        p = prompts[pi]
        for L, per in res["prompts"][pi]["layers"].items():
            if str(q) not in per:
                continue
            margin, last, runner = per[str(q)][:3]
            probe.force = (int(L), q, last, runner)
            lp = logprobs(model, p)[q]
            probe.force = None
            row = {"prompt": pi, "query": q, "layer": int(L), "margin": margin, "chosen": last, "runner_up": runner,
                   "logprob": res["prompts"][pi]["logprobs"][q], "logprob_runner_up_forced": round(lp, 5)}
            res["flips"].append(row)
            print(json.dumps(row), flush=True)
    if "--bf16" in sys.argv:
        res["bf16_flips"] = bf16_flips(src, prompts, res)
    json.dump(res, open(out, "w"), indent=1)


def bf16_flips(src, prompts, res):
    """The (prompt, layer, query) whose block choice transformers' bf16 model makes otherwise than float32's, with
    the float32 margin there."""
    import serve_check as sc
    model, _ = sc.load_hf(src, "bfloat16", "cpu")
    probe = Probe(model)
    flips = []
    for pi, p in enumerate(prompts):
        probe.rec.clear()
        logprobs(model, p)
        for L, per in probe.rec.items():
            f32 = res["prompts"][pi]["layers"][str(L)]
            for q, m in per[0].items():
                if sorted(m[3]) != sorted(f32[str(q)][3]):
                    flips.append({"prompt": pi, "layer": L, "query": q, "margin_f32": f32[str(q)][0]})
    print(f"bf16 flips: {len(flips)}", flush=True)
    return flips


if __name__ == "__main__":
    main()
