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
