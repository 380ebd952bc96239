"""Fuzz: damaged copies of a real auto-round export, one seeded damage per case (header bytes, the length prefix,
dtypes, shapes, offsets, names, the index, config.json, the quantization config, data bytes, scale values, file
lengths, stray files). Every case must end in a clean refusal (exit 2 or 3, one line, no traceback, nothing claiming
completeness) or in an output that ``m3-verify OUT --against IN`` accepts: never a traceback, never an error no check
anticipated, never a complete-looking output that m3-verify rejects.

M3_FUZZ_CASES (default 500) sets the budget, M3_FUZZ_SEED (default 26) the seed; the counts (tried / refused /
converted / crashed, per kind of damage) are printed in pytest's summary. Case i uses Random(seed * 1_000_003 + i),
so one case can be replayed alone with M3_FUZZ_FIRST=i M3_FUZZ_CASES=1.
"""
import json
import os
import random
import shutil
import struct
from collections import Counter, defaultdict
from pathlib import Path

from click.testing import CliRunner

from conftest import FIXTURES, FUZZ_REPORT

#: the undamaged inputs (real exports: three namings, g_idx, another topology, a real MTP block) and the options
#: each is converted with
BASES = [(FIXTURES / "ar_model_naming", []), (FIXTURES / "ar_model_naming", ["--keep-vision"]),
         (FIXTURES / "ar_model_naming", ["--target", "stock-vllm"]), (FIXTURES / "ar_reverted_naming", ["--dtype", "bf16"]),
         (FIXTURES / "ar_gptq_gidx", []), (FIXTURES / "ar_alt", []),
         (FIXTURES / "gpu_tiny", ["--keep-vision", "--keep-mtp"])]
CASES = int(os.environ.get("M3_FUZZ_CASES", "500"))
SEED = int(os.environ.get("M3_FUZZ_SEED", "26"))
FIRST = int(os.environ.get("M3_FUZZ_FIRST", "0"))
VALUES = [None, "x", "", True, False, 0, -1, 1, 2, 3, 7, 64, 10**9, 2**63, 2.5, -0.5, float("nan"), [], {}, [1, 2], "4"]


# ---------------------------------------------------------------- the damaged copy
def clone(base: Path, dst: Path):
    """A copy of ``base`` sharing its bytes (hard links): a file is made private (own) before it is damaged."""
    dst.mkdir()
    for f in os.listdir(base):
        os.link(base / f, dst / f)


def own(path: Path) -> Path:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def shards(d):
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors")


def read_st(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n].decode("utf-8"), raw[8 + n:]


def write_st(path, text, data, length=None):
    hdr = text.encode("utf-8")
    hdr += b" " * (-len(hdr) % 8)
    own(path).write_bytes(struct.pack("<Q", len(hdr) if length is None else length) + hdr + data)


def edit_header(rng, d, fn):
    """fn(rng, header dict, tensor names) edits the header of a random shard; its data stays."""
    path = rng.choice(shards(d))
    _, text, data = read_st(path)
    obj = json.loads(text)
    names = [k for k in obj if k != "__metadata__"]
    what = fn(rng, obj, names) if names else "empty shard"
    write_st(path, json.dumps(obj), data)
    return f"{path.name}: {what}"


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    what = fn(obj)
    own(path).write_text(json.dumps(obj, indent=1))
    return what


# ---------------------------------------------------------------- one damage each
def header_bytes(rng, d):
    path = rng.choice(shards(d))
    n, _, _ = read_st(path)
    raw = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 3)):
        i = 8 + rng.randrange(n)
        raw[i] = ord(rng.choice("0123456789")) if chr(raw[i]).isdigit() and rng.random() < 0.7 else rng.randrange(256)
    own(path).write_bytes(bytes(raw))
    return f"{path.name}: bytes of the header"


def length_prefix(rng, d):
    path = rng.choice(shards(d))
    n, text, data = read_st(path)
    size = 8 + n + len(data)
    new = rng.choice([0, 1, 2, n - 8, n - 1, n + 1, n + 8, size, size - 8, 2**64 - 1, 100_000_001, rng.randrange(2**32)])
    new = max(0, min(new, 2**64 - 1))
    raw = path.read_bytes()
    own(path).write_bytes(struct.pack("<Q", new) + raw[8:])
    return f"{path.name}: length {n} -> {new}"


