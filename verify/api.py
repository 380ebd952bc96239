"""m3-verify's Python API: the checks the command line runs, as one function (the CLI, :mod:`.cli`, prints them).

    from m3_verify import verify
    report = verify("/data/MiniMax-M3-vllm", against="/data/MiniMax-M3-AutoRound")
    report.ok, [f.line() for f in report.findings]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from m3_convert.errors import processing


@dataclass
class Report:
    """What one verification found: ``ok`` only when there are no findings."""
    out_dir: str
    against: str | None
    findings: list                                   # checks.Finding: stage, file, tensor, message
    seconds: dict = field(default_factory=dict)      # stage -> seconds
    vllm: dict | None = None                         # --vllm: what vLLM's loader filled (parameters, tensors)

    @property
    def ok(self) -> bool:
        return not self.findings


def verify(out_dir, *, against=None, vllm=False, integrity_only=False, workers=2, progress=None) -> Report:
    """Check ``out_dir``, a directory m3-convert wrote: 1. integrity (SHA256SUMS), 2. structure (headers, index, the
    exact key set, shapes, dtypes and GPTQ bits vLLM expects for its config.json), 3. ``against``: every tensor
    equals its source, 4. ``vllm``: vLLM's own loader fills every parameter exactly. ``integrity_only``: 1 only.
    ``progress(stage)`` may return a callable of bytes read for that stage (or None). An exception no check
    anticipated propagates (the CLI reports it in one line, exit 3)."""
    from . import checks
    progress = progress or (lambda stage: None)
    rep = Report(out_dir, against, [])
    stages = [("integrity", lambda: checks.check_integrity(out_dir, progress("hashing"), workers))]
    if not integrity_only:
        stages.append(("structure", lambda: checks.check_structure(out_dir)))
        if against:
            stages.append(("against", lambda: checks.check_against(out_dir, against, progress("against"))))
        if vllm:
            rep.vllm = {}
            stages.append(("vllm", lambda: _vllm(out_dir, rep.vllm)))
    for name, run in stages:
        t = time.time()
        with processing(f"{out_dir} ({name} check)"):      # an unanticipated error names where it happened
            rep.findings += list(run())
        rep.seconds[name] = round(time.time() - t, 3)
    return rep


def _vllm(out_dir, report):
    from . import vllm_check
    return vllm_check.check_vllm(out_dir, report=report)
