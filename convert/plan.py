"""Planning: headers only -> every output tensor with the operation that makes it (:class:`.outputs.OutTensor`).

The source is read by :mod:`.source` (files from the index, configs, headers); vision and MTP are
:mod:`.vl_mtp`'s; this module is the phases of the text model: read headers -> canonicalise names (names.ALIASES) -> match modules (names.MODULES)
-> check bits (tensor shapes vs quantization_config) and every shape against the
config (rules.py, the rules m3-verify checks an output with) -> decide copy / split /
de-quantize -> check every GPTQ scale is finite -> lay out output shards.  The only
tensor data read here: every GPTQ ``scales`` tensor (1/32 of the GPTQ bytes, read in
batches) and the tiny ``g_idx`` vectors of auto_gptq exports (to prove them trivial).
"""
from __future__ import annotations

import contextlib
import gc
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from . import gptq, model_config, names, rules, st
from .errors import CheckpointError, UsageError, processing
from .outputs import CAST, COPY, DEQUANT, PROMOTE, SLICE, OutTensor, cast_plain, split_rows
from .source import Source, _fname, other_files, read_source
from .quantcfg import SourceQuantConfig
from .vl_mtp import add_vision_and_mtp, collect_vision, mtp_tensor

#: --dtype: "source" writes plain tensors as stored (the default: exact bytes); "bf16" rounds F32/F16 plain tensors
#: that vLLM holds in bf16 (names.served_dtype) to bf16, as vLLM's own load does
PLAIN_DTYPE_MODES = ("source", "bf16")

#: output targets: "m3-plugin" (vLLM + this project's m3_gptq plugin: per-module bits, promotion at load)
#: and "stock-vllm" (vLLM's own auto-round/INC config, no plugin: one scheme per fused module and per MoE
#: layer, made uniform here by lossless promotion)
TARGETS = ("m3-plugin", "stock-vllm")


@dataclass
class Plan:
    in_dir: str
    source_config: dict
    out_config: dict
    quant_config: dict
    write_quant_config_json: bool
    layout: names.Layout
    tensors: list                    # OutTensor, in output order
    shards: list = field(default_factory=list)   # [(filename, [OutTensor])]
    copied_files: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)   # shard path -> Header
    stats: dict = field(default_factory=dict)
    shard_headers: dict = field(default_factory=dict)   # output shard -> its header bytes (execute.shard_header)


def make_plan(in_dir: str, max_shard_size: int = 5 * 10**9, target: str = "m3-plugin", min_bits: int | None = None,
              keep_vision: bool = False, keep_mtp: bool = False, plain_dtype: str = "source") -> Plan:
    """Plan the conversion from the headers alone, in named phases: collect (every source tensor sorted into what
    it is) -> decide_modules (one typed Decision per source module) -> emit (the output tensors of each decision, one
    function per action) -> vision and MTP -> finalize (quantization config, shards, stats).
    The cyclic garbage collector is paused while the plan's objects are built (gc_paused)."""
    opts = Options(target, min_bits, keep_vision, keep_mtp, plain_dtype)
    opts.validate()
    with gc_paused():
        return _make_plan(in_dir, max_shard_size, opts)


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off for the block (as it was before, after it): a plan's objects hold no cycles,
    and at 67k tensors ~4x10^5 of them are alive at the end, so each full pass costs ~0.09 s, many times over
    while they are built. The CLI holds it over everything before the first byte is written."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True)
class Options:
    target: str = "m3-plugin"
    min_bits: int | None = None
    keep_vision: bool = False
    keep_mtp: bool = False
    plain_dtype: str = "source"

    @property
    def stock(self) -> bool:
        return self.target == "stock-vllm"

    def validate(self):
        """The option values and combinations m3-convert refuses (UsageError, exit 2): the one home of these rules
        (the CLI and the Python API both call it)."""
        if self.target not in TARGETS:
            raise UsageError(f"unknown target {self.target!r} (one of {', '.join(TARGETS)})")
        if self.plain_dtype not in PLAIN_DTYPE_MODES:
            raise UsageError(f"unknown plain dtype mode {self.plain_dtype!r} (one of {', '.join(PLAIN_DTYPE_MODES)})")
        if self.min_bits is not None and not self.stock:
            raise UsageError("--stock-min-bits needs --target stock-vllm")
        if self.min_bits is not None and self.min_bits not in gptq.VALID_BITS:
            raise UsageError(f"--stock-min-bits must be one of {', '.join(map(str, gptq.VALID_BITS))}")
        if self.keep_mtp and not self.keep_vision:
            raise UsageError("--keep-mtp needs --keep-vision: vLLM's MTP drafter names its layers model.layers.K, which "
                             "collide with the text-only class's own layers (\"Duplicate layer name\"); the VL class "
                             "nests the text model under language_model.")
        if self.keep_mtp and self.stock:
            raise UsageError("--keep-mtp is not supported with --target stock-vllm yet (use the default target)")


