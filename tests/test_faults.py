"""Crashes, hostile input and hostile output directories.

Kill trials use real SIGKILLs: 20 at byte positions spread over the whole run (the test-only
M3_CONVERT_KILL_AT_BYTES hook, so every phase is hit, the manifest included) and 5 at random
wall-clock times from outside (kill -9).  After each: nothing claims completeness, and
--resume finishes with output byte-identical to an uninterrupted run, leaving no temporary files.
"""
import json
import os
import re
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, copy_fixture, edit_quant_config, run_convert, run_verify
from test_errors import EXIT_INPUT, EXIT_USAGE, convert_fails

SRC = FIXTURES / "ar_model_naming"
ARGS = ["--max-shard-size", "200KB", "--quiet"]
CLI = [sys.executable, "-m", "m3_convert.cli"]
SHARD = "model-00006-of-00006.safetensors"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    p = subprocess.run(CLI + [str(SRC), str(out)] + ARGS, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    total = sum(os.path.getsize(out / f) for f in os.listdir(out))
    return out, (out / "SHA256SUMS").read_text(), total


def leftovers(out: Path):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".partial") or ".m3-convert" in p.parts)


def assert_not_complete(out: Path):
    if not (out / "SHA256SUMS").exists():
        return
    # a manifest may exist only if the run had actually finished: then it must verify
    r = run_verify(out, "--quiet")
    assert r.exit_code == 0, r.output


def resume_and_compare(out: Path, ref_sums: str):
    p = subprocess.run(CLI + [str(SRC), str(out), "--resume"] + ARGS, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (out / "SHA256SUMS").read_text() == ref_sums
    assert leftovers(out) == []
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out).returncode == 0


def test_kill_trials_at_every_phase(reference_run, tmp_path):
    _, ref_sums, total = reference_run
    killed = 0
    for i in range(20):
        out = tmp_path / f"t{i}"
        at = max(1, int(total * (i + 0.5) / 20))
        env = dict(os.environ, M3_CONVERT_KILL_AT_BYTES=str(at))
        p = subprocess.run(CLI + [str(SRC), str(out)] + ARGS, capture_output=True, text=True, env=env)
        assert p.returncode == -signal.SIGKILL, (at, p.returncode, p.stderr)
        killed += 1
        assert_not_complete(out)
        r = run_verify(out, "--quiet")
        assert r.exit_code != 0 or (out / "SHA256SUMS").exists()
        resume_and_compare(out, ref_sums)
    assert killed == 20


