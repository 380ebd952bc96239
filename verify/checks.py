"""The checks behind m3-verify.  Each check yields Findings (one line each).

* integrity: SHA256SUMS (``sha256sum -c`` format) against the files;
* structure: headers, index, and the exact key set / shapes / dtypes / bits
  that vLLM's MiniMaxM3SparseForCausalLM expects for OUT_DIR/config.json,
  computed from the converter's own name table (m3_convert.names) and config rules
  (m3_convert.rules, which the planner applies to the source before writing), and
  every GPTQ scale finite;
* against: every output tensor and config field equal to what the source gives, by m3-verify's own
  derivation (verify/against.py: its own source normaliser, inverse name map and config reading; it
  shares no planner, executor or name-table code with the converter).
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from m3_convert import model_config
from m3_convert import gptq, names, rules, st
from m3_convert.errors import CheckpointError
from m3_convert.st import INDEX_FILE, SINGLE_FILE, sha256_file
from m3_convert.quantcfg import FORMAT, QUANT_METHOD, STOCK_METHOD, natural_key as _nat, stock_extra_config


@dataclass
class Finding:
    check: str
    file: str
    tensor: str | None
    message: str

    def line(self) -> str:
        return f"{self.check}: {self.file}" + (f": {self.tensor}" if self.tensor else "") + f": {self.message}"


# ---------------------------------------------------------------- integrity
SUMS = "SHA256SUMS"
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def parse_sums(out_dir):
    path = os.path.join(out_dir, SUMS)
    entries = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            m = _SUM_LINE.match(line)
            if not m:
                raise CheckpointError(SUMS, None, f"line {n} is not '<sha256>  <file>'")
            entries[m.group(2)] = m.group(1).lower()
    return entries


def check_integrity(out_dir, progress=None, workers=2):
    if not os.path.exists(os.path.join(out_dir, SUMS)):
        yield Finding("integrity", SUMS, None, "missing: the conversion did not finish (or this is not an m3-convert output)")
        return
    try:
        entries = parse_sums(out_dir)
    except (CheckpointError, UnicodeDecodeError) as e:
        yield Finding("integrity", SUMS, None, str(e))
        return
    present = set()
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if root == out_dir else dirs
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), out_dir)
            present.add(rel)
    for name in sorted(present - set(entries) - {SUMS}):
        yield Finding("integrity", name, None, "present but not listed in SHA256SUMS")
    todo = []
    for name in sorted(entries):
        if name not in present:
            yield Finding("integrity", name, None, "listed in SHA256SUMS but absent")
        else:
            todo.append(name)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        for name, got in zip(todo, ex.map(lambda n: sha256_file(os.path.join(out_dir, n), progress), todo)):
            if got != entries[name]:
                yield Finding("integrity", name, None, f"sha256 mismatch (expected {entries[name][:16]}..., got {got[:16]}...)")


# ---------------------------------------------------------------- structure
def _load_json(out_dir, name):
    with open(os.path.join(out_dir, name), "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def output_headers(out_dir):
    """(headers by file, findings) for the output's safetensors, via the index if any."""
    findings = []
    idx_path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(idx_path):
        idx = _load_json(out_dir, INDEX_FILE)
        wm = idx.get("weight_map", {})
        files = sorted(set(wm.values()))
    else:
        wm, idx = None, None
        files = [SINGLE_FILE] if os.path.exists(os.path.join(out_dir, SINGLE_FILE)) else []
    if not files:
        findings.append(Finding("structure", out_dir, None, "no safetensors files (no index and no model.safetensors)"))
    headers = {}
    for f in files:
        p = os.path.join(out_dir, f)
        if not os.path.exists(p):
            findings.append(Finding("structure", f, None, f"named in {INDEX_FILE} but absent"))
            continue
        try:
            headers[f] = st.read_header(p)
        except CheckpointError as e:
            findings.append(Finding("structure", e.file, e.tensor, e.msg))
    stray = sorted(x for x in os.listdir(out_dir) if x.endswith(".safetensors") and x not in files)
    for x in stray:
        findings.append(Finding("structure", x, None, "safetensors file not referenced by the index"))
    if wm is not None:
        total = 0
        for f, h in headers.items():
            for t in h.tensors.values():
                total += t.nbytes
                if wm.get(t.name) != f:
                    findings.append(Finding("structure", f, t.name, f"index places it in {wm.get(t.name)!r}"))
        for t, f in wm.items():
            if f in headers and t not in headers[f].tensors:
                findings.append(Finding("structure", f, t, "listed in the index but not in the file"))
        if idx.get("metadata", {}).get("total_size") != total:
            findings.append(Finding("structure", INDEX_FILE, None, f"metadata.total_size {idx.get('metadata', {}).get('total_size')} != {total} bytes of tensors"))
    return headers, findings