@dataclass
class Collected:
    """Phase 1: every source tensor sorted into what it is."""
    groups: dict = field(default_factory=lambda: defaultdict(dict))   # (Module, src module, layer, expert) -> leaf -> TensorInfo
    vision: dict = field(default_factory=dict)   # (VisionModule, layer, leaf) -> TensorInfo (--keep-vision)
    mtp: dict = field(default_factory=dict)      # output name -> OutTensor (--keep-mtp)
    dropped: Counter = field(default_factory=Counter)
    dropped_bytes: Counter = field(default_factory=Counter)


# Phase 2's actions: what happens to one source module
ROUTER_COPY, PLAIN_COPY, PLAIN_SPLIT, DEQUANTIZE, GPTQ_COPY, GPTQ_SPLIT = (
    "router", "plain", "plain-split", "dequantize", "gptq", "gptq-split")


@dataclass(frozen=True)
class Decision:
    """Phase 2: one source module and what is written for it."""
    module: names.Module
    src_module: str
    layer: int | None
    expert: int | None
    leaves: dict
    action: str
    order: tuple                     # where its first source byte is: output order follows input order
    shape: gptq.GPTQShape | None = None
    width: int | None = None         # bits written: the source's, or wider (--target stock-vllm promotes)

    @property
    def match(self) -> names.Match:
        return names.Match(self.module, self.src_module, "weight", self.layer, self.expert)


@dataclass
class Emitted:
    """Phase 3's output: the tensors and the per-module quantization map, with what was counted on the way."""
    out: list = field(default_factory=list)
    modules_q: dict = field(default_factory=dict)     # official module -> {"bits": b|None, "group_size": g}
    bits_hist: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    promotion: dict = field(default_factory=dict)     # layer -> [native bytes, output bytes] of qweight+qzeros


def _make_plan(in_dir, max_shard_size, opts: Options) -> Plan:
    src = read_source(in_dir)
    with processing("config.json"):
        out_cfg, layout = model_config.convert_config(src.cfg)
    col = collect(src.files, src.headers, layout, opts, src.cfg, src.file_rank)
    decisions, notes = decide_modules(col.groups, src.qcfg, layout, out_cfg, opts, src.file_rank,
                                      model_config.text_config_of(src.cfg))
    check_scales(decisions, notes)
    em = Emitted(notes=notes)
    for d in decisions:
        EMIT[d.action](em, d)
    out, out_cfg = add_vision_and_mtp(em.out, col, out_cfg, src.cfg, layout, opts, src.file_rank)
    return finalize(src, out_cfg, layout, out, em, col, opts, max_shard_size)


# ---------------------------------------------------------------- phase 1: collect
def collect(files, headers, layout, opts: Options, src_cfg, file_rank) -> Collected:
    """Every source tensor to its module rule (names.resolve), or to vision / MTP / left out; anything else, a layer
    or expert the config does not have, or a second spelling of one tensor stops the run."""
    col = Collected()
    for fname in files:
        with processing(fname):
            _collect_file(col, headers[fname], fname, layout, opts, src_cfg, file_rank)
    return col


def _collect_file(col: Collected, header, fname, layout, opts: Options, src_cfg, file_rank):
    """collect, for the tensors of one input file."""
    for t in header.tensors.values():
        canon, m = names.resolve(t.name)
        cat = names.excluded_category(canon) if m is None else None
        if cat == "vision" and opts.keep_vision:
            collect_vision(col.vision, canon, t, fname)
        elif cat == "mtp" and opts.keep_mtp:
            mtp_tensor(col.mtp, canon, t, fname, src_cfg, file_rank)
        elif cat:
            col.dropped[cat] += 1
            col.dropped_bytes[cat] += t.nbytes
        elif m is None:
            raise CheckpointError(fname, t.name, "unknown tensor: no rule in the name table maps it (refusing to drop it silently)")
        else:
            _check_layout(m, t, fname, layout)
            key = (m.module, m.src_module, m.layer, m.expert)
            if m.leaf in col.groups[key]:
                raise CheckpointError(fname, t.name, f"two spellings of the same tensor ({col.groups[key][m.leaf].name})")
            col.groups[key][m.leaf] = t