def dtype(rng, d):
    def fn(rng, obj, names):
        t = rng.choice(names)
        obj[t]["dtype"] = rng.choice(["F16", "BF16", "F32", "I32", "U32", "U8", "I8", "F64", "I64", "BOOL", "F8_E4M3",
                                      "f16", "X", 5, None])
        return f"{t} dtype {obj[t]['dtype']!r}"
    return edit_header(rng, d, fn)


def shape(rng, d):
    def fn(rng, obj, names):
        t = rng.choice(names)
        s = list(obj[t]["shape"])
        op = rng.choice(["+1", "-1", "0", "x2", "reverse", "append 1", "drop", "value"])
        if op == "value" or not s:
            s = rng.choice([None, "x", [-1], [2.5], [True], [10**12, 10**12]])
        elif op == "reverse":
            s = s[::-1]
        elif op == "append 1":
            s = s + [1]
        elif op == "drop":
            s = s[:-1]
        else:
            i = rng.randrange(len(s))
            s[i] = {"+1": s[i] + 1, "-1": s[i] - 1, "0": 0, "x2": s[i] * 2}[op]
        obj[t]["shape"] = s
        return f"{t} shape {op} -> {s!r}"
    return edit_header(rng, d, fn)


def offsets(rng, d):
    def fn(rng, obj, names):
        a, b = rng.choice(names), rng.choice(names)
        op = rng.choice(["shift", "end", "begin", "swap", "alias", "value"])
        oa = obj[a]["data_offsets"]
        if op == "swap" or op == "alias":
            obj[a]["data_offsets"], obj[b]["data_offsets"] = obj[b]["data_offsets"], (oa if op == "swap" else obj[b]["data_offsets"])
        elif op == "value":
            obj[a]["data_offsets"] = rng.choice([None, [0], [1, 0], [-2, 6], [0, 2**70], "0,4"])
        else:
            k = rng.choice([-4, -2, -1, 1, 2, 4, 8, 1024])
            obj[a]["data_offsets"] = [oa[0] + (k if op in ("shift", "begin") else 0), oa[1] + (k if op in ("shift", "end") else 0)]
        return f"{a} offsets {op} ({b})"
    return edit_header(rng, d, fn)


def name(rng, d):
    path = rng.choice(shards(d))
    _, text, data = read_st(path)
    names = [k for k in json.loads(text) if k != "__metadata__"]
    if not names:
        return "empty shard"
    a, b = rng.choice(names), rng.choice(names)
    op = rng.choice(["twice", "swap", "char", "layer", "expert", "suffix", "prefix", "empty"])
    if op == "twice":                     # a second entry under an existing name (text: JSON keeps the last)
        text = text.replace(json.dumps(b) + ":", json.dumps(a) + ":", 1)
    else:
        if op == "swap":
            text = text.replace(json.dumps(a), "\0").replace(json.dumps(b), json.dumps(a)).replace("\0", json.dumps(b))
        else:
            new = {"char": lambda: a[:-1] + rng.choice("xyz0"), "layer": lambda: a.replace("layers.", "layers.1", 1),
                   "expert": lambda: a.replace("experts.", "experts.9", 1), "suffix": lambda: a + ".weight",
                   "prefix": lambda: "model." + a, "empty": lambda: ""}[op]()
            text = text.replace(json.dumps(a) + ":", json.dumps(new) + ":", 1)
    write_st(path, text, data)
    return f"{path.name}: name {op} {a}"


def index(rng, d):
    p = d / "model.safetensors.index.json"
    op = rng.choice(["drop entry", "move entry", "ghost entry", "bad file", "weight_map", "total_size", "bytes",
                     "remove shard", "rename shard"])
    if op == "bytes":
        raw = bytearray(p.read_bytes())
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        own(p).write_bytes(bytes(raw))
        return op
    if op in ("remove shard", "rename shard"):
        s = rng.choice(shards(d))
        s.rename(d / "renamed.safetensors") if op == "rename shard" else s.unlink()
        return f"{op} {s.name}"

    def fn(idx):
        wm = idx["weight_map"]
        k = rng.choice(sorted(wm))
        if op == "drop entry":
            del wm[k]
        elif op == "move entry":
            wm[k] = rng.choice(sorted(set(wm.values())))
        elif op == "ghost entry":
            wm[k + "x"] = wm[k]
        elif op == "bad file":
            wm[k] = rng.choice(["../x.safetensors", "/etc/passwd", "", None, 3, "absent.safetensors"])
        elif op == "weight_map":
            idx["weight_map"] = rng.choice([None, [], "x"])
        else:
            idx.setdefault("metadata", {})["total_size"] = rng.choice([0, -1, None, "x"])
        return f"{op} {k}"
    return edit_json(p, fn)