def check_config(cfg):
    """Config fields that silently change what vLLM builds."""
    F = "config.json"
    if cfg.get("model_type") != "minimax_m3_vl":
        yield Finding("structure", F, "model_type", f"must be 'minimax_m3_vl', got {cfg.get('model_type')!r}")
    vl = (cfg.get("quantization_config") or {}).get("layout") == "vl"
    arch = model_config.VL_ARCH if vl else "MiniMaxM3SparseForCausalLM"
    if cfg.get("architectures") != [arch]:
        yield Finding("structure", F, "architectures", f"must be [{arch!r}], got {cfg.get('architectures')!r}")
    if vl:
        yield from _check_vision_config(cfg)
    tc = cfg.get("text_config")
    if not isinstance(tc, dict):
        yield Finding("structure", F, "text_config", "missing")
        return
    if tc.get("hidden_act") != "swigluoai":
        yield Finding("structure", F, "text_config.hidden_act", f"must be 'swigluoai', got {tc.get('hidden_act')!r}")
    for path, msg in rules.text_config_problems(tc):     # the rules the converter applies before writing
        yield Finding("structure", F, f"text_config.{path}", msg)
    if not isinstance(tc.get("sparse_attention_config"), dict):
        yield Finding("structure", F, "text_config.sparse_attention_config", "missing")
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        yield Finding("structure", F, "quantization_config", "missing")
    elif qc.get("target") == "stock-vllm":
        yield from _check_stock_config(qc)
    else:
        if qc.get("quant_method") != QUANT_METHOD or qc.get("format") != FORMAT:
            yield Finding("structure", F, "quantization_config", f"quant_method/format must be {QUANT_METHOD!r}/{FORMAT!r}")
        if isinstance(qc.get("bits"), int) and qc["bits"] > 8:
            yield Finding("structure", F, "quantization_config.bits", f"top-level bits {qc['bits']} > 8")


def _check_vision_config(cfg):
    """The fields vLLM's VL class reads from vision_config (as attributes: a missing one is an error at
    build, or a silent default): rules.vision_config_problems, as the converter checks them."""
    for path, msg in rules.vision_config_problems(cfg):
        yield Finding("structure", "config.json", path, msg)