def _check_layout(m, t, fname, layout):
    if m.layer is not None:
        if m.layer >= layout.num_layers:
            raise CheckpointError(fname, t.name, f"layer {m.layer} but config has {layout.num_layers} layers")
        if not layout.applies(m.module.where, m.layer):
            raise CheckpointError(fname, t.name, f"config says layer {m.layer} has no {m.module.src} "
                                  f"(sparse_attention={layout.sparse_attn[m.layer]}, moe={layout.moe[m.layer]})")
    if m.expert is not None and m.expert >= layout.num_experts:
        raise CheckpointError(fname, t.name, f"expert {m.expert} but config has {layout.num_experts} experts")


# ---------------------------------------------------------------- phase 2: decide
def decide_modules(groups, qcfg, layout, out_cfg, opts: Options, file_rank, src_tc):
    """One Decision per source module (in collection order), and the notes the decisions produce."""
    notes = Counter()
    gptq_info = {}                           # key -> (GPTQShape, Scheme) for quantized linears
    for key, leaves in groups.items():
        info = _classify(key[0], key[1], leaves, qcfg)
        if info is not None:
            gptq_info[key] = info
    dequant = _dequant_keys(groups, gptq_info, layout, opts, notes)
    widths = _stock_widths(groups, gptq_info, dequant, layout, opts.min_bits) if opts.stock else {}
    if opts.stock:
        _note_marlin_shape(gptq_info, widths, out_cfg["text_config"], notes)
    check_shapes(groups, gptq_info, out_cfg["text_config"], src_tc)
    check_complete(groups, layout)
    decisions = []
    for key, leaves in groups.items():
        module = key[0]
        first = min(leaves.values(), key=lambda t: (file_rank[t.file], t.begin))
        q = gptq_info.get(key)
        if module.role == names.ROUTER:
            _check_routing_bias(leaves, key[1], out_cfg["text_config"])
            action = ROUTER_COPY
        elif q is None:
            action = PLAIN_SPLIT if module.role == names.GATE_UP else PLAIN_COPY
        elif key in dequant:
            action = DEQUANTIZE
        else:
            action = GPTQ_SPLIT if module.role == names.GATE_UP else GPTQ_COPY
        shape = q[0] if q else None
        decisions.append(Decision(*key, leaves, action, (file_rank[first.file], first.begin), shape,
                                  widths.get(key, shape.bits) if shape else None))
    return decisions, notes


def _dequant_keys(groups, gptq_info, layout, opts: Options, notes) -> set:
    """The GPTQ modules written in bf16: q/k/v of sparse-attention layers (vLLM fuses them with the bf16 indexer),
    q/k/v of dense-attention layers whose schemes differ (vLLM's fused qkv has one; the stock target promotes
    them instead), and a GPTQ index projection."""
    qkv_by_layer = defaultdict(list)
    for k in groups:
        if k[0].role == names.QKV:
            qkv_by_layer[k[2]].append(k)
    dequant = set()
    for layer in range(layout.num_layers):
        ks = qkv_by_layer.get(layer, [])
        quant = [gptq_info.get(k) for k in ks]
        if layout.sparse_attn[layer]:
            dequant.update(k for k, q in zip(ks, quant) if q is not None)
            continue
        schemes = {(q[0].bits, q[0].group_size) if q else None for q in quant}
        if len(schemes) > 1:
            if opts.stock and None not in schemes and len({g for _, g in schemes}) == 1:
                continue   # promoted to the widest width (INC needs one scheme per fused module)
            dequant.update(k for k, q in zip(ks, quant) if q is not None)
            notes["dense-attention layers with mixed q/k/v schemes (de-quantized)"] += 1
    dequant.update(key for key in gptq_info if key[0].role == names.INDEX)
    return dequant


def _note_marlin_shape(gptq_info, widths, tc, notes):
    from .serve.decide import marlin_moe_shape_problem   # pure; imports no vLLM
    moe_groups = {gptq_info[k][0].group_size for k in widths if k[0].role == names.EXPERT}
    if any(marlin_moe_shape_problem(tc["hidden_size"], tc["intermediate_size"], g) for g in moe_groups):
        notes["WARNING: expert intermediate_size <= group_size: stock vLLM's Marlin MoE serves wrong experts "
              "for this shape (m3-verify --vllm reports it; the m3-plugin target serves it with humming)"] += 1


