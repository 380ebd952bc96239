"""Error types.  Every error names the file and, where there is one, the tensor.

Exit codes (the CLI maps exceptions to these):
  0  success
  1  verification failed (m3-verify findings)
  2  usage error (bad arguments, refused OUT_DIR)
  3  invalid or unsupported input checkpoint
  4  I/O failure while writing (disk full, permission)
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_IO = 4


class M3Error(Exception):
    exit_code = EXIT_INPUT


class CheckpointError(M3Error):
    """Bad input: names the file and the tensor."""

    def __init__(self, file, tensor, msg):
        self.file, self.tensor, self.msg = file, tensor, msg
        where = f"{file}" + (f": {tensor}" if tensor else "")
        super().__init__(f"{where}: {msg}")


class UsageError(M3Error):
    exit_code = EXIT_USAGE


class OutputError(M3Error):
    exit_code = EXIT_IO
