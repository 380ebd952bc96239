"""m3-convert: the command line (thin: parse, check OUT_DIR, plan, execute, report)."""
from __future__ import annotations

import gc
import json
import os
import re
import sys
import time

import click

from .errors import EXIT_USAGE, CheckpointError, M3Error, OutputError, UsageError, report_unexpected, unexpected_error


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (examples: 5GB, 500MB, 1GiB, 1048576)")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}.get(unit)
    if mult is None:
        raise click.BadParameter(f"unknown unit in {text!r}")
    n = int(num * mult)
    if n <= 0:
        raise click.BadParameter("size must be positive")
    return n


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


def check_dirs(in_dir: str, out_dir: str, force: bool, resume: bool, dry_run: bool):
    from .execute import STATE_DIR
    if not os.path.isdir(in_dir):     # an input that cannot be read: exit 3, as an unreadable file in it
        raise CheckpointError(in_dir, None, "IN_DIR is not a directory" if os.path.exists(in_dir) else "IN_DIR does not exist")
    rin, rout = os.path.realpath(in_dir), os.path.realpath(out_dir)
    if rin == rout:
        raise UsageError("OUT_DIR is IN_DIR: refusing to convert in place")
    if rout.startswith(rin + os.sep):
        raise UsageError(f"OUT_DIR {out_dir} is inside IN_DIR {in_dir}: refusing (the output would be read as input)")
    if rin.startswith(rout + os.sep):
        raise UsageError(f"IN_DIR {in_dir} is inside OUT_DIR {out_dir}: refusing")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"OUT_DIR {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and not dry_run:
        from .execute import refuse_if_busy
        refuse_if_busy(out_dir)        # another m3-convert writing there: refused, with its pid, whatever the options
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not dry_run:
        has_state = os.path.isdir(os.path.join(out_dir, STATE_DIR))
        if resume and has_state:
            return
        if resume and not force:
            return "check-own-files"   # decided after planning: only files m3-convert would write
        if not force:
            hint = " (an interrupted run: use --resume)" if has_state else ""
            raise UsageError(f"OUT_DIR {out_dir} is not empty{hint}; use --force to write into it "
                             "(files m3-convert writes are replaced, other files are left alone)")


def summary_text(plan, result, elapsed):
    s = plan.stats
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


def check_options(target, stock_min_bits, keep_vision, keep_mtp):
    """Option combinations m3-convert refuses (exit 2)."""
    if keep_mtp and not keep_vision:
        raise UsageError("--keep-mtp needs --keep-vision: vLLM's MTP drafter names its layers model.layers.K, which "
                         "collide with the text-only class's own layers (\"Duplicate layer name\"); the VL class "
                         "nests the text model under language_model.")
    if keep_mtp and target == "stock-vllm":
        raise UsageError("--keep-mtp is not supported with --target stock-vllm yet (use the default target)")
    if stock_min_bits and target != "stock-vllm":
        raise UsageError("--stock-min-bits needs --target stock-vllm")


def check_resume_without_journal(plan, out_dir, quiet):
    """--resume into an OUT_DIR with no journal: only files this run would write may be there."""
    from . import execute, plan as planmod
    own = {f for f, _ in plan.shards} | set(plan.copied_files) | planmod.GENERATED | {execute.STATE_DIR}
    foreign = sorted(f for f in os.listdir(out_dir) if f not in own and not (f.startswith(".") and f.endswith(".partial")))
    if foreign:
        raise UsageError(f"--resume: OUT_DIR {out_dir} has no m3-convert journal and holds files m3-convert "
                         f"would not write ({', '.join(foreign[:3])}); use --force to write into it anyway")
    if not quiet:
        click.echo("resume: no journal in OUT_DIR (the last run finished or never started a shard); "
                   "every shard is rewritten", err=True)


def print_dry_run(plan, t_plan, as_json, quiet):
    """--dry-run's report: the summary, or the JSON one with every planned shard."""
    if as_json:
        click.echo(json.dumps({"dry_run": True, "plan_seconds": round(t_plan, 3), **plan.stats,
                               "shards": [{"file": f, "tensors": len(ts), "bytes": sum(o.nbytes for o in ts)} for f, ts in plan.shards]}, indent=2))
    elif not quiet:
        click.echo(summary_text(plan, None, 0))
        click.echo(f"planned in {t_plan:.2f} s (dry run: nothing written)")