# ---------------------------------------------------------------- phase 3: emit, one function per action
def _emit_router(em: Emitted, d: Decision):
    for leaf, t in d.leaves.items():
        em.out.append(OutTensor(names.Match(d.module, d.src_module, leaf, d.layer, d.expert).dst_tensor(), t.dtype, t.shape,
                                COPY, (t,), order=d.order + (t.begin,)))
        em.ops[COPY] += 1


def _emit_plain(em: Emitted, d: Decision):
    dst = d.match.dst_modules()[0]
    t = d.leaves["weight"]
    em.out.append(OutTensor(dst + ".weight", t.dtype, t.shape, COPY, (t,), order=d.order))
    em.ops[COPY] += 1
    if d.module.role in names.LINEAR_ROLES:
        em.modules_q[dst] = {"bits": None}


def _emit_plain_split(em: Emitted, d: Decision):
    t = d.leaves["weight"]
    half = split_rows(t)
    m = d.match
    for i, (a, b) in enumerate(((0, half), (half, t.shape[0]))):
        em.out.append(OutTensor(m.dst_tensor(i).rsplit(".", 1)[0] + ".weight", t.dtype, (half, t.shape[1]), SLICE, (t,),
                                rows=(a, b), order=d.order + (i,)))
        em.modules_q[m.dst_modules()[i]] = {"bits": None}
    em.ops["split"] += 1


def _gptq_sources(em: Emitted, d: Decision) -> tuple:
    gi = d.leaves.get("g_idx")
    if gi is not None:
        em.notes["trivial g_idx tensors left out (== arange(in)//group_size)"] += 1
    return (d.leaves["qweight"], d.leaves["qzeros"], d.leaves["scales"]) + ((gi,) if gi is not None else ())


def _emit_dequantize(em: Emitted, d: Decision):
    srcs = _gptq_sources(em, d)
    dst = d.match.dst_modules()[0]
    em.out.append(OutTensor(dst + ".weight", names.DEQUANT_DTYPE, (d.shape.out_features, d.shape.in_features), DEQUANT,
                            srcs, order=d.order))
    em.modules_q[dst] = {"bits": None}
    em.ops["dequant"] += 1
    em.bits_hist[f"{d.shape.bits}->bf16"] += 1


def _emit_gptq(em: Emitted, d: Decision):
    _gptq_sources(em, d)
    shape, W = d.shape, d.width
    dst = d.match.dst_modules()[0]
    ps = gptq.packed_shapes(shape.in_features, shape.out_features, shape.group_size, W)
    for j, leaf in enumerate(("qweight", "qzeros", "scales")):
        t = d.leaves[leaf]
        if W != shape.bits and leaf != "scales":
            em.out.append(OutTensor(f"{dst}.{leaf}", t.dtype, ps[leaf], PROMOTE, (t,), order=d.order + (j,), promote=(shape.bits, W)))
        else:
            em.out.append(OutTensor(f"{dst}.{leaf}", t.dtype, t.shape, COPY, (t,), order=d.order + (j,)))
    em.modules_q[dst] = {"bits": W, "group_size": shape.group_size}
    em.bits_hist[str(shape.bits) if W == shape.bits else f"{shape.bits}->{W}"] += 1
    _account(em.promotion, d.layer, shape, shape.out_features, W)
    em.ops["copy_gptq" if W == shape.bits else "promote"] += 1


