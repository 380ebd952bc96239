"""m3-verify: prove a converted checkpoint is complete, intact and faithful."""
from __future__ import annotations

import json
import os
import sys

import click

from m3_convert.errors import EXIT_FINDINGS, EXIT_INPUT, EXIT_OK, report_unexpected, unexpected_error



@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out_dir", type=click.Path())
@click.option("--against", "in_dir", type=click.Path(), help="Source checkpoint: prove every output tensor "
              "equal to its source (bytes for copies and splits, exact decode for de-quantized q/k/v).")
@click.option("--vllm", "with_vllm", is_flag=True, help="Also build vLLM's own MiniMaxM3SparseForCausalLM from config.json, "
              "load the checkpoint with its load_weights and check every parameter (needs vllm).")
@click.option("--integrity-only", is_flag=True, help="Only check SHA256SUMS (what `sha256sum -c SHA256SUMS` checks).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Files hashed in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print findings only (no progress, no summary).")
@click.option("--debug", is_flag=True, help="On an error no check anticipated, print its traceback too (for a bug "
              "report; also M3_CONVERT_DEBUG=1).")
def main(out_dir, in_dir, with_vllm, integrity_only, workers, as_json, quiet, debug):
    """Check OUT_DIR, a directory written by m3-convert.

    \b
    1. integrity: every file in SHA256SUMS exists and matches; unlisted or missing files are reported;
    2. structure: headers parse and are consistent, the index agrees, and the tensor key set, shapes,
       dtypes and GPTQ bits are exactly what vLLM's MiniMaxM3SparseForCausalLM expects for config.json;
    3. --against IN_DIR: every tensor equals its source;
    4. --vllm: vLLM's own loader accepts every tensor and fills every parameter.

    Exit code 0 only when everything holds; 1 when there are findings (one line each on stdout,
    naming the file and tensor, then the verdict line OK/FAILED); 2 on bad usage; 3 when OUT_DIR or
    --against is not a readable directory, or a check stopped on an error it did not anticipate
    (one line naming the file; --debug for its traceback). With --json every outcome, errors
    included, prints one JSON object on stdout.
    """
    for what, d in (("", out_dir), ("--against ", in_dir)):
        if d and not os.path.isdir(d):     # an input that cannot be read: exit 3, as m3-convert's IN_DIR
            _fail(f"m3-verify: error: {what}{d} {'is not a directory' if os.path.exists(d) else 'does not exist'}",
                  EXIT_INPUT, as_json)
    try:
        findings, stages, vllm_report = _run_checks(out_dir, in_dir, with_vllm, integrity_only, workers, as_json, quiet)
    except Exception as e:     # no check anticipated it: one line and exit 3, never a bare traceback
        _fail(None, report_unexpected("m3-verify", e, debug), as_json, unexpected_error("m3-verify", e))
    _report(findings, stages, vllm_report, out_dir, in_dir, as_json, quiet)


def _fail(line, code, as_json, json_error=None):
    """Exit ``code`` after the one-line error on stderr (None: already printed); with --json also
    ``{"ok": false, "exit_code": N, "error": "..."}`` on stdout."""
    if line:
        click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps({"ok": False, "exit_code": code, "error": line or json_error}, indent=2))
    sys.exit(code)


def _run_checks(out_dir, in_dir, with_vllm, integrity_only, workers, as_json, quiet):
    """The checks main asks for, through the API: (findings, seconds per stage, the --vllm report or None)."""
    from .api import verify
    bars = _Bars(enabled=not quiet and not as_json)
    try:
        rep = verify(out_dir, against=in_dir, vllm=with_vllm, integrity_only=integrity_only, workers=workers,
                     progress=bars.stage)
    finally:
        bars.close()
    return rep.findings, rep.seconds, rep.vllm


class _Bars:
    """One progress bar per stage on stderr, each counting the bytes that stage reads (the output's files while
    hashing; the output's and the source's tensors compared with --against), so no bar counts one stage's bytes
    into another's."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def stage(self, desc: str):
        self.close()
        if not self.enabled:
            return None
        from tqdm import tqdm
        self.bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)
        return self.bar.update

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _report(findings, stages, vllm_report, out_dir, in_dir, as_json, quiet):
    """Print the findings (or the JSON report) and exit 0 or 1."""
    ok = not findings
    if as_json:
        click.echo(json.dumps({"ok": ok, "out_dir": out_dir, "against": in_dir, "seconds": stages,
                               "findings": [f.__dict__ for f in findings],
                               **({"vllm": vllm_report} if vllm_report is not None else {})}, indent=2))
    else:
        for f in findings:
            click.echo(f.line())
        if vllm_report and not quiet:
            if "params" in vllm_report:
                what = f"{vllm_report.get('params')} parameters filled from {vllm_report.get('tensors')} tensors"
            else:   # --target stock-vllm: vLLM's INC parser over the model's modules
                what = f"{vllm_report.get('modules')} modules resolved by vLLM's INC config"
            if vllm_report.get("mtp"):
                what += f"; MTP drafter: {vllm_report['mtp'].get('params')} parameters filled"
            click.echo(f"vllm: {what}; CPU bypasses: {', '.join(vllm_report.get('bypassed') or ['none'])}")
        if not quiet:
            done = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
            click.echo(f"{'OK' if ok else 'FAILED'}: {len(findings)} finding(s) ({done})")
    sys.exit(EXIT_OK if ok else EXIT_FINDINGS)


if __name__ == "__main__":
    main()
