"""Serving decisions, pure: which kernel serves each vLLM layer of an m3-convert checkpoint, at which width.

Imports neither vLLM nor torch: the planner (``--dry-run``'s GPU memory projection), m3-verify and the
plugin all read it.  Input is the checkpoint's per-module map (``quantization_config.modules``, official
names, ``bits`` 2/3/4/8 or None for bf16); output is a typed decision per vLLM layer:

* :func:`select_linear` -> :class:`LinearDecision` for a Linear (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
  ``down_proj``, shared-expert modules): its shards must share one scheme (vLLM fuses them).
* :func:`select_moe` -> :class:`MoeDecision` for a MoE layer's routed experts.

Kernels (the families a platform offers, :data:`GPU_KERNELS` on a CUDA GPU with humming-kernels):

* ``gptq``: vLLM's own GPTQ methods (``AutoGPTQLinearMethod``: Machete/Marlin; ``AutoGPTQMoEMethod``: Marlin
  WNA16): 4 and 8 bits only, one width per layer.
* ``humming``: humming-kernels (ships with vLLM 0.26 and 0.33): any width up to 8, dense and MoE, exact in
  batch-invariant mode (gpu/README.md). One humming layer holds one width, so a MoE layer whose experts
  mix widths is held as one *part* per (sublayer, width) (:class:`Part`), each in its own humming layer,
  each run over only the rows routed to its experts.

Rules, in order (the widths held on the GPU are the stored ones unless a rule says "promoted"):

* Linear: bf16 -> ``bf16``; 4/8-bit -> ``gptq``; 2/3-bit -> ``humming``; without humming, 2/3-bit is
  promoted to 4 bits and served by ``gptq`` (exact, logged).
* MoE: all experts bf16 -> ``bf16``; one width, 4 or 8, and a shape vLLM's Marlin MoE serves right ->
  ``marlin`` (``gptq``); anything else (mixed widths, 2/3-bit, the Marlin shape problem) -> ``humming``
  parts at the stored widths; without humming, every expert promoted to the layer's widest width (>= 4)
  and served by Marlin (the old behaviour: exact, up to 4x the memory of a 2-bit expert in a layer with an 8-bit one; 2.35x
  for the real topology's mix, bench/project_memory.py).

The gate and up projections of one expert may differ in width (AutoRound chooses per module). vLLM fuses
them into one w13 row block per expert; the humming parts instead hold each half as a *virtual expert*
``2*e + h`` (h 0: gate/w1, 1: up/w3) of width ``intermediate``: a routed row ``(token, k)`` becomes the two
rows ``(token, 2k + h)`` of a top-``2*top_k`` problem, whose outputs, laid out ``[tokens * 2*top_k,
intermediate]``, are exactly the ``[tokens * top_k, 2*intermediate]`` gate/up buffer vLLM's activation reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..gptq import VALID_BITS as QUANT_BITS, packed_shapes, split_point_ok
from ..names import EXPERT_SHARDS, SERVED_F32

BF16, GPTQ, HUMMING, MARLIN = "bf16", "gptq", "humming", "marlin"
#: kernel families on a CUDA GPU where humming-kernels imports (compute capability >= 8.0 for bf16)
GPU_KERNELS = frozenset({GPTQ, HUMMING})
#: the old, promoting behaviour (env M3_GPTQ_KERNELS=promote; the benchmark's "promoted" arm)
PROMOTE_KERNELS = frozenset({GPTQ})
#: humming pads N to a multiple of its tile (sm90 heuristics: block_n 128 or 256; vLLM pads to 256)
HUMMING_PAD_N = 256
W13_HALVES = EXPERT_SHARDS[:2]          # gate w1, up w3: virtual expert 2*e + h


class ServeError(ValueError):
    """A checkpoint the plugin cannot serve as written (the message names the layer)."""


# ---------------------------------------------------------------- typed decisions
@dataclass(frozen=True)
class LinearDecision:
    prefix: str
    kernel: str                  # BF16 | GPTQ | HUMMING
    bits: int | None             # stored width (None: bf16)
    width: int | None            # width held on the GPU (== bits unless promoted)
    group: int | None
    note: str = ""               # why a fallback was taken

    @property
    def promoted(self) -> bool:
        return self.bits is not None and self.width != self.bits


@dataclass(frozen=True)
class Part:
    """One humming layer of a MoE layer: the ``sublayer`` rows of every slot stored at ``bits``.

    ``slots`` are virtual experts ``2*e + h`` for ``w13`` (gate h=0, up h=1) and experts ``e`` for ``w2``,
    ascending; slot ``slots[i]`` is index ``i`` of the part's stacked tensors."""
    sublayer: str                # "w13" | "w2"
    bits: int
    slots: tuple

    @property
    def name(self) -> str:
        return f"{self.sublayer}_b{self.bits}"