def _emit_gptq_split(em: Emitted, d: Decision):
    """A fused [gate; up] GPTQ module split by outputs on a packing-word boundary: still GPTQ, lossless."""
    _gptq_sources(em, d)
    shape, W = d.shape, d.width
    qw, qz, sc = d.leaves["qweight"], d.leaves["qzeros"], d.leaves["scales"]
    if shape.out_features % 2:
        raise CheckpointError(_fname(qw), qw.name, f"fused gate_up has an odd number of outputs ({shape.out_features})")
    half = shape.out_features // 2
    if not gptq.split_point_ok(half, shape.bits):
        raise CheckpointError(_fname(qz), qz.name, f"cannot split {shape.bits}-bit gate_up at output {half}: "
                              f"{half}*{shape.bits}/32 is not a whole qzeros word, the split is not on a packing-word boundary (lossless split impossible)")
    if W != shape.bits and not gptq.split_point_ok(half, W):
        raise CheckpointError(_fname(qz), qz.name, f"cannot split gate_up promoted to {W} bits at output {half}: not on a packing-word boundary")
    zhalf = half * shape.bits // 32
    for i, (a, b, za, zb) in enumerate(((0, half, 0, zhalf), (half, shape.out_features, zhalf, qz.shape[1]))):
        dst = d.match.dst_modules()[i]
        if W == shape.bits:
            em.out.append(OutTensor(dst + ".qweight", qw.dtype, (qw.shape[0], b - a), SLICE, (qw,), cols=(a, b), order=d.order + (i, 0)))
            em.out.append(OutTensor(dst + ".qzeros", qz.dtype, (qz.shape[0], zb - za), SLICE, (qz,), cols=(za, zb), order=d.order + (i, 1)))
        else:
            ps = gptq.packed_shapes(shape.in_features, b - a, shape.group_size, W)
            em.out.append(OutTensor(dst + ".qweight", qw.dtype, ps["qweight"], PROMOTE, (qw,), cols=(a, b),
                                    order=d.order + (i, 0), promote=(shape.bits, W)))
            em.out.append(OutTensor(dst + ".qzeros", qz.dtype, ps["qzeros"], PROMOTE, (qz,), cols=(za, zb),
                                    order=d.order + (i, 1), promote=(shape.bits, W)))
        em.out.append(OutTensor(dst + ".scales", sc.dtype, (sc.shape[0], b - a), SLICE, (sc,), cols=(a, b), order=d.order + (i, 2)))
        em.modules_q[dst] = {"bits": W, "group_size": shape.group_size}
        em.bits_hist[str(shape.bits) if W == shape.bits else f"{shape.bits}->{W}"] += 1
        _account(em.promotion, d.layer, shape, half, W)
    em.ops["split"] += 1


EMIT = {ROUTER_COPY: _emit_router, PLAIN_COPY: _emit_plain, PLAIN_SPLIT: _emit_plain_split, DEQUANTIZE: _emit_dequantize,
        GPTQ_COPY: _emit_gptq, GPTQ_SPLIT: _emit_gptq_split}


# ---------------------------------------------------------------- phase 5: finalize
def finalize(src: Source, out_cfg, layout, out, em: Emitted, col: Collected, opts: Options, max_shard_size) -> Plan:
    """Phase 5: the output quantization config, the Plan, its shards, the files copied beside them, the stats."""
    if opts.plain_dtype == "bf16":
        em.ops[CAST] = cast_plain(out)      # tensors (text, vision, MTP), beside the plain modules counted as COPY
    out.sort(key=lambda o: o.order)
    qout = _output_quant_config(em.modules_q, src.qcfg, out_cfg, opts)
    out_cfg["quantization_config"] = qout
    plan = Plan(src.in_dir, src.cfg, out_cfg, qout, src.has_qjson, layout, out)
    plan.inputs = src.headers
    plan.shards = shard(out, max_shard_size)
    plan.copied_files, ignored = other_files(src.in_dir, src.files)
    plan.stats = _stats(plan, em, col, src.files, src.headers, ignored, opts)
    return plan


def _output_quant_config(modules_q, qcfg, out_cfg, opts: Options) -> dict:
    group_sizes = Counter(v["group_size"] for v in modules_q.values() if v["bits"])
    g_default = group_sizes.most_common(1)[0][0] if group_sizes else qcfg.default.group_size
    from .quantcfg import output_config, stock_output_config
    layout_tag = "vl" if opts.keep_vision else None
    if opts.stock:
        # sym: every module written is symmetric (_classify refuses the others), whatever the source's default says
        return stock_output_config(modules_q, g_default, True, qcfg.source_summary(), opts.min_bits, layout_tag)
    return output_config(modules_q, g_default, True, qcfg.source_summary(), layout_tag,
                         out_cfg["text_config"]["num_mtp_modules"] if opts.keep_mtp else None,
                         opts.plain_dtype if opts.plain_dtype != "source" else None)


