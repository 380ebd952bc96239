"""m3-convert: the command line (thin: parse, check OUT_DIR, plan, execute, report)."""
from __future__ import annotations

import json
import sys

import click

from .errors import M3Error, report_unexpected, unexpected_error
from .gptq import VALID_BITS
from .plan import PLAIN_DTYPE_MODES, TARGETS


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fail(line, code, as_json, json_error=None):
    """Exit ``code`` after the one-line error on stderr (``line``; None: already printed); with --json also the
    JSON a caller parses on stdout: ``{"ok": false, "exit_code": N, "error": "..."}``."""
    if line:
        click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps({"ok": False, "exit_code": code, "error": line or json_error}, indent=2))
    sys.exit(code)


def summary_text(s, result, elapsed):
    """The human summary of a conversion (``result`` None: of a dry run) from its stats (api.Result.stats)."""
    lines = [
        f"input : {s['input_files']} files, {s['input_tensors']} tensors, {human(s['input_bytes'])}",
        f"output: {s['output_shards']} shards, {s['output_tensors']} tensors, {human(s['output_bytes'])}",
        "modules: " + ", ".join(f"{s['modules'][k]} {label}" for k, label in (
            ("copy_gptq", "GPTQ copied"), ("split", "fused gate_up split (still GPTQ)"),
            ("dequant", "q/k/v de-quantized to bf16"), ("promote", "GPTQ promoted to a wider width (lossless)"),
            ("copy", "plain tensors"), ("cast", "plain tensors rounded to bf16 (--dtype bf16)")) if s["modules"].get(k)),
        "bits   : " + (", ".join(f"{k}-bit x{v}" if "->" not in k else f"{k} x{v}" for k, v in s["bits_histogram"].items()) or "none"),
    ]
    if s.get("target") == "stock-vllm":
        p = s["promotion"]
        pct = 100.0 * p["extra_bytes"] / p["gptq_bytes_native"] if p["gptq_bytes_native"] else 0.0
        lines.append(f"target : stock-vllm (vLLM's auto-round config, no plugin); promotion costs {human(p['extra_bytes'])} "
                     f"(+{pct:.1f}% of GPTQ weight bytes, {human(p['gptq_bytes_native'])} -> {human(p['gptq_bytes_output'])})")
        for L, v in p["per_layer"].items():
            lines.append(f"         layer {L}: {human(v['native'])} -> {human(v['output'])}")
    pd = s.get("plain_dtypes") or {}
    if pd:
        wide = {k: v for k, v in pd.items() if k != "BF16"}
        hint = (" (--dtype bf16 rounds those vLLM holds in bf16, as its load does, and halves their bytes)"
                if wide and s.get("plain_dtype_mode") == "source" else "")
        lines.append("plain  : " + ", ".join(f"{v['tensors']} {k} ({human(v['bytes'])})" for k, v in pd.items()) + hint)
    g = s.get("gpu_weight_bytes")
    if g:
        one = next(iter(g["tp"].values()))
        promoted = (human(g["promoted"]) if g["promoted"] is not None
                    else f"cannot be served: {one['promoted_problems'][0]}")
        native = (f"weights {human(g['native'])} at their stored widths" if g["native"] is not None
                  else f"cannot be served at TP 1: {one['problems'][0]}")
        lines.append(f"GPU    : {native} (the plugin's fallback without humming-kernels, every layer promoted: "
                     f"{promoted}); KV cache and activations come on top")
        for tp, row in g["tp"].items():
            fit = ""
            if row["problems"]:
                lines.append(f"         TP {tp}: cannot be served ({row['problems'][0]})")
                continue
            if g.get("gpu_memory_gib"):
                fit = (f": fits {g['gpu_memory_gib']:g} GiB GPUs, {human(row['left_per_gpu'])} left per GPU" if row["fits"]
                       else f": does not fit {g['gpu_memory_gib']:g} GiB GPUs")
            promoted = "cannot be served" if row["promoted_problems"] else human(row["promoted_per_gpu"])
            lines.append(f"         TP {tp}: {human(row['native_per_gpu'])} per GPU (promoted {promoted}){fit}")
    if s.get("mtp_kept"):
        lines.append(f"kept   : MTP block(s), {s['mtp_kept']['tensors']} tensors, {human(s['mtp_kept']['bytes'])} (for vLLM's MiniMaxM3MTP)")
    if s.get("vision_kept"):
        lines.append(f"kept   : vision tower and projector, {s['vision_kept']['tensors']} tensors, {human(s['vision_kept']['bytes'])} "
                     "(checkpoint for vLLM's MiniMaxM3SparseForConditionalGeneration)")
    for cat, d in s["dropped"].items():
        lines.append(f"left out ({cat}, not part of the text model): {d['tensors']} tensors, {human(d['bytes'])}")
    for note, n in s["notes"].items():
        lines.append(f"note: {note}: {n}")
    d = s.get("disk")
    if d:
        verdict = "fits" if d["needed_bytes"] <= d["free_bytes"] else "DOES NOT FIT (m3-convert refuses; --skip-space-check)"
        lines.append(f"disk   : needs {human(d['needed_bytes'])}, {human(d['free_bytes'])} free on {d['filesystem']}: {verdict}")
    if s["copied_files"]:
        lines.append("copied : " + ", ".join(s["copied_files"]))
    if s.get("ignored_files"):
        lines.append("ignored: " + ", ".join(s["ignored_files"]))
    if result is not None:
        reused = f", reused {len(result['reused_shards'])} (--resume, re-hashed)" if result.get("resumed") else ""
        lines.append(f"wrote {len(result['written_shards'])} shards{reused}, "
                     f"{result['files']} files in SHA256SUMS, {elapsed:.1f} s")
    return "\n".join(lines)


