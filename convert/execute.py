"""Execution: write each planned output shard, streaming, hashing while writing.

* copies are raw byte ranges (adjacent source ranges are coalesced into one
  large read), through one reusable buffer per worker;
* splits read the source in row blocks and write the column slice; casts (--dtype bf16) round row blocks;
* promotions re-pack a qweight / qzeros at a wider width;
* de-quantization reads the packed triple once and decodes by output-row block;
* every file is written to ``.NAME.partial`` and renamed when complete; the
  resume journal (``.m3-convert/state.json``) is updated after each shard;
  ``SHA256SUMS`` is written last and is the only completeness marker.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import gptq, st
from .errors import CheckpointError, OutputError, UsageError, processing
from .outputs import CAST, COPY, DEQUANT, PROMOTE, SLICE
from .plan import Plan
from .quantcfg import FORMAT                        # the format tag: journal, shard recipes, "is this ours?"
from .st import CHUNK, INDEX_FILE, sha256_file

STATE_DIR = ".m3-convert"
STATE_FILE = "state.json"
LOCK_FILE = "lock"          # in STATE_DIR: WriterLock


class FaultHook:
    """Test-only fault injection, off unless its environment variables are set.

    M3_CONVERT_KILL_AT_BYTES=N   SIGKILL this process once N output bytes (all files) are written;
    M3_CONVERT_ENOSPC_AT_BYTES=N raise ENOSPC ("No space left on device") at that point instead;
    M3_CONVERT_PAUSE_AT_BYTES=N  pause there instead: create the file M3_CONVERT_PAUSE_FILE names and, in every thread
                                 that writes, wait until it is removed (at most 120 s), holding everything the run
                                 holds (its writer lock);
    M3_CONVERT_FREE_BYTES=N      the free space the space check sees instead of statvfs's (read by space_plan).
    Used by tests/test_faults.py for crash trials, a second writer during a live run, and disk-full simulation where
    no small filesystem can be mounted.
    """

    def __init__(self):
        self.kill_at = int(os.environ.get("M3_CONVERT_KILL_AT_BYTES", "0") or 0)
        self.enospc_at = int(os.environ.get("M3_CONVERT_ENOSPC_AT_BYTES", "0") or 0)
        self.pause_at = int(os.environ.get("M3_CONVERT_PAUSE_AT_BYTES", "0") or 0)
        self.pause_file = os.environ.get("M3_CONVERT_PAUSE_FILE", "")
        self.pause_deadline = 0.0
        self.written = 0

    def tick(self, n):
        if not (self.kill_at or self.enospc_at or self.pause_at or self.pause_deadline):
            return
        self.written += n
        if self.pause_at and self.written >= self.pause_at and self.pause_file:
            self.pause_at = 0
            self.pause_deadline = time.monotonic() + 120
            with open(self.pause_file, "w"):
                pass
        self.hold()
        if self.kill_at and self.written >= self.kill_at:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        if self.enospc_at and self.written >= self.enospc_at:
            import errno
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def hold(self):
        """Once the pause began, every writing thread (shard workers, the metadata thread) waits here, at each write
        and before each rename, so that nothing changes in OUT_DIR while the pause file exists. Raises nothing."""
        while self.pause_deadline and os.path.exists(self.pause_file) and time.monotonic() < self.pause_deadline:
            time.sleep(0.01)


FAULT = FaultHook()


class WriterLock:
    """One writer per OUT_DIR: an exclusive ``flock`` on ``OUT_DIR/.m3-convert/lock`` (the journal's folder), taken
    before anything in OUT_DIR is written or removed and held until the run ends, with the holder's pid written in
    the file. The OS releases it when its process dies (kill -9 included), so ``--resume`` after a crash finds it
    free; a second m3-convert (plain, ``--resume`` or ``--force``) is refused (UsageError, exit 2) naming the pid.
    The file goes with the journal's folder when the run completes."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, STATE_DIR, LOCK_FILE)
        self.fd = None

    def __enter__(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _write_failed(self.out_dir, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_pid(fd)
            os.close(fd)
            raise busy_error(self.out_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)       # releases the lock (the file itself goes with the journal's folder)
        self.fd = None


def _lock_pid(fd) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def busy_error(out_dir: str, pid: str) -> UsageError:
    return UsageError(f"OUT_DIR {out_dir} is being written by another m3-convert (pid {pid}; lock "
                      f"{os.path.join(STATE_DIR, LOCK_FILE)}): wait for it to finish or stop it (after a crash, "
                      "--resume continues; the lock dies with its process)")


def refuse_if_busy(out_dir: str):
    """Refuse at once (busy_error) when a live m3-convert holds OUT_DIR's writer lock: the second run learns the
    holder's pid before anything else is decided (WriterLock refuses it anyway when it starts writing). Creates
    nothing; a free lock is taken and released at once."""
    path = os.path.join(out_dir, STATE_DIR, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise busy_error(out_dir, _lock_pid(fd)) from None
    except OSError:
        pass
    finally:
        os.close(fd)       # (releases it if it was taken)


class HashingWriter:
    """Sequential writer that hashes exactly the bytes it writes, on a second thread.

    ``write(data, done)`` returns once the bytes are written; hashing runs behind it
    (hashlib releases the GIL), and ``done`` (an Event) is set when ``data`` may be reused.
    """

    def __init__(self, path):
        self.path = path
        self.f = open(path, "wb", buffering=0)
        self.h = hashlib.sha256()
        self.size = 0
        self._q = queue.Queue(maxsize=8)
        self._t = threading.Thread(target=self._hash_loop, name="m3-hash", daemon=True)
        self._t.start()

    def _hash_loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            data, done = item
            self.h.update(data)
            if done is not None:
                done()

    def copy_range(self, fd_in, offset, n, view, done=None):
        """Copy ``n`` source bytes in the kernel (copy_file_range: no user-space copy), hash ``view`` of them."""
        copied = 0
        while copied < n:
            try:
                k = os.copy_file_range(fd_in, self.f.fileno(), n - copied, offset + copied)
            except OSError as e:
                if copied == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    return self.write(view, done)          # filesystem without it: a plain write
                raise
            if k == 0:
                raise OSError(errno.EIO, f"source ended early at offset {offset + copied} (truncated during conversion?)")
            copied += k
            self.size += k
            FAULT.tick(k)
        self._q.put((view, done))

    def write(self, data, done=None):
        mv = memoryview(data).cast("B")
        rest = mv
        while len(rest):
            n = self.f.write(rest)
            rest = rest[n:]
            self.size += n
            FAULT.tick(n)
        self._q.put((mv, done))

    def _stop(self):
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()

    def close(self, sync=True):
        self._stop()
        if sync:
            os.fsync(self.f.fileno())
        else:
            start_writeback(self.f.fileno())
        self.f.close()
        return self.h.hexdigest()

    def abort(self):
        self._stop()
        self.f.close()


class Progress:
    def __init__(self, bar):
        self.bar = bar
        self.lock = threading.Lock()

    def __call__(self, n):
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)


class SourceFiles:
    """Open input files (fd + read-only mmap), for one shard writer."""

    def __init__(self):
        self.fds, self.maps = {}, {}

    def fd(self, path):
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def view(self, path, offset, n):
        """A zero-copy view of source bytes, and a callback that drops those pages from our mapping
        once hashed (they stay in the page cache; RSS stays flat)."""
        mm = self.maps.get(path)
        if mm is None:
            mm = self.maps[path] = mmap.mmap(self.fd(path), 0, access=mmap.ACCESS_READ)
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
        start = offset - offset % mmap.PAGESIZE

        def release():
            if hasattr(mm, "madvise") and not mm.closed:
                mm.madvise(mmap.MADV_DONTNEED, start, offset + n - start)
        return memoryview(mm)[offset:offset + n], release

    def close(self):
        for mm in self.maps.values():
            try:
                mm.close()
            except BufferError:
                pass
        for fd in self.fds.values():
            os.close(fd)


def shard_header(plan: Plan, fname: str, tensors) -> bytes:
    """The header of output shard ``fname`` exactly as written, built from its planned tensors once (kept in
    ``plan.shard_headers``): read by the space check (the shard's size) and by the writer."""
    h = plan.shard_headers.get(fname)
    if h is None:
        h = plan.shard_headers[fname] = st.build_header([(o.name, o.dtype, o.shape, o.nbytes) for o in tensors])
    return h


class BufferRing:
    """A few large reusable buffers: one is filled while the hash thread still reads the others."""

    def __init__(self, n=3, size=CHUNK):
        self.bufs = [bytearray(size) for _ in range(n)]
        self.done = [None] * n
        self.i = 0

    def next(self):
        i = self.i
        self.i = (i + 1) % len(self.bufs)
        if self.done[i] is not None:
            self.done[i].wait()
        self.done[i] = threading.Event()
        return self.bufs[i], self.done[i].set


def _copy_range(src, path, w, begin, end, progress):
    fd = src.fd(path)
    off = begin
    while off < end:
        n = min(CHUNK, end - off)
        view, release = src.view(path, off, n)
        w.copy_range(fd, off, n, view, release)
        del view
        progress(n)
        off += n


def _write_slice(src, w, o, ring, progress):
    (t,) = o.srcs
    item = st.DTYPES[t.dtype][0]
    fd = src.fd(t.file)
    if o.rows is not None:  # contiguous rows: a byte range
        row_bytes = item * int(np.prod(t.shape[1:]))
        _copy_range(src, t.file, w, t.begin + o.rows[0] * row_bytes, t.begin + o.rows[1] * row_bytes, progress)
        return
    rows, cols = t.shape
    a, b = o.cols
    row_bytes = cols * item
    block = max(1, CHUNK // row_bytes)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        buf, done = ring.next()
        done()   # the slice below is a copy; the buffer itself is never queued for hashing
        view = memoryview(buf)[: (r1 - r0) * row_bytes]
        st.read_into(fd, view, t.begin + r0 * row_bytes, t)
        arr = np.frombuffer(view, dtype=st.DTYPES[t.dtype][1]).reshape(r1 - r0, cols)
        part = arr[:, a:b].copy()   # always a copy: a one-row slice would be a view of the reused buffer
        w.write(part)
        progress(part.nbytes)


def _write_dequant(src, w, o, progress, rows_per_block=1024):
    arrays = []
    for t in o.srcs:
        arrays.append(st.read_array(src.fd(t.file), t))
    qw, qz, sc = arrays[:3]
    gi = arrays[3] if len(arrays) > 3 else None
    shape = gptq.infer_shape(qw.shape, qz.shape, sc.shape)
    per_word = 32 if shape.bits == 3 else 32 // shape.bits   # outputs per qzeros word (3-bit: 32 per 3 words)
    zw = 3 if shape.bits == 3 else 1
    step = max(per_word, rows_per_block - rows_per_block % per_word)
    for o0 in range(0, shape.out_features, step):
        o1 = min(shape.out_features, o0 + step)   # out_features is a whole number of qzeros words
        z0, z1 = o0 // per_word * zw, o1 // per_word * zw
        data = gptq.to_bf16(gptq.dequantize(qw[:, o0:o1], qz[:, z0:z1], sc[:, o0:o1], gi))
        w.write(data)
        progress(data.nbytes)


def _write_cast(src, w, o, ring, progress):
    """A plain F32/F16 tensor (or the rows of a split) rounded to bf16 (round to nearest even, as torch's
    .to(torch.bfloat16) and so vLLM's load), streamed in row blocks: memory stays flat for an embedding table."""
    (t,) = o.srcs
    item, npdt = st.DTYPES[t.dtype][0], st.DTYPES[t.dtype][1]
    row_elems = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    r0, r1 = o.rows if o.rows is not None else (0, t.shape[0] if t.shape else 1)
    row_bytes = row_elems * item
    block = max(1, CHUNK // row_bytes)
    fd = src.fd(t.file)
    for a in range(r0, r1, block):
        b = min(r1, a + block)
        buf, done = ring.next()
        done()   # the cast below is a new array; the buffer itself is never queued for hashing
        view = memoryview(buf)[: (b - a) * row_bytes]
        st.read_into(fd, view, t.begin + a * row_bytes, t)
        data = gptq.to_bf16(np.frombuffer(view, dtype=npdt))   # to_bf16 widens F16 itself; F32 is not copied
        w.write(data)
        progress(data.nbytes)


def _write_promote(src, w, o, progress):
    """A qweight / qzeros (or a column slice of one) re-packed at a wider bit width (gptq.promote_*)."""
    (t,) = o.srcs
    arr = st.read_array(src.fd(t.file), t)
    if o.cols is not None:
        arr = arr[:, o.cols[0]:o.cols[1]]
    bits, new_bits = o.promote
    try:
        data = np.ascontiguousarray(gptq.promote_packed(arr, bits, new_bits, o.name))
    except gptq.GPTQError as e:
        raise CheckpointError(os.path.basename(t.file), t.name, f"promoting to {o.name}: {e}") from None
    if tuple(data.shape) != tuple(o.shape) or data.dtype != np.int32:
        raise OutputError(f"{o.name}: promotion gave {data.dtype} {list(data.shape)}, planned {list(o.shape)}")
    w.write(data)
    progress(data.nbytes)


def write_shard(path_tmp, tensors, header, progress):
    """Write one output shard (``header``: its header bytes, :func:`shard_header`); returns (size, sha256)."""
    src = SourceFiles()
    ring = BufferRing(n=1)   # row blocks for column slices (copies go through the kernel)
    w = HashingWriter(path_tmp)
    try:
        w.write(header)
        i = 0
        while i < len(tensors):
            o = tensors[i]
            if o.op == COPY:
                t = o.srcs[0]
                begin, end = t.begin, t.end
                j = i + 1  # coalesce adjacent source ranges of the same file
                while j < len(tensors) and tensors[j].op == COPY and tensors[j].srcs[0].file == t.file and tensors[j].srcs[0].begin == end:
                    end = tensors[j].srcs[0].end
                    j += 1
                _copy_range(src, t.file, w, begin, end, progress)
                i = j
                continue
            if o.op == SLICE:
                _write_slice(src, w, o, ring, progress)
            elif o.op == DEQUANT:
                _write_dequant(src, w, o, progress)
            elif o.op == PROMOTE:
                _write_promote(src, w, o, progress)
            elif o.op == CAST:
                _write_cast(src, w, o, ring, progress)
            else:
                raise AssertionError(o.op)
            i += 1
        expected = len(header) + sum(o.nbytes for o in tensors)
        if w.size != expected:
            raise OutputError(f"{os.path.basename(path_tmp)}: wrote {w.size} bytes, planned {expected}")
        digest = w.close(sync=False)   # flushed to disk once, for all shards, before the manifest
    except BaseException:
        try:
            w.abort()
        finally:
            if os.path.exists(path_tmp):
                os.unlink(path_tmp)
        raise
    finally:
        src.close()
    return w.size, digest


# ---------------------------------------------------------------- whole run
def file_fingerprint(path):
    s = os.stat(path)
    return [s.st_size, s.st_mtime_ns]


def shard_recipe(plan: Plan, fname, tensors) -> str:
    """What a shard is made of: its layout and the fingerprints of the inputs it reads."""
    h = hashlib.sha256(f"{FORMAT}\n{fname}\n".encode())
    srcs = sorted({t.file for o in tensors for t in o.srcs})
    for p in srcs:
        h.update(f"{os.path.basename(p)} {file_fingerprint(p)}\n".encode())
    h.update("\n".join(f"{o.name} {o.dtype} {o.shape} {o.op} {o.cols} {o.rows} {o.promote} "
                       + " ".join(f"{t.name}@{t.begin}:{t.end}" for t in o.srcs) for o in tensors).encode())
    return h.hexdigest()


def _named(e: OSError, name: str) -> OSError:
    """``e`` naming the file being written: a write, flush or fsync error carries no file name of its own."""
    return e if e.filename is not None else OSError(e.errno, e.strerror or str(e), name)


def _write_failed(out_dir: str, e: OSError, unnamed: str = "") -> OutputError:
    """The exit-4 error of a failed write: the OS's words and the file (or what was being done)."""
    where = os.path.basename(str(e.filename)) if e.filename else unnamed
    return OutputError(f"writing into {out_dir} failed: {e.strerror or e}" + (f" ({where})" if where else ""))


def _write_file(path, chunks, sync=True):
    """Write ``chunks`` to ``.NAME.partial``, fsync (unless the caller syncs later), rename onto ``path``;
    returns the sha256 of the bytes."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for b in chunks:
                h.update(b)
                f.write(b)
                FAULT.tick(len(b))
            f.flush()
            if sync:
                os.fsync(f.fileno())
        FAULT.hold()                     # the test pause also holds the rename
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quiet(tmp)
        raise _named(e, os.path.basename(path)) from None
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return h.hexdigest()


def _atomic_write(path, data: bytes, sync=True):
    return _write_file(path, (data,), sync)


def _copy_file(src, dst, sync=True):
    def chunks():
        with open(src, "rb") as fi:
            while True:
                b = fi.read(CHUNK)
                if not b:
                    return
                yield b
    return _write_file(dst, chunks(), sync)


_OUR_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def _previous_outputs(out_dir):
    """Shard files an earlier m3-convert run wrote into out_dir: named in its journal, or in its
    SHA256SUMS when config.json there is m3-convert's. Only shard names; never anything else."""
    names = set()
    try:
        with open(os.path.join(out_dir, STATE_DIR, STATE_FILE)) as f:
            names |= set(json.load(f).get("shards", {}))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            ours = json.load(f).get("quantization_config", {}).get("format") == FORMAT
        if ours:
            with open(os.path.join(out_dir, "SHA256SUMS"), encoding="utf-8") as f:
                names |= {line.rstrip("\n").split("  ", 1)[-1] for line in f}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        pass
    return {n for n in names if isinstance(n, str) and _OUR_SHARD.match(n)}


def shard_file_bytes(plan: Plan, fname, tensors) -> int:
    """The exact size of an output shard: its header (as the writer writes it) and its tensors."""
    return len(shard_header(plan, fname, tensors)) + sum(o.nbytes for o in tensors)


def space_plan(plan: Plan, out_dir: str, resume: bool = False, workers: int = 1) -> dict:
    """What the run adds to OUT_DIR's filesystem at its peak, and what is free there (os.statvfs).

    needed = bytes to write (shards not kept by --resume, metadata, copied files, manifest)
             - bytes of files in OUT_DIR the run replaces or removes (freed once each is replaced)
             + the largest ``workers`` of those replaced shards (the old file stays until its successor's rename)."""
    state = {}
    if resume:
        try:
            with open(os.path.join(out_dir, STATE_DIR, STATE_FILE)) as f:
                state = json.load(f).get("shards", {})
        except (OSError, ValueError, AttributeError):
            state = {}
        state = state if isinstance(state, dict) else {}

    def size(name):
        try:
            return os.path.getsize(os.path.join(out_dir, name))
        except OSError:
            return None
    write = reclaim = 0
    replaced = []
    for fname, tensors in plan.shards:
        n = shard_file_bytes(plan, fname, tensors)
        old = size(fname)
        rec = state.get(fname)
        if isinstance(rec, dict) and old == n == rec.get("size") and rec.get("recipe") == shard_recipe(plan, fname, tensors):
            continue                                        # --resume keeps it (after re-hashing)
        write += n
        if old is not None:
            reclaim += old
            replaced.append(old)
    meta = [(f, os.path.getsize(os.path.join(plan.in_dir, f))) for f in plan.copied_files]
    index = 0 if len(plan.shards) == 1 else 64 + sum(len(o.name) + 40 for o in plan.tensors)
    meta += [("config.json", len(json_bytes(plan.out_config))), (INDEX_FILE, index),
             ("SHA256SUMS", 100 * (len(plan.shards) + len(plan.copied_files) + 4)), ("quantization_config.json", 1 << 16)]
    for f, n in meta:
        write += n
        old = size(f)
        reclaim += old or 0
    for stale in _previous_outputs(out_dir) - {f for f, _ in plan.shards}:
        reclaim += size(stale) or 0                         # removed by this run
    needed = max(0, write - reclaim + sum(sorted(replaced)[-workers:]))
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    st_ = os.statvfs(probe)
    mount = probe
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    free = int(os.environ.get("M3_CONVERT_FREE_BYTES") or st_.f_bavail * st_.f_frsize)     # (test-only hook)
    return {"needed_bytes": needed, "free_bytes": free, "filesystem": mount,
            "write_bytes": write, "reclaimed_bytes": reclaim}


def start_writeback(fd):
    """Start writing a finished file back to disk now, without waiting (Linux: POSIX_FADV_DONTNEED
    starts asynchronous writeback of dirty pages and drops clean ones), so that the fsync pass at the
    end finds little left to do and the page cache does not fill up with our output."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def prefetch(paths, budget):
    """Ask the kernel to read the first ``budget`` bytes of ``paths`` into the page cache, in the
    background (POSIX_FADV_WILLNEED, a hint: no data enters this process), while the planner works."""
    def run():
        left = budget
        for p in paths:
            if left <= 0:
                return
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                n = min(os.fstat(fd).st_size, left)
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_WILLNEED)
                left -= n
            except OSError:
                pass
            finally:
                os.close(fd)
    if hasattr(os, "posix_fadvise") and budget > 0:
        threading.Thread(target=run, name="m3-prefetch", daemon=True).start()


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


_MEMO_TYPES = (int, str, bool, type(None))


def json_bytes(obj) -> bytes:
    """Indented JSON, deterministic; large flat maps (index weight_map, per-module quant map) one
    entry per line through the C encoder (json's indent mode is pure Python and slow at 90k entries)."""
    return (_dump(obj, 0) + "\n").encode("utf-8")


def _dump(obj, level):
    if isinstance(obj, dict) and obj:
        pad = "  " * (level + 1)
        if len(obj) > 64:
            enc = json.encoder.encode_basestring
            memo = {}   # values repeat ({"bits": 4}, a shard name): each distinct one is encoded once

            def val(v):
                if isinstance(v, str):
                    return enc(v)
                # memoised only where equal keys print the same: str keys; int / str / bool / None
                # members, typed (True is not 1; floats, -0.0 == 0.0, are never memoised)
                if type(v) is not dict or len(v) > 2 or not all(type(k) is str and type(x) in _MEMO_TYPES for k, x in v.items()):
                    return json.dumps(v, ensure_ascii=False)
                key = tuple((k, type(x), x) for k, x in v.items())   # in order
                out = memo.get(key)
                if out is None:
                    out = memo[key] = json.dumps(v, ensure_ascii=False)
                return out
            items = [f"{pad}{enc(k)}: {val(v)}" for k, v in obj.items()]
        else:
            items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {_dump(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        pad = "  " * (level + 1)
        return "[\n" + ",\n".join(pad + _dump(v, level + 1) for v in obj) + "\n" + "  " * level + "]"
    return json.dumps(obj, ensure_ascii=False)


def _write_metadata(plan: Plan, out_dir: str) -> dict:
    """config.json, quantization_config.json, the copied non-weight files and the index (not fsynced
    here; ``run`` syncs every file before it writes SHA256SUMS). Returns {file: sha256}."""
    files = {"config.json": _atomic_write(os.path.join(out_dir, "config.json"), json_bytes(plan.out_config), sync=False)}
    if plan.write_quant_config_json:
        files["quantization_config.json"] = _atomic_write(os.path.join(out_dir, "quantization_config.json"),
                                                          json_bytes(plan.quant_config), sync=False)
    for f in plan.copied_files:
        files[f] = _copy_file(os.path.join(plan.in_dir, f), os.path.join(out_dir, f), sync=False)
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": sum(o.nbytes for _, ts in plan.shards for o in ts)},
                 "weight_map": {o.name: fname for fname, ts in plan.shards for o in ts}}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        files[INDEX_FILE] = _atomic_write(os.path.join(out_dir, INDEX_FILE), json_bytes(index), sync=False)
    return files


class _Background:
    """``fn(*args)`` on a thread; ``result()`` joins and returns its value or raises its exception."""

    def __init__(self, fn, *args):
        self._value = self._error = None
        self._t = threading.Thread(target=self._run, args=(fn, args), name="m3-metadata", daemon=True)
        self._t.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except BaseException as e:   # handed to the caller by result()
            self._error = e

    def wait(self):
        self._t.join()

    def result(self):
        self._t.join()
        if self._error is not None:
            raise self._error
        return self._value


def run(plan: Plan, out_dir: str, workers: int = 1, resume: bool = False, bar=None, log=print):
    """Execute ``plan`` into ``out_dir`` (already checked by the CLI), holding OUT_DIR's writer lock (WriterLock)
    from before anything there is written or removed to the end. Returns a summary dict."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise _write_failed(out_dir, e, out_dir) from None
    with WriterLock(out_dir):
        try:
            return _run(plan, out_dir, workers, resume, bar, log)
        except OSError as e:                  # (the shards' and the manifest's are named where they happen)
            raise _write_failed(out_dir, e) from None


def _load_journal(state_path, log) -> dict:
    """The journal an interrupted run left (--resume), or a fresh one when it is unreadable."""
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("shards"), dict):
        log("resume: journal unreadable, starting over")
        state = {"tool": FORMAT, "shards": {}}
    return state


def _run(plan: Plan, out_dir: str, workers: int, resume: bool, bar, log):
    """run, under the writer lock: the shards (kept by --resume when their journal entry and bytes agree), the
    metadata files beside them, then the manifest."""
    sums_path = os.path.join(out_dir, "SHA256SUMS")
    previous = _previous_outputs(out_dir)   # files an earlier m3-convert run wrote here (its manifest, journal)
    if os.path.exists(sums_path):
        os.unlink(sums_path)   # nothing may claim completeness while we work
    state_dir = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    state_path = os.path.join(state_dir, STATE_FILE)
    state = _load_journal(state_path, log) if resume and os.path.exists(state_path) else {"tool": FORMAT, "shards": {}}
    state_lock = threading.Lock()
    progress = Progress(bar)
    digests = {}
    reused = []

    todo = []
    for fname, tensors in plan.shards:
        rec = state["shards"].get(fname) if resume else None
        rec = rec if isinstance(rec, dict) else None
        path = os.path.join(out_dir, fname)
        if rec and os.path.isfile(path) and os.path.getsize(path) == rec.get("size") \
                and rec.get("recipe") == shard_recipe(plan, fname, tensors):
            if sha256_file(path) == rec.get("sha256"):     # re-checked, never trusted blindly
                digests[fname] = rec["sha256"]
                reused.append(fname)
                progress(sum(o.nbytes for o in tensors))
                continue
            log(f"resume: {fname} changed since it was written, redoing it")
        todo.append((fname, tensors))

    def one(item):
        fname, tensors = item
        recipe = shard_recipe(plan, fname, tensors)   # before reading: the input fingerprints this shard is made from
        tmp = os.path.join(out_dir, "." + fname + ".partial")
        try:
            with processing(fname):
                size, digest = write_shard(tmp, tensors, shard_header(plan, fname, tensors), progress)
        except OSError as e:
            raise _named(e, fname) from None
        FAULT.hold()                         # the test pause also holds the rename
        os.replace(tmp, os.path.join(out_dir, fname))
        with state_lock:
            state["shards"][fname] = {"recipe": recipe, "size": size, "sha256": digest}
            # atomic, not fsynced: a journal lost to a power cut only means redoing shards, and a shard
            # lost with a surviving journal fails --resume's re-hash and is redone
            _atomic_write(state_path, json_bytes(state), sync=False)
        return fname, digest

    # the metadata files depend on the plan only: written on a side thread while the shards stream
    # (synced with them below; SHA256SUMS, which claims completeness, is still written last)
    meta = _Background(_write_metadata, plan, out_dir)
    try:
        if workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=workers) as ex:
                for fname, digest in ex.map(one, todo):
                    digests[fname] = digest
        else:
            for item in todo:
                fname, digest = one(item)
                digests[fname] = digest
        files = dict(digests)
        files.update(meta.result())
    except OSError as e:
        meta.wait()
        raise _write_failed(out_dir, e) from None
    except BaseException:
        meta.wait()
        raise

    write_manifest(out_dir, files, previous, single_shard=len(plan.shards) == 1)
    shutil.rmtree(state_dir, ignore_errors=True)
    return {"written_shards": [f for f, _ in todo], "reused_shards": reused, "files": len(files), "resumed": resume}


def write_manifest(out_dir: str, files: dict, previous: set, single_shard: bool):
    """The last step: stale files of an earlier run removed, every file synced to disk, then SHA256SUMS
    ({file: sha256} in ``sha256sum -c`` format), the one file that claims the output complete."""
    try:
        if single_shard:
            stale = os.path.join(out_dir, INDEX_FILE)
            if os.path.exists(stale):
                os.unlink(stale)
        for stale in sorted(previous - set(files)):   # ours from an earlier run, not part of this output
            _unlink_quiet(os.path.join(out_dir, stale))
        # durability: every file reaches the disk before anything claims completeness (shards started
        # their writeback when finished; a shard torn by a power loss before this point is caught by
        # --resume, which re-hashes every shard against the journal)
        for f in files:
            _fsync_path(os.path.join(out_dir, f))
        sums = "".join(f"{files[f]}  {f}\n" for f in sorted(files))
        _fsync_path(out_dir)
        _atomic_write(os.path.join(out_dir, "SHA256SUMS"), sums.encode())
        _fsync_path(out_dir)
    except OSError as e:
        raise _write_failed(out_dir, e, "SHA256SUMS and the final sync") from None
