"""MoE layers of the m3_gptq plugin, without vLLM: what a layer holds (:class:`MoeDims`, its parts' layout and
tunings), the loaders (:func:`load_expert` for the per-width parts, :func:`promoting_loader` for Marlin's one
width) and the GPU kernel (:class:`HummingMoEKernel`). The methods (``M3HummingMoEMethod``, ``M3MarlinMoEMethod``)
are in :mod:`.methods`.

The parts: every expert at its stored width, one part per (sublayer, width) (m3_convert.serve.decide), held one
after another in one flat tensor per leaf (``w13_qweight``, ``w13_qzeros``, ``w13_scales``, ``w2_*``: the names
vLLM's MiniMax-M3 loader asks for); the loader puts each checkpoint expert tensor, sliced for this
tensor-parallel rank, into its slot. :class:`HummingMoEKernel` turns each part into a humming MoE layer and runs
them (GPU); m3_verify's reference kernel computes the same from the exact decode (CPU).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from . import compat, decide
from .linear import checked_codes

log = logging.getLogger("m3_convert.serve")


@dataclass(frozen=True)
class MoeDims:
    """What a MoE layer's experts are on this rank: ``hidden`` size, ``inter`` (intermediate size per rank),
    ``num_experts`` and the activations' ``dtype``."""
    hidden: int
    inter: int
    num_experts: int
    dtype: object


@dataclass(frozen=True)
class PartTuning:
    """One part's humming kernel tuning: ``slots`` (virtual experts of its sublayer: 2E for w13, E for w2), the
    ``tuning`` list and its JSON as humming takes it."""
    slots: int
    tuning: list
    json: str


def create_expert_params(layer, d, hidden, inter, num_experts, params_dtype):
    """The flat ``w13_<leaf>`` / ``w2_<leaf>`` parameters of a MoE layer held in parts (decide.flat_layout), each
    with the loader that puts a checkpoint expert tensor into its slot (:func:`load_expert`)."""
    import torch
    layer.m3_moe = d
    layer.m3_dims = MoeDims(hidden, inter, num_experts, params_dtype)
    layer.m3_index = decide.slot_index(d.parts)
    layer.m3_layout = {s: decide.flat_layout(d.parts, s, d.group, hidden, inter) for s in ("w13", "w2")}
    for s, lay in layer.m3_layout.items():
        for leaf, (total, _) in lay.items():
            dtype = torch.float16 if leaf == "scales" else torch.int32    # the checkpoint's: fp16 scales kept exact
            p = torch.nn.Parameter(torch.empty(total, dtype=dtype), requires_grad=False)
            p.weight_loader = _loader(layer, s, leaf)
            layer.register_parameter(f"{s}_{leaf}", p)


def _loader(layer, sublayer, leaf):
    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False, **_):
        load_expert(layer, param, loaded_weight, sublayer, leaf, shard_id, int(expert_id))
        return True if return_success else None
    return load


def part_view(layer, part, leaf):
    """The [slots, ...] view of one part inside its flat ``<sublayer>_<leaf>`` tensor."""
    off, shape = layer.m3_layout[part.sublayer][leaf][1][part.name]
    n = 1
    for x in shape:
        n *= x
    return getattr(layer, f"{part.sublayer}_{leaf}").data[off:off + n].view(shape)


def load_expert(layer, param, loaded_weight, sublayer, leaf, shard_id, expert_id):
    """One checkpoint expert tensor (``<prefix>.<expert>.<shard>.<leaf>``) into its slot, sliced for this rank."""
    d = layer.m3_moe
    hidden, inter = layer.m3_dims.hidden, layer.m3_dims.inter
    where = f"{d.prefix}.{expert_id}.{shard_id}"
    key = decide.slot_of(shard_id, expert_id)
    if key[0] != sublayer or key not in layer.m3_index:
        raise decide.ServeError(f"m3_gptq: {where}.{leaf} has no slot in {sublayer}")
    part, i = layer.m3_index[key]
    loaded_weight = checked_codes(loaded_weight, leaf, part.bits, part.bits, where)
    dim, start, length = decide.rank_slice_spec(sublayer, leaf, part.bits, d.group, inter,
                                                layer.moe_config.tp_rank if layer.moe_config.tp_size > 1 else 0)
    want = decide.slot_shapes(sublayer, part.bits, d.group, hidden, inter)[leaf]
    full = list(want)
    full[dim] = length * layer.moe_config.tp_size
    if list(loaded_weight.shape) != full:
        raise decide.ServeError(f"m3_gptq: {where}.{leaf}: shape {list(loaded_weight.shape)}, but a {part.bits}-bit "
                                f"{shard_id} of this layer is {full} (bits in quantization_config.modules disagree with the tensors?)")
    part_view(layer, part, leaf)[i].copy_(loaded_weight.narrow(dim, start, length))


