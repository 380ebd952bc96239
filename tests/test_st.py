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