def _stats(plan: Plan, em: Emitted, col: Collected, files, headers, ignored, opts: Options) -> dict:
    out = plan.tensors
    stats = {
        "input_files": len(files),
        "input_tensors": sum(len(h.tensors) for h in headers.values()),
        "input_bytes": sum(t.nbytes for h in headers.values() for t in h.tensors.values()),
        "output_tensors": len(out),
        "output_bytes": sum(o.nbytes for o in out),
        "output_shards": len(plan.shards),
        "modules": dict(sorted(em.ops.items())),
        "tensors_by_op": dict(Counter(o.op for o in out)),
        "bits_histogram": dict(sorted(em.bits_hist.items())),
        "dropped": {c: {"tensors": col.dropped[c], "bytes": col.dropped_bytes[c]} for c in sorted(col.dropped)},
        "notes": dict(em.notes),
        "target": opts.target,
        "mtp_kept": {"tensors": len(col.mtp), "bytes": sum(o.nbytes for o in col.mtp.values())} if opts.keep_mtp else None,
        "vision_kept": {"tensors": len(col.vision), "bytes": sum(t.nbytes for t in col.vision.values())} if opts.keep_vision else None,
        "copied_files": list(plan.copied_files),
        "ignored_files": ignored,
        "plain_dtypes": _plain_dtype_stats(out),
        "plain_dtype_mode": opts.plain_dtype,
    }
    if opts.stock:        # (the m3-plugin target's GPU projection: serving_projection, called by the CLI)
        native, promoted = (sum(v[i] for v in em.promotion.values()) for i in (0, 1))
        stats["promotion"] = {
            "min_bits": opts.min_bits,
            "gptq_bytes_native": native, "gptq_bytes_output": promoted,
            "extra_bytes": promoted - native,
            "per_layer": {str(L): {"native": v[0], "output": v[1]}
                          for L, v in sorted(em.promotion.items(), key=lambda kv: -1 if kv[0] is None else kv[0]) if v[1] != v[0]},
        }
    return stats


def _check_routing_bias(leaves, src_mod, tc):
    """vLLM builds the router's e_score_correction_bias exactly when text_config.use_routing_bias (default true):
    with it, a missing bias would stay uninitialised; without it, a present one would be skipped silently."""
    want = bool(tc.get("use_routing_bias", True))
    if want != ("e_score_correction_bias" in leaves):
        t = leaves["weight"]
        msg = ("missing, but text_config.use_routing_bias is true: vLLM's router has this parameter and would leave it "
               "uninitialised" if want else "present, but text_config.use_routing_bias is false: vLLM's router has no such "
               "parameter and would skip it silently")
        raise CheckpointError(_fname(t), f"{src_mod}.e_score_correction_bias", msg)


def _plain_dtype_stats(out) -> dict:
    """dtype -> {"tensors", "bytes"} of the written plain (non-GPTQ, not de-quantized) tensors."""
    stats: dict = {}
    for o in out:
        if o.op in (COPY, SLICE, CAST) and o.dtype in names.PLAIN_DTYPES and o.name.rsplit(".", 1)[-1] not in names.LEAVES_QUANT:
            row = stats.setdefault(o.dtype, {"tensors": 0, "bytes": 0})
            row["tensors"] += 1
            row["bytes"] += o.nbytes
    return dict(sorted(stats.items()))


