"""AutoRound's quantization_config (input) and m3-convert's per-module schema (output).

Input lookup mirrors auto-round's own loader (``auto_round/inference/utils.py``
``_expand_regex_config``): a key that is a module name is exact; every other key
is a regex matched with ``re.search``; exact keys win, then the first matching
regex in file order.  Differences, on purpose: an invalid regex or a bits value
outside {2,3,4,8} / >= 16 is an error here (auto-round skips it silently), and
keys in auto-round's reverted naming are canonicalised first.

Output schema (the contract between converter, m3-verify and the vLLM shim)::

    {
      "quant_method": "m3_gptq",                 # registered by m3_convert.vllm_plugin
      "format": "m3-convert/1",
      "packing_format": "auto_round:auto_gptq",  # GPTQ v1 packing (docs/FORMAT.md#gptq-packing)
      "zero_point": "gptq_v1",                   # stored qzeros = zero - 1
      "group_size": 128, "sym": true, "desc_act": false,
      "modules": {                               # EVERY Linear of the text model, official names
        "model.layers.0.self_attn.q_proj": {"bits": 4},      # GPTQ, this many bits
        "model.layers.3.self_attn.q_proj": {"bits": null},   # bf16 (unquantized / de-quantized)
        ...
      },
      "source": {...}                            # provenance: the AutoRound settings it came from
    }

There is no top-level ``bits``: the per-module map is the only authority.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import names
from .gptq import VALID_BITS
from .errors import CheckpointError

QUANT_METHOD = "m3_gptq"
FORMAT = "m3-convert/1"


@dataclass(frozen=True)
class Scheme:
    bits: int | None        # None: not quantized
    group_size: int
    sym: bool

    @property
    def quantized(self) -> bool:
        return self.bits is not None


def _bits(value, where_file, where_key):
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(where_file, where_key, f"bits must be an integer, got {value!r}")
    if value in VALID_BITS:
        return value
    if value >= 16:
        return None
    raise CheckpointError(where_file, where_key, f"bits {value} not supported (allowed: 2, 3, 4, 8; >= 16 means unquantized)")


class SourceQuantConfig:
    """AutoRound's quantization_config, validated, with per-module lookup by canonical name."""

    def __init__(self, qc: dict, file: str = "config.json"):
        if not isinstance(qc, dict):
            raise CheckpointError(file, "quantization_config", "must be a JSON object")
        self.raw = qc
        self.file = file
        method = qc.get("quant_method")
        if method not in ("auto-round", "auto_round", "gptq"):
            raise CheckpointError(file, "quantization_config.quant_method", f"expected 'auto-round' (or 'gptq'), got {method!r}")
        pf = qc.get("packing_format", "auto_round:auto_gptq" if method != "gptq" else "auto_gptq")
        if pf not in ("auto_round:auto_gptq", "auto_gptq", "auto_round:gptq"):
            raise CheckpointError(file, "quantization_config.packing_format", f"unsupported packing format {pf!r} (GPTQ v1 packing expected)")
        if qc.get("desc_act"):
            raise CheckpointError(file, "quantization_config.desc_act", "act-order (desc_act) checkpoints are not supported")
        self.default = self._scheme(qc, file, "quantization_config", None)
        base = {k: qc[k] for k in ("bits", "group_size", "sym", "data_type") if k in qc}
        self.exact: dict[str, Scheme] = {}
        self.regex: list[tuple[re.Pattern, str, Scheme]] = []
        extra = qc.get("extra_config") or {}
        dyn = qc.get("dynamic") or {}
        if not isinstance(extra, dict) or not isinstance(dyn, dict):
            raise CheckpointError(file, "quantization_config.extra_config", "must be a JSON object")
        # GPTQ "dynamic" (auto_gptq exports): "+:regex" overrides, "-:regex" means not quantized
        dyn_items = [(k[2:] if k.startswith(("+:", "-:")) else k, v, k.startswith("-:")) for k, v in dyn.items()]
        for key, cfg, excluded in [(k, v, False) for k, v in extra.items()] + dyn_items:
            if not isinstance(cfg, dict):
                raise CheckpointError(file, f"extra_config[{key!r}]", "entry must be a JSON object")
            scheme = self._scheme(cfg, file, f"extra_config[{key!r}]", base)
            if excluded:
                scheme = Scheme(None, scheme.group_size, scheme.sym)
            canon_w, m = names.resolve(key + ".weight")
            if m is not None:
                self.exact[canon_w[: -len(".weight")]] = scheme
            else:
                try:
                    rx = re.compile(key)
                except re.error as e:
                    raise CheckpointError(file, f"extra_config[{key!r}]", f"neither a module name nor a valid regex ({e})") from None
                self.regex.append((rx, key, scheme))

    @staticmethod
    def _scheme(cfg, file, key, base):
        """Interpret one entry merged over the global scheme (``base``: the raw global dict, or None)."""
        merged = {"bits": 16, "group_size": 128, "sym": True, "data_type": "int"}
        if base is not None:
            merged.update({k: base[k] for k in ("bits", "group_size", "sym", "data_type") if k in base})
        merged.update(cfg)
        dt = merged["data_type"]
        bits = _bits(merged["bits"], file, key + ".bits")
        if not isinstance(dt, str):
            raise CheckpointError(file, key + ".data_type", f"bad data_type {dt!r}")
        if "float" in dt or dt.startswith("fp") or dt in ("bf16", "fp16"):
            bits = None
        elif bits is not None and not dt.startswith("int"):
            raise CheckpointError(file, key + ".data_type", f"data_type {dt!r} is not a GPTQ integer scheme")
        g, sym = merged["group_size"], merged["sym"]
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
            raise CheckpointError(file, key + ".group_size", f"bad group_size {g!r}")
        if not isinstance(sym, bool):
            raise CheckpointError(file, key + ".sym", f"bad sym {sym!r}")
        return Scheme(bits, g, sym)

    def lookup(self, canon_module: str) -> Scheme:
        s = self.exact.get(canon_module)
        if s is not None:
            return s
        for rx, _key, scheme in self.regex:
            if rx.search(canon_module):
                return scheme
        return self.default

    def source_summary(self) -> dict:
        keep = ("quant_method", "packing_format", "bits", "group_size", "sym", "data_type", "autoround_version", "iters")
        return {k: self.raw[k] for k in keep if k in self.raw}