def routed_buffers(layer, x, topk_ids):
    """The start every MoE kernel's ``apply`` shares: (out [M, hidden], M, top-k, hidden, inter); ``out`` is the
    answer as it stands when there are no rows (M == 0)."""
    import torch
    hidden, inter = layer.m3_dims.hidden, layer.m3_dims.inter
    M, k = topk_ids.shape
    return torch.empty(M, hidden, dtype=x.dtype, device=x.device), M, k, hidden, inter


class HummingMoEKernel:
    """Each part a humming MoE layer (indexed GEMM, batch-invariant); the forward runs every w13 part over the
    rows routed to its virtual experts into one gate/up buffer, vLLM's SwiGLU-OAI on it, every w2 part over its
    rows into one down buffer, and the weighted sum over top-k. No host synchronisation, no data-dependent
    Python: capturable by CUDA graphs.

    ``decode="hgemv"`` (``M3_MOE_KERNEL=hgemv``): batches of up to a row per expert (decide.wmix_path's "gemv")
    run :mod:`.hgemv` instead, one launch per sublayer over the same tensors humming holds (no second copy);
    larger ones run the parts as above. bf16 activations only (the layout hgemv reads is humming's for them); a
    layer hgemv cannot read (:func:`hgemv_tables` says why) keeps the parts, with a warning. ``act`` and ``wsum``:
    the activation and the sum (compat's GPU ops; on a CPU, tests/test_hgemv.py's)."""
    name = "humming-parts"

    def __init__(self, decode: str = "parts", act=None, wsum=None):
        if decode not in ("parts", "hgemv"):
            raise ValueError(f"HummingMoEKernel(decode={decode!r}): 'parts' or 'hgemv'")
        self.decode = decode
        self.act = act or compat.swiglu_oai
        self.wsum = wsum or compat.weighted_sum

    def prepare(self, layer):
        import torch
        d = layer.m3_moe
        dims = layer.m3_dims
        hidden, inter, E, dtype = dims.hidden, dims.inter, dims.num_experts, dims.dtype
        dev = getattr(layer, "w13_qweight").device
        layer.m3_tuning = {}
        for part in d.parts:
            n, k = (inter, hidden) if part.sublayer == "w13" else (hidden, inter)
            qw = part_view(layer, part, "qweight")
            sc = part_view(layer, part, "scales")
            compat.humming_layer(layer, part.bits, d.group, qw, sc, n, k, dtype, dev, part.name, len(part.slots))
            slots = 2 * E if part.sublayer == "w13" else E
            emap = torch.full((slots,), -1, dtype=torch.int32)
            emap[list(part.slots)] = torch.arange(len(part.slots), dtype=torch.int32)
            layer.register_buffer(f"{part.name}_map", emap.to(dev), persistent=False)
            tuning = compat.humming_tuning(layer, part.name, "indexed")
            layer.m3_tuning[part.name] = PartTuning(slots, tuning, compat.json.dumps(tuning))
        layer.m3_w13 = [p for p in d.parts if p.sublayer == "w13"]
        layer.m3_w2 = [p for p in d.parts if p.sublayer == "w2"]
        for s in ("w13", "w2"):
            for leaf in decide.GPTQ_LEAVES:
                delattr(layer, f"{s}_{leaf}")
        layer.register_buffer("locks", compat.humming_locks(dev), persistent=False)
        layer.m3_cc = compat.humming_compute_config("indexed")
        layer.m3_act = compat.swiglu(layer)
        layer.m3_streams = compat.moe_streams(dev, max(len(layer.m3_w13), len(layer.m3_w2)) - 1)
        if self.decode == "hgemv":
            problem = self.add_hgemv(layer)
            if problem:
                log.warning("m3_gptq: hgemv error, this layer decodes on humming's width parts: %s", problem)
        torch.cuda.synchronize(dev)

    @staticmethod
    def add_hgemv(layer):
        """hgemv's tables (:func:`hgemv_tables`) and the SM count its K split aims at (:func:`sm_count`) put on a
        layer humming's parts are on: None, or why hgemv cannot read this layer (it then keeps the parts)."""
        try:
            layer.m3_hgemv = hgemv_tables(layer)
        except decide.ServeError as e:
            return str(e)
        layer.m3_sms = sm_count(layer.m3_hgemv["w13"].words.device)
        return None

    def decode_path(self, layer, rows: int) -> str:
        """"hgemv" where this kernel decodes ``rows`` (token, expert) rows by hgemv (decode "hgemv", the layer's
        tables made, at most a row per expert: decide.wmix_path's "gemv"; shape-only, fixed per CUDA graph), else
        "parts"."""
        if self.decode == "hgemv" and getattr(layer, "m3_hgemv", None) \
                and decide.wmix_path(rows, layer.m3_dims.num_experts) == "gemv":
            return "hgemv"
        return "parts"

    def apply(self, layer, x, topk_weights, topk_ids):
        import torch
        if self.decode_path(layer, topk_ids.numel()) == "hgemv":
            return routed_apply(layer, x, topk_weights, topk_ids, hgemv_gemm, self.act, self.wsum)
        out, M, k, hidden, inter = routed_buffers(layer, x, topk_ids)
        if M == 0:
            return out
        ids = topk_ids.to(torch.int32)
        vids = torch.stack((2 * ids, 2 * ids + 1), dim=-1).view(M, 2 * k)     # (token, 2k + h): gate, up
        gate_up = torch.empty(M * k, 2 * inter, dtype=x.dtype, device=x.device)
        self._parts(layer, layer.m3_w13, x, gate_up.view(M * 2 * k, inter), vids, 2 * k)
        act = torch.empty(M * k, inter, dtype=x.dtype, device=x.device)
        self.act(act, gate_up, *layer.m3_act)
        down = torch.empty(M * k, hidden, dtype=x.dtype, device=x.device)
        self._parts(layer, layer.m3_w2, act, down, ids, 1)
        return self.wsum(down.view(M, k, hidden), topk_weights, out)

    def _parts(self, layer, parts, inputs, outputs, ids, top_k):
        """Every part of one sublayer over its rows. Parts write disjoint rows of ``outputs`` and read only
        ``inputs``/``ids``, so they may run at once: with side streams (compat.moe_streams) each part after the
        first runs on its own stream, forked from and joined back into the current one (recorded as such inside
        a CUDA graph capture). Every buffer shared by the streams (inputs, ids, outputs) is allocated on the current
        stream before the fork and freed after the join; what a part allocates itself (its alignment, humming's
        per-launch buffers) is allocated and used on its own stream only. The bits are those of running them one
        after another: each part's kernel is the same, on the same rows."""
        import torch
        streams = layer.m3_streams
        if not streams or len(parts) < 2:
            for part in parts:
                self._gemm(layer, part, inputs, outputs, ids, top_k)
            return
        cur = torch.cuda.current_stream()
        side = streams[:len(parts) - 1]
        for s in side:
            s.wait_stream(cur)
        self._gemm(layer, parts[0], inputs, outputs, ids, top_k)
        for part, s in zip(parts[1:], side):
            with torch.cuda.stream(s):
                self._gemm(layer, part, inputs, outputs, ids, top_k)
        for s in side:
            cur.wait_stream(s)

    @staticmethod
    def _gemm(layer, part, inputs, outputs, ids, top_k):
        """One part over the rows routed to its slots: ``outputs`` rows (token * top_k + j) of the slots
        ``ids[token, j]`` this part holds are written, no other row."""
        from humming.layer import HummingMethod
        t = layer.m3_tuning[part.name]
        slots, tuning, tuning_s = t.slots, t.tuning, t.json
        valid = max(1, -(-ids.numel() * len(part.slots) // slots))       # rows expected in this part
        sid, eid, ntp = compat.moe_align(ids, compat.block_m(tuning, valid), slots, getattr(layer, f"{part.name}_map"))
        HummingMethod.forward_layer(layer=layer, inputs=inputs, outputs=outputs, sorted_ids=sid, expert_ids=eid,
                                    num_tokens_padded=ntp, top_k=top_k, valid_shape_m=valid,
                                    compute_config=layer.m3_cc, tuning_config=tuning_s, sublayer_name=part.name)


class WmixMoEKernel:
    """Every expert at its stored width, read in place: one wmix launch per sublayer (m3_convert.serve.wmix) over
    the flat ``w13_*`` / ``w2_*`` tensors as loaded, vLLM's SwiGLU-OAI between them and the weighted sum over
    top-k after. The codes and float16 scales stay as the checkpoint wrote them; the zeros (the symmetric
    constant, checked when loaded) are dropped. No host synchronisation, shapes fixed by the batch: capturable.
    ``act`` and ``wsum`` are the activation and the sum (compat's GPU ops; m3_verify's on a CPU)."""
    name = "wmix"

    def __init__(self, act=None, wsum=None):
        self.act = act or compat.swiglu_oai
        self.wsum = wsum or compat.weighted_sum

    def prepare(self, layer):
        d = layer.m3_moe
        dims = layer.m3_dims
        dev = layer.w13_qweight.device
        layer.m3_wmix = {s: slot_table(layer, s, dev) for s in ("w13", "w2")}
        for s in ("w13", "w2"):
            delattr(layer, f"{s}_qzeros")
        layer.m3_act = compat.swiglu(layer)
        layer.m3_sms = sm_count(dev)
        log.info("m3_gptq: %s: wmix over %d w13 + %d w2 slots (%s)", d.prefix, 2 * dims.num_experts,
                 dims.num_experts, "+".join(f"{p.name}x{len(p.slots)}" for p in d.parts))

    def apply(self, layer, x, topk_weights, topk_ids):
        return routed_apply(layer, x, topk_weights, topk_ids, self._gemm, self.act, self.wsum)

    @staticmethod
    def _gemm(layer, sublayer, x, ids, in_div, out):
        from . import wmix
        t = layer.m3_wmix[sublayer]
        qw, sc = getattr(layer, f"{sublayer}_qweight"), getattr(layer, f"{sublayer}_scales")
        rows = ids.numel()
        if decide.wmix_path(rows, t.bits.numel() // t.halves) == "gemv":
            cfg = wmix.gemv_config(rows, t, layer.m3_sms)
            return wmix.gemv(t, qw, sc, x, ids, in_div, out, cfg)
        cfg = wmix.tiled_config(rows, t)
        return wmix.tiled(t, qw, sc, x, ids, in_div, out, cfg, wmix_align)


def sm_count(device) -> int:
    """The SMs wmix's and hgemv's K split aims at: the GPU's; on a CPU (the interpreter) an H100/H200's 132, so that
    it splits as they do."""
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def routed_apply(layer, x, topk_weights, topk_ids, gemm, act, wsum):
    """The forward over flat (token, expert) rows that wmix and hgemv share: ``gemm(layer, sublayer, inputs, ids,
    in_div, out)`` writes ``out[p, h*N:(h+1)*N]`` for every row p and half h (w13: gate, up into one buffer, the
    input row p // top-k), ``act`` (SwiGLU-OAI) between the sublayers, ``wsum`` the weighted sum over top-k."""
    import torch
    out, M, k, hidden, inter = routed_buffers(layer, x, topk_ids)
    if M == 0:
        return out
    ids = topk_ids.reshape(-1).to(torch.int32)        # a no-op for vLLM's int32 ids
    gate_up = torch.empty(M * k, 2 * inter, dtype=x.dtype, device=x.device)
    gemm(layer, "w13", x, ids, k, gate_up)
    a = torch.empty(M * k, inter, dtype=x.dtype, device=x.device)
    act(a, gate_up, *layer.m3_act)
    down = torch.empty(M * k, hidden, dtype=x.dtype, device=x.device)
    gemm(layer, "w2", a, ids, 1, down)
    return wsum(down.view(M, k, hidden), topk_weights, out)


def hgemv_tables(layer) -> dict:
    """Per sublayer the :class:`~m3_convert.serve.hgemv.HummingTable` of the width parts humming holds on ``layer``
    (``{part}_weight`` / ``{part}_weight_scale``, made by :meth:`HummingMoEKernel.prepare`)."""
    import torch
    from . import hgemv
    d, dims = layer.m3_moe, layer.m3_dims
    if dims.dtype != torch.bfloat16:
        raise decide.ServeError(f"m3_gptq: {d.prefix}: M3_MOE_KERNEL=hgemv reads humming's layout for bf16 "
                                f"activations, not {dims.dtype}")
    tables = {}
    for s, halves in (("w13", 2), ("w2", 1)):
        n, k = (dims.inter, dims.hidden) if s == "w13" else (dims.hidden, dims.inter)
        parts = [(p.bits, p.slots, getattr(layer, f"{p.name}_weight"), getattr(layer, f"{p.name}_weight_scale"))
                 for p in d.parts if p.sublayer == s]
        tables[s] = hgemv.humming_table(parts, n, k, d.group, halves, dims.num_experts)
        if tables[s].slots.align == 1 and tables[s].words.is_cuda:
            log.warning("m3_gptq: %s: %s slots not 16-element aligned: hgemv reads their words 4 bytes at a time",
                        d.prefix, s)
    return tables


def hgemv_gemm(layer, sublayer, x, ids, in_div, out):
    """One sublayer by :func:`m3_convert.serve.hgemv.gemv` over humming's tensors, K split as decide.wmix_split
    says for the rows (its programs-per-SM aim, measured for wmix's gemv)."""
    from . import hgemv
    t = layer.m3_hgemv[sublayer]
    split = decide.wmix_split(ids.numel(), t.slots.n, hgemv.BLOCK_N, t.slots.halves, layer.m3_sms)
    return hgemv.gemv(t, x, ids, in_div, out, split)


def wmix_align(ids, block_m, experts):
    """vLLM's moe_align_block_size on a GPU; wmix's torch version elsewhere (the CPU interpreter). Both check the
    ids' shape (compat.check_topk_ids), so the CPU forward tests check what the GPU branch is given."""
    from . import wmix
    if ids.is_cuda:
        return compat.moe_align(ids, block_m, experts, None)
    return wmix.align_reference(ids, block_m, experts)


def slot_table(layer, sublayer, device):
    """The :class:`~m3_convert.serve.wmix.SlotTable` of one sublayer: each slot's width and element offsets in the
    flat ``<sublayer>_qweight`` / ``<sublayer>_scales`` (decide.flat_layout); every slot must be held."""
    import torch
    from .wmix import SlotTable, unknown_widths
    d, dims = layer.m3_moe, layer.m3_dims
    halves = 2 if sublayer == "w13" else 1
    slots = halves * dims.num_experts
    bits, qoff, soff = [0] * slots, [0] * slots, [0] * slots
    lay = layer.m3_layout[sublayer]
    for part in d.parts:
        if part.sublayer != sublayer:
            continue
        (oq, shq), (os_, shs) = lay["qweight"][1][part.name], lay["scales"][1][part.name]
        for i, slot in enumerate(part.slots):
            bits[slot] = part.bits
            qoff[slot] = oq + i * shq[1] * shq[2]
            soff[slot] = os_ + i * shs[1] * shs[2]
    missing = [i for i, b in enumerate(bits) if not b]
    if missing:
        raise decide.ServeError(f"m3_gptq: {d.prefix}: {sublayer} slots {missing[:8]} are held by no part")
    odd = unknown_widths(bits)
    if odd:                                  # wmix's kernels take every width they do not know for 3 bits
        raise decide.ServeError(f"m3_gptq: {d.prefix}: {sublayer} has {odd}-bit parts; wmix reads {decide.QUANT_BITS}")
    n, k = (dims.inter, dims.hidden) if sublayer == "w13" else (dims.hidden, dims.inter)
    return SlotTable(torch.tensor(bits, dtype=torch.int32, device=device),
                     torch.tensor(qoff, dtype=torch.int64, device=device),
                     torch.tensor(soff, dtype=torch.int64, device=device), n, k, d.group, halves)


def promoting_loader(orig, decision, leaf):
    def loader(param, loaded_weight, weight_name, shard_id, expert_id, **kw):
        where = f"{decision.prefix}.{expert_id}.{shard_id}"
        bits = decision.expert_bits.get(where, decision.width)
        loaded_weight = checked_codes(loaded_weight, leaf, bits, decision.width, where)
        return orig(param, loaded_weight, weight_name, shard_id=shard_id, expert_id=expert_id, **kw)
    return loader
