"""m3-convert's Python API: everything the command line does, as one function (the CLI, :mod:`.cli`, is a thin
click layer over it: options in, printing out).

    from m3_convert import convert
    result = convert("/data/MiniMax-M3-AutoRound", "/data/MiniMax-M3-vllm", workers=4)
    result.stats["bits_histogram"], result.written_shards

Errors are the exceptions of :mod:`.errors`, each with its exit code: UsageError (2: options, a refused or busy
OUT_DIR), CheckpointError (3: the input; it names the file and tensor), OutputError (4: writing). An exception no
check anticipated carries the file being processed (``e.m3_file``).
"""
from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import dataclass, field

from .errors import CheckpointError, OutputError, UsageError


@dataclass
class Result:
    """What one conversion (or dry run) did."""
    in_dir: str
    out_dir: str
    dry_run: bool
    stats: dict                  # the plan's summary: what --json prints (bits, bytes, kept / left out, disk, GPU)
    plan_seconds: float
    seconds: float
    written_shards: list = field(default_factory=list)
    reused_shards: list = field(default_factory=list)     # --resume: shards kept after re-hashing
    files: int = 0               # files listed in SHA256SUMS
    resumed: bool = False
    plan: object = field(default=None, repr=False)        # the Plan (its shards: plan.shards)


def convert(in_dir, out_dir, *, dry_run=False, force=False, resume=False, max_shard_size="5GB", workers=None,
            target="m3-plugin", stock_min_bits=None, keep_vision=False, keep_mtp=False, dtype="source",
            skip_space_check=False, gpu_memory=95.0, gpu_projection=True, progress=None, log=None,
            info=None) -> Result:
    """Convert the AutoRound (GPTQ) MiniMax-M3 checkpoint in ``in_dir`` into vLLM's layout in ``out_dir`` (the
    options are the CLI's, ``m3-convert --help``); ``dry_run`` plans from the headers (and GPTQ scales) and writes
    nothing. ``gpu_projection``: compute the GPU bytes per tensor-parallel size (0.3 s at 90k tensors; the plugin
    target only). ``progress(total_bytes)``: called once, just before the first byte is written, it returns a
    progress bar (``update(nbytes)``, ``close()``) for the bytes written; ``log``: what the writer reports (a
    callable of one string: a shard found changed and redone, an unreadable journal; default: none); ``info``:
    notes a quiet run leaves out (default: ``log``)."""
    from . import execute, plan as planmod
    from .plan import Options
    log = log or (lambda m: None)
    t0 = time.time()
    workers = workers or min(8, 2 * (os.cpu_count() or 1))   # bench/bench.py: 4 workers beat 2 on 2 cores (2-12%)
    # everything before the first byte with the collector off (plan.gc_paused; the plan itself and the space
    # check's shard headers: ~0.2 s of ~1.4 s at 67k tensors)
    with planmod.gc_paused():
        shard_size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        pending = check_dirs(in_dir, out_dir, force, resume, dry_run)
        Options(target, int(stock_min_bits) if stock_min_bits else None, keep_vision, keep_mtp, dtype).validate()
        if not dry_run:   # overlap the first reads with planning (a kernel hint; nothing is read into this process)
            execute.prefetch(sorted(os.path.join(in_dir, f) for f in os.listdir(in_dir) if f.endswith(".safetensors")),
                             prefetch_budget())
        plan = planmod.make_plan(in_dir, shard_size, target=target, min_bits=int(stock_min_bits) if stock_min_bits else None,
                                 keep_vision=keep_vision, keep_mtp=keep_mtp, plain_dtype=dtype)
        if pending == "check-own-files":
            check_resume_without_journal(plan, out_dir, info or log)
        stats = dict(plan.stats)     # the plan's, with what serving and this OUT_DIR add (the plan is not changed)
        if target == "m3-plugin" and gpu_projection:
            stats["gpu_weight_bytes"] = planmod.serving_projection(plan, gpu_memory)
        space = stats["disk"] = execute.space_plan(plan, out_dir, resume=resume, workers=workers)
    t_plan = time.time() - t0
    res = Result(in_dir, out_dir, dry_run, stats, round(t_plan, 3), round(t_plan, 3), plan=plan)
    if dry_run:
        return res
    if space["needed_bytes"] > space["free_bytes"] and not skip_space_check:
        from .cli import human
        raise OutputError(f"not enough space for the output: needs {human(space['needed_bytes'])}, "
                          f"{human(space['free_bytes'])} free on {space['filesystem']} (nothing written; "
                          "--skip-space-check writes anyway)")
    frozen_before = gc.get_freeze_count() > 0    # a caller's own freeze is left alone
    gc.freeze()   # the plan's ~4x10^5 objects live to the end: keep the collector from re-scanning them
    bar = progress(plan.stats["output_bytes"]) if progress else None
    try:
        done = execute.run(plan, out_dir, workers=workers, resume=resume, bar=bar, log=log)
    finally:
        if not frozen_before:
            gc.unfreeze()
        if bar is not None:
            bar.close()
    res.written_shards, res.reused_shards, res.files, res.resumed = (done["written_shards"], done["reused_shards"],
                                                                     done["files"], done["resumed"])
    res.seconds = round(time.time() - t0, 3)
    return res


def parse_size(text: str) -> int:
    """--max-shard-size: 5GB, 500MB, 1GiB or bytes (UsageError otherwise)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise UsageError(f"{text!r} is not a size (examples: 5GB, 500MB, 1GiB, 1048576)")
    num = float(m.group(1))
    unit = (m.group(2) or "").upper()
    mult = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}.get(unit)
    if mult is None:
        raise UsageError(f"unknown unit in {text!r}")
    n = int(num * mult)
    if n <= 0:
        raise UsageError("size must be positive")
    return n


def check_dirs(in_dir: str, out_dir: str, force: bool, resume: bool, dry_run: bool):
    """IN_DIR readable, OUT_DIR not refused; "check-own-files" where --resume finds no journal (decided after planning)."""
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


def check_resume_without_journal(plan, out_dir, log):
    """--resume into an OUT_DIR with no journal: only files this run would write may be there."""
    from . import execute
    from .source import GENERATED
    own = {f for f, _ in plan.shards} | set(plan.copied_files) | GENERATED | {execute.STATE_DIR}
    foreign = sorted(f for f in os.listdir(out_dir) if f not in own and not (f.startswith(".") and f.endswith(".partial")))
    if foreign:
        raise UsageError(f"--resume: OUT_DIR {out_dir} has no m3-convert journal and holds files m3-convert "
                         f"would not write ({', '.join(foreign[:3])}); use --force to write into it anyway")
    log("resume: no journal in OUT_DIR (the last run finished or never started a shard); every shard is rewritten")


def prefetch_budget() -> int:
    """Bytes of input to prefetch while planning: a quarter of the available memory, at most 2 GiB."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 1 << 30
    return min(2 << 30, avail // 4)