def test_kill_trials_at_random_times(reference_run, tmp_path):
    _, ref_sums, _ = reference_run
    t0 = time.time()
    subprocess.run(CLI + [str(SRC), str(tmp_path / "timing")] + ARGS, check=True)
    duration = time.time() - t0
    rng = random.Random(1234)
    resumed = 0
    for i in range(5):
        out = tmp_path / f"r{i}"
        p = subprocess.Popen(CLI + [str(SRC), str(out)] + ARGS, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert_not_complete(out)
        if out.exists() and os.listdir(out):
            resume_and_compare(out, ref_sums)
            resumed += 1
    assert resumed >= 1   # kills land after the output exists (30-100% of a run), or the trials test nothing


def test_resume_redoes_a_shard_that_changed(reference_run, tmp_path):
    _, ref_sums, total = reference_run
    out = tmp_path / "o"
    env = dict(os.environ, M3_CONVERT_KILL_AT_BYTES=str(int(total * 0.8)))
    subprocess.run(CLI + [str(SRC), str(out)] + ARGS, env=env)
    shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
    assert shards, "the kill point should leave finished shards"
    with open(out / shards[0], "r+b") as f:     # damage a finished shard behind the journal's back
        f.seek(100)
        f.write(b"\x00\x01\x02")
    p = subprocess.run(CLI + [str(SRC), str(out), "--resume"] + ARGS[:-1], capture_output=True, text=True)
    assert p.returncode == 0 and f"{shards[0]} changed since it was written, redoing it" in p.stderr
    assert (out / "SHA256SUMS").read_text() == ref_sums


@pytest.fixture
def small_fs(tmp_path):
    """(directory, env, mounted): a real 1 MiB tmpfs; where mounting is not allowed (it needs root), a plain
    directory and the test-only hooks that give the same two conditions (1 MiB free for the space check, ENOSPC
    once 1 MiB is written). Never skipped."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    env = dict(os.environ) if mounted else dict(os.environ, M3_CONVERT_FREE_BYTES=str(1 << 20),
                                                       M3_CONVERT_ENOSPC_AT_BYTES=str(1 << 20))
    yield mnt, env, mounted
    if mounted:
        subprocess.run(["umount", str(mnt)])


def test_refused_up_front_when_the_disk_is_too_small(small_fs):
    mnt, env, mounted = small_fs
    out = mnt / "out"
    p = subprocess.run(CLI + [str(SRC), str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 4, p.stderr
    fs = re.escape(str(mnt)) if mounted else r"/\S*"
    assert re.search(r"not enough space for the output: needs \d+\.\d\d MiB, 1\.00 MiB free on " + fs, p.stderr), p.stderr
    assert not out.exists()                              # nothing written, not even the directory
    dry = subprocess.run(CLI + [str(SRC), str(out), "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and re.search(r"disk   : needs .* MiB, 1\.00 MiB free on .*: DOES NOT FIT", dry.stdout), dry.stdout
    js = json.loads(subprocess.run(CLI + [str(SRC), str(out), "--dry-run", "--json"], capture_output=True, text=True,
                                   env=env).stdout)
    assert js["disk"]["needed_bytes"] > js["disk"]["free_bytes"] == 1 << 20


def test_disk_full_real_small_filesystem(small_fs):
    """Told to try anyway, the write fails (on the real filesystem where it can be mounted): exit 4, the file being
    written named, no manifest, no partial files."""
    mnt, env, _ = small_fs
    out = mnt / "out"
    p = subprocess.run(CLI + [str(SRC), str(out), "--skip-space-check"], capture_output=True, text=True, env=env)
    assert p.returncode == 4, p.stderr
    assert re.search(r"No space left on device \((model[-0-9of]*\.safetensors|[a-z_.]+json)\)", p.stderr), p.stderr
    assert "()" not in p.stderr and "Traceback" not in p.stderr
    assert not (out / "SHA256SUMS").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".partial")]


def test_disk_full_names_the_shard(tmp_path):
    """The same error raised by the fault hook inside the first shard (no mount needed): the shard is named.

    The hook counts bytes over every writer, so the point must be one only shard 1 can reach: one worker (shards in
    order, each followed by its journal write), and a point below shard 1's size that the metadata files written
    beside it (about 10 KB in all) cannot reach on their own. With several workers and 200 KB, a CI machine once
    crossed it in the journal written after another shard (state.json)."""
    out = tmp_path / "o"
    env = dict(os.environ, M3_CONVERT_ENOSPC_AT_BYTES=str(100_000))   # shard 1 of this fixture: 171 KB
    p = subprocess.run(CLI + [str(SRC), str(out), "--workers", "1"] + ARGS, capture_output=True, text=True, env=env)
    assert p.returncode == 4, p.stderr
    assert re.search(r"failed: No space left on device \(model-00001-of-\d+\.safetensors\)", p.stderr), p.stderr


def test_disk_full_in_the_metadata_phase(reference_run, tmp_path):
    _, _, total = reference_run
    out = tmp_path / "o"
    env = dict(os.environ, M3_CONVERT_ENOSPC_AT_BYTES=str(total - 500))   # inside config/README/index/manifest
    p = subprocess.run(CLI + [str(SRC), str(out)] + ARGS, capture_output=True, text=True, env=env)
    assert p.returncode == 4 and "No space left on device" in p.stderr
    assert not (out / "SHA256SUMS").exists() and not [f for f in os.listdir(out) if f.endswith(".partial")]


# ---------------------------------------------------------------- hostile input
def raw_shard(path, header_bytes, data=b"", length=None):
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)


def test_header_length_larger_than_file(tmp_path):
    d = copy_fixture(tmp_path)
    raw_shard(d / SHARD, b'{"a":1}', length=10**6)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "larger than the file")


def test_huge_header_refused_before_reading(tmp_path):
    d = copy_fixture(tmp_path)
    raw_shard(d / SHARD, b"{}", length=2**40)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "exceeds the")


def test_non_utf8_header(tmp_path):
    d = copy_fixture(tmp_path)
    raw_shard(d / SHARD, b'{"\xff\xfe":1}      ')
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "not valid UTF-8")


def _hdr(obj):
    js = json.dumps(obj).encode()
    return js + b" " * (-len(js) % 8)


def test_offsets_out_of_range(tmp_path):
    d = copy_fixture(tmp_path)
    raw_shard(d / SHARD, _hdr({"x.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}), b"\0" * 4)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "x.weight", "beyond the end")


def test_overlapping_offsets(tmp_path):
    d = copy_fixture(tmp_path)
    raw_shard(d / SHARD, _hdr({"a.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                               "b.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [4, 12]}}), b"\0" * 12)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "b.weight", "overlaps a.weight")


def test_dtype_shape_disagree_with_byte_range(tmp_path):
    d = copy_fixture(tmp_path)
    raw_shard(d / SHARD, _hdr({"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}), b"\0" * 8)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "a.weight", "needs 16 bytes but data_offsets span 8")


@pytest.mark.parametrize("bad", ["/etc/passwd", "sub/model.safetensors", "..", "..\\x.safetensors", "../outside.safetensors"])
def test_index_names_leaving_in_dir(tmp_path, bad):
    d = copy_fixture(tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = bad
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model.safetensors.index.json", "not a plain file name")


def test_invalid_json_index(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model.safetensors.index.json", "not valid JSON")


def test_bits_16_means_unquantized_and_disagrees_with_gptq_tensors(tmp_path):
    d = copy_fixture(tmp_path)
    m = "model.language_model.layers.0.self_attn.o_proj"
    edit_quant_config(d, lambda q: q["extra_config"][m].update(bits=16))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, m + ".qweight", "8-bit GPTQ but quantization_config says unquantized")


def test_qweight_without_scales(tmp_path):
    from conftest import edit_checkpoint
    d = copy_fixture(tmp_path)
    t = "model.language_model.layers.1.mlp.experts.3.down_proj.scales"
    edit_checkpoint(d, remove=[t])
    convert_fails(d, tmp_path / "o", EXIT_INPUT, t, "missing partner tensor")


# ---------------------------------------------------------------- hostile output directory
def test_in_dir_inside_out_dir(tmp_path):
    d = copy_fixture(tmp_path)
    convert_fails(d, tmp_path, EXIT_USAGE, "inside OUT_DIR")


def test_symlink_in_out_dir_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "precious.json"
    outside.write_text("keep me")
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").symlink_to(outside)
    r = run_convert(SRC, out, "--force", "--quiet")
    assert r.exit_code == 0, r.output
    assert outside.read_text() == "keep me" and not (out / "config.json").is_symlink()


def test_no_pickle_anywhere():
    root = Path(__file__).parent.parent
    for sub in ("convert", "verify"):
        for f in (root / sub).rglob("*.py"):
            text = f.read_text()
            assert "torch.load(" not in text and "pickle" not in text, f


def test_force_rewrite_removes_only_its_own_stale_files(tmp_path):
    """A re-run with other shard sizes: the old shards (listed in the old SHA256SUMS) go, other files stay."""
    out = tmp_path / "o"
    assert run_convert(SRC, out, "--max-shard-size", "200KB", "--quiet").exit_code == 0
    old = {f for f in os.listdir(out) if f.startswith("model-")}
    (out / "notes.txt").write_text("mine")
    assert run_convert(SRC, out, "--force", "--quiet").exit_code == 0
    now = set(os.listdir(out))
    assert not (old & now) and "model.safetensors" in now and "model.safetensors.index.json" not in now
    assert (out / "notes.txt").read_text() == "mine"
    r = run_verify(out, "--quiet")
    assert r.output.strip() == "integrity: notes.txt: present but not listed in SHA256SUMS"


def test_hidden_input_files_are_reported_not_copied(tmp_path):
    d = copy_fixture(tmp_path)
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    r = run_convert(d, tmp_path / "o")
    assert r.exit_code == 0 and "ignored: .gitattributes" in r.output
    assert not (tmp_path / "o" / ".gitattributes").exists()


def test_failure_on_the_metadata_thread_stops_the_run(tmp_path):
    """The metadata files are written on a side thread while the shards stream: its error must end the
    run the same way (OutputError, exit 4 in the CLI), with no manifest and no temporary files."""
    from m3_convert import execute, plan as planmod
    from m3_convert.errors import OutputError
    d = copy_fixture(tmp_path)
    p = planmod.make_plan(str(d), 200_000)
    assert p.copied_files, "the fixture should carry non-weight files to copy"
    os.unlink(d / p.copied_files[0])          # gone between planning and writing
    out = tmp_path / "o"
    with pytest.raises(OutputError, match=p.copied_files[0]):
        execute.run(p, str(out), workers=2)
    assert not (out / "SHA256SUMS").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".partial")]
    assert threading_names() == []


def threading_names():
    import threading
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("m3-"))


def test_index_file_name_that_is_not_a_string(tmp_path):
    d = copy_fixture(tmp_path)
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    idx["weight_map"][next(iter(idx["weight_map"]))] = ["x"]
    p.write_text(json.dumps(idx))
    convert_fails(d, tmp_path / "o", EXIT_INPUT, "model.safetensors.index.json", "['x'] is not a plain file name")


# ---------------------------------------------------------------- one writer per OUT_DIR
def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    """A live run holds OUT_DIR's writer lock (paused mid-shard by the test-only hook): a second m3-convert, plain,
    --resume or --force, is refused with exit 2 and the first one's pid, before it writes or removes anything; the
    first then finishes normally."""
    from m3_convert import execute, plan as planmod
    from m3_convert.errors import UsageError
    out, pause = tmp_path / "o", tmp_path / "paused"
    env = dict(os.environ, M3_CONVERT_PAUSE_AT_BYTES="100000", M3_CONVERT_PAUSE_FILE=str(pause))
    first = subprocess.Popen(CLI + [str(SRC), str(out), "--workers", "1"] + ARGS, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not pause.exists():                  # bounded: the hook pauses at 100 kB, the run writes ~2 MB
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        before = sorted(os.listdir(out))
        for extra in ([], ["--resume"], ["--force"], ["--resume", "--force"]):
            p = subprocess.run(CLI + [str(SRC), str(out)] + extra + ARGS, capture_output=True, text=True)
            assert p.returncode == EXIT_USAGE, (extra, p.stderr)
            assert f"is being written by another m3-convert (pid {first.pid}; lock .m3-convert/lock)" in p.stderr, p.stderr
        with pytest.raises(UsageError, match=f"pid {first.pid}"):        # the lock itself, not only the CLI's check
            execute.run(planmod.make_plan(str(SRC), 200_000), str(out))
        assert sorted(os.listdir(out)) == before
    finally:
        pause.unlink(missing_ok=True)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert run_verify(out, "--quiet").exit_code == 0 and leftovers(out) == []
    assert run_convert(SRC, out, "--force", "--quiet").exit_code == 0        # the lock went with the first run


def test_a_killed_writer_leaves_no_lock_behind(reference_run, tmp_path):
    """kill -9 mid-run: the lock file stays (with the dead pid) but the OS released the lock, so --resume runs."""
    _, ref_sums, total = reference_run
    out = tmp_path / "o"
    env = dict(os.environ, M3_CONVERT_KILL_AT_BYTES=str(total // 2))
    p = subprocess.Popen(CLI + [str(SRC), str(out)] + ARGS, env=env)
    assert p.wait() == -signal.SIGKILL
    assert (out / ".m3-convert" / "lock").read_text() == f"{p.pid}\n"
    resume_and_compare(out, ref_sums)


# ---------------------------------------------------------------- safetensors layout, on a real shard
def _rewrite_header(path, edit):
    """Rewrite a real shard's header JSON text with ``edit(text) -> (text, data)`` (data: the bytes after it)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text, data = edit(raw[8:8 + n].decode(), raw[8 + n:])
    hdr = text.encode()
    hdr += b" " * (-len(hdr) % 8)
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + data)


