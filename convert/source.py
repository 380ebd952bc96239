"""Reading the source checkpoint: the files (from the index, never a glob), config.json and the quantization
config, and every safetensors header, each checked against the index. Headers and JSON only: no tensor data.
The planner (:mod:`.plan`) starts here."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass

from . import st
from .errors import CheckpointError, processing
from .quantcfg import SourceQuantConfig
from .st import INDEX_FILE, SINGLE_FILE

#: a tensor file AutoRound may write beside the shards, outside the index
EXTRA_FILE = "model_extra_tensors.safetensors"
#: files the converter writes itself; never copied from the input
GENERATED = {"config.json", "quantization_config.json", INDEX_FILE, "SHA256SUMS"}


@dataclass
class Source:
    """The source checkpoint as read before planning: its configs and every header, in index order."""
    in_dir: str
    cfg: dict                   # config.json
    qcfg: SourceQuantConfig     # its quantization config (config.json's or quantization_config.json)
    has_qjson: bool             # quantization_config.json exists
    files: list                 # tensor files, from the index
    headers: dict               # file -> st.Header
    file_rank: dict             # absolute path -> index of the file (output order)


def read_source(in_dir: str) -> Source:
    """Configs first (named in errors as config.json), then every header against the index."""
    with processing("config.json"):
        cfg, qcfg, has_qjson = load_configs(in_dir)
    files, headers = read_sources(in_dir)
    return Source(in_dir, cfg, qcfg, has_qjson, files, headers,
                  {os.path.join(in_dir, f): i for i, f in enumerate(files)})


def _load_json(path, what):
    fname = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(fname, None, f"cannot read {what}: {e.strerror}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(fname, None, f"{what} is not valid JSON: {e}") from None


def _safe_name(fname, where):
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname
            or "\x00" in fname or os.path.isabs(fname)):
        raise CheckpointError(where, None, f"file name {fname!r} is not a plain file name inside IN_DIR")
    return fname


def input_files(in_dir: str):
    """Shard files from the index (never a glob), plus model_extra_tensors.safetensors."""
    idx_path = os.path.join(in_dir, INDEX_FILE)
    weight_map = None
    if os.path.exists(idx_path):
        idx = _load_json(idx_path, "index")
        if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
            raise CheckpointError(INDEX_FILE, None, "no weight_map object")
        weight_map = idx["weight_map"]
        distinct = set()
        for fname in weight_map.values():
            if type(fname) is str and fname in distinct:
                continue                     # each distinct name is checked once
            distinct.add(_safe_name(fname, INDEX_FILE))   # refuses a non-string before it is hashed
        files = sorted(distinct)
    elif os.path.exists(os.path.join(in_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(os.path.basename(in_dir.rstrip("/")) or in_dir, None, f"no {INDEX_FILE} and no {SINGLE_FILE}")
    if os.path.exists(os.path.join(in_dir, EXTRA_FILE)) and EXTRA_FILE not in files:
        files.append(EXTRA_FILE)
    for fname in files:
        if not os.path.isfile(os.path.join(in_dir, fname)):
            raise CheckpointError(fname, None, f"listed in {INDEX_FILE} but absent from IN_DIR")
    others = sorted(f for f in os.listdir(in_dir) if f.endswith(".safetensors") and f not in files)
    if others:
        raise CheckpointError(others[0], None, f"safetensors file not referenced by {INDEX_FILE}: refusing to guess whether it is part of the checkpoint")
    return files, weight_map


def load_configs(in_dir: str):
    cfg_path = os.path.join(in_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError("config.json", None, "missing")
    cfg = _load_json(cfg_path, "config")
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json", None, "not a JSON object")
    qc = cfg.get("quantization_config")
    qpath = os.path.join(in_dir, "quantization_config.json")
    has_qjson = os.path.exists(qpath)
    if has_qjson:
        qj = _load_json(qpath, "quantization_config.json")
        if qc is None:
            qc = qj
        elif qj != qc:
            raise CheckpointError("quantization_config.json", None, "differs from config.json's quantization_config: refusing to choose")
    if qc is None:
        raise CheckpointError("config.json", "quantization_config", "missing (not an AutoRound/GPTQ checkpoint?)")
    return cfg, SourceQuantConfig(qc, "quantization_config.json" if has_qjson and "quantization_config" not in cfg else "config.json"), has_qjson


def read_sources(in_dir: str):
    files, weight_map = input_files(in_dir)
    headers = {}
    for f in files:
        with processing(f):
            headers[f] = st.read_header(os.path.join(in_dir, f))
    listed: dict = defaultdict(set)          # file -> tensor names the index places there
    if weight_map is not None:
        for tname, fname in weight_map.items():
            listed[fname].add(tname)
    n_total = sum(len(h.tensors) for h in headers.values())
    consistent = len(set().union(*(h.tensors.keys() for h in headers.values()))) == n_total and (
        weight_map is None or all(headers[f].tensors.keys() == listed[f] if f != EXTRA_FILE else listed[f] <= headers[f].tensors.keys()
                                  for f in files))
    if consistent:                           # the common case, checked with set operations
        return files, headers
    seen = {}                                # else find the first offending tensor, for the message
    for fname in files:
        for tname in headers[fname].tensors:
            if tname in seen:
                raise CheckpointError(fname, tname, f"same tensor also in {seen[tname]}")
            seen[tname] = fname
            if weight_map is not None and fname != EXTRA_FILE and weight_map.get(tname) != fname:
                if tname not in weight_map:
                    raise CheckpointError(fname, tname, f"not listed in {INDEX_FILE}")
                raise CheckpointError(fname, tname, f"{INDEX_FILE} places it in {weight_map[tname]!r}")
    for tname, fname in weight_map.items():
        if tname not in headers[fname].tensors:
            raise CheckpointError(fname, tname, f"listed in {INDEX_FILE} but not in the file's header")
    raise AssertionError("inconsistent index with no offending tensor")


def _fname(t: st.TensorInfo) -> str:
    return os.path.basename(t.file)


def other_files(in_dir, shard_files):
    """Non-weight files copied byte for byte (tokenizer, templates, LICENSE, ...), and the hidden
    entries left out (``.gitattributes``, ``.cache/``: reported in the summary, never silently)."""
    skip = set(shard_files) | GENERATED
    out, hidden = [], []
    for f in sorted(os.listdir(in_dir)):
        p = os.path.join(in_dir, f)
        if f in skip:
            continue
        if f.startswith("."):
            hidden.append(f)
            continue
        if os.path.isfile(p):
            out.append(f)
        else:
            raise CheckpointError(f, None, "sub-directories in IN_DIR are not supported (not copied); move or remove it")
    return out, hidden
