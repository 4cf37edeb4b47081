"""CPU feature detection and the choice of kernel path.

Paths, fastest first:

* ``vnni512``: AVX-512 VNNI ``vpdpbusd`` on 512-bit vectors (needs avx512f,
  avx512bw and avx512vnni, plus f16c for the fp16 scales).
* ``avx2``: ``vpmaddubsw`` + ``vpmaddwd`` on 256-bit vectors, the technique
  llama.cpp uses on AVX2 (needs avx2, fma and f16c).
* ``generic``: plain numba loops that LLVM vectorizes for whatever the host
  is (any x86-64, ARM).

The environment variable ``MER_KERNEL_PATH`` (``vnni512``, ``avx2`` or
``generic``) forces a path for tests and benchmarks; forcing a path the CPU
cannot run is an error rather than a crash inside LLVM.
"""

from __future__ import annotations

import functools
import os

from mer_cli.errors import UnsupportedError

PATHS = ("vnni512", "avx2", "generic")
_NEEDS = {
    "vnni512": ("avx512f", "avx512bw", "avx512vnni", "f16c", "fma"),
    "avx2": ("avx2", "fma", "f16c"),
    "generic": (),
}
ENV = "MER_KERNEL_PATH"


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """Instruction-set features of this CPU as LLVM names them (``avx2``, ...)."""
    import llvmlite.binding as llvm

    try:
        feats = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot query this host (some ARM kernels)
        return frozenset()
    return frozenset(k for k, on in feats.items() if on)


def supported_paths() -> tuple[str, ...]:
    """Paths this CPU can execute, fastest first."""
    have = host_features()
    return tuple(p for p in PATHS if all(f in have for f in _NEEDS[p]))


def missing_features(path: str) -> tuple[str, ...]:
    """CPU features ``path`` needs that this host lacks (empty if runnable)."""
    have = host_features()
    return tuple(f for f in _NEEDS[path] if f not in have)


def check_path(path: str) -> str:
    """Validate a path name and that this CPU can run it; return it."""
    if path not in PATHS:
        raise UnsupportedError(
            f"{ENV}={path!r} is not a kernel path; expected one of "
            f"{', '.join(PATHS)} (or unset it to pick the fastest automatically)"
        )
    miss = missing_features(path)
    if miss:
        raise UnsupportedError(
            f"kernel path {path!r} needs CPU features {', '.join(miss)} that this "
            f"CPU lacks; use one of {', '.join(supported_paths())} "
            f"(or unset {ENV})"
        )
    return path


def best_path() -> str:
    """The path kernels use: ``$MER_KERNEL_PATH`` if set, else the fastest one."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        return check_path(forced)
    return supported_paths()[0]