MANY = "model-00001-of-00006.safetensors"     # a shard with many tensors


def _first_two(text):
    obj = json.loads(text)
    names = [k for k in obj if k != "__metadata__"]
    return obj, sorted(names, key=lambda k: obj[k]["data_offsets"])[:2]


def test_tensor_named_twice_in_a_real_shard(tmp_path):
    d = copy_fixture(tmp_path)

    def dup(text, data):
        obj, (a, b) = _first_two(text)
        entry = json.dumps(obj[b], separators=(",", ":"))
        return text.replace(json.dumps(b) + ":" + entry, json.dumps(a) + ":" + entry, 1), data
    _rewrite_header(d / MANY, dup)
    a = _first_two(json.dumps(json.loads(_header_text(d / MANY))))[1][0]
    convert_fails(d, tmp_path / "o", EXIT_INPUT, f"{MANY}: {a}: named twice in the header")


def test_two_tensors_on_the_same_bytes_in_a_real_shard(tmp_path):
    d = copy_fixture(tmp_path)

    def alias(text, data):
        obj, (a, b) = _first_two(text)          # b described as a copy of a, on a's bytes
        obj[b] = dict(obj[a])
        return json.dumps(obj), data
    _rewrite_header(d / MANY, alias)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, MANY, "byte range overlaps")
    (a, b), = [_first_two(_header_text(d / MANY))[1]]
    out = run_convert(d, tmp_path / "o").output
    assert f"{MANY}: {a}: byte range overlaps {b}" in out or f"{MANY}: {b}: byte range overlaps {a}" in out, out