TEXT_FIELDS = ["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
               "intermediate_size", "dense_intermediate_size", "shared_intermediate_size", "n_shared_experts",
               "num_local_experts", "num_experts_per_tok", "index_n_heads", "index_head_dim", "index_block_size",
               "index_topk_blocks", "index_local_blocks", "layer_types", "mlp_layer_types", "rope_parameters",
               "partial_rotary_factor", "rotary_dim", "rms_norm_eps", "routed_scaling_factor", "swiglu_alpha",
               "swiglu_limit", "use_routing_bias", "scoring_func", "tie_word_embeddings", "num_mtp_modules", "model_type",
               "sparse_attention_config", "moe_layer_freq", "rope_theta"]


def config(rng, d):
    p = d / "config.json"
    if rng.random() < 0.08:
        raw = bytearray(p.read_bytes())
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        own(p).write_bytes(bytes(raw))
        return "config.json bytes"

    def fn(c):
        where, key = rng.choice([("text_config", k) for k in TEXT_FIELDS] * 4 + [(None, "model_type"),
                                 (None, "text_config"), ("vision_config", "hidden_size"), (None, "tie_word_embeddings")])
        obj = c if where is None else c[where]
        old = obj.get(key)
        pool = VALUES + ([old + 1, old * 2, old - 1] if type(old) is int else []) + (
            [old[:-1], old + old[-1:], old[::-1]] if isinstance(old, list) and old else [])
        if rng.random() < 0.15:
            obj.pop(key, None)
            return f"{where}.{key} removed"
        obj[key] = rng.choice(pool)
        return f"{where}.{key}: {old!r} -> {obj[key]!r}"
    return edit_json(p, fn)


def quant(rng, d):
    key = rng.choice(["bits", "group_size", "sym", "data_type", "quant_method", "packing_format", "desc_act", "extra",
                      "extra bits", "extra group_size", "extra drop", "extra regex"])
    value = rng.choice(VALUES + [4, 8, 16, 32, 64, 128, "int", "float", "auto-round", "gptq", "auto_gptq"])
    both = rng.random() < 0.85                # else only one of the two copies: they disagree

    def fn(q):
        ex = q.setdefault("extra_config", {})
        k = rng.choice(sorted(ex)) if ex else "x"
        if key == "extra":
            q["extra_config"] = value
        elif key.startswith("extra ") and ex:
            if key == "extra drop":
                ex.pop(k)
            elif key == "extra regex":
                ex[rng.choice([r".*experts.*", r".*q_proj.*", "(", r".*"])] = {"bits": value}
            else:
                ex[k] = dict(ex[k], **{key.split()[1]: value}) if isinstance(ex[k], dict) else value
        else:
            q[key] = value
        return f"quantization_config {key} ({k}) -> {value!r}"
    what = edit_json(d / "quantization_config.json", fn)
    if both:
        edit_json(d / "config.json", lambda c: c.__setitem__("quantization_config",
                                                             json.loads((d / "quantization_config.json").read_text())))
    return what + ("" if both else " (quantization_config.json only)")


def data_bytes(rng, d):
    path = rng.choice(shards(d))
    n, _, data = read_st(path)
    if not data:
        return "empty shard"
    raw = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 8)):
        raw[8 + n + rng.randrange(len(data))] = rng.randrange(256)
    own(path).write_bytes(bytes(raw))
    return f"{path.name}: data bytes"