def _check_stock_config(qc):
    """--target stock-vllm: vLLM's auto-round (INC) fields, and extra_config exactly the one derived from the
    per-module map (so the bits m3-verify checks against the tensors are the bits vLLM will use)."""
    F = "config.json"
    if qc.get("quant_method") != STOCK_METHOD or qc.get("format") != FORMAT:
        yield Finding("structure", F, "quantization_config", f"quant_method/format must be {STOCK_METHOD!r}/{FORMAT!r} for target stock-vllm")
    if not isinstance(qc.get("bits"), int) or not 2 <= qc["bits"] <= 8:
        yield Finding("structure", F, "quantization_config.bits", f"vLLM's auto-round config needs a top-level bits in 2..8, got {qc.get('bits')!r}")
    for k, want in (("packing_format", "auto_round:auto_gptq"), ("data_type", "int"), ("sym", True)):
        if qc.get(k) != want:
            yield Finding("structure", F, f"quantization_config.{k}", f"must be {want!r}, got {qc.get(k)!r}")
    from m3_convert.quantcfg import STOCK_BLOCKS, stock_prefix
    pre = stock_prefix(qc.get("layout"))
    if qc.get("block_name_to_quantize") != pre + STOCK_BLOCKS:
        yield Finding("structure", F, "quantization_config.block_name_to_quantize", f"must be {pre + STOCK_BLOCKS!r}")
    try:
        derived = stock_extra_config(qc.get("modules") or {}, qc.get("sym", True), pre)
    except (ValueError, KeyError, TypeError) as e:
        yield Finding("structure", F, "quantization_config.modules", f"no single scheme per vLLM module: {e}")
        return
    have = qc.get("extra_config") or {}
    for k in sorted(set(derived) | set(have), key=_nat):
        if derived.get(k) != have.get(k):
            yield Finding("structure", F, f"quantization_config.extra_config[{k!r}]",
                          f"is {have.get(k)!r} but the tensors' per-module bits give {derived.get(k)!r}")


PLAIN = names.PLAIN_DTYPES           # the one dtype policy (names.py): any plain float tensor vLLM casts on load


def expected_tensors(cfg):
    """Official tensor name -> (dtype options, shape) for this config and its per-module quant map.

    Returns (expected, findings): quant-map problems are findings, not exceptions.
    """
    tc = cfg["text_config"]
    layout = model_config.layout_from_text_config(tc)
    qmods = (cfg.get("quantization_config") or {}).get("modules", {})
    exp, findings, seen_mods = {}, [], set()
    for module, layer, expert in names.expected_modules(layout):
        shapes = rules.expected_shapes(tc, module.src)      # the table the planner checks the source with
        for i, dst in enumerate(names.official_modules(module, layer, expert)):
            shape = shapes[i]
            if module.role in names.LINEAR_ROLES:
                seen_mods.add(dst)
                if dst not in qmods:
                    findings.append(Finding("structure", "config.json", f"quantization_config.modules[{dst!r}]", "missing: no scheme for this module"))
                    continue
                entry = qmods[dst]
                bits = entry.get("bits") if isinstance(entry, dict) else "?"
                if bits is None:      # bf16 in the source (any plain float) or de-quantized by m3-convert (bf16)
                    exp[f"{dst}.weight"] = (PLAIN, shape)
                elif bits in gptq.VALID_BITS:
                    g = entry.get("group_size", cfg["quantization_config"].get("group_size", 128))
                    out_f, in_f = shape
                    for leaf, pshape in gptq.packed_shapes(in_f, out_f, g, bits).items():
                        exp[f"{dst}.{leaf}"] = ((names.GPTQ_DTYPES[leaf],), pshape)
                else:
                    findings.append(Finding("structure", "config.json", f"quantization_config.modules[{dst!r}]", f"bad bits {bits!r}"))
            elif module.role == names.ROUTER:
                exp[f"{dst}.weight"] = (PLAIN, shape)
                if tc.get("use_routing_bias", True):     # vLLM builds the bias parameter exactly then
                    exp[names.official_tensor(module, layer, expert, "e_score_correction_bias")] = (PLAIN, (shape[0],))
            else:
                exp[f"{dst}.weight"] = (PLAIN, shape)
    if (cfg.get("quantization_config") or {}).get("layout") == "vl":
        exp = {names.VL_TEXT_PREFIX + k: v for k, v in exp.items()}
        vc = cfg.get("vision_config") or {}
        for m, L, leaf in names.expected_vision(int(vc.get("num_hidden_layers") or 0)):
            exp[names.vision_tensor(m, L, leaf)] = (PLAIN, rules.vision_shape(m, leaf, cfg))
    n_mtp = (cfg.get("quantization_config") or {}).get("mtp_blocks")
    if n_mtp:   # names as written (the VL layout's language_model.model.mtp.layers.K.*)
        for name, module, own, i in names.expected_mtp_modules(int(n_mtp), layout.num_experts):
            exp[name] = (PLAIN, rules.mtp_shape(tc, module.src if module else None, own, i, name.rsplit(".", 1)[1]))
    for extra in sorted(set(qmods) - seen_mods):
        findings.append(Finding("structure", "config.json", f"quantization_config.modules[{extra!r}]", "names no module of this model"))
    # fused modules must share one scheme (vLLM builds one quant method per fused parameter)
    fused = {}
    for module, layer, expert in names.expected_modules(layout):
        if module.vllm_fused and module.role != names.EXPERT:
            key = names.OUT_LAYER_PREFIX.replace("{L}", str(layer)) + module.vllm_fused
            for dst in names.official_modules(module, layer, expert):
                if dst in qmods:
                    fused.setdefault(key, {})[dst] = (qmods[dst].get("bits"), qmods[dst].get("group_size"))
    for key, members in fused.items():
        if len(set(members.values())) > 1:
            findings.append(Finding("structure", "config.json", key, f"fused module mixes schemes {members}"))
    return exp, findings