def prefetch_budget() -> int:
    """Bytes of input to prefetch while planning: a quarter of the available memory, at most 2 GiB."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 1 << 30
    return min(2 << 30, avail // 4)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("in_dir", type=click.Path(file_okay=False))
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
@click.option("--target", type=click.Choice(["m3-plugin", "stock-vllm"]), default="m3-plugin", show_default=True,
              help="m3-plugin: per-module bits, served by vLLM with this project's m3_gptq plugin (installed with "
              "m3-convert). stock-vllm: vLLM's own auto-round config, no plugin: every fused module and every MoE "
              "layer is made one width by lossless promotion (costs memory; the summary reports how much).")
@click.option("--stock-min-bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
              help="With --target stock-vllm: also promote modules below this width (4 sends every layer to Marlin; "
              "without it 2/3-bit layers go to vLLM's humming kernels).")
@click.option("--keep-vision", is_flag=True, help="Keep the vision tower and projector and write the checkpoint for vLLM's "
              "VL class (MiniMaxM3SparseForConditionalGeneration: text under language_model., vision under MiniMax's "
              "original names, a vision_config vLLM reads). Serve with image input, or text-only with "
              "--language-model-only.")
@click.option("--keep-mtp", is_flag=True, help="Also write the MTP (multi-token prediction) block for vLLM's MiniMaxM3MTP "
              "speculative decoding, in its stored dtype (needs --keep-vision: vLLM's MTP layer names collide with the text-only class). "
              "Serve with --speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": 1}'.")
@click.option("--dtype", "plain_dtype", type=click.Choice(["source", "bf16"]), default="source", show_default=True,
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
    from . import execute, plan as planmod
    t0 = time.time()
    if workers is None:
        workers = min(8, 2 * (os.cpu_count() or 1))   # bench/bench.py: 4 workers beat 2 on 2 cores (2-12%)
    try:
        # everything before the first byte with the collector off (plan.gc_paused; the plan itself and the space
        # check's shard headers: ~0.2 s of ~1.4 s at 67k tensors)
        with planmod.gc_paused():
            shard_size = parse_size(max_shard_size)
            pending = check_dirs(in_dir, out_dir, force, resume, dry_run)
            check_options(target, stock_min_bits, keep_vision, keep_mtp)
            if not dry_run:   # overlap the first reads with planning (a kernel hint; nothing is read into this process)
                execute.prefetch(sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir) if f.endswith(".safetensors")),
                                 prefetch_budget())
            plan = planmod.make_plan(in_dir, shard_size, target=target, min_bits=int(stock_min_bits) if stock_min_bits else None,
                                     keep_vision=keep_vision, keep_mtp=keep_mtp, plain_dtype=plain_dtype)
            if pending == "check-own-files":
                check_resume_without_journal(plan, out_dir, quiet)
            if target == "m3-plugin" and (as_json or not quiet):    # computed only when shown: 0.3 s for 90k tensors
                plan.stats["gpu_weight_bytes"] = planmod.serving_projection(plan, gpu_memory)
            space = execute.space_plan(plan, out_dir, resume=resume, workers=workers)
            plan.stats["disk"] = space
        t_plan = time.time() - t0
        gc.freeze()   # the plan's ~4x10^5 objects live to the end: keep the collector from re-scanning them
        if dry_run:
            return print_dry_run(plan, t_plan, as_json, quiet)
        if space["needed_bytes"] > space["free_bytes"] and not skip_space_check:
            raise OutputError(f"not enough space for the output: needs {human(space['needed_bytes'])}, "
                              f"{human(space['free_bytes'])} free on {space['filesystem']} (nothing written; "
                              "--skip-space-check writes anyway)")
        bar = None
        if not quiet and not as_json:
            from tqdm import tqdm
            bar = tqdm(total=plan.stats["output_bytes"], unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr)
        try:
            result = execute.run(plan, out_dir, workers=workers, resume=resume, bar=bar, log=lambda m: click.echo(m, err=True))
        finally:
            if bar is not None:
                bar.close()
        elapsed = time.time() - t0
        if as_json:
            click.echo(json.dumps({"dry_run": False, "seconds": round(elapsed, 3), "plan_seconds": round(t_plan, 3), **plan.stats, **result}, indent=2))
        elif not quiet:
            click.echo(summary_text(plan, result, elapsed))
    except click.BadParameter as e:
        fail(f"m3-convert: error: {e.message}", EXIT_USAGE, as_json)
    except M3Error as e:
        fail(f"m3-convert: error: {e}", e.exit_code, as_json)
    except KeyboardInterrupt:
        fail("m3-convert: interrupted (use --resume to continue)", 130, as_json)
    except Exception as e:     # no check anticipated it: still one line and exit 3, never a bare traceback
        code = report_unexpected("m3-convert", e, debug)
        fail(None, code, as_json, unexpected_error("m3-convert", e))
    finally:
        gc.unfreeze()   # only matters when called in-process (tests): the next plan is not kept frozen


if __name__ == "__main__":
    main()