def scales(rng, d):
    import numpy as np
    path = rng.choice([s for s in shards(d) if ".scales" in read_st(s)[1]])
    n, text, _ = read_st(path)
    obj = json.loads(text)
    t = rng.choice([k for k in obj if k.endswith(".scales")])
    b, e = obj[t]["data_offsets"]
    value = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 65504.0, 6e-8, -1.0])
    raw = bytearray(path.read_bytes())
    at = 8 + n + b + 2 * rng.randrange((e - b) // 2)
    raw[at:at + 2] = np.array([value], dtype=np.float16).tobytes()
    own(path).write_bytes(bytes(raw))
    return f"{t} = {value}"


def file_length(rng, d):
    path = rng.choice(shards(d))
    raw = path.read_bytes()
    op = rng.choice(["truncate", "append", "empty"])
    new = raw[:rng.randrange(len(raw))] if op == "truncate" else raw + os.urandom(rng.choice([1, 7, 8, 4096])) if op == "append" else b""
    own(path).write_bytes(new)
    return f"{path.name}: {op} to {len(new)} bytes"


def stray(rng, d):
    op = rng.choice(["safetensors", "subdir", "hidden", "copied file"])
    if op == "safetensors":
        shutil.copyfile(rng.choice(shards(d)), d / "extra.safetensors")
    elif op == "subdir":
        (d / "sub").mkdir()
    elif op == "hidden":
        (d / ".cache").write_text("x")
    else:
        (d / "tokenizer.json").write_bytes(os.urandom(100))
    return op


DAMAGES = [header_bytes, length_prefix, dtype, shape, offsets, name, index, config, quant, data_bytes, scales,
           file_length, stray]


# ---------------------------------------------------------------- one case, and the campaign
def run_case(i, work: Path):
    """(kind, what, outcome, detail): outcome refused / converted / crashed (a traceback, an unanticipated error, exit 4,
    or a complete-looking output m3-verify rejects)."""
    from m3_convert.cli import main as convert
    from m3_verify.cli import main as verify
    rng = random.Random(SEED * 1_000_003 + i)
    base, options = rng.choice(BASES)
    damage = rng.choice(DAMAGES)
    src, out = work / f"in{i}", work / f"out{i}"
    clone(base, src)
    what = f"{base.name} {' '.join(options)}: " + damage(rng, src)
    r = CliRunner().invoke(convert, [str(src), str(out), "--quiet"] + options)
    try:
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            return damage.__name__, what, "crashed", f"{type(r.exception).__name__}: {r.exception}"
        text = r.output.strip()
        if r.exit_code in (2, 3):
            clean = (text.count("\n") == 0 and text.startswith("m3-convert: error: ") and "Traceback" not in text
                     and "unexpected " not in text and not (out / "SHA256SUMS").exists())
            return damage.__name__, what, "refused" if clean else "crashed", text
        if r.exit_code != 0:
            return damage.__name__, what, "crashed", f"exit {r.exit_code}: {text}"
        v = CliRunner().invoke(verify, [str(out), "--against", str(src), "--quiet"])
        if v.exit_code != 0 or not (out / "SHA256SUMS").exists():
            return damage.__name__, what, "crashed", f"converted, but m3-verify exit {v.exit_code}: {v.output.strip()[:300]}"
        return damage.__name__, what, "converted", ""
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def test_fuzz_damaged_inputs_are_refused_or_converted_exactly(tmp_path, request):
    counts, per_kind, bad = Counter(), defaultdict(Counter), []
    for i in range(FIRST, FIRST + CASES):
        kind, what, outcome, detail = run_case(i, tmp_path)
        counts[outcome] += 1
        per_kind[kind][outcome] += 1
        if outcome == "crashed":
            bad.append(f"case {i} ({kind}: {what}): {detail}")
    lines = [f"m3 fuzz (seed {SEED}, cases {FIRST}..{FIRST + CASES - 1}): tried {CASES}, refused {counts['refused']}, "
             f"converted {counts['converted']}, crashed {counts['crashed']}"]
    lines += [f"  {k:14s} " + ", ".join(f"{o} {n}" for o, n in sorted(c.items())) for k, c in sorted(per_kind.items())]
    request.config.stash.setdefault(FUZZ_REPORT, []).extend(lines)
    print("\n".join(lines))
    assert not bad, "\n".join(bad[:20])
    assert counts["refused"] and counts["converted"]        # both outcomes exercised: the damage is neither all fatal nor all harmless