def print_dry_run(res, as_json, quiet):
    """--dry-run's report: the summary, or the JSON one with every planned shard."""
    if as_json:
        shards = [{"file": f, "tensors": len(ts), "bytes": sum(o.nbytes for o in ts)} for f, ts in res.plan.shards]
        click.echo(json.dumps({"dry_run": True, "plan_seconds": res.plan_seconds, **res.stats, "shards": shards}, indent=2))
    elif not quiet:
        click.echo(summary_text(res.stats, None, 0))
        click.echo(f"planned in {res.plan_seconds:.2f} s (dry run: nothing written)")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("in_dir", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Write into a non-empty OUT_DIR (only files m3-convert writes are replaced).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: shards already written are re-hashed and kept "
              "if their inputs are unchanged (size and mtime) and their bytes match the journal; everything else is redone.")
@click.option("--dry-run", is_flag=True, help="Read headers only and print the plan (copied / split / de-quantized / left-out "
              "tensors, bytes in and out, bit-width histogram); write nothing.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 1GiB, bytes).")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Shards written in parallel (default: twice the number of CPUs, at most 8: a shard waiting on the "
              "disk leaves its core to another one's hashing).")
@click.option("--target", type=click.Choice(TARGETS), default=TARGETS[0], show_default=True,
              help="m3-plugin: per-module bits, served by vLLM with this project's m3_gptq plugin (installed with "
              "m3-convert). stock-vllm: vLLM's own auto-round config, no plugin: every fused module and every MoE "
              "layer is made one width by lossless promotion (costs memory; the summary reports how much).")
@click.option("--stock-min-bits", type=click.Choice([str(b) for b in VALID_BITS]), default=None,
              help="With --target stock-vllm: also promote modules below this width (4 sends every layer to Marlin; "
              "without it 2/3-bit layers go to vLLM's humming kernels).")
@click.option("--keep-vision", is_flag=True, help="Keep the vision tower and projector and write the checkpoint for vLLM's "
              "VL class (MiniMaxM3SparseForConditionalGeneration: text under language_model., vision under MiniMax's "
              "original names, a vision_config vLLM reads). Serve with image input, or text-only with "
              "--language-model-only.")
@click.option("--keep-mtp", is_flag=True, help="Also write the MTP (multi-token prediction) block for vLLM's MiniMaxM3MTP "
              "speculative decoding, in its stored dtype (needs --keep-vision: vLLM's MTP layer names collide with the text-only class). "
              "Serve with --speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": 1}'.")
