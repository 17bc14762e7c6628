"""Keep freed host memory in the process (glibc malloc) for runs on the CPU backend.

XLA:CPU allocates every execution's temporaries afresh on its worker threads, and glibc gives such blocks back to
the kernel when they are freed (large chunks are mmap'd, thread arenas are trimmed). Each train step then
page-faults all its temporaries in again: 1.75 GB per step on `benchmarks/compare_torch.py`'s mid model, 0.9 to
4.7 s of kernel time per 7-10 s step on our KVM machines (docs/PERFORMANCE.md). One arena, no mmap'd chunks and
no trimming below 2 GiB keep those pages in the process for the next step. The process's footprint stays at its
peak, which a training or benchmark process reaches every step anyway.

It has to run before JAX starts its CPU client: a thread that already has an arena keeps it. Off glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_BELOW = 2 ** 31 - 1  # bytes of free memory at the heap's top kept before trimming (mallopt takes an int)


def keep_freed_memory() -> bool:
  """Tell glibc to keep freed memory for reuse; True when it took the settings."""
  if os.name != "posix":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BELOW)))


def cpu_only_run(env=None) -> bool:
  """True when the environment (default: os.environ) pins JAX to the CPU (JAX_PLATFORMS=cpu), known before JAX
  starts."""
  env = os.environ if env is None else env
  return env.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu"
