"""m3-verify: prove a converted checkpoint is complete, intact and faithful."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from m3_convert.errors import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE

from . import checks


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--against", "in_dir", type=click.Path(file_okay=False), help="Source checkpoint: prove every output tensor "
              "equal to its source (bytes for copies and splits, exact decode for de-quantized q/k/v).")
@click.option("--vllm", "with_vllm", is_flag=True, help="Also build vLLM's own MiniMaxM3SparseForCausalLM from config.json, "
              "load the checkpoint with its load_weights and check every parameter (needs vllm).")
@click.option("--integrity-only", is_flag=True, help="Only check SHA256SUMS (what `sha256sum -c SHA256SUMS` checks).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Files hashed in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print findings only (no progress, no summary).")
def main(out_dir, in_dir, with_vllm, integrity_only, workers, as_json, quiet):
    """Check OUT_DIR, a directory written by m3-convert.

    \b
    1. integrity: every file in SHA256SUMS exists and matches; unlisted or missing files are reported;
    2. structure: headers parse and are consistent, the index agrees, and the tensor key set, shapes,
       dtypes and GPTQ bits are exactly what vLLM's MiniMaxM3SparseForCausalLM expects for config.json;
    3. --against IN_DIR: every tensor equals its source;
    4. --vllm: vLLM's own loader accepts every tensor and fills every parameter.

    Exit code 0 only when everything holds; 1 when there are findings (one line each,
    naming the file and tensor); 2 on bad usage.
    """
    if not os.path.isdir(out_dir):
        click.echo(f"m3-verify: error: {out_dir} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    if in_dir and not os.path.isdir(in_dir):
        click.echo(f"m3-verify: error: --against {in_dir} is not a directory", err=True)
        sys.exit(EXIT_USAGE)
    findings = []
    bar = None
    if not quiet and not as_json:
        from tqdm import tqdm
        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="verifying", file=sys.stderr)
    progress = (lambda n: bar.update(n)) if bar is not None else None
    stages = {}
    vllm_report = None
    try:
        t = time.time()
        findings += list(checks.check_integrity(out_dir, progress, workers))
        stages["integrity"] = round(time.time() - t, 3)
        if not integrity_only:
            t = time.time()
            findings += list(checks.check_structure(out_dir))
            stages["structure"] = round(time.time() - t, 3)
            if in_dir:
                t = time.time()
                findings += list(checks.check_against(out_dir, in_dir, progress))
                stages["against"] = round(time.time() - t, 3)
            if with_vllm:
                from . import vllm_check
                t = time.time()
                vllm_report = {}
                findings += list(vllm_check.check_vllm(out_dir, report=vllm_report))
                stages["vllm"] = round(time.time() - t, 3)
    finally:
        if bar is not None:
            bar.close()
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
            click.echo(f"vllm: {what}; CPU bypasses: {', '.join(vllm_report.get('bypassed') or ['none'])}", err=True)
        if not quiet:
            done = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
            click.echo(f"{'OK' if ok else 'FAILED'}: {len(findings)} finding(s) ({done})", err=True)
    sys.exit(EXIT_OK if ok else EXIT_FINDINGS)


if __name__ == "__main__":
    main()
