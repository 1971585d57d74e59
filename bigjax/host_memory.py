"""Keep freed host memory in the process (glibc malloc settings), so that XLA:CPU does not fault
in fresh pages for its temporaries on every step.

Why: XLA:CPU allocates one temporary arena per execution (1.6 GB for a ResNet-18 CIFAR step at
batch 64) and frees it at the end. glibc serves such a block with a fresh mmap (or, from a thread's
own arena, always with mmap), returns it to the kernel on free, and the next step faults all of it
in again, zero-filled: 400,000 minor page faults and ~1 s of system time per step on 2 cores
(notes/issue-12-perf.md). One arena served from the heap (brk), no mmap for large blocks and no
trimming of the heap's top keep those pages mapped from one step to the next: 0 faults.
The cost: the process keeps its peak heap until it exits, and all threads share one malloc arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# jax's accelerator plugins: where one is installed the step's temporaries live on the device
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def runs_on_cpu() -> bool:
    """Whether jax will compute on the host's CPU: JAX_PLATFORMS says cpu, or names nothing and no
    accelerator plugin is installed (looked up, not imported: jax must not start yet)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_PLUGINS)


def keep_freed_host_memory() -> bool:
    """Set glibc's malloc to reuse freed memory instead of returning it to the kernel. Call it
    before jax creates its CPU client (its threads pick their malloc arena on first use). Returns
    whether the settings were applied (False off Linux/glibc: nothing to do)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # the largest the int takes
