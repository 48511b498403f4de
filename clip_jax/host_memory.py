"""Host memory on XLA:CPU: keep freed memory for the next step instead of handing it back to the kernel.

XLA:CPU allocates a step's temporaries as one buffer (3.9 GB for B/32 at batch 32) with posix_memalign, from a
thread of its pool. glibc serves a request that large, in any arena but the main one, from a fresh mmap (the only
way a thread arena grows past 64 MB, whatever M_MMAP_MAX says) and unmaps it when freed, so every step faults the
whole buffer in again, page by page: ~950,000 page faults a step, and as much kernel time as compute on the 2-core
development machine (2-12 s of system time against ~10 s of user time, the more the busier the machine). With one
arena, no mmap and no trimming, the buffer is carved from the heap once and reused by every later step.

The price is that memory freed by the process stays in it (its resident size stays at its peak) and that all
threads share one arena, which is why this is for the CPU backend only: on a GPU or TPU the step's buffers live on
the device and the host runs the input pipeline. `dispatch_depth` is the other CPU-only choice: how many steps the
host dispatches ahead of the last finished one (none on the CPU, where overlapping steps compete for the cores).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _backend_started() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a private helper; without it, trust the caller to come first
        return False
    return backends_are_initialized()


def _accelerator_expected() -> bool:
    """Whether JAX will pick a GPU or TPU, judged without starting it: JAX_PLATFORMS if set, else the plugins
    installed (GPU plugins register under `jax_plugins`, TPU is the libtpu package)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def keep_freed_memory() -> bool:
    """On the CPU backend with glibc, before JAX starts: one malloc arena, no mmap, no trimming (see above).
    Returns whether it was applied; elsewhere, or once JAX has started its threads (each keeps the arena it first
    allocated from, so the big buffer would still be mapped afresh), it changes nothing."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _accelerator_expected() or _backend_started():
        return False
    libc = ctypes.CDLL(None)
    # -1 as glibc's size_t threshold is the largest one: never trim. The arena limit goes first, so that no thread
    # creates an arena of its own between the calls.
    applied = all(libc.mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if applied:
        log.debug("XLA:CPU host memory: one malloc arena, no mmap, no trimming")
    return applied


def dispatch_depth() -> int:
    """Steps (or evaluation batches) the host may dispatch beyond the last one known finished. On a GPU or TPU, two:
    the device never idles while the host launches the next step. On the CPU backend, none: the device is the
    host's own cores, so an overlapping step gains nothing and competes with the running one for cores and memory.
    Measured on the 2-core development machine, 2026-12-04: the trainer with B/32 at batch 32 (fp32, 14 steps)
    7.1 samples/s against 6.85 with two ahead, the demo's recipe the same with either (~630); a loop dispatching
    the same batch two steps ahead (benchmarks/train_step.py's, before it used this) took 9.9 s a step against
    4.8 s waiting for each, with 3.8 million page faults in 8 steps against none."""
    import jax

    return 0 if jax.default_backend() == "cpu" else 2
