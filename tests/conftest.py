import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NAMINGS = ["ar_model_naming", "ar_reverted_naming", "ar_gptq_gidx"]   # one tiny model, three export namings
OTHERS = ["ar_alt", "gpu_tiny", "gpu_mixed"]   # other topologies (5 layers / n_shared_experts 2; GPU-sized; every MoE layer mixed)
DTYPES = ["ar_f32", "ar_f16"]    # the tiny model with every plain tensor F32 / F16 (auto-round without bf16 / in fp16)
ALL = NAMINGS + OTHERS + DTYPES

#: lines test_fuzz.py leaves for pytest's summary (its counts of tried / refused / converted / crashed)
FUZZ_REPORT = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(FUZZ_REPORT, None)
    if lines:
        terminalreporter.section("m3 fuzz")
        for line in lines:
            terminalreporter.write_line(line)


def need_vllm():
    """For tests that need vLLM: skip outside CI when it is absent; in CI (CI=true) a missing vLLM fails."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("vLLM not installed (run `make test`)", allow_module_level=True)


def run_convert(*args):
    from m3_convert.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_verify(*args):
    from m3_verify.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Each committed fixture converted once (small shards so the index path is used)."""
    out = {}
    for name in ALL:
        dst = tmp_path_factory.mktemp("conv") / name
        r = run_convert(FIXTURES / name, dst, "--max-shard-size", "1MB", "--quiet")
        assert r.exit_code == 0, r.output
        out[name] = dst
    return out


def copy_fixture(tmp_path, name="ar_model_naming"):
    dst = tmp_path / ("in_" + name)
    shutil.copytree(FIXTURES / name, dst)
    return dst


def shard_of(ckpt: Path, tensor: str) -> str:
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return idx["weight_map"][tensor]


def edit_checkpoint(ckpt: Path, add=None, remove=(), rename=None):
    """Rewrite shards with safetensors' own API (test-side corruption of a real fixture)."""
    idx_path = ckpt / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    wm = idx["weight_map"]
    touched = {}
    for t in remove:
        touched.setdefault(wm[t], {})
    for old in (rename or {}):
        touched.setdefault(wm[old], {})
    first = sorted(set(wm.values()))[0]
    if add:
        touched.setdefault(first, {})
    for fname in touched:
        tensors = load_file(str(ckpt / fname))
        for t in remove:
            if wm.get(t) == fname:
                tensors.pop(t)
                wm.pop(t)
        for old, new in (rename or {}).items():
            if wm.get(old) == fname:
                tensors[new] = tensors.pop(old)
                wm[new] = wm.pop(old)
        if add and fname == first:
            for k, v in add.items():
                tensors[k] = v
                wm[k] = fname
        save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    idx_path.write_text(json.dumps(idx, indent=2))


def edit_quant_config(ckpt: Path, fn):
    for f in ("config.json", "quantization_config.json"):
        p = ckpt / f
        if not p.exists():
            continue
        obj = json.loads(p.read_text())
        if f == "config.json":
            fn(obj["quantization_config"])
        else:
            fn(obj)
        p.write_text(json.dumps(obj, indent=2))


def all_tensors(ckpt: Path):
    out = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            out.update(load_file(str(ckpt / f)))
    return out
