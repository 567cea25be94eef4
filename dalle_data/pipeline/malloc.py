"""Allocator settings for stages that allocate the same large arrays batch after batch.

Kept apart from the stages so that a worker process can run it as its initializer without
importing the stage (and pandas with it).
"""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next batch instead of handing it back to
    the kernel: every batch allocates the same large arrays again, and faulting their pages
    in afresh was a third of the filter's CPU time; this halves the page faults. (A no-op
    where libc is not glibc.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: arrays below it reuse the heap
    libc.mallopt(m_trim_threshold, 256 << 20)
    libc.mallopt(m_top_pad, 64 << 20)
