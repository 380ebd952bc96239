"""The planner's vision and MTP part: ``--keep-vision`` (the text under ``language_model.``, the vision tower and
projector under MiniMax's original names, the VL config) and ``--keep-mtp`` (the MTP block(s) for vLLM's
MiniMaxM3MTP, every tensor present, in its stored dtype). :mod:`.plan` calls :func:`collect_vision` and
:func:`mtp_tensor` while it collects, :func:`add_vision_and_mtp` after it emits the text model."""
from __future__ import annotations

from . import model_config, names, rules
from .errors import CheckpointError
from .outputs import COPY, SLICE, OutTensor, split_rows
from .quantcfg import natural_key
from .source import _fname


def collect_vision(vision, canon, t, fname):
    vm = names.vision_match(canon)
    if vm is None:
        raise CheckpointError(fname, t.name, "vision tensor with no rule in the name table: vLLM's VL class would "
                              "raise KeyError on it (refusing to drop it silently)")
    if vm in vision:
        raise CheckpointError(fname, t.name, f"two spellings of the same tensor ({vision[vm].name})")
    if t.dtype not in names.PLAIN_DTYPES:
        raise CheckpointError(fname, t.name, f"vision tensor in {t.dtype}, expected one of {'/'.join(names.PLAIN_DTYPES)}")
    vision[vm] = t


# ---------------------------------------------------------------- phase 4: vision and MTP
def add_vision_and_mtp(out, col, out_cfg, src_cfg, layout, opts, file_rank):
    """--keep-vision: the text under language_model., the vision tower added, the VL config; --keep-mtp: the MTP
    block(s), every tensor present."""
    if opts.keep_vision:
        for o in out:
            o.name = names.VL_TEXT_PREFIX + o.name
        out_cfg = model_config.vl_config(out_cfg, src_cfg)
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


def _num_mtp(src_cfg):
    tc = model_config.text_config_of(src_cfg)
    n = tc.get("num_mtp_modules", 1)
    if not isinstance(n, int) or n < 1:
        raise CheckpointError("config.json", "text_config.num_mtp_modules", f"must be a positive integer with --keep-mtp, got {n!r}")
    return n


def mtp_tensor(mtp, canon, t, fname, src_cfg, file_rank):
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
        half = split_rows(t)
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
