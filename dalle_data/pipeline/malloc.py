"""Allocator settings for stages that allocate the same large arrays batch after batch.

Kept apart from the stages so that a worker process can run it as its initializer without
importing the stage (and pandas with it).
"""

from __future__ import annotations

import contextlib
import ctypes

# GLIBC_TUNABLES's names of the settings mallopt can also change in a running process.
_MALLOPT = {
    "glibc.malloc.trim_threshold": -1,  # M_TRIM_THRESHOLD
    "glibc.malloc.top_pad": -2,  # M_TOP_PAD
    "glibc.malloc.mmap_threshold": -3,  # M_MMAP_THRESHOLD
}
# mmap_threshold: glibc's largest, so arrays below it reuse the heap.
KEEP_FREED = (
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
    ":glibc.malloc.top_pad=67108864"
)


def set_tunables(tunables: str) -> None:
    """Apply the malloc settings of ``tunables`` (GLIBC_TUNABLES's syntax) to this process:
    glibc reads the variable only when a program starts, so a forked process (and one that
    was not started with it) needs mallopt. Other settings are left to the variable. (A
    no-op where libc is not glibc.)"""
    wanted: list[tuple[int, int]] = []
    for name, _, text in (item.partition("=") for item in tunables.split(":")):
        with contextlib.suppress(KeyError, ValueError):  # glibc ignores what it can't read too
            wanted.append((_MALLOPT[name], int(text, 0)))
    if not wanted:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option, value in wanted:
        libc.mallopt(option, value)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next batch instead of handing it back to
    the kernel: every batch allocates the same large arrays again, and faulting their pages
    in afresh was a third of the filter's CPU time; this halves the page faults."""
    set_tunables(KEEP_FREED)
