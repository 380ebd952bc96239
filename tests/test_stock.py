"""--target stock-vllm: vLLM's own auto-round (INC) config, no plugin.

Every fused module and every MoE layer gets one scheme by lossless promotion; promoted modules decode
exactly to auto-round's reference; the written extra_config resolves, through vLLM's own INCConfig
parser on vLLM's own model (test_vllm-style, needs vLLM), to exactly the tensors' bits.
"""
import json

import numpy as np
import pytest
import torch

from conftest import ALL, FIXTURES, all_tensors, edit_checkpoint, copy_fixture, edit_quant_config, run_convert, run_verify, need_vllm
from m3_convert import gptq, names
from test_convert import oracle, reference, src_cfg


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    out = {}
    for name in ALL:
        d = tmp_path_factory.mktemp("stock") / name
        r = run_convert(FIXTURES / name, d, "--target", "stock-vllm", "--max-shard-size", "1MB", "--json")
        assert r.exit_code == 0, r.output
        out[name] = (d, json.loads(r.output))
    d = tmp_path_factory.mktemp("stock") / "gpu_tiny_min4"
    r = run_convert(FIXTURES / "gpu_tiny", d, "--target", "stock-vllm", "--stock-min-bits", "4", "--json")
    assert r.exit_code == 0, r.output
    out["gpu_tiny_min4"] = (d, json.loads(r.output))
    return out


def qconf(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]


def source_bits(name):
    """official module -> bits in the source checkpoint (from the default target's per-module map)."""
    return {m: v["bits"] for m, v in qconf_default(name)["modules"].items()}


def gptq_bits_in_source(name):
    """official module -> bits, from the source checkpoint's own tensor shapes (gptq.infer_shape) and the
    name table; independent of the planner."""
    from m3_convert import st
    shapes = {}
    for path in sorted((FIXTURES / name).glob("*.safetensors")):
        for t in st.read_header(str(path)).tensors.values():
            _, m = names.resolve(t.name)
            if m is not None and m.leaf in ("qweight", "qzeros", "scales"):
                shapes.setdefault(m._replace(leaf="weight"), {})[m.leaf] = t.shape
    out = {}
    for m, sh in shapes.items():
        bits = gptq.infer_shape(sh["qweight"], sh["qzeros"], sh["scales"]).bits
        out.update(dict.fromkeys(m.dst_modules(), bits))
    return out


_DEFAULT = {}


def qconf_default(name):
    if name not in _DEFAULT:
        import tempfile
        from pathlib import Path
        d = Path(tempfile.mkdtemp()) / "o"
        assert run_convert(FIXTURES / name, d, "--quiet").exit_code == 0
        _DEFAULT[name] = qconf(d)
    return _DEFAULT[name]


@pytest.mark.parametrize("name", ALL)
def test_one_scheme_per_vllm_module_at_the_widest_width(stock, name):
    d, _ = stock[name]
    qc = qconf(d)
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == "auto_round:auto_gptq"
    assert 2 <= qc["bits"] <= 8 and qc["block_name_to_quantize"] == "model.layers"
    src = source_bits(name)
    units = {}
    for m, b in src.items():
        units.setdefault(names.vllm_module(m), []).append((m, b))
    extra = qc["extra_config"]
    assert set(extra) == set(units) | {"lm_head"}
    sparse = src_cfg(name.replace("_min4", ""))["text_config"]["layer_types"]
    for unit, members in units.items():
        widths = [b for _, b in members]
        want = 16 if None in widths else max(widths)
        L = int(unit.split(".")[2]) if unit.startswith("model.layers.") else None
        if unit.endswith("qkv_proj") and sparse[L] != "minimax_m3_sparse" and set(widths) == {None}:
            # dense q/k/v of mixed widths: the default target de-quantizes them, stock promotes them to the
            # widest of their source widths (read from the source tensors' shapes)
            want = max(gptq_bits_in_source(name.replace("_min4", ""))[m] for m, _ in members)
            if name.endswith("_min4"):
                want = max(want, 4)
            assert extra[unit]["bits"] == want, (unit, members)
        else:
            assert extra[unit]["bits"] == want, (unit, members)
        for m, _ in members:
            assert (qc["modules"][m]["bits"] or 16) == want
    assert extra["lm_head"]["bits"] == 16
    # MoE layers: one width per layer, the widest of their experts
    moe = [u for u in units if u.endswith("block_sparse_moe.experts")]
    assert moe and all(extra[u]["bits"] == max(b for _, b in units[u]) for u in moe)