@dataclass(frozen=True)
class MoeDecision:
    prefix: str
    kernel: str                  # BF16 | MARLIN | HUMMING
    group: int | None
    width: int | None            # MARLIN: the width every expert is held at
    expert_bits: dict = field(default_factory=dict)   # "<prefix>.<e>.<w1|w3|w2>" -> stored bits
    parts: tuple = ()            # HUMMING: the parts, w13 parts first, each by ascending width
    note: str = ""

    @property
    def promoted(self) -> int:
        """How many expert matrices are held wider than stored."""
        if self.kernel != MARLIN:
            return 0
        return sum(1 for b in self.expert_bits.values() if b != self.width)


# ---------------------------------------------------------------- reading the per-module map
def fused_members(prefix: str, modules: dict, shards: dict) -> list[str]:
    """Official checkpoint modules behind one vLLM layer prefix. ``shards``: ``names.fused_shards()``
    (vLLM fused module -> (official shard, required on every layer))."""
    head, _, last = prefix.rpartition(".")
    members = shards.get(last)
    if members is None:
        return [prefix]
    return [f"{head}.{s}" for s, required in members if required or f"{head}.{s}" in modules]


def resolve_linear(prefix: str, modules: dict, shards: dict) -> tuple:
    """(bits or None, group_size) of a linear layer; the shards must agree and be present."""
    members = fused_members(prefix, modules, shards)
    missing = [m for m in members if m not in modules]
    if missing:
        raise ServeError(f"m3_gptq: quantization_config.modules has no entry for {missing} (layer {prefix}); "
                         "was this checkpoint written by m3-convert?")
    schemes = {m: (modules[m].get("bits"), modules[m].get("group_size")) for m in members}
    if len(set(schemes.values())) > 1:
        raise ServeError(f"m3_gptq: fused module {prefix} mixes quantization schemes {schemes}: vLLM builds one "
                         "method per fused module. Re-run m3-convert (it de-quantizes such q/k/v groups).")
    bits, group = next(iter(schemes.values()))
    if bits is not None and bits not in QUANT_BITS:
        raise ServeError(f"m3_gptq: {members[0]}: bits {bits} not in {QUANT_BITS}")
    return bits, group


def resolve_experts(prefix: str, modules: dict, num_experts: int) -> tuple:
    """({"<prefix>.<e>.<shard>": bits}, group) of a MoE layer's routed experts; bf16 and GPTQ may not mix."""
    per, groups = {}, set()
    for e in range(num_experts):
        for s in EXPERT_SHARDS:
            name = f"{prefix}.{e}.{s}"
            if name not in modules:
                raise ServeError(f"m3_gptq: quantization_config.modules has no entry for {name}")
            b = modules[name].get("bits")
            if b is not None and b not in QUANT_BITS:
                raise ServeError(f"m3_gptq: {name}: bits {b} not in {QUANT_BITS}")
            per[name] = b
            if b is not None:
                groups.add(modules[name].get("group_size"))
    kinds = {b is None for b in per.values()}
    if len(kinds) > 1:
        raise ServeError(f"m3_gptq: MoE layer {prefix} mixes bf16 and GPTQ experts; vLLM needs one method per layer")
    if len(groups) > 1:
        raise ServeError(f"m3_gptq: MoE layer {prefix} mixes group sizes {sorted(groups)}")
    return per, (groups.pop() if groups else None)


