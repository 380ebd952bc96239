"""Error types.  Every error names the file and, where there is one, the tensor.

Exit codes (the CLIs map exceptions to these):
  0  success
  1  verification failed (m3-verify findings)
  2  usage error (bad arguments, refused OUT_DIR: also one another m3-convert is writing)
  3  invalid or unsupported input checkpoint; also any exception no check anticipated (one line naming the
     file being processed; the traceback with M3_CONVERT_DEBUG=1 or --debug)
  4  I/O failure while writing (disk full, permission)
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_IO = 4

#: set to 1 (or pass --debug) to print the traceback of an unexpected exception before its one-line error
DEBUG_ENV = "M3_CONVERT_DEBUG"


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


@contextlib.contextmanager
def processing(name: str):
    """Name the file being processed on any unexpected exception that leaves the block (the innermost block names
    it): the CLIs print it in their one-line error (unexpected_error). The name travels on the exception, so it
    survives a worker thread."""
    try:
        yield
    except M3Error:
        raise
    except Exception as e:
        if getattr(e, "m3_file", None) is None:
            e.m3_file = name
        raise


def report_unexpected(tool: str, e: BaseException, debug: bool = False) -> int:
    """For a CLI's last ``except Exception``: the one-line error on stderr (its traceback first with ``debug`` or
    M3_CONVERT_DEBUG=1); returns the exit code, EXIT_INPUT."""
    if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    print(unexpected_error(tool, e), file=sys.stderr)
    return EXIT_INPUT


def unexpected_error(tool: str, e: BaseException) -> str:
    """The one line a CLI prints for an exception no check anticipated (exit EXIT_INPUT)."""
    where = getattr(e, "m3_file", None)
    text = str(e).splitlines()[0] if str(e) else ""
    return (f"{tool}: error: {where + ': ' if where else ''}unexpected {type(e).__name__}" + (f": {text}" if text else "")
            + f" (an input {tool} does not understand, or a bug: {DEBUG_ENV}=1 or --debug shows the traceback)")
