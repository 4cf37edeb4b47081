"""Numba compile flags for every kernel, in one place.

``JIT`` is for serial kernels, ``PJIT`` for kernels parallel over rows (``prange``).
``fastmath`` is off by default: it lets LLVM contract ``a*b+c`` into an FMA and
reassociate sums, which changes the activation quantizer's rounding (it must
match :func:`mer_cli.kernels.quantize_activation` bit for bit). Kernels whose
numpy-twin tests allow summation-order differences use ``FAST``/``PFAST``
(``nnan``-free fastmath: contraction and reassociation only, so infinities and
NaNs still propagate the way numpy's do).
"""

from __future__ import annotations

import os

import numba
import numpy as np

#: fastmath flags that keep inf/nan semantics (``-inf`` masks in attention).
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}

JIT = {"nogil": True, "cache": True}
PJIT = {"nogil": True, "cache": True, "parallel": True}
FAST = {**JIT, "fastmath": FASTMATH}
PFAST = {**PJIT, "fastmath": FASTMATH}


def frozen(a: np.ndarray, dtype=None) -> np.ndarray:
    """C-contiguous read-only view (or copy, if needed) of ``a``.

    Numba compiles a separate specialization for read-only and writeable
    arrays; passing every input read-only compiles each kernel once whether
    its weights come from a memmap, a slab or a test array.
    """
    v = np.ascontiguousarray(a, dtype=dtype).view()
    v.flags.writeable = False
    return v


def call_sized(work: int, min_parallel: int, fn, *args):
    """``fn(*args)`` on one thread when ``work < min_parallel``, else on all.

    A parallel region ends when every worker thread has run its share, so on a
    busy machine a tiny kernel can wait a whole scheduler slice (milliseconds,
    measured here) for a worker to get a core; small work runs alone instead.
    """
    n = numba.get_num_threads()
    if work >= min_parallel or n == 1:
        return fn(*args)
    numba.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(n)


#: multiply-adds below which a product runs on the calling thread alone
#: (see call_sized; switching the thread count costs ~5 us)
MIN_PARALLEL_MACS = 1 << 20


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads in parallel kernels (``None``: all cores numba sees).

    Returns the number now in use. Numba's setting is per calling thread, so a
    worker thread that runs kernels should call this itself.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = limit
    n = max(1, min(int(n), limit))
    numba.set_num_threads(n)
    return n


def get_threads() -> int:
    """Threads the parallel kernels use when called from this thread."""
    return numba.get_num_threads()


def single_blas_thread() -> None:
    """Keep numpy's BLAS (OpenBLAS, MKL, ...) on the calling thread, process-wide.

    mer's heavy products are numba kernels on numba's thread pool; what numpy's
    BLAS sees is small (attention at decode, norms, predictors, sketches). A
    multi-threaded BLAS call leaves its workers spinning after it returns, on
    the cores the kernels need, and none of that shows in the caller's timing:
    streamed decode with the mlp+preview predictor on the widened store ran
    at 0.84-0.89x prefetch-off with OpenBLAS's 2 threads and 1.03-1.09x with
    one (same run, 2-core machine); train-predictor's batched MLP products took
    60 ms with the threads against 0.65 ms without on a busy 2-core machine.
    Called by ``Engine`` and the CLI.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# MER_THREADS caps the default (e.g. for benchmarks beside other work).
if os.environ.get("MER_THREADS"):
    set_threads(int(os.environ["MER_THREADS"]))