# ---------------------------------------------------------------- kernel-shape rules
def marlin_moe_shape_problem(hidden_size: int, intermediate_per_partition: int, group_size: int) -> str | None:
    """Why vLLM's Marlin MoE would serve wrong experts for this shape, or None.

    vLLM 0.26-0.33 (fused_moe/oracle/int_wna16.py, _process_weights_marlin) permutes the w13 scales
    with size_k = intermediate_size_per_partition instead of hidden_size; the grouped permutation is
    chosen only when group_size < size_k, so an intermediate size (per TP rank) of at most one group
    with a hidden size of several groups gets the channel-wise permutation: wrong scales, no error
    (seen on an H200 with vLLM 0.26: gpu/README.md)."""
    if group_size and intermediate_per_partition <= group_size < hidden_size:
        return (f"vLLM's Marlin MoE permutes w13 scales as if they had one group when intermediate_size per "
                f"rank ({intermediate_per_partition}) <= group_size ({group_size}) < hidden_size ({hidden_size}); "
                "it would serve wrong experts")
    return None


def split_problem(features_per_rank: int, bits: int, group: int, packed_along: str) -> str | None:
    """Why a GPTQ tensor cannot be cut into tensor-parallel slices of ``features_per_rank`` exactly, or None.

    ``packed_along`` "in": the rank's slice is along the inputs (row parallel: o_proj, down_proj, w2): whole
    groups and whole packing words of qweight; "out": along the outputs (column parallel: qkv, gate_up, w1/w3):
    whole packing words of qzeros. 3-bit words hold 32 values in 3 words."""
    if packed_along == "in" and features_per_rank % group:
        return f"{features_per_rank} inputs per rank is not a whole number of {group}-wide groups"
    if not split_point_ok(features_per_rank, bits):
        return f"{features_per_rank} features per rank do not fill whole {bits}-bit packing words"
    return None


# ---------------------------------------------------------------- the selectors
def select_linear(prefix: str, modules: dict, shards: dict, kernels=GPU_KERNELS) -> LinearDecision:
    bits, group = resolve_linear(prefix, modules, shards)
    if bits is None:
        return LinearDecision(prefix, BF16, None, None, None)
    if bits in (4, 8) and GPTQ in kernels:
        return LinearDecision(prefix, GPTQ, bits, bits, group)
    if HUMMING in kernels:
        return LinearDecision(prefix, HUMMING, bits, bits, group)
    if GPTQ in kernels:
        return LinearDecision(prefix, GPTQ, bits, 4, group, note="humming-kernels unavailable: promoted to 4 bits")
    raise ServeError(f"m3_gptq: no kernel serves {bits}-bit GPTQ layer {prefix} on this platform")


def select_moe(prefix: str, modules: dict, num_experts: int, hidden: int, inter_per_rank: int,
               kernels=GPU_KERNELS) -> MoeDecision:
    per, group = resolve_experts(prefix, modules, num_experts)
    if not per or all(b is None for b in per.values()):
        return MoeDecision(prefix, BF16, None, None, per)
    widths = set(per.values())
    for b in widths:
        for n, along in ((inter_per_rank, "out"), (inter_per_rank, "in")):
            problem = split_problem(n, b, group, along)
            if problem:
                raise ServeError(f"m3_gptq: {prefix}: {b}-bit experts: {problem} (lower the tensor-parallel size)")
    marlin_problem = marlin_moe_shape_problem(hidden, inter_per_rank, group)
    if len(widths) == 1 and widths <= {4, 8} and GPTQ in kernels and not marlin_problem:
        return MoeDecision(prefix, MARLIN, group, widths.pop(), per)
    if HUMMING in kernels:
        note = f"Marlin MoE shape problem avoided: {marlin_problem}" if marlin_problem and len(widths) == 1 else ""
        return MoeDecision(prefix, HUMMING, group, None, per, expert_parts(prefix, per, num_experts), note)
    if GPTQ in kernels:
        if marlin_problem:
            raise ServeError(f"m3_gptq: {prefix}: {marlin_problem}; humming-kernels (which would serve it) is "
                             "unavailable. Use a smaller tensor-parallel size.")
        width = max(4, max(widths))
        return MoeDecision(prefix, MARLIN, group, width, per,
                           note="" if widths == {width} else f"humming-kernels unavailable: experts promoted to {width} bits")
    raise ServeError(f"m3_gptq: no kernel serves the GPTQ experts of {prefix} on this platform")


