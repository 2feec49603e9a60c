"""The one place that decides how dpm's CPU kernels are compiled.

Caching policy:
- Compiled kernels are cached on disk (numba's cache=True): a warm start skips the 2-4 s of compiling.
  numba keys the cache on the content of the file that defines a kernel, so a kernel may call only
  kernels from its own file: a cached caller never sees a changed helper from another file.
- Where no cache directory is writable (a read-only install with no writable HOME and no
  NUMBA_CACHE_DIR), numba refuses cache=True at import; dpm then compiles in memory instead of failing.
- DPM_JIT_CACHE=0 turns the disk cache off (for example to time a cold start).
Kernels are single-threaded and release the GIL (nogil): parallel=True costs seconds of compiling for no
gain at these sizes. A batch uses the cores through fixed chunks that two Python threads share, BLAS held
to one thread meanwhile (cpu_train.train_chunks).
Scalar equations (cpu_kernels.coef_at, kl_coord, ...) are `scalar` kernels, inlined into their callers;
the few that the host calls for a number NumPy used to compute are `strict` (no fastmath).
"""
import os

import numba

# No nnan/ninf: a NaN must survive to the divergence check. reassoc lets reductions vectorise.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
CACHE = os.environ.get("DPM_JIT_CACHE", "1") != "0"


def kernel(fn, **extra):
    """numba.njit with dpm's options; falls back to an in-memory compile where caching is impossible."""
    opts = dict(dict(fastmath=FASTMATH, error_model="numpy", nogil=True), **extra)
    if CACHE:
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            pass
    return numba.njit(cache=False, **opts)(fn)


def scalar(fn):
    """A kernel for one scalar equation, inlined into its callers in numba's IR (inline="always")."""
    return kernel(fn, inline="always")


def strict(fn):
    """A kernel for one scalar equation that the host calls: plain IEEE arithmetic in the written order (no
    fastmath), so that it gives the same number as the NumPy expression it replaces."""
    return kernel(fn, fastmath=False)