@click.option("--dtype", "plain_dtype", type=click.Choice(PLAIN_DTYPE_MODES), default=PLAIN_DTYPE_MODES[0], show_default=True,
              help="Plain (non-GPTQ) tensors: 'source' writes them as stored (exact bytes, F32/F16/BF16); 'bf16' rounds "
              "F32/F16 ones to bf16 exactly as vLLM does when it loads them (it holds them in bf16), halving their bytes; "
              "the router, which vLLM holds in float32, stays as stored. m3-verify --against proves every cast.")
@click.option("--skip-space-check", is_flag=True, help="Write even when OUT_DIR's filesystem has less free space than "
              "the output needs (by default m3-convert refuses before writing anything, exit 4).")
@click.option("--gpu-memory", default=95.0, show_default=True, type=click.FloatRange(min=1),
              help="GiB of memory per GPU, for the summary's line on whether the weights fit at tensor-parallel 1/2/4/8.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary (errors still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary on stdout.")
@click.option("--debug", is_flag=True, help="On an error no check anticipated, print its traceback too (for a bug "
              "report; also M3_CONVERT_DEBUG=1).")
def main(in_dir, out_dir, force, resume, dry_run, max_shard_size, workers, target, stock_min_bits, keep_vision, keep_mtp,
         plain_dtype, skip_space_check, gpu_memory, quiet, as_json, debug):
    """Convert an AutoRound (GPTQ) MiniMax-M3 checkpoint in IN_DIR into vLLM's native
    MiniMaxM3SparseForCausalLM layout in OUT_DIR.

    \b
    What it does, exactly and offline:
      * renames every tensor to vLLM's official names (one declarative table);
      * splits fused GPTQ gate_up into gate/up shards, still quantized (lossless);
      * de-quantizes q/k/v of sparse-attention layers to bf16 (exact GPTQ v1 decode,
        rounded once), because vLLM fuses them with the bf16 indexer;
      * copies everything else as the source bytes;
      * leaves out vision tower and projector (or keeps them: --keep-vision) and
        mtp.* (counted in the summary);
      * writes a config.json that vLLM serves with no overrides, a per-module
        quantization_config, the index, and SHA256SUMS last.

    \b
    Exit codes: 0 done; 2 bad usage / OUT_DIR refused (also while another m3-convert
    writes it: the message names its pid); 3 invalid input checkpoint (the message
    names the file and tensor; also any error no check anticipated, in one line:
    --debug for its traceback); 4 write failure (e.g. disk full); 130 interrupted
    (continue with --resume).
    Check the result with: m3-verify OUT_DIR --against IN_DIR
    """
    from .api import convert
    progress = _progress_bar if not quiet and not as_json else None
    try:
        log = (lambda m: click.echo(m, err=True))                  # the writer's reports: also with --quiet
        info = log if not quiet else (lambda m: None)
        res = convert(in_dir, out_dir, dry_run=dry_run, force=force, resume=resume, max_shard_size=max_shard_size,
                      workers=workers, target=target, stock_min_bits=stock_min_bits, keep_vision=keep_vision,
                      keep_mtp=keep_mtp, dtype=plain_dtype, skip_space_check=skip_space_check, gpu_memory=gpu_memory,
                      gpu_projection=as_json or not quiet, progress=progress, log=log, info=info)
        if dry_run:
            return print_dry_run(res, as_json, quiet)
        result = {"written_shards": res.written_shards, "reused_shards": res.reused_shards, "files": res.files,
                  "resumed": res.resumed}
        if as_json:
            click.echo(json.dumps({"dry_run": False, "seconds": res.seconds, "plan_seconds": res.plan_seconds,
                                   **res.stats, **result}, indent=2))
        elif not quiet:
            click.echo(summary_text(res.stats, result, res.seconds))
    except M3Error as e:
        fail(f"m3-convert: error: {e}", e.exit_code, as_json)
    except KeyboardInterrupt:
        fail("m3-convert: interrupted (use --resume to continue)", 130, as_json)
    except Exception as e:     # no check anticipated it: still one line and exit 3, never a bare traceback
        code = report_unexpected("m3-convert", e, debug)
        fail(None, code, as_json, unexpected_error("m3-convert", e))


def _progress_bar(total):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr)


if __name__ == "__main__":
    main()