def _header_text(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + n].decode()


def _shift_first(text, data, by):
    """Every tensor's data_offsets moved ``by`` bytes later, ``by`` zero bytes before the data: a gap before the first."""
    obj = json.loads(text)
    for k, v in obj.items():
        if k != "__metadata__":
            v["data_offsets"] = [v["data_offsets"][0] + by, v["data_offsets"][1] + by]
    return json.dumps(obj), b"\0" * by + data


def _gap_after_first(text, data):
    """The tensors after the first moved 8 bytes later (8 zero bytes inserted after the first): a gap between two."""
    obj = json.loads(text)
    a, _ = _first_two(text)[1]
    cut = obj[a]["data_offsets"][1]
    for k, v in obj.items():
        if k != "__metadata__" and v["data_offsets"][0] >= cut:
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]
    return json.dumps(obj), data[:cut] + b"\0" * 8 + data[cut:]


def _metadata_twice(text, data):
    assert text.startswith("{")
    return '{"__metadata__":{"format":"pt"},"__metadata__":{"format":"pt"},' + text[1:], data


def _field_twice(text, data):
    obj = json.loads(text)
    a = _first_two(text)[1][0]
    e = obj[a]
    entry = json.dumps(e, separators=(",", ":"))
    twice = entry[:-1] + ',"dtype":' + json.dumps(e["dtype"]) + "}"
    assert entry in text
    return text.replace(entry, twice, 1), data