def check_structure(out_dir):
    try:
        cfg = _load_json(out_dir, "config.json")
    except (OSError, ValueError) as e:
        yield Finding("structure", "config.json", None, f"unreadable: {e}")
        return
    findings = list(check_config(cfg))
    yield from findings
    if any(f.tensor in ("text_config", "text_config.moe_layer_freq", "text_config.n_shared_experts") for f in findings):
        return
    try:
        exp, qfind = expected_tensors(cfg)
    except (CheckpointError, KeyError, TypeError) as e:
        yield Finding("structure", "config.json", None, f"cannot derive the expected key set: {e}")
        return
    yield from qfind
    headers, hfind = output_headers(out_dir)
    yield from hfind
    actual = {}
    for f, h in headers.items():
        for t in h.tensors.values():
            actual[t.name] = (f, t)
    for name in sorted(set(actual) - set(exp), key=_nat):
        f, t = actual[name]
        yield Finding("structure", f, name, "unexpected tensor: vLLM would skip it silently")
    for name in sorted(set(exp) - set(actual), key=_nat):
        yield Finding("structure", "(all shards)", name, "missing: vLLM would leave this parameter uninitialised")
    for name in sorted(set(exp) & set(actual), key=_nat):
        f, t = actual[name]
        dtypes, shape = exp[name]
        if t.dtype not in dtypes:
            yield Finding("structure", f, name, f"dtype {t.dtype}, expected {'/'.join(dtypes)}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            yield Finding("structure", f, name, f"shape {list(t.shape)}, expected {list(shape)}")
    yield from check_scales(t for _, t in actual.values())


def check_scales(tensors):
    """Every GPTQ scale of the output is finite (gptq.scales_problem, the converter's rule): vLLM would serve a NaN or
    inf as it is. Reads only the scales tensors (about 1/32 of the GPTQ bytes), in batches of one buffer."""
    scales = [t for t in tensors if t.name.endswith(".scales") and t.dtype == names.GPTQ_DTYPES["scales"]]
    for problems in st.map_batches(scales, lambda batch, view: list(gptq.batch_scales_problems(batch, view))):
        for t, problem in problems:
            yield Finding("structure", os.path.basename(t.file), t.name, f"{problem}: vLLM would serve NaN/inf from "
                          f"{t.name.rsplit('.', 1)[0]}")


# ---------------------------------------------------------------- against the source
def check_against(out_dir, in_dir, progress=None):
    """--against: m3-verify's own derivation from the source (verify/against.py), nothing shared with the planner."""
    from .against import check_against as run
    yield from run(out_dir, in_dir, output_headers, Finding, progress)