def expert_parts(prefix: str, per: dict, num_experts: int) -> tuple:
    """The humming parts of a MoE layer: w13 by (virtual expert) width, then w2 by width."""
    w13, w2 = {}, {}
    for e in range(num_experts):
        for h, s in enumerate(W13_HALVES):
            w13.setdefault(per[f"{prefix}.{e}.{s}"], []).append(2 * e + h)
        w2.setdefault(per[f"{prefix}.{e}.w2"], []).append(e)
    return tuple([Part("w13", b, tuple(v)) for b, v in sorted(w13.items())]
                 + [Part("w2", b, tuple(v)) for b, v in sorted(w2.items())])


def slot_index(parts: tuple) -> dict:
    """(sublayer, slot) -> (part, index within the part): where the loader puts an expert's tensors."""
    return {(p.sublayer, s): (p, i) for p in parts for i, s in enumerate(p.slots)}


def slot_of(shard: str, expert: int) -> tuple:
    """A checkpoint expert shard (w1/w3/w2) of expert ``expert`` -> (sublayer, slot)."""
    if shard == "w2":
        return "w2", expert
    return "w13", 2 * expert + W13_HALVES.index(shard)


def expert_of(sublayer: str, slot: int) -> tuple:
    """The inverse of :func:`slot_of`: (sublayer, slot) -> (expert, checkpoint shard w1/w3/w2)."""
    return (slot // 2, W13_HALVES[slot % 2]) if sublayer == "w13" else (slot, "w2")


# ---------------------------------------------------------------- wmix: which of its kernels, at which tile
#: (token, expert) rows per expert of one MoE sublayer up to which m3_convert.serve.wmix's gemv kernel runs (one
#: program per row and output tile, each row reading its expert's codes: cost grows with the rows); above, the tiled
#: kernel (rows grouped by expert, tensor-core dot products: cost grows with the experts' row blocks). On an H100
#: (gpu/results/issue25-2026-12-07, mixed layer) gemv took 104.6 / 186.3 / 307.0 / 487.3 us for 4 / 8 / 16 / 32 rows,
#: about linear, so 128 rows (32 tokens) would take ~1.9 ms, where the tiled kernel took 3.1 ms (a row per expert
#: there: the tiled kernel de-quantizes an expert's weights for one useful row of 16). Up to one row per expert on
#: average, gemv. Measured since (gpu/results/issue25-2026-12-07b, H100, uniform 4-bit): gemv at 32 tokens (128
#: rows) 1341 us, the tiled kernel ("fields") at 64 tokens 2664-2741 us (two calls). If gemv doubles with the rows
#: (an extrapolation: gemv at 64 tokens was not timed) the two meet near 64 tokens; one row per expert stands.
#: At the same size since (gpu/results/issue24-2026-12-07, H100, vLLM 0.33's Triton 3.8, mixed layer, 32 tokens):
#: gemv 1328.3 us, the tiled kernel at 16 x 64 with three stages (the sweep's tile; decide's has one) 2012.8.
WMIX_GEMV_ROWS_PER_EXPERT = 1


def wmix_path(rows: int, experts: int) -> str:
    """"gemv" or "tiled" for ``rows`` (token, expert) rows of one sublayer over ``experts`` experts (shape-only:
    fixed per CUDA graph)."""
    return "gemv" if rows <= WMIX_GEMV_ROWS_PER_EXPERT * experts else "tiled"


#: gemv programs per SM that the K split aims for. On an H100 (gpu/results/issue25-2026-12-07, mixed layer, tile
#: 16 x 64, split 1 / 2 / 4): one token w13 70.1 / 53.3 / 50.0 us, w2 20.1 / 21.8 / 22.1; two tokens w13 90.9 /
#: 84.8 / 78.9, w2 50.3 / 46.5 / 45.1; eight tokens w13 257.9 / 246.0 / 243.4, w2 136.6 / 132.3 / 135.1. Aiming at
#: 8 per SM takes split 4, 4 / 2, 2 / 1, 1 there: within 8% of the best of each
WMIX_PROGRAMS_PER_SM = 8


def wmix_split(rows: int, n: int, block_n: int, halves: int, sms: int) -> int:
    """The gemv kernel's K split: the smallest of 1, 2, 4, 8 that gives the SMs WMIX_PROGRAMS_PER_SM programs each
    (rows x output tiles x halves x split); a fixed split summed in order, so the bits depend on the shape only."""
    tiles = rows * halves * -(-n // block_n)
    for split in (1, 2, 4, 8):
        if tiles * split >= WMIX_PROGRAMS_PER_SM * sms:
            return split
    return 8


#: shared memory one block may take on sm_90 (227 KiB); a tile over it does not launch (OutOfResources)
SM90_SHARED = 232448


def wmix_tile(rows: int, experts: int) -> tuple:
    """The tiled kernel's (block_m, block_n, warps, pipeline stages, load): 16 x 64, one stage, "fields" below 16 rows
    per expert; 64 x 64, two stages, "words" from 16 rows per expert (prefill). Measured on an H100 (mixed layer at
    M3's shapes, ``gpu/wmix_bench.py --sweep``, each tile checked against decide's output), under vLLM 0.33's Triton
    3.8.0 (gpu/results/issue25-2026-12-08/kernels/wb_triton38_*.json: what serving compiles with):

    tokens (rows per expert)   16 x 64 "fields", w13 / w2   64 x 64 "words"   32 x 64 "words"
    64 (2)                     1528.2 / 779.0 us            2245.7 / 1141.4   2188.4 / 1117.2
    256 (8)                    1975.7 / 1013.0              2725.2 / 1365.4   2654.3 / 1368.4
    512 (16)                   2947.0 / 1499.4              2677.3 / 1389.2   2606.6 / 1375.5
    2048 (64)                  9299.2 / 4811.8 ("words")    4016.6 / 2421.1

    At 16 rows per expert the small tile takes 1.10x / 1.08x the time of 64 x 64 "words" (32 x 64 was 2.6% / 1.0%
    faster than 64 x 64 here and 1.39x / 1.35x slower at 1024 tokens under 3.6: not taken, a third tile to compile);
    under the image's Triton 3.6.0 the same comparison was 2678.4 / 1400.3 against 4762.2 / 2393.8 (1.78x / 1.71x), and
    at 8 rows per expert 64 x 64 beat the small tile there too (2677.2 / 1382.2 against 2884.2 / 1449.3; 16 x 64 "words"
    beat both, 2297.8 / 1193.0): the threshold follows 3.8. Until 2026-12-08 the threshold was 32 rows per
    expert, a guess on its lower side. Every tile gives the same output as decide's up to float32 summation order
    (bit for bit at the same load: wmix_diag.py ``graph``). "words" reads a 3-bit triplet's words once
    (wmix._triplets): the mixed layer at 2048 tokens took 7477.9 us against 9662.9 with 3 bits gathered a word per
    code (the code of 5602a64, one call, Triton 3.6.0, kernels/wb_old.json and wb_new.json)."""
    if rows >= 16 * max(experts, 1):
        return (64, 64, 4, 2, "words")
    return (16, 64, 4, 1, "fields")


# ---------------------------------------------------------------- GPU bytes (weights: codes + scales)
def humming_bytes(n: int, k: int, bits: int, group: int, count: int = 1) -> int:
    """humming holds b bits per weight and one bf16 scale per group and output (no zeros: symmetric),
    with N padded to its tile."""
    n_pad = -(-n // HUMMING_PAD_N) * HUMMING_PAD_N
    return count * (n_pad * k * bits // 8 + n_pad * (k // group) * 2)


def gptq_kernel_bytes(n: int, k: int, width: int, group: int, count: int = 1) -> int:
    """vLLM's Marlin/Machete GPTQ layers: codes at ``width`` bits and bf16 scales (symmetric: no zeros)."""
    return count * (n * k * width // 8 + n * (k // group) * 2)


def linear_bytes(d: LinearDecision, n: int, k: int) -> int:
    if d.kernel == BF16:
        return n * k * 2
    if d.kernel == HUMMING:
        return humming_bytes(n, k, d.width, d.group)
    return gptq_kernel_bytes(n, k, d.width, d.group)


def moe_bytes(d: MoeDecision, num_experts: int, hidden: int, inter: int) -> int:
    """Routed experts of one MoE layer on one rank (``inter`` = intermediate size per rank)."""
    if d.kernel == BF16:
        return num_experts * 3 * hidden * inter * 2
    if d.kernel == MARLIN:
        return gptq_kernel_bytes(2 * inter, hidden, d.width, d.group, num_experts) + \
            gptq_kernel_bytes(hidden, inter, d.width, d.group, num_experts)
    total = 0
    for p in d.parts:
        n, k = (inter, hidden) if p.sublayer == "w13" else (hidden, inter)
        total += humming_bytes(n, k, p.bits, d.group, len(p.slots))
    return total


# ---------------------------------------------------------------- the humming parts' tensors on one rank
GPTQ_LEAVES = ("qweight", "qzeros", "scales")


def slot_shapes(sublayer: str, bits: int, group: int, hidden: int, inter: int) -> dict:
    """GPTQ shapes of one slot of a part on one rank (``inter`` per rank): w13 slots are [hidden -> inter]
    (one half of an expert's w13), w2 slots [inter -> hidden]."""
    n, k = (inter, hidden) if sublayer == "w13" else (hidden, inter)
    return packed_shapes(k, n, group, bits)


def flat_layout(parts: tuple, sublayer: str, group: int, hidden: int, inter: int) -> dict:
    """leaf -> (total elements, {part name: (offset, (slots, *slot shape))}): the parts of one sublayer held
    one after another in one flat tensor per leaf (``w13_qweight``, ...), each part's slots contiguous, so
    that a part is a view [slots, ...] of the flat tensor."""
    out = {}
    for leaf in GPTQ_LEAVES:
        off, where = 0, {}
        for p in parts:
            if p.sublayer != sublayer:
                continue
            shape = (len(p.slots),) + slot_shapes(sublayer, p.bits, group, hidden, inter)[leaf]
            where[p.name] = (off, shape)
            n = 1
            for d in shape:
                n *= d
            off += n
        out[leaf] = (off, where)
    return out


def rank_slice_spec(sublayer: str, leaf: str, bits: int, group: int, per_rank: int, rank: int) -> tuple:
    """(dim, start, length) of a checkpoint expert tensor that rank ``rank`` holds (``per_rank``: intermediate
    size per rank). w1/w3 are column parallel (a slice of the outputs: qweight and scales columns, qzeros packed
    columns), w2 row parallel (a slice of the inputs: qweight packed rows, scales and qzeros group rows)."""
    if sublayer == "w13":
        w = per_rank * bits // 32 if leaf == "qzeros" else per_rank
        return 1, rank * w, w
    w = per_rank * bits // 32 if leaf == "qweight" else per_rank // group
    return 0, rank * w, w


# ---------------------------------------------------------------- GPU memory projection (m3-convert --dry-run)
#: vLLM's tensor parallelism per fused Linear: column parallel (outputs split) or row parallel (inputs split)
ROW_PARALLEL = ("o_proj", "down_proj")
KINDS = ("attention", "dense_mlp", "shared_expert", "routed_experts", "embeddings", "other")


def _kind(vllm_module: str) -> str:
    if ".self_attn." in vllm_module:
        return "attention"
    if ".shared_experts." in vllm_module:
        return "shared_expert"
    if vllm_module.endswith(".experts"):
        return "routed_experts"
    if ".mlp." in vllm_module:
        return "dense_mlp"
    return "other"


def gpu_projection(text_config: dict, modules: dict, shapes: dict, plain: dict, shards: dict, module_of,
                   tp_sizes=(1, 2, 4, 8), gpu_gib: float | None = None) -> dict:
    """GPU bytes of the weights the plugin will hold, native (stored widths) and promoted (the fallback), per
    layer kind, in all and per GPU at each tensor-parallel size. A kind, total or per-GPU figure is None where a
    layer of it cannot be served that way (the reason is in ``problems`` / ``promoted_problems``): never 0.

    ``modules``: the output's per-module map (official names); ``shapes``: official module -> (in, out) of every
    Linear; ``plain``: every other tensor name -> element count; ``module_of``: official module -> the vLLM
    module loading it (m3_convert.names.vllm_module). Counted: codes and scales as the kernels hold them
    (humming's N padding included; no zeros: symmetric), bf16 Linears, plain tensors at vLLM's dtype (bf16;
    the router in float32), embedding and lm_head split over the ranks, norms and router replicated. Not
    counted: KV cache, activations, workspaces; the replication of K/V heads when tp > KV heads."""
    E, H = text_config["num_local_experts"], text_config["hidden_size"]
    I = text_config["intermediate_size"]
    groups: dict = {}
    for m in shapes:
        groups.setdefault(module_of(m), []).append(m)
    out = {"tp": {}}
    for tp in tp_sizes:
        row = {"native": dict.fromkeys(KINDS, 0), "promoted": dict.fromkeys(KINDS, 0), "problems": [], "promoted_problems": []}
        for vm, members in sorted(groups.items()):
            kind = _kind(vm)
            for arm, kernels in (("native", GPU_KERNELS), ("promoted", PROMOTE_KERNELS)):
                try:
                    if kind == "routed_experts":
                        d = select_moe(vm, modules, E, H, I // tp, kernels)
                        b = moe_bytes(d, E, H, I // tp)
                    else:
                        d = select_linear(vm, modules, shards, kernels)
                        k = shapes[members[0]][0]
                        n = sum(shapes[m][1] for m in members)
                        if vm.rsplit(".", 1)[-1] in ROW_PARALLEL:
                            k //= tp
                        else:
                            n //= tp
                        b = linear_bytes(d, n, k)
                except ServeError as e:      # this layer cannot be served at this size: reported, never counted as 0
                    row["problems" if arm == "native" else "promoted_problems"].append(str(e))
                    row[arm][kind] = None
                    continue
                if row[arm][kind] is None:
                    continue
                row[arm][kind] += b
        for name, count in plain.items():
            split = "embed_tokens" in name or name.endswith("lm_head.weight")
            b = count * (4 if name.endswith(SERVED_F32) else 2) // (tp if split else 1)
            kind = "embeddings" if split else "other"
            row["native"][kind] += b
            row["promoted"][kind] += b
        for arm in ("native", "promoted"):       # None: some layer of this arm cannot be served at this size
            v = row[arm].values()
            row[f"{arm}_per_gpu"] = None if None in v else sum(v)
        if gpu_gib:
            free = None if row["native_per_gpu"] is None else gpu_gib * 2**30 - row["native_per_gpu"]
            row["fits"] = free is not None and free > 0         # a layer that cannot be served never fits
            row["left_per_gpu"] = None if free is None else int(free)
        out["tp"][str(tp)] = row
    one = out["tp"][str(tp_sizes[0])]
    out["native"], out["promoted"] = (None if one[f"{a}_per_gpu"] is None else one[f"{a}_per_gpu"] * tp_sizes[0]
                                      for a in ("native", "promoted"))
    out["by_kind"] = {k: {"native": one["native"][k], "promoted": one["promoted"][k]} for k in KINDS}
    out["gpu_memory_gib"] = gpu_gib
    return out