def serving_projection(plan, gpu_gib: float | None = None, tp_sizes=(1, 2, 4, 8)) -> dict:
    """GPU bytes of the weights vLLM + the m3_gptq plugin will hold for this output (serve.decide.gpu_projection),
    from the planned tensors alone: native (every GPTQ layer at its stored width) and promoted (the plugin's
    fallback without humming-kernels), per layer kind, and per GPU at each tensor-parallel size."""
    from .serve import decide
    modules = plan.quant_config["modules"]
    pre = names.VL_TEXT_PREFIX if plan.quant_config.get("layout") == "vl" else ""
    shapes, plain = {}, {}
    for o in plan.tensors:
        name = o.name[len(pre):] if pre and o.name.startswith(pre) else o.name
        base, _, leaf = name.rpartition(".")
        if base in modules:
            bits = modules[base].get("bits")
            if leaf == "qweight":
                shapes[base] = (o.shape[0] * 32 // bits, o.shape[1])
            elif leaf == "weight":
                shapes[base] = (o.shape[1], o.shape[0])
            continue
        n = 1
        for d in o.shape:
            n *= d
        plain[name] = n
    return decide.gpu_projection(plan.out_config["text_config"], modules, shapes, plain, names.fused_shards(),
                                 names.vllm_module, tp_sizes, gpu_gib)


def _account(promotion, layer, shape, out_features, W):
    """qweight + qzeros bytes of one (part of a) GPTQ module, native and as written."""
    row = promotion.setdefault(layer, [0, 0])
    for i, bits in enumerate((shape.bits, W)):
        ps = gptq.packed_shapes(shape.in_features, out_features, shape.group_size, bits)
        row[i] += 4 * sum(r * c for r, c in (ps["qweight"], ps["qzeros"]))   # int32 words


def _stock_widths(groups, gptq_info, dequant_keys, layout, min_bits):
    """--target stock-vllm: the bit width each GPTQ module is written at. vLLM's INC config takes one scheme
    per fused module (qkv_proj, gate_up_proj) and per MoE layer (its per-expert keys are never read), so
    every member is promoted (losslessly) to the widest width among them, and to at least ``min_bits``."""
    floor = min_bits or 0
    unit: dict = defaultdict(list)           # vLLM module -> [keys]
    for key in gptq_info:
        if key in dequant_keys:
            continue
        module, _src, layer, expert = key
        official = names.Match(module, _src, "weight", layer, expert).dst_modules()[0]
        unit[names.vllm_module(official)].append(key)
    widths = {}
    for vmod, keys in unit.items():
        shapes = [gptq_info[k][0] for k in keys]
        if len({s.group_size for s in shapes}) > 1:
            any_t = groups[keys[0]]["qweight"]
            raise CheckpointError(_fname(any_t), any_t.name, f"{vmod}: members use different group sizes "
                                  f"{sorted({s.group_size for s in shapes})}; vLLM's auto-round config needs one scheme per module")
        widths.update(dict.fromkeys(keys, max(max(s.bits for s in shapes), floor)))
    # a MoE layer whose experts mix GPTQ and bf16 cannot have one scheme
    kinds: dict = defaultdict(set)           # layer -> {is GPTQ} over its experts
    for k in groups:
        if k[0].role == names.EXPERT:
            kinds[k[2]].add(k in gptq_info)
    for L, ks in sorted(kinds.items()):
        if len(ks) > 1:
            t = next(iter(next(v for k, v in groups.items() if k[2] == L and k[0].role == names.EXPERT).values()))
            raise CheckpointError(_fname(t), t.name, f"MoE layer {L} mixes GPTQ and bf16 experts: vLLM's auto-round config "
                                  "needs one scheme per MoE layer (use the default target, whose plugin handles this)")
    return widths


def _classify(module, src_mod, leaves, qcfg: SourceQuantConfig):
    """Validate one module's tensor set against its role and the config. Returns (GPTQShape, Scheme) or None."""
    leafset = set(leaves)
    any_t = next(iter(leaves.values()))
    where = _fname(any_t)
    if module.role in (names.NORM, names.EMBED):
        if leafset != {"weight"}:
            raise CheckpointError(where, any_t.name, f"{module.src} must be a plain weight, found {sorted(leafset)}")
        return None
    if module.role == names.ROUTER:
        if leafset - {"weight", "e_score_correction_bias"} or "weight" not in leafset:
            raise CheckpointError(where, any_t.name, f"router must be an unquantized weight (+ e_score_correction_bias), found {sorted(leafset)}")
        return None
    scheme = qcfg.lookup(src_mod)
    if "weight" in leafset:
        if leafset != {"weight"}:
            raise CheckpointError(where, any_t.name, f"module has both a plain weight and GPTQ tensors: {sorted(leafset)}")
        t = leaves["weight"]
        if scheme.quantized:
            raise CheckpointError(where, t.name, f"quantization_config says {scheme.bits}-bit GPTQ but the module is a plain {t.dtype} weight")
        return None
    for need in ("qweight", "qzeros", "scales"):
        if need not in leafset:
            have = leaves.get("qweight") or any_t
            raise CheckpointError(_fname(have), f"{src_mod}.{need}", f"missing partner tensor (module has {sorted(leafset)})")
    qw, qz, sc = leaves["qweight"], leaves["qzeros"], leaves["scales"]
    for t, dt in ((qw, names.GPTQ_DTYPES["qweight"]), (qz, names.GPTQ_DTYPES["qzeros"]), (sc, names.GPTQ_DTYPES["scales"])):
        if t.dtype != dt:
            raise CheckpointError(_fname(t), t.name, f"expected {dt}, found {t.dtype}")
    try:
        shape = gptq.infer_shape(qw.shape, qz.shape, sc.shape)
    except gptq.GPTQError as e:
        raise CheckpointError(_fname(qw), qw.name, str(e)) from None
    if not scheme.quantized:
        raise CheckpointError(_fname(qw), qw.name, f"tensors are {shape.bits}-bit GPTQ but quantization_config says unquantized")
    if scheme.bits != shape.bits:
        raise CheckpointError(_fname(qw), qw.name, f"quantization_config says {scheme.bits} bits, tensors say {shape.bits} bits")
    if scheme.group_size != shape.group_size:
        raise CheckpointError(_fname(qw), qw.name, f"quantization_config says group_size {scheme.group_size}, tensors say {shape.group_size}")
    if not scheme.sym:
        raise CheckpointError(_fname(qw), qw.name, "asymmetric (sym=false) GPTQ is not supported")
    gi = leaves.get("g_idx")
    if gi is not None:
        if gi.dtype != names.GPTQ_DTYPES["g_idx"] or gi.shape != (shape.in_features,):
            raise CheckpointError(_fname(gi), gi.name, f"g_idx must be I32 [{shape.in_features}], found {gi.dtype} {list(gi.shape)}")
        fd = os.open(gi.file, os.O_RDONLY)
        try:
            arr = st.read_array(fd, gi)
        finally:
            os.close(fd)
        if not gptq.is_trivial_g_idx(arr, shape):
            raise CheckpointError(_fname(gi), gi.name, "non-trivial g_idx (act-order) is not supported: vLLM's GPTQ path drops g_idx")
    return shape, scheme


def check_shapes(groups, gptq_info, tc, src_tc):
    """Every source module has the shape the config gives it (rules.SHAPES, the table m3-verify checks an output
    with): a config field that cannot describe the tensors stops the run, naming the field, its value and the tensor."""
    want = {}                                 # symbolic shape -> its value for this config (computed once each)
    for key, leaves in groups.items():
        q = gptq_info.get(key)
        t = leaves["qweight"] if q else leaves["weight"]
        checks = [(rules.stored_shape(key[0].src), (q[0].out_features, q[0].in_features) if q else t.shape, t)]
        if "e_score_correction_bias" in leaves:
            checks.append((rules.ROUTER_BIAS, leaves["e_score_correction_bias"].shape, leaves["e_score_correction_bias"]))
        for dims, actual, t in checks:
            if dims not in want:
                want[dims] = tuple(rules.dim_value(tc, d) for d in dims)
            if tuple(actual) == want[dims]:
                continue
            what = (f"{key[1]} ({q[0].bits}-bit GPTQ in {_fname(t)}) has [out, in] = {list(actual)} by its "
                    "qweight/qzeros/scales shapes" if q and t is leaves["qweight"] else
                    f"{t.name} ({_fname(t)}) has shape {list(actual)}")
            raise CheckpointError(model_config.F, model_config.source_spelling(rules.shape_disagreement(tc, dims, actual), src_tc),
                                  f"disagrees with the tensors: {what}, the config gives {list(want[dims])}")


def check_complete(groups, layout):
    """Every module the config gives the text model is in the source (names.expected_modules, the key set m3-verify
    expects): vLLM would leave a missing one uninitialised without an error."""
    have = {(k[0], k[2], k[3]) for k in groups}
    for module, layer, expert in names.expected_modules(layout):     # stops at the first missing one
        if (module, layer, expert) in have:
            continue
        why = []
        if layer is not None:
            why.append(f"text_config.num_hidden_layers = {layout.num_layers}, layer {layer}: sparse_attention="
                       f"{layout.sparse_attn[layer]}, moe={layout.moe[layer]}")
        if expert is not None:
            why.append(f"text_config.num_local_experts = {layout.num_experts}")
        raise CheckpointError("(all shards)", names.source_module(module, layer, expert), "missing from the source, "
                              f"but the config has it ({'; '.join(why) or 'every model has it'}): vLLM would leave its "
                              "parameters uninitialised")


def check_scales(decisions, notes):
    """Every GPTQ scale of every module written is finite (gptq.scales_problem): a NaN or inf decodes its group to
    NaN/inf, and vLLM would serve it. Reads each scales tensor once, in batches of one buffer (st.map_batches); exact
    zeros are counted in a note (gptq.scales_problem says why they are not refused)."""
    def scan(batch, view):
        return list(gptq.batch_scales_problems(batch, view)), gptq.zero_scales(view)
    found = st.map_batches([d.leaves["scales"] for d in decisions if d.shape is not None], scan)
    for problems, _ in found:
        for t, problem in problems:
            raise CheckpointError(_fname(t), t.name, f"{problem}: module {t.name.rsplit('.', 1)[0]} would decode to "
                                  "NaN/inf there, and vLLM would serve it")
    zeros = sum(z for _, z in found)
    if zeros:
        notes["GPTQ scales exactly 0 (each decodes its group to zeros, as auto-round writes for weights below fp16's "
              "range)"] += zeros


def shard(tensors, max_size):
    """Greedy, order-preserving sharding (a tensor larger than max_size gets a shard of its own)."""
    groups, cur, size = [], [], 0
    for t in tensors:
        if cur and size + t.nbytes > max_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur:
        groups.append(cur)
    n = len(groups)
    if n == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