def output_config(modules: dict, group_size: int, sym: bool, source: dict, layout: str | None = None,
                  mtp_blocks: int | None = None, plain_dtype: str | None = None) -> dict:
    """The converted quantization_config. ``modules``: official module -> {"bits": b, "group_size": g} or {"bits": None} (bf16).
    ``layout`` "vl": the checkpoint is for the VL class, text tensors are ``language_model.`` + the official names
    (the modules map keeps the official text names) and vision modules are bf16."""
    extra = {"layout": layout} if layout else {}
    if mtp_blocks:
        extra["mtp_blocks"] = mtp_blocks      # MTP layers (bare model.layers.K.* prefixes in vLLM's drafter): bf16
    if plain_dtype:
        extra["plain_dtype"] = plain_dtype    # m3-convert --dtype bf16: F32/F16 plain tensors rounded to bf16
    return {**extra,
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "packing_format": "auto_round:auto_gptq",
        "zero_point": "gptq_v1",
        "group_size": group_size,
        "sym": sym,
        "desc_act": False,
        "modules": {k: dict(modules[k]) for k in sorted(modules, key=natural_key)},
        "source": source,
    }


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


STOCK_METHOD = "auto-round"      # vLLM maps it to its INC config (quantization/inc/inc.py)
STOCK_BLOCKS = names.OUT_LAYER_PREFIX.split(".{L}", 1)[0]     # "model.layers": INC's block_name_to_quantize


def stock_extra_config(modules: dict, sym: bool, prefix: str = "") -> dict:
    """vLLM's INC ``extra_config`` for a checkpoint with per-official-module bits ``modules``: one exact key per
    module vLLM builds (names.vllm_module: qkv_proj, o_proj, gate_up_proj, down_proj, each shared-expert
    module, each MoE layer's ``block_sparse_moe.experts``), bits 16 where the module is bf16, and lm_head
    explicitly unquantized.  Raises ValueError if the members of one vLLM module disagree."""
    out: dict = {}
    for official in sorted(modules, key=natural_key):
        m = modules[official]
        entry = {"bits": m["bits"] or 16, "group_size": m.get("group_size", -1) if m["bits"] else -1, "sym": sym}
        key = prefix + names.vllm_module(official)
        if out.setdefault(key, entry) != entry:
            raise ValueError(f"{key}: members need different schemes ({out[key]} vs {official}: {entry})")
    out[prefix + "lm_head"] = {"bits": 16, "group_size": -1, "sym": sym}
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def stock_output_config(modules: dict, group_size: int, sym: bool, source: dict, min_bits, layout: str | None = None) -> dict:
    """The converted quantization_config for --target stock-vllm (vLLM's own auto-round / INC path, no plugin).

    The top-level ``bits`` is only INC's fallback (every module has an exact key) and must be 2..8; the
    per-module map ``modules`` is kept for m3-verify (``extra_config`` is derived from it and checked)."""
    prefix = stock_prefix(layout)
    extra = stock_extra_config(modules, sym, prefix)
    used = [v["bits"] for v in extra.values() if v["bits"] < 16]
    top = max(set(used), key=used.count) if used else 4
    return {
        "quant_method": STOCK_METHOD,
        "packing_format": "auto_round:auto_gptq",
        "data_type": "int",
        "bits": top,
        "group_size": group_size,
        "sym": sym,
        "block_name_to_quantize": prefix + STOCK_BLOCKS,
        "extra_config": extra,
        "format": FORMAT,
        "target": "stock-vllm",
        **({"layout": layout} if layout else {}),
        "min_bits": min_bits,
        "zero_point": "gptq_v1",
        "desc_act": False,
        "modules": {k: dict(modules[k]) for k in sorted(modules, key=natural_key)},
        "source": source,
    }


def stock_prefix(layout: str | None) -> str:
    """Module prefix vLLM's INC sees for text modules: the VL class nests the text model under language_model."""
    return names.VL_TEXT_PREFIX if layout == "vl" else ""