@pytest.mark.parametrize("damage, needles", [
    (lambda t, d: _shift_first(t, d, 8), ["data_offsets start 8 bytes after the start of the data: a gap"]),
    (_gap_after_first, ["data_offsets start 8 bytes after the end of", ": a gap"]),
    (_metadata_twice, ["__metadata__: named twice in the header"]),
    (_field_twice, ["an entry of the header gives 'dtype' twice"]),
])
def test_header_layout_refused_through_the_cli(tmp_path, damage, needles):
    """The layout rules of st.read_header (tested against the safetensors library in test_st), fed to m3-convert
    through a real shard: exit 3, one line naming the file, nothing complete written."""
    d = copy_fixture(tmp_path)
    _rewrite_header(d / MANY, damage)
    out = convert_fails(d, tmp_path / "o", EXIT_INPUT, f"m3-convert: error: {MANY}", *needles)
    assert out.count("\n") == 1, out


def test_header_over_the_reference_limit_is_refused(tmp_path):
    """The limit is the reference's 100,000,000 bytes (it was 100 MiB here before): a header just over it, with
    the file long enough to hold it, is refused before it is read."""
    d = copy_fixture(tmp_path)
    p = d / MANY
    raw = p.read_bytes()
    n = 100_000_008
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", n) + raw[8:])
        f.truncate(8 + n + 16)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, MANY, "100000000")


def test_trailing_bytes_after_a_real_shard(tmp_path):
    d = copy_fixture(tmp_path)
    with open(d / SHARD, "ab") as f:
        f.write(b"\0" * 16)
    convert_fails(d, tmp_path / "o", EXIT_INPUT, SHARD, "16 trailing bytes after the last tensor")
