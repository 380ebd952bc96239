"""Tensor parallelism on a CPU (issue 18's CPU part): vLLM's MiniMax-M3 built at TP 2 over gloo, rank 0 and rank 1
each loading the gpu_mixed checkpoint through vLLM's own load_weights and the plugin's methods; each rank must hold
exactly its slice of every linear (column-parallel qkv / gate_up split by outputs, KV heads replicated when fewer
than the ranks; row-parallel o_proj / down_proj by inputs) and of every mixed-width expert part (gate and up by
outputs, down by inputs), at the stored width, compared with the exact decode. The same comparison against the
other rank's slice must fail (the check can tell the ranks apart)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_vllm

pytestmark = pytest.mark.vllm
HERE = Path(__file__).parent


def test_tp2_each_rank_holds_exactly_its_slices(converted):
    need_vllm()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_DIST_IDENT=f"m3tp{port}", VLLM_LOGGING_LEVEL="WARNING",
               PYTHONPATH=str(HERE.parent / "verify" / "_cpu_site"))
    procs = [subprocess.Popen([sys.executable, str(HERE / "tp_worker.py"), str(r), "2", str(port), str(converted["gpu_mixed"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        line = [ln for ln in out.splitlines() if ln.startswith("TPRESULT ")]
        assert line, err[-3000:]
        results.append(json.loads(line[-1][len("TPRESULT "):]))
    for r in results:
        assert r["bad"] == [], r
        assert r["checked"]["linear"] == 16 and r["checked"]["moe_slots"] == 3 * 8 * 3, r
        assert r["checked"]["moe_other_rank_differs"] == 72 and r["checked"]["linear_other_rank_differs"] >= 12, r