def test_dense_mixed_qkv_is_promoted_to_the_widest(stock):
    d, _ = stock["ar_model_naming"]
    qc = qconf(d)["modules"]
    _, meta = reference()                       # source bits per source module (model naming)
    tc = src_cfg("ar_model_naming")["text_config"]
    mixed = 0
    for L, kind in enumerate(tc["layer_types"]):
        src = [meta["bits"][f"model.language_model.layers.{L}.self_attn.{p}_proj"] for p in "qkv"]
        out = [qc[f"model.layers.{L}.self_attn.{p}_proj"]["bits"] for p in "qkv"]
        if kind == "minimax_m3_sparse":
            assert out == [None] * 3
        else:
            assert out == [max(src)] * 3, (L, src, out)
            mixed += len(set(src)) > 1
    assert mixed >= 1


@pytest.mark.parametrize("name", ["ar_model_naming", "gpu_tiny_min4"])
def test_promoted_modules_decode_exactly_to_the_source(stock, name):
    """Independent of the converter's planner: decode each output module and compare with auto-round's
    reference decode (ar_model_naming) or with the default target's output decode (gpu_tiny)."""
    d, _ = stock[name]
    out = all_tensors(d)
    qc = qconf(d)["modules"]
    if name == "ar_model_naming":
        lin, _ = oracle(src_cfg(name)["text_config"])
        refs, _ = reference()
    else:
        import tempfile
        from pathlib import Path
        dd = Path(tempfile.mkdtemp()) / "o"
        assert run_convert(FIXTURES / "gpu_tiny", dd, "--quiet").exit_code == 0
        base = all_tensors(dd)
        base_q = qconf(dd)["modules"]
    promoted = 0
    for mod, m in qc.items():
        if not m["bits"]:
            continue
        dec = gptq.dequantize(*(out[f"{mod}.{x}"].numpy() for x in ("qweight", "qzeros", "scales")))
        if name == "ar_model_naming":
            src, half = lin[mod]
            ref = refs[src].numpy()
            if half is not None:
                ref = ref[: ref.shape[0] // 2] if half == 0 else ref[ref.shape[0] // 2:]
            was = None
        else:
            was = base_q[mod]["bits"]
            ref = (gptq.dequantize(*(base[f"{mod}.{x}"].numpy() for x in ("qweight", "qzeros", "scales")))
                   if was else gptq.bf16_to_f32(base[f"{mod}.weight"].view(torch.int16).numpy().view(np.uint16)))
            if was is None:
                pytest.fail(f"{mod}: bf16 in the default output but GPTQ in stock output")
        assert np.array_equal(dec, ref), mod
        promoted += int(out[f"{mod}.qweight"].shape[0] * 32 // dec.shape[1] != (was or m["bits"]))
    if name == "gpu_tiny_min4":
        assert min(m["bits"] for m in qc.values() if m["bits"]) >= 4
        assert promoted > 5


@pytest.mark.parametrize("name", ALL)
def test_verify_against_source_passes(stock, name):
    d, _ = stock[name]
    r = run_verify(d, "--against", FIXTURES / name, "--quiet")
    assert r.exit_code == 0, r.output


def test_memory_cost_is_reported_and_true(stock):
    d, rep = stock["gpu_tiny"]
    p = rep["promotion"]
    out = all_tensors(d)
    default = qconf_default("gpu_tiny")["modules"]
    qc = qconf(d)["modules"]
    native = written = 0
    for mod, m in qc.items():
        if m["bits"] and default[mod]["bits"]:
            nbytes = sum(out[f"{mod}.{x}"].numel() * 4 for x in ("qweight", "qzeros"))
            written += nbytes
            native += nbytes * default[mod]["bits"] // m["bits"]
    assert (p["gptq_bytes_native"], p["gptq_bytes_output"]) == (native, written)
    assert p["extra_bytes"] == written - native > 0
    assert set(p["per_layer"]) == {"2"}     # only layer 2 (mixed experts, 2/3-bit shared) changes
    r = run_convert(FIXTURES / "gpu_tiny", d.parent / "again", "--target", "stock-vllm")
    assert "promotion costs" in r.output and "layer 2:" in r.output


def test_planted_extra_config_fault_is_caught(stock, tmp_path):
    import shutil
    d = tmp_path / "o"
    shutil.copytree(stock["gpu_tiny"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["extra_config"].pop("model.layers.2.block_sparse_moe.experts")
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_verify(d, "--quiet")
    assert r.exit_code == 1
    assert "extra_config['model.layers.2.block_sparse_moe.experts']" in r.output


def test_moe_layer_mixing_bf16_and_gptq_experts_is_refused(tmp_path):
    d = copy_fixture(tmp_path)
    m = "model.language_model.layers.1.mlp.experts.0.down_proj"
    t = all_tensors(d)
    w = torch.from_numpy(gptq.dequantize(*(t[f"{m}.{x}"].numpy() for x in ("qweight", "qzeros", "scales")))).to(torch.bfloat16)
    edit_checkpoint(d, remove=[f"{m}.qweight", f"{m}.qzeros", f"{m}.scales"], add={f"{m}.weight": w})
    edit_quant_config(d, lambda q: q["extra_config"].__setitem__(m, {"bits": 16}))
    assert run_convert(d, tmp_path / "ok", "--quiet").exit_code == 0     # the plugin target handles it
    r = run_convert(d, tmp_path / "o", "--target", "stock-vllm")
    assert r.exit_code == 3 and "MoE layer 1 mixes GPTQ and bf16 experts" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o" / "SHA256SUMS").exists()


def test_sym_is_written_true_whatever_the_source_default(tmp_path):
    d = copy_fixture(tmp_path, "gpu_tiny")

    def flip(q):
        q["sym"] = False
        for v in q["extra_config"].values():
            if v.get("bits", 16) < 16:
                v["sym"] = True
    edit_quant_config(d, flip)
    o = tmp_path / "o"
    assert run_convert(d, o, "--target", "stock-vllm", "--quiet").exit_code == 0
    qc = qconf(o)
    assert qc["sym"] is True and all(v["sym"] is True for v in qc["extra_config"].values())
    assert run_verify(o, "--against", d, "--quiet").exit_code == 0


def test_vllm_check_reports_an_unreadable_config_as_a_finding(stock, tmp_path):
    import shutil
    d = tmp_path / "o"
    shutil.copytree(stock["gpu_tiny"][0], d)
    (d / "config.json").write_text("{not json")
    r = run_verify(d, "--vllm", "--json")
    assert r.exit_code == 1 and "Traceback" not in r.output
    rep = json.loads(r.output)
    assert any(f["check"] == "vllm" and "unreadable" in f["message"] for f in rep["findings"])


def test_stock_min_bits_needs_the_stock_target(tmp_path):
    r = run_convert(FIXTURES / "gpu_tiny", tmp_path / "o", "--stock-min-bits", "4")
    assert r.exit_code == 2 and "--stock-min-bits needs --target stock-vllm" in r.output


# ---------------------------------------------------------------- vLLM's own INC parser (needs vLLM)
def _vllm(d):
    r = run_verify(d, "--vllm", "--json")
    return r.exit_code, json.loads(r.output)


@pytest.mark.vllm
def test_vllm_inc_resolves_every_module_to_the_tensors_scheme(stock):
    need_vllm()
    for name, humming in (("gpu_tiny", True), ("gpu_tiny_min4", False), ("ar_alt", None)):
        d, _ = stock[name]
        code, rep = _vllm(d)
        hazards = [f for f in rep["findings"] if "would serve wrong experts" in f["message"]]
        assert rep["findings"] == hazards and (code == 0) == (not hazards), (name, rep["findings"])
        assert bool(hazards) == (name == "ar_alt")       # ar_alt's experts are 128 wide (= group size)
        methods = rep["vllm"]["methods"]
        qc = qconf(d)
        assert set(methods) == set(qc["extra_config"])          # every module vLLM builds, and nothing else
        assert rep["vllm"]["modules"] == len(methods)
        for prefix, meth in methods.items():
            b = qc["extra_config"][prefix]["bits"]
            if b == 16:
                assert meth.startswith("Unquantized"), (prefix, meth)
            else:
                assert meth.startswith(f"INCWna16Scheme {b}-bit"), (prefix, meth)
                if prefix.endswith("block_sparse_moe.experts"):
                    assert ("Humming" in meth) == (b in (2, 3)) and ("Marlin" in meth) == (b in (4, 8))
                else:
                    assert ("Humming" in meth) == (b in (2, 3))
        if humming is not None:
            assert any("Humming" in m for m in methods.values()) == humming


@pytest.mark.vllm
def test_vllm_stock_check_reports_the_marlin_moe_shape_hazard(stock):
    need_vllm()
    d, _ = stock["ar_model_naming"]             # expert width 128 == group size
    code, rep = _vllm(d)
    assert code == 1
    msgs = {f["tensor"]: f["message"] for f in rep["findings"]}
    assert set(msgs) == {"model.layers.1.block_sparse_moe.experts", "model.layers.2.block_sparse_moe.experts"}
    assert all("would serve wrong experts" in m for m in msgs.values())


@pytest.mark.vllm
def test_vllm_stock_check_catches_a_wrong_key(stock, tmp_path):
    need_vllm()
    import shutil
    d = tmp_path / "o"
    shutil.copytree(stock["gpu_tiny"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    ec = cfg["quantization_config"]["extra_config"]
    ec["model.layers.2.block_sparse_moe.experts"]["bits"] = 4     # tensors are 8-bit after promotion
    (d / "config.json").write_text(json.dumps(cfg))
    code, rep = _vllm(d)
    assert code == 1
    assert any(f["tensor"] == "model.layers.2.block_sparse_moe.experts" and "INC resolves bits=4" in f["message"]
               for f in rep["findings"]), rep["findings"]


def _promoted_qweight(d):
    """A qweight the stock target promoted (its PROMOTE op), from the converter's own plan of the source."""
    from m3_convert import plan as planmod
    p = planmod.make_plan(str(FIXTURES / "gpu_tiny"), 1 << 20, target="stock-vllm")
    return next(o.name for o in p.tensors if o.op == planmod.PROMOTE and o.name.endswith(".qweight"))


def test_against_catches_a_changed_promoted_code(stock, tmp_path):
    import shutil
    from test_verify import _flip_byte_in_tensor, rehash, verify_lines
    d = tmp_path / "o"
    shutil.copytree(stock["gpu_tiny"][0], d)
    t = _promoted_qweight(d)
    fname = _flip_byte_in_tensor(d, t)
    rehash(d)
    code, lines = verify_lines(d, "--against", FIXTURES / "gpu_tiny")
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"against: {fname}: {t}: promoted ") and \
        "bits, but does not decode to the source" in lines[0], lines


def test_against_decode_proof_catches_a_promotion_bug_the_byte_check_shares(tmp_path, monkeypatch):
    """A wrong promotion rule in gptq (codes shifted, zeros not), used by the converter: m3-verify never promotes,
    it decodes the written module and the source module and compares the values."""
    from test_verify import verify_lines
    good_shift = gptq._shift

    def wrong_qweight(qweight, bits, new_bits):
        return qweight if new_bits == bits else gptq.pack_qweight(good_shift(gptq.unpack_qweight(qweight, bits), bits, new_bits) + 1, new_bits)
    monkeypatch.setattr(gptq, "promote_qweight", wrong_qweight)
    d = tmp_path / "o"
    r = run_convert(FIXTURES / "gpu_tiny", d, "--target", "stock-vllm", "--quiet")
    assert r.exit_code == 0, r.output
    code, lines = verify_lines(d, "--against", FIXTURES / "gpu_tiny")
    assert code == 1 and lines and all("bits, but does not decode to the source" in l for l in lines), lines
