"""safetensors header writing/reading, against the safetensors library itself."""
import json
import struct

import numpy as np
from safetensors.numpy import load_file

from m3_convert import st


def test_build_header_is_the_compact_json_and_safetensors_reads_it(tmp_path):
    entries = [("a\"b\u00e9", "F32", (2, 3), 24), ("x", "I32", (), 4), ("e", "F16", (0,), 0)]
    obj = {"__metadata__": {"format": "pt"}}
    off = 0
    for n, d, s, b in entries:
        obj[n] = {"dtype": d, "shape": list(s), "data_offsets": [off, off + b]}
        off += b
    js = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    js += b" " * (-len(js) % 8)
    hdr = st.build_header(entries)
    assert hdr == struct.pack("<Q", len(js)) + js
    data = np.arange(6, dtype=np.float32).tobytes() + np.array(7, dtype=np.int32).tobytes()
    p = tmp_path / "t.safetensors"
    p.write_bytes(hdr + data)
    back = load_file(str(p))
    assert np.array_equal(back["a\"b\u00e9"], np.arange(6, dtype=np.float32).reshape(2, 3)) and back["x"] == 7
    h = st.read_header(str(p))
    assert set(h.tensors) == {"e", "a\"b\u00e9", "x"}
    assert h.tensors["x"].nbytes == 4


def test_json_bytes_large_maps_print_each_value_as_json_does():
    # large flat maps go through a memo of encoded values: values that compare equal but print
    # differently must not share an entry
    import json
    import math
    from m3_convert.execute import json_bytes
    vals = [{"s": 0.0}, {"s": -0.0}, {1: 4}, {True: 4}, {"b": (1,)}, {"b": (True,)}, {"bits": 1}, {"bits": True},
            {"bits": 4, "group_size": 128}, {"bits": None}, {"x": "é"}]
    obj = {f"m{i:03d}": vals[i % len(vals)] for i in range(99)}
    out = json_bytes(obj).decode()
    lines = {ln.split(": ", 1)[0].strip().strip('"'): ln.split(": ", 1)[1].rstrip(",") for ln in out.splitlines()[1:-1]}
    assert lines == {k: json.dumps(v, ensure_ascii=False) for k, v in obj.items()}
    back = json.loads(out)
    assert math.copysign(1, back["m001"]["s"]) == -1 and back["m003"] == {"true": 4} and back["m007"] == {"bits": True}


# ---------------------------------------------------------------- the layout rules, against the reference library
def _file(tmp_path, header_text: str, data: bytes, name="t.safetensors"):
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


def _reference_accepts(p) -> bool:
    from safetensors import SafetensorError
    try:
        load_file(str(p))
        return True
    except SafetensorError:
        return False


def _ours(p):
    from m3_convert.errors import CheckpointError
    try:
        st.read_header(str(p))
        return None
    except CheckpointError as e:
        return str(e)


E = '{{"dtype":"U8","shape":[{n}],"data_offsets":[{b},{e}]}}'


def entry(n, b, e=None):
    return E.format(n=n, b=b, e=b + n if e is None else e)


LAYOUTS = {   # name -> (header text, data, what our message says, or None when the file is valid)
    "contiguous, header order != offset order": ('{"b":%s,"a":%s}' % (entry(4, 4), entry(4, 0)), b"x" * 8, None),
    "two empty tensors at one offset": ('{"a":%s,"b":%s,"c":%s}' % (entry(0, 0), entry(0, 0), entry(4, 0)), b"x" * 4, None),
    "a ':' inside a name and in __metadata__": ('{"__metadata__":{"k":"a:b"},"x:y":%s}' % entry(4, 0), b"x" * 4, None),
    "gap between two tensors": ('{"a":%s,"b":%s}' % (entry(4, 0), entry(4, 6)), b"x" * 10, "b: data_offsets start 2 bytes after the end of a: a gap"),
    "first tensor not at 0": ('{"a":%s}' % entry(4, 2), b"x" * 6, "a: data_offsets start 2 bytes after the start of the data"),
    "trailing bytes": ('{"a":%s}' % entry(4, 0), b"x" * 9, "5 trailing bytes after the last tensor"),
    "overlap": ('{"a":%s,"b":%s}' % (entry(4, 0), entry(4, 2)), b"x" * 6, "b: byte range overlaps a"),
    "same bytes under two names": ('{"a":%s,"b":%s}' % (entry(4, 0), entry(4, 0)), b"x" * 4, "b: byte range overlaps a"),
    "a name twice, other bytes": ('{"a":%s,"a":%s}' % (entry(4, 0), entry(4, 4)), b"x" * 8, "a: named twice in the header"),
    "__metadata__ twice": ('{"__metadata__":{},"__metadata__":{},"a":%s}' % entry(4, 0), b"x" * 4, "__metadata__: named twice"),
    "a field twice in one entry": ('{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}', b"x" * 4,
                                   "an entry of the header gives 'dtype' twice"),
}


def test_layout_rules_match_the_safetensors_library(tmp_path):
    """Each layout: refused by us exactly when the reference library (safetensors' own load_file) refuses it, with a
    message naming the tensor; the one difference, on purpose: a name given twice with the same range (the reference
    keeps one entry silently)."""
    for i, (what, (header, data, message)) in enumerate(LAYOUTS.items()):
        p = _file(tmp_path, header, data, f"t{i}.safetensors")
        got = _ours(p)
        assert (got is None) == (message is None) and (message is None or message in got), (what, got)
        assert _reference_accepts(p) == (message is None), what
    same_range_twice = _file(tmp_path, '{"a":%s,"a":%s}' % (entry(4, 0), entry(4, 0)), b"x" * 4, "dup.safetensors")
    assert _reference_accepts(same_range_twice)
    assert "a: named twice in the header" in _ours(same_range_twice)


def test_map_batches_reads_every_tensor_once_in_bounded_batches(tmp_path):
    from safetensors.numpy import save_file
    arrays = {f"t{i}": np.full((i + 1, 3), i, dtype=np.float16) for i in range(9)}
    infos = []
    for f, names in (("a.safetensors", ["t0", "t3", "t5", "t7"]), ("b.safetensors", ["t1", "t2", "t4", "t6", "t8"])):
        save_file({k: arrays[k] for k in names}, str(tmp_path / f))
        infos += st.read_header(str(tmp_path / f)).tensors.values()
    largest = max(t.nbytes for t in infos)
    seen = {}

    def take(batch, view):
        assert len(view) <= max(40, largest) and len({t.file for t in batch}) == 1
        off = 0
        for t in batch:
            seen[t.name] = np.frombuffer(view[off:off + t.nbytes], np.float16).reshape(t.shape).copy()
            off += t.nbytes
        return [t.name for t in batch]
    order = [n for names in st.map_batches(list(reversed(infos)), take, limit=40) for n in names]
    assert order == [t.name for t in sorted(infos, key=lambda t: (t.file, t.begin))]
    assert seen.keys() == arrays.keys() and all(np.array_equal(seen[k], v) for k, v in arrays.items())
