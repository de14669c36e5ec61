"""glibc allocator settings for CPU inference: serve large buffers from the heap and keep freed memory for reuse.

`keep_freed_memory()` calls `mallopt(M_MMAP_MAX, 0)` (no mmap for big blocks) and raises `M_TRIM_THRESHOLD` (no
returning the heap top to the OS after every free). Both are what `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`
would set at start-up, applied from Python so every entry point gets them. The cost: resident memory stays at its
peak instead of shrinking between batches. Set `FSAD_DEFAULT_MALLOC=1` to keep glibc's defaults (e.g. to compare).
Elsewhere (macOS, musl, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap top is kept
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("FSAD_DEFAULT_MALLOC", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied


def is_applied() -> bool:
    return bool(_applied)
