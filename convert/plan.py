"""Planning: headers only -> every output tensor with the operation that makes it.

read headers -> canonicalise names (names.ALIASES) -> match modules (names.MODULES)
-> check bits (tensor shapes vs quantization_config) and every shape against the
config (rules.py, the rules m3-verify checks an output with) -> decide copy / split /
de-quantize -> check every GPTQ scale is finite -> lay out output shards.  The only
tensor data read here: every GPTQ ``scales`` tensor (1/32 of the GPTQ bytes, read in
batches) and the tiny ``g_idx`` vectors of auto_gptq exports (to prove them trivial).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from . import config as cfgmod
from . import gptq, names, rules, st
from .errors import CheckpointError, processing
from .quantcfg import SourceQuantConfig, natural_key
from .st import INDEX_FILE, SINGLE_FILE

EXTRA_FILE = "model_extra_tensors.safetensors"
#: files the converter writes itself; never copied from the input
GENERATED = {"config.json", "quantization_config.json", INDEX_FILE, "SHA256SUMS"}

COPY, SLICE, DEQUANT, PROMOTE, CAST = "copy", "slice", "dequant", "promote", "cast"
#: --dtype: "source" writes plain tensors as stored (the default: exact bytes); "bf16" rounds F32/F16 plain tensors
#: that vLLM holds in bf16 (names.served_dtype) to bf16, as vLLM's own load does
PLAIN_DTYPE_MODES = ("source", "bf16")

#: output targets: "m3-plugin" (vLLM + this project's m3_gptq plugin: per-module bits, promotion at load)
#: and "stock-vllm" (vLLM's own auto-round/INC config, no plugin: one scheme per fused module and per MoE
#: layer, made uniform here by lossless promotion)
TARGETS = ("m3-plugin", "stock-vllm")


class _computed_once:
    """functools.cached_property without its per-access lock (3.11): ~70k reads in one plan."""

    def __init__(self, fn):
        self.fn, self.attr = fn, fn.__name__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.attr] = self.fn(obj)
        return value


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple
    op: str                          # copy | slice | dequant | promote | cast
    srcs: tuple                      # TensorInfo(s): copy/slice/promote/cast: (t,), dequant: (qweight, qzeros, scales[, g_idx])
    cols: tuple | None = None        # slice/promote: (start, stop) along the last axis of a 2-D tensor
    rows: tuple | None = None        # slice/cast: (start, stop) along the first axis (contiguous bytes)
    order: tuple = ()
    promote: tuple | None = None     # promote: (bits, new_bits) of a qweight/qzeros (gptq.promote_*)

    @_computed_once
    def nbytes(self) -> int:   # read ~3x per tensor (layout, headers, stats); dtype and shape never change
        n = st.DTYPES[self.dtype][0]
        for d in self.shape:
            n *= d
        return n


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
    shard_headers: dict = field(default_factory=dict)   # output shard -> its header bytes (built once, on demand)

    def shard_header(self, fname: str, tensors) -> bytes:
        """The header of output shard ``fname`` exactly as written: built once, read by the space check (the
        shard's size) and by the writer."""
        h = self.shard_headers.get(fname)
        if h is None:
            h = self.shard_headers[fname] = st.build_header([(o.name, o.dtype, o.shape, o.nbytes) for o in tensors])
        return h


def _load_json(path, what):
    fname = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(fname, None, f"cannot read {what}: {e.strerror}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(fname, None, f"{what} is not valid JSON: {e}") from None


def _safe_name(fname, where):
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname
            or "\x00" in fname or os.path.isabs(fname)):
        raise CheckpointError(where, None, f"file name {fname!r} is not a plain file name inside IN_DIR")
    return fname


def input_files(in_dir: str):
    """Shard files from the index (never a glob), plus model_extra_tensors.safetensors."""
    idx_path = os.path.join(in_dir, INDEX_FILE)
    weight_map = None
    if os.path.exists(idx_path):
        idx = _load_json(idx_path, "index")
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise CheckpointError(INDEX_FILE, None, "no weight_map object")
        weight_map = idx["weight_map"]
        distinct = set()
        for fname in weight_map.values():
            if type(fname) is str and fname in distinct:
                continue                     # each distinct name is checked once
            distinct.add(_safe_name(fname, INDEX_FILE))   # refuses a non-string before it is hashed
        files = sorted(distinct)
    elif os.path.exists(os.path.join(in_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(os.path.basename(in_dir.rstrip("/")) or in_dir, None, f"no {INDEX_FILE} and no {SINGLE_FILE}")
    if os.path.exists(os.path.join(in_dir, EXTRA_FILE)) and EXTRA_FILE not in files:
        files.append(EXTRA_FILE)
    for fname in files:
        if not os.path.isfile(os.path.join(in_dir, fname)):
            raise CheckpointError(fname, None, f"listed in {INDEX_FILE} but absent from IN_DIR")
    others = sorted(f for f in os.listdir(in_dir) if f.endswith(".safetensors") and f not in files)
    if others:
        raise CheckpointError(others[0], None, f"safetensors file not referenced by {INDEX_FILE}: refusing to guess whether it is part of the checkpoint")
    return files, weight_map


def load_configs(in_dir: str):
    cfg_path = os.path.join(in_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError("config.json", None, "missing")
    cfg = _load_json(cfg_path, "config")
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json", None, "not a JSON object")
    qc = cfg.get("quantization_config")
    qpath = os.path.join(in_dir, "quantization_config.json")
    has_qjson = os.path.exists(qpath)
    if has_qjson:
        qj = _load_json(qpath, "quantization_config.json")
        if qc is None:
            qc = qj
        elif qj != qc:
            raise CheckpointError("quantization_config.json", None, "differs from config.json's quantization_config: refusing to choose")
    if qc is None:
        raise CheckpointError("config.json", "quantization_config", "missing (not an AutoRound/GPTQ checkpoint?)")
    return cfg, SourceQuantConfig(qc, "quantization_config.json" if has_qjson and "quantization_config" not in cfg else "config.json"), has_qjson


def read_sources(in_dir: str):
    files, weight_map = input_files(in_dir)
    headers = {}
    for f in files:
        with processing(f):
            headers[f] = st.read_header(os.path.join(in_dir, f))
    listed: dict = defaultdict(set)          # file -> tensor names the index places there
    if weight_map is not None:
        for tname, fname in weight_map.items():
            listed[fname].add(tname)
    n_total = sum(len(h.tensors) for h in headers.values())
    consistent = len(set().union(*(h.tensors.keys() for h in headers.values()))) == n_total and (
        weight_map is None or all(headers[f].tensors.keys() == listed[f] if f != EXTRA_FILE else listed[f] <= headers[f].tensors.keys()
                                  for f in files))
    if consistent:                           # the common case, checked with set operations
        return files, headers
    seen = {}                                # else find the first offending tensor, for the message
    for fname in files:
        for tname in headers[fname].tensors:
            if tname in seen:
                raise CheckpointError(fname, tname, f"same tensor also in {seen[tname]}")
            seen[tname] = fname
            if weight_map is not None and fname != EXTRA_FILE and weight_map.get(tname) != fname:
                if tname not in weight_map:
                    raise CheckpointError(fname, tname, f"not listed in {INDEX_FILE}")
                raise CheckpointError(fname, tname, f"{INDEX_FILE} places it in {weight_map[tname]!r}")
    for tname, fname in weight_map.items():
        if tname not in headers[fname].tensors:
            raise CheckpointError(fname, tname, f"listed in {INDEX_FILE} but not in the file's header")
    raise AssertionError("inconsistent index with no offending tensor")


def _fname(t: st.TensorInfo) -> str:
    return os.path.basename(t.file)


def make_plan(in_dir: str, max_shard_size: int = 5 * 10**9, target: str = "m3-plugin", min_bits: int | None = None,
              keep_vision: bool = False, keep_mtp: bool = False, plain_dtype: str = "source") -> Plan:
    """Plan the conversion from the headers alone, in named phases: collect (every source tensor sorted into what
    it is) -> decide (one typed Decision per source module) -> emit (the output tensors of each decision, one
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
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}")
        if self.plain_dtype not in PLAIN_DTYPE_MODES:
            raise ValueError(f"unknown plain dtype mode {self.plain_dtype!r}")
        if self.min_bits is not None and (not self.stock or self.min_bits not in gptq.VALID_BITS):
            raise ValueError("min_bits applies to --target stock-vllm only and must be 2, 3, 4 or 8")
        if self.keep_mtp and (not self.keep_vision or self.stock):
            raise ValueError("keep_mtp needs keep_vision (the VL layout) and the m3-plugin target")


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
    with processing("config.json"):
        src_cfg, qcfg, has_qjson = load_configs(in_dir)
        out_cfg, layout = cfgmod.convert_config(src_cfg)
    files, headers = read_sources(in_dir)
    file_rank = {os.path.join(in_dir, f): i for i, f in enumerate(files)}
    col = collect(files, headers, layout, opts, src_cfg, file_rank)
    decisions, notes = decide(col.groups, qcfg, layout, out_cfg, opts, file_rank, cfgmod.text_config_of(src_cfg))
    check_scales(decisions, notes)
    em = Emitted(notes=notes)
    for d in decisions:
        EMIT[d.action](em, d)
    out, out_cfg = add_vision_and_mtp(em.out, col, out_cfg, src_cfg, layout, opts, file_rank)
    return finalize(in_dir, src_cfg, out_cfg, qcfg, has_qjson, layout, out, em, col, files, headers, opts, max_shard_size)


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
            _collect_vision(col.vision, canon, t, fname)
        elif cat == "mtp" and opts.keep_mtp:
            _mtp_tensor(col.mtp, canon, t, fname, src_cfg, file_rank)
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


def _collect_vision(vision, canon, t, fname):
    vm = names.vision_match(canon)
    if vm is None:
        raise CheckpointError(fname, t.name, "vision tensor with no rule in the name table: vLLM's VL class would "
                              "raise KeyError on it (refusing to drop it silently)")
    if vm in vision:
        raise CheckpointError(fname, t.name, f"two spellings of the same tensor ({vision[vm].name})")
    if t.dtype not in names.PLAIN_DTYPES:
        raise CheckpointError(fname, t.name, f"vision tensor in {t.dtype}, expected one of {'/'.join(names.PLAIN_DTYPES)}")
    vision[vm] = t


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
def decide(groups, qcfg, layout, out_cfg, opts: Options, file_rank, src_tc):
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
    if d.module.role in LINEAR_ROLES:
        em.modules_q[dst] = {"bits": None}


def _emit_plain_split(em: Emitted, d: Decision):
    t = d.leaves["weight"]
    if len(t.shape) != 2 or t.shape[0] % 2:
        raise CheckpointError(_fname(t), t.name, f"fused gate_up weight shape {list(t.shape)} cannot be split in two")
    half = t.shape[0] // 2
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


LINEAR_ROLES = (names.LINEAR, names.EXPERT, names.QKV, names.INDEX, names.GATE_UP)
EMIT = {ROUTER_COPY: _emit_router, PLAIN_COPY: _emit_plain, PLAIN_SPLIT: _emit_plain_split, DEQUANTIZE: _emit_dequantize,
        GPTQ_COPY: _emit_gptq, GPTQ_SPLIT: _emit_gptq_split}


# ---------------------------------------------------------------- phase 4: vision and MTP
def add_vision_and_mtp(out, col: Collected, out_cfg, src_cfg, layout, opts: Options, file_rank):
    """--keep-vision: the text under language_model., the vision tower added, the VL config; --keep-mtp: the MTP
    block(s), every tensor present."""
    if opts.keep_vision:
        for o in out:
            o.name = names.VL_TEXT_PREFIX + o.name
        out_cfg = cfgmod.vl_config(out_cfg, src_cfg)
        out += _vision_tensors(col.vision, out_cfg, file_rank)
    if opts.keep_mtp:
        n_mtp = out_cfg["text_config"]["num_mtp_modules"] = _num_mtp(src_cfg)
        missing = sorted(set(names.expected_mtp(n_mtp, layout.num_experts)) - set(col.mtp), key=natural_key)
        if missing:
            raise CheckpointError("(all shards)", missing[0], f"MTP tensor missing from the source ({len(missing)} missing): "
                                  "vLLM's MiniMaxM3MTP would leave its parameter uninitialised without an error")
        _check_mtp_shapes(col.mtp, out_cfg["text_config"], n_mtp, layout.num_experts)
        out += list(col.mtp.values())
    return out, out_cfg


# ---------------------------------------------------------------- phase 5: finalize
def finalize(in_dir, src_cfg, out_cfg, qcfg, has_qjson, layout, out, em: Emitted, col: Collected, files, headers,
             opts: Options, max_shard_size) -> Plan:
    if opts.plain_dtype == "bf16":
        em.ops[CAST] = _cast_plain(out)      # tensors (text, vision, MTP), beside the plain modules counted as COPY
    out.sort(key=lambda o: o.order)
    qout = _output_quant_config(em.modules_q, qcfg, out_cfg, opts)
    out_cfg["quantization_config"] = qout
    plan = Plan(in_dir, src_cfg, out_cfg, qout, has_qjson, layout, out)
    plan.inputs = headers
    plan.shards = shard(out, max_shard_size)
    plan.copied_files, ignored = other_files(in_dir, files)
    plan.stats = _stats(plan, em, col, files, headers, ignored, opts)
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


def _cast_plain(out):
    """--dtype bf16: every plain tensor stored F32/F16 that vLLM holds in bf16 becomes a CAST (a whole tensor or the
    rows of a split), rounded to bf16 as vLLM's load would; the router (held in float32) stays as stored."""
    n = 0
    for o in out:
        if (o.op in (COPY, SLICE) and o.cols is None and o.dtype in ("F32", "F16") and names.served_dtype(o.name) == "BF16"
                and o.name.rsplit(".", 1)[-1] not in names.LEAVES_QUANT):     # GPTQ scales stay fp16 (the exact decode)
            o.op, o.dtype = CAST, "BF16"
            o.__dict__.pop("nbytes", None)       # dtype changed: recompute the cached size
            n += 1
    return n


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


def _num_mtp(src_cfg):
    tc = cfgmod.text_config_of(src_cfg)
    n = tc.get("num_mtp_modules", 1)
    if not isinstance(n, int) or n < 1:
        raise CheckpointError("config.json", "text_config.num_mtp_modules", f"must be a positive integer with --keep-mtp, got {n!r}")
    return n


def _mtp_tensor(mtp, canon, t, fname, src_cfg, file_rank):
    """--keep-mtp: one source MTP tensor -> its output tensor(s), in its stored dtype (a fused gate_up split by rows;
    --dtype bf16 rounds F32/F16 ones later, _cast_plain)."""
    mm = names.mtp_match(canon)
    if mm is None:
        raise CheckpointError(fname, t.name, "MTP tensor with no rule in the name table: vLLM's MiniMaxM3MTP would skip "
                              "it silently (refusing to drop it)")
    if mm.leaf in names.LEAVES_QUANT:
        raise CheckpointError(fname, t.name, "GPTQ-quantized MTP tensors are not supported: --keep-mtp writes MTP in bf16 "
                              "(vLLM's quantization prefixes of MTP layers collide with the main model's) and does not "
                              "de-quantize it")
    if t.dtype not in names.PLAIN_DTYPES:
        raise CheckpointError(fname, t.name, f"MTP tensor in {t.dtype}, expected one of {'/'.join(names.PLAIN_DTYPES)}")
    n = _num_mtp(src_cfg)
    if mm.block >= n:
        raise CheckpointError(fname, t.name, f"MTP block {mm.block} but text_config.num_mtp_modules is {n}")
    order = (file_rank[t.file], t.begin)
    if len(mm.dst) == 2:   # a fused [gate; up] in transformers' naming
        if len(t.shape) != 2 or t.shape[0] % 2:
            raise CheckpointError(fname, t.name, f"fused gate_up weight shape {list(t.shape)} cannot be split in two")
        half = t.shape[0] // 2
        for i, rows in enumerate(((0, half), (half, t.shape[0]))):
            name = names.mtp_tensor(mm.block, mm.dst[i], mm.leaf)
            _add_mtp(mtp, OutTensor(name, t.dtype, (half, t.shape[1]), SLICE, (t,), rows=rows, order=order + (i,)), fname, t)
        return
    _add_mtp(mtp, OutTensor(names.mtp_tensor(mm.block, mm.dst[0], mm.leaf), t.dtype, t.shape, COPY, (t,), order=order), fname, t)


def _add_mtp(mtp, o, fname, t):
    if o.name in mtp:
        raise CheckpointError(fname, t.name, f"two spellings of the same tensor ({mtp[o.name].srcs[0].name})")
    mtp[o.name] = o


def _check_mtp_shapes(mtp, tc, n_mtp, num_experts):
    """Every MTP tensor has the shape vLLM's MiniMaxM3MTP builds for the config (rules.mtp_shape)."""
    for name, module, own, i in names.expected_mtp_modules(n_mtp, num_experts):
        o = mtp[name]
        want = rules.mtp_shape(tc, module.src if module else None, own, i, name.rsplit(".", 1)[1])
        if tuple(o.shape) != tuple(want):
            t = o.srcs[0]
            raise CheckpointError(_fname(t), t.name, f"MTP tensor of shape {list(o.shape)} (as {name}), but the config "
                                  f"gives {list(want)} (text_config: hidden_size, intermediate_size, num_local_experts, ...)")


def _vision_tensors(vision, cfg, file_rank):
    """--keep-vision: every vision tensor the VL class has, copied as is (--dtype bf16: F32/F16 rounded, _cast_plain);
    a missing one, or one whose shape is not what vision_config gives (rules.vision_shape), stops the run
    (vLLM would leave its parameter uninitialised without an error, or fail to load it)."""
    num_layers = cfg["vision_config"]["num_hidden_layers"]
    out = []
    want = set(names.expected_vision(num_layers))
    for key in want:
        if key not in vision:
            m, L, leaf = key
            src = names.source_vision(m, L, leaf)
            raise CheckpointError("(all shards)", src, "vision tensor missing from the source: vLLM's VL class would leave "
                                  "its parameter uninitialised without an error")
    for key, t in vision.items():
        if key not in want:
            raise CheckpointError(_fname(t), t.name, f"vision layer {key[1]} but vision_config has {num_layers} encoder layers")
        shape = rules.vision_shape(key[0], key[2], cfg)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(_fname(t), t.name, f"shape {list(t.shape)}, but vision_config (hidden_size, "
                                  f"intermediate_size, num_channels, patch_size, ...) gives {list(shape)}")
        out.append(OutTensor(names.vision_tensor(*key), t.dtype, t.shape, COPY, (t,), order=(file_rank[t.file], t.begin)))
    return out


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
            raise CheckpointError(cfgmod.F, cfgmod.source_spelling(rules.shape_disagreement(tc, dims, actual), src_tc),
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


def other_files(in_dir, shard_files):
    """Non-weight files copied byte for byte (tokenizer, templates, LICENSE, ...), and the hidden
    entries left out (``.gitattributes``, ``.cache/``: reported in the summary, never silently)."""
    skip = set(shard_files) | GENERATED
    out, hidden = [], []
    for f in sorted(os.listdir(in_dir)):
        p = os.path.join(in_dir, f)
        if f in skip:
            continue
        if f.startswith("."):
            hidden.append(f)
            continue
        if os.path.isfile(p):
            out.append(f)
        else:
            raise CheckpointError(f, None, "sub-directories in IN_DIR are not supported (not copied); move or remove it")
    return out, hidden
